"""LoRA recipe: adapters only in the language model, full copies of the MaskCMA heads, trained [SEG] rows, and a
merge whose outputs equal the unmerged model's."""

from __future__ import annotations

import pytest
import torch
from peft import PeftModel, get_peft_model
from torch import nn

from transformers_maskcma.data.synthetic import SyntheticConfig, generate_synthetic
from transformers_maskcma.processing.processing_maskcma import MaskCMAProcessor
from transformers_maskcma.tiny import build_tiny_model
from transformers_maskcma.trainer.callbacks import active_cma, set_warmup_factor
from transformers_maskcma.trainer.data import ProcessedRecords
from transformers_maskcma.trainer.lora import (
    apply_lora,
    default_lora_config,
    language_model_prefix,
    lm_head_is_tied,
    merge_lora,
)

PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@pytest.fixture(scope="module")
def sample_inputs():
    model, tokenizer = build_tiny_model(seed=0)
    processor = MaskCMAProcessor.from_model_config(model.config, tokenizer)
    records = generate_synthetic(1, SyntheticConfig(video_fraction=0.0, seed=11), show_progress=False)
    return ProcessedRecords(records, processor)[0]


def _perturb_trainable(model: nn.Module, seed: int = 0) -> None:
    """LoRA B matrices start at zero and the copies equal the originals: move every trainable tensor so that the
    merge has something to fold in."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in model.parameters():
            if parameter.requires_grad:
                parameter.add_(0.05 * torch.randn(parameter.shape, generator=generator))


def test_default_config_targets_only_the_language_model():
    model, _ = build_tiny_model(seed=0)
    config = default_lora_config(model)
    assert (config.r, config.lora_alpha, config.lora_dropout) == (128, 256, 0.05)
    prefix = language_model_prefix(model)
    assert prefix == "vlm.model.language_model"
    targets = sorted(config.target_modules)
    num_layers = model.config.vlm_config.get_text_config().num_hidden_layers
    expected = sorted(
        f"{prefix}.layers.{layer}.{'self_attn' if name.endswith(('q_proj', 'k_proj', 'v_proj', 'o_proj')) else 'mlp'}.{name}"
        for layer in range(num_layers)
        for name in PROJECTIONS
    )
    assert targets == expected
    assert set(config.modules_to_save) == {"cma", "seg_proj", "text_proj", "sam2.mask_decoder"}
    assert config.trainable_token_indices == {f"{prefix}.embed_tokens": [model.config.seg_token_id]}


def test_conv_prior_head_is_fully_trained_when_present():
    model, _ = build_tiny_model(seed=0, mask_source="conv")
    assert "prior_head" in default_lora_config(model).modules_to_save


def test_trainable_parameters_after_apply_lora():
    model, _ = build_tiny_model(seed=0)
    peft_model = apply_lora(model, default_lora_config(model, r=4, lora_alpha=8))
    trainable = [name for name, p in peft_model.named_parameters() if p.requires_grad]
    assert trainable
    for name in trainable:
        assert (
            "lora_" in name
            or ".modules_to_save.default." in name
            or "trainable_tokens_delta" in name
        ), name
    assert not any("vision_tower" in name or "vision_encoder" in name for name in trainable)
    assert any(name.startswith("base_model.model.cma.modules_to_save") for name in trainable)
    assert any("sam2.mask_decoder.modules_to_save" in name for name in trainable)
    # the tied LM head reads the trained [SEG] row from the embedding's adapter
    base = peft_model.get_base_model()
    head_adapter = base.vlm.get_output_embeddings().token_adapter
    assert head_adapter.tied_adapter is base.get_input_embeddings().token_adapter


def test_lora_merge_gives_the_same_outputs(sample_inputs):
    model, _ = build_tiny_model(seed=0)
    peft_model = apply_lora(model, default_lora_config(model, r=4, lora_alpha=8))
    _perturb_trainable(peft_model)
    peft_model.eval()
    with torch.no_grad():
        before = peft_model(**sample_inputs)
        merged = merge_lora(peft_model)
        assert type(merged).__name__ == "MaskCMAModel"
        assert not any("lora_" in name or "modules_to_save" in name for name, _ in merged.named_parameters())
        after = merged(**sample_inputs)
    for field in ("logits", "pred_masks", "prior_masks", "seg_embeds", "loss", "lm_loss", "mask_bce"):
        torch.testing.assert_close(getattr(after, field), getattr(before, field), rtol=1e-4, atol=1e-5, msg=field)
    # the merge changed the model (the adapters were not zero)
    fresh, _ = build_tiny_model(seed=0)
    with torch.no_grad():
        original = fresh.eval()(**sample_inputs)
    assert (original.logits - after.logits).abs().max() > 1e-3


def test_untied_lm_head_gets_its_own_trained_rows(sample_inputs):
    model, _ = build_tiny_model(seed=0)
    head = model.vlm.get_output_embeddings()
    head.weight = nn.Parameter(head.weight.detach().clone())  # untie
    assert not lm_head_is_tied(model)
    config = default_lora_config(model, r=4, lora_alpha=8)
    assert set(config.trainable_token_indices) == {"vlm.model.language_model.embed_tokens", "vlm.lm_head"}
    peft_model = get_peft_model(model, config)
    _perturb_trainable(peft_model, seed=1)
    peft_model.eval()
    with torch.no_grad():
        before = peft_model(**sample_inputs)
        after = merge_lora(peft_model)(**sample_inputs)
    torch.testing.assert_close(after.logits, before.logits, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(after.pred_masks, before.pred_masks, rtol=1e-4, atol=1e-5)


def test_warmup_factor_reaches_the_trained_cma_copy():
    model, _ = build_tiny_model(seed=0)
    peft_model = apply_lora(model, default_lora_config(model, r=4, lora_alpha=8))
    set_warmup_factor(peft_model, 0.25)
    running = active_cma(peft_model)
    assert running is peft_model.get_base_model().cma.modules_to_save["default"]
    assert running.warmup_factor == 0.25


def test_errors_name_the_problem():
    model, _ = build_tiny_model(seed=0)
    with pytest.raises(ValueError, match="no linear layer named"):
        default_lora_config(model, projection_names=["query_key_value"])
    with pytest.raises(ValueError, match="outside the vocabulary"):
        default_lora_config(model, new_token_ids=[10_000])
    with pytest.raises(TypeError, match="expects a peft PeftModel"):
        merge_lora(model)
    assert isinstance(apply_lora(model), PeftModel)
