import pytest
from transformers import AutoConfig, InternVLConfig, Sam2VideoConfig

from transformers_maskcma import MaskCMAConfig
from transformers_maskcma.modeling import MaskCMAAttentionConfig
from transformers_maskcma.tiny import tiny_config


def test_defaults_are_the_research_code_behaviour():
    config = tiny_config()
    assert config.mask_source == "pred"
    assert isinstance(config.cma_config, MaskCMAAttentionConfig)
    assert config.cma_config.direction == "visual_to_text"
    assert config.cma_topk_tokens == 2
    assert config.cma_config.gate == "output"
    assert config.cma_config.warmup_target == "residual"
    assert config.warmup_ratio == 0.1
    assert config.cma_config.num_heads == 8
    assert config.cma_config.dropout == 0.0
    assert (config.tmc_weight, config.tmc_temperature) == (0.1, 0.15)
    assert config.use_cma is True
    assert isinstance(config.vlm_config, InternVLConfig)
    assert isinstance(config.sam2_config, Sam2VideoConfig)


def test_default_sub_configs_are_internvl_and_sam2():
    config = MaskCMAConfig()
    assert config.vlm_config.model_type == "internvl"
    assert config.sam2_config.model_type == "sam2_video"
    assert config.seg_embed_dim == 256


def test_save_and_load_round_trip(tmp_path):
    config = tiny_config(
        mask_source="conv", cma_topk_tokens=None, cma_config={"gate": "attention", "num_heads": 4}, warmup_ratio=0.3
    )
    config.save_pretrained(tmp_path)
    loaded = AutoConfig.from_pretrained(tmp_path)
    assert isinstance(loaded, MaskCMAConfig)
    saved, restored = config.to_dict(), loaded.to_dict()
    restored.pop("_name_or_path"), saved.pop("_name_or_path")
    assert restored == saved
    assert loaded.cma_topk_tokens is None
    assert isinstance(loaded.cma_config, MaskCMAAttentionConfig)
    assert (loaded.cma_config.gate, loaded.cma_config.num_heads) == ("attention", 4)
    assert loaded.vlm_config.text_config.hidden_size == config.vlm_config.text_config.hidden_size
    assert loaded.sam2_config.vision_config.backbone_feature_sizes == config.sam2_config.vision_config.backbone_feature_sizes


@pytest.mark.parametrize(
    "field, value, message",
    [
        ("mask_source", "box", r"mask_source='box' is not valid; allowed values are \['pred', 'conv', 'gt'\]"),
        ("cma_topk_tokens", 0, r"cma_topk_tokens=0 is not valid; use an integer >= 1, or None"),
        ("cma_topk_tokens", -3, r"cma_topk_tokens=-3"),
        ("warmup_ratio", 1.5, r"warmup_ratio=1.5 is not valid; it must lie in \[0, 1\]"),
        ("warmup_ratio", -0.1, r"warmup_ratio=-0.1"),
        ("tmc_temperature", 0.0, r"tmc_temperature=0.0 is not valid"),
        ("tmc_weight", -1.0, r"tmc_weight=-1.0 is not valid"),
    ],
)
def test_invalid_values_raise_naming_field_value_and_allowed(field, value, message):
    with pytest.raises(ValueError, match=message):
        tiny_config(**{field: value})


def test_invalid_value_in_saved_config_raises_on_load(tmp_path):
    import json

    tiny_config().save_pretrained(tmp_path)
    path = tmp_path / "config.json"
    data = json.loads(path.read_text())
    data["mask_source"] = "oracle"
    path.write_text(json.dumps(data))
    with pytest.raises(ValueError, match="mask_source='oracle'"):
        MaskCMAConfig.from_pretrained(tmp_path)


@pytest.mark.parametrize(
    "field, value, message",
    [
        ("direction", "both", r"MaskCMAAttentionConfig.direction='both'.*\['visual_to_text', 'text_to_visual'\]"),
        ("gate", "input", r"MaskCMAAttentionConfig.gate='input'.*\['output', 'attention'\]"),
        ("warmup_target", "gamma", r"MaskCMAAttentionConfig.warmup_target='gamma'.*\['residual', 'mask'\]"),
        ("num_heads", 7, r"num_heads=7 is not valid; it must divide SAM2's embedding width 256"),
        ("num_heads", 0, r"num_heads=0 is not valid"),
        ("dropout", 1.0, r"dropout=1.0 is not valid; it must lie in \[0, 1\)"),
    ],
)
def test_invalid_cma_values_raise_naming_field_value_and_allowed(field, value, message):
    with pytest.raises(ValueError, match=message):
        tiny_config(cma_config={field: value})


def test_flat_cma_fields_of_older_configs_move_into_the_sub_config():
    old_style = tiny_config(cma_direction="text_to_visual", cma_gate="attention", cma_warmup_target="mask",
                            cma_num_heads=4, cma_dropout=0.1)
    nested = tiny_config(cma_config={"direction": "text_to_visual", "gate": "attention", "warmup_target": "mask",
                                     "num_heads": 4, "dropout": 0.1})
    assert old_style.to_dict() == nested.to_dict()
    assert "cma_direction" not in old_style.to_dict()
    with pytest.raises(ValueError, match=r"MaskCMAAttentionConfig.direction='both' is not valid"):
        tiny_config(cma_direction="both")
    with pytest.raises(ValueError, match=r"both cma_config and the flat fields \['cma_gate'\].*\['gate'\]"):
        tiny_config(cma_config={"direction": "text_to_visual"}, cma_gate="attention")


def test_a_config_saved_with_flat_cma_fields_loads_into_the_sub_config(tmp_path):
    import json

    tiny_config().save_pretrained(tmp_path)
    path = tmp_path / "config.json"
    data = json.loads(path.read_text())
    del data["cma_config"]
    data.update(cma_direction="text_to_visual", cma_gate="attention", cma_num_heads=2)
    path.write_text(json.dumps(data))
    loaded = MaskCMAConfig.from_pretrained(tmp_path)
    assert (loaded.cma_config.direction, loaded.cma_config.gate, loaded.cma_config.num_heads) == (
        "text_to_visual", "attention", 2
    )
    assert loaded.cma_config.warmup_target == "residual"
