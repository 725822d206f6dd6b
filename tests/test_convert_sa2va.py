"""`maskcma convert sa2va`: a Sa2VA checkpoint folder → MaskCMA with the CMA at γ = 0.

The Sa2VA-format fixture is generated from the tiny MaskCMA model's weights through the *inverse* naming, written
here by hand from the Sa2VA remote-code layout (InternViT `vision_model.*` with fused `attn.qkv`, `mlp1.{0,1,3}`,
`language_model.model.*`, `text_hidden_fcs.{0,2}`) and, for SAM2, from the official → transformers rules of
`convert_sam2` read backwards (their parity against the official `sam2` package is tested in test_convert_sam2).
The vision path of the converted model is also checked against an independent forward of the original InternViT
layout computed here from the Sa2VA tensors, and the converted folder, run as a user runs it (its own processor and
`segment`), against Sa2VA's conventions computed independently (tests/sa2va_reference.py).

Like the releases, the fixture's `config.json` names Sa2VA's remote code in `auto_map` (so a plain `AutoTokenizer`
call asks whether to run it) and its tokenizer's chat template adds a system turn that Sa2VA does not use.
"""

from __future__ import annotations

import copy
import json
import re
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from transformers import AutoModel, AutoProcessor, AutoTokenizer, TokenizersBackend

from transformers_maskcma.cli import main
from transformers_maskcma.hub_cards.convert_sa2va import (
    CONVERSION_REPORT_NAME,
    Sa2VAConversionError,
    build_sa2va_model,
    convert_sa2va_checkpoint,
)
from transformers_maskcma.hub_cards.convert_sam2 import SAM2_SIZE_PRESETS, sam2_key_rules
from transformers_maskcma.modeling import MaskCMAModel
from transformers_maskcma.modeling.modeling_maskcma import forced_answer_generate_kwargs
from transformers_maskcma.processing.processing_maskcma import DEFAULT_CHAT_TEMPLATE
from transformers_maskcma.processing.samples import draw_sample_shapes
from transformers_maskcma.tiny import (
    TINY_IMAGE_SEQ_LENGTH,
    build_tiny_model,
    build_tiny_processor,
    tiny_config,
    tiny_vlm_config,
)

from sa2va_reference import (
    gradient_image,
    image_blocks,
    internvl_tiles,
    sa2va_masks,
    sa2va_prompt,
    sam2_reference,
)

VIT = "vlm.model.vision_tower"
# a Qwen-style tokenizer template: it adds a default system turn, which Sa2VA's own prompt does not have
SYSTEM_CHAT_TEMPLATE = (
    "{% if messages[0]['role'] != 'system' %}<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}"
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


# --------------------------------------------------------------------------------------------------------------
# Building a Sa2VA-format checkpoint from the tiny model
# --------------------------------------------------------------------------------------------------------------


def vlm_to_sa2va(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Inverse naming of the VLM, the projector, the LLM and the [SEG] projection (hand-written)."""
    out: dict[str, torch.Tensor] = {}
    layer_ids = sorted({int(m.group(1)) for k in state if (m := re.match(rf"{VIT}\.encoder\.layer\.(\d+)\.", k))})
    out["vision_model.embeddings.class_embedding"] = state[f"{VIT}.embeddings.cls_token"]
    out["vision_model.embeddings.position_embedding"] = state[f"{VIT}.embeddings.position_embeddings"]
    for p in ("weight", "bias"):
        out[f"vision_model.embeddings.patch_embedding.{p}"] = state[f"{VIT}.embeddings.patch_embeddings.projection.{p}"]
    for i in layer_ids:
        src, dst = f"{VIT}.encoder.layer.{i}", f"vision_model.encoder.layers.{i}"
        out[f"{dst}.attn.qkv.weight"] = torch.cat(
            [state[f"{src}.attention.{n}_proj.weight"] for n in ("q", "k", "v")], dim=0
        )
        if f"{src}.attention.q_proj.bias" in state:
            out[f"{dst}.attn.qkv.bias"] = torch.cat([state[f"{src}.attention.{n}_proj.bias"] for n in ("q", "k", "v")])
        for p in ("weight", "bias"):
            out[f"{dst}.attn.proj.{p}"] = state[f"{src}.attention.projection_layer.{p}"]
            out[f"{dst}.mlp.fc1.{p}"] = state[f"{src}.mlp.fc1.{p}"]
            out[f"{dst}.mlp.fc2.{p}"] = state[f"{src}.mlp.fc2.{p}"]
            if f"{src}.layernorm_before.{p}" in state:  # RMS norms have no bias
                out[f"{dst}.norm1.{p}"] = state[f"{src}.layernorm_before.{p}"]
                out[f"{dst}.norm2.{p}"] = state[f"{src}.layernorm_after.{p}"]
        for n in ("q", "k"):
            if f"{src}.attention.{n}_norm.weight" in state:
                out[f"{dst}.attn.{n}_norm.weight"] = state[f"{src}.attention.{n}_norm.weight"]
        out[f"{dst}.ls1"] = state[f"{src}.lambda_1"]
        out[f"{dst}.ls2"] = state[f"{src}.lambda_2"]
    for index, name in ((0, "layer_norm"), (1, "linear_1"), (3, "linear_2")):
        for p in ("weight", "bias"):
            out[f"mlp1.{index}.{p}"] = state[f"vlm.model.multi_modal_projector.{name}.{p}"]
    for key, value in state.items():
        if key.startswith("vlm.model.language_model."):
            out["language_model.model." + key[len("vlm.model.language_model.") :]] = value
    # tied LM head: like Qwen2.5-0.5B, the release stores no language_model.lm_head.weight
    for index in (0, 2):
        for p in ("weight", "bias"):
            out[f"text_hidden_fcs.{index}.{p}"] = state[f"seg_proj.{index}.{p}"]
    return {key: value.clone() for key, value in out.items()}


def sam2_to_official(model: MaskCMAModel) -> dict[str, torch.Tensor]:
    """The transformers Sam2VideoModel weights under their official names, with the convert_sam2 rules reversed."""
    config = model.config.sam2_config
    arch = replace(
        SAM2_SIZE_PRESETS["tiny"],
        mask_downsampler_stride=config.mask_downsampler_stride,
        mask_downsampler_total_stride=config.mask_downsampler_total_stride,
    )
    rules = sam2_key_rules(arch, video=True)
    out: dict[str, torch.Tensor] = {}
    for key, tensor in model.sam2.state_dict().items():
        sources = next(found for rule in rules if (found := rule.map_target(key, tensor.shape)) is not None)
        if len(sources) == 1:
            out[sources[0]] = tensor.clone()
        else:  # rows of one transformers tensor are separate official embeddings
            for row, source in enumerate(sources):
                out[source] = tensor[row : row + 1].clone()
    # Sa2VA's HF export renames every `.gamma` (here the memory fuser's layer scale) to `.g_weight`
    renamed = {re.sub(r"\.gamma$", ".g_weight", key): value for key, value in out.items()}
    assert len(renamed) == len(out) and any(key.endswith(".g_weight") for key in renamed)
    return {f"grounding_encoder.sam2_model.{key}": value for key, value in renamed.items()}


def sa2va_config(model: MaskCMAModel) -> dict:
    vlm = model.config.vlm_config
    vision = vlm.vision_config
    llm = vlm.text_config.to_dict()
    llm["architectures"] = ["Qwen2ForCausalLM"]
    return {
        "architectures": ["Sa2VAChatModel"],
        "model_type": "sa2va_chat",
        "auto_map": {
            "AutoConfig": "configuration_sa2va_chat.Sa2VAChatConfig",
            "AutoModel": "modeling_sa2va_chat.Sa2VAChatModel",
        },
        "template": "qwen_chat",
        "downsample_ratio": vlm.downsample_ratio,
        "select_layer": -1,
        "ps_version": "v2",
        "force_image_size": vision.image_size[0],
        "dynamic_image_size": True,
        "use_thumbnail": True,
        "vision_config": {
            "architectures": ["InternVisionModel"],
            "hidden_size": vision.hidden_size,
            "num_hidden_layers": vision.num_hidden_layers,
            "num_attention_heads": vision.num_attention_heads,
            "intermediate_size": vision.intermediate_size,
            "image_size": vision.image_size[0],
            "patch_size": vision.patch_size[0],
            "qkv_bias": vision.attention_bias,
            "qk_normalization": vision.use_qk_norm,
            "norm_type": vision.norm_type,
            "layer_norm_eps": vision.layer_norm_eps,
            "hidden_act": vision.hidden_act,
            "initializer_factor": 0.1,
        },
        "llm_config": llm,
    }


def write_sa2va_folder(folder: Path, model: MaskCMAModel, tokenizer, weights: dict, config: dict | None = None) -> Path:
    """Two shards + index, config.json and the tokenizer, as in the releases."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(config or sa2va_config(model)))
    tokenizer = copy.deepcopy(tokenizer)
    tokenizer.chat_template = SYSTEM_CHAT_TEMPLATE
    tokenizer.save_pretrained(folder)
    names = sorted(weights)
    shards = {"model-00001-of-00002.safetensors": names[::2], "model-00002-of-00002.safetensors": names[1::2]}
    weight_map = {}
    for shard, keys in shards.items():
        save_file({key: weights[key].contiguous() for key in keys}, folder / shard)
        weight_map.update({key: shard for key in keys})
    (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return folder


@pytest.fixture(scope="module")
def tiny_source():
    """The tiny model with every weight perturbed (no trivial zero/one tensors) and its Sa2VA-format weights."""
    model, tokenizer = build_tiny_model(seed=11)
    generator = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(0.02 * torch.randn(parameter.shape, generator=generator))
        # transformers keeps the official random-Fourier matrix twice; a converted SAM2 has two equal copies
        model.sam2.shared_image_embedding.positional_embedding.copy_(
            model.sam2.prompt_encoder.shared_embedding.positional_embedding
        )
    model.eval()
    weights = {**vlm_to_sa2va(model.state_dict()), **sam2_to_official(model)}
    return model, tokenizer, weights


@pytest.fixture(scope="module")
def sa2va_dir(tiny_source, tmp_path_factory):
    model, tokenizer, weights = tiny_source
    return write_sa2va_folder(tmp_path_factory.mktemp("sa2va") / "Sa2VA-tiny", model, tokenizer, weights)


@pytest.fixture(scope="module")
def sam2_config_file(tiny_source, tmp_path_factory):
    model, _, _ = tiny_source
    path = tmp_path_factory.mktemp("sam2cfg") / "config.json"
    model.config.sam2_config.to_json_file(path)
    return path


@pytest.fixture(scope="module")
def converted(sa2va_dir, sam2_config_file, tmp_path_factory):
    output = tmp_path_factory.mktemp("converted") / "maskcma"
    code = main(["convert", "sa2va", str(sa2va_dir), "--output", str(output), "--sam2-config", str(sam2_config_file),
                 "--no-progress"])  # fmt: skip
    assert code == 0
    return output


# --------------------------------------------------------------------------------------------------------------
# Tests
# --------------------------------------------------------------------------------------------------------------


def test_every_source_key_is_mapped_and_only_cma_modules_are_new(converted, tiny_source):
    model, _, weights = tiny_source
    report = json.loads((converted / CONVERSION_REPORT_NAME).read_text())
    assert set(report["mapped"]) == set(weights)
    assert report["num_source_keys"] == len(weights) and report["dropped"] == {}
    expected_new = {k for k in model.state_dict() if k.startswith(("cma.", "text_proj."))} | {"vlm.lm_head.weight"}
    assert set(report["added"]["keys"]) == expected_new
    targets = {target for targets in report["mapped"].values() for target in targets}
    assert targets.isdisjoint(expected_new)
    assert targets | expected_new == set(model.state_dict())
    assert report["tie_word_embeddings"] is True


def test_converted_weights_equal_the_source_weights(converted, tiny_source):
    model, _, _ = tiny_source
    loaded = MaskCMAModel.from_pretrained(converted)  # strict: every weight present
    source, result = model.state_dict(), loaded.state_dict()
    assert set(source) == set(result)
    for key, value in source.items():
        if key.startswith(("cma.", "text_proj.")):
            continue
        assert torch.equal(value, result[key]), key
    assert loaded.cma.gamma.item() == 0.0
    assert loaded.config.use_cma is True
    assert loaded.config.seg_token_id == 6 and loaded.config.vlm_config.image_token_id == 5


def test_converted_masks_equal_the_sa2va_path_at_gamma_zero(converted, tiny_source):
    """At γ = 0 the two-pass CMA decoding reproduces the single Sa2VA pass (`use_cma=False`) exactly."""
    model, tokenizer, _ = tiny_source
    loaded = MaskCMAModel.from_pretrained(converted).eval()
    plain = MaskCMAModel(replace_config(model.config, use_cma=False)).eval()
    plain.load_state_dict(model.state_dict())
    processor = build_tiny_processor(tokenizer)
    generator = torch.Generator().manual_seed(3)
    image = (torch.rand(40, 56, 3, generator=generator) * 255).to(torch.uint8).numpy()
    masks = [(torch.rand(40, 56, generator=generator) > 0.5).numpy() for _ in range(2)]
    inputs = processor(images=image, text="Please segment the red circle.", answer="It is [SEG] and [SEG].",
                       masks=masks)  # fmt: skip
    with torch.no_grad():
        expected = plain(**inputs)
        got = loaded(**inputs)
    assert got.pred_masks.shape == (2, 32, 32)
    assert torch.equal(got.pred_masks, expected.pred_masks)
    assert torch.equal(got.iou_scores, expected.iou_scores)
    assert got.prior_masks is not None and torch.equal(got.prior_masks, expected.pred_masks)
    # γ ≠ 0 changes the masks: the CMA really runs on this path
    with torch.no_grad():
        loaded.cma.gamma.fill_(1.0)
        assert not torch.equal(loaded(**inputs).pred_masks, expected.pred_masks)


def replace_config(config, **changes):
    copy = config.__class__.from_dict(config.to_dict())
    for name, value in changes.items():
        setattr(copy, name, value)
    return copy


def internvit_reference(weights: dict, config: dict, pixel_values: torch.Tensor) -> torch.Tensor:
    """The original InternViT + pixel shuffle (v2) + mlp1 forward, written from the Sa2VA layout (fused qkv)."""
    vision = config["vision_config"]
    heads, dim = vision["num_attention_heads"], vision["hidden_size"]
    v = "vision_model."
    x = F.conv2d(pixel_values, weights[f"{v}embeddings.patch_embedding.weight"],
                 weights[f"{v}embeddings.patch_embedding.bias"], stride=vision["patch_size"])  # fmt: skip
    x = x.flatten(2).transpose(1, 2)
    cls = weights[f"{v}embeddings.class_embedding"].expand(x.shape[0], 1, dim)
    x = torch.cat([cls, x], dim=1) + weights[f"{v}embeddings.position_embedding"]
    eps = vision["layer_norm_eps"]

    def rms_norm(states, weight):
        return weight * states * torch.rsqrt(states.pow(2).mean(-1, keepdim=True) + eps)

    def norm(states, prefix):
        if vision["norm_type"] == "rms_norm":
            return rms_norm(states, weights[prefix + ".weight"])
        return F.layer_norm(states, (dim,), weights[prefix + ".weight"], weights[prefix + ".bias"], eps)

    for i in range(vision["num_hidden_layers"]):
        p = f"{v}encoder.layers.{i}."
        h = norm(x, p + "norm1")
        qkv = h @ weights[p + "attn.qkv.weight"].T
        if vision["qkv_bias"]:
            qkv = qkv + weights[p + "attn.qkv.bias"]
        batch, length, _ = h.shape
        q, k, val = qkv.reshape(batch, length, 3, heads, dim // heads).permute(2, 0, 3, 1, 4)
        if vision["qk_normalization"]:  # RMS norm over all heads together, as InternViT-6B does
            q = rms_norm(q.transpose(1, 2).flatten(-2), weights[p + "attn.q_norm.weight"])
            k = rms_norm(k.transpose(1, 2).flatten(-2), weights[p + "attn.k_norm.weight"])
            q = q.view(batch, length, heads, dim // heads).transpose(1, 2)
            k = k.view(batch, length, heads, dim // heads).transpose(1, 2)
        attention = ((q * (dim // heads) ** -0.5) @ k.transpose(-2, -1)).softmax(-1)
        out = (attention @ val).transpose(1, 2).reshape(batch, length, dim)
        out = out @ weights[p + "attn.proj.weight"].T + weights[p + "attn.proj.bias"]
        x = x + out * weights[p + "ls1"]
        h = norm(x, p + "norm2")
        h = F.gelu(h @ weights[p + "mlp.fc1.weight"].T + weights[p + "mlp.fc1.bias"])
        h = h @ weights[p + "mlp.fc2.weight"].T + weights[p + "mlp.fc2.bias"]
        x = x + h * weights[p + "ls2"]
    x = x[:, 1:]
    side = int(x.shape[1] ** 0.5)
    x = x.reshape(x.shape[0], side, side, dim)
    # pixel shuffle 'v2' with scale 0.5: (n, w, h, c) → (n, w/2, h/2, 4c), height and width swapped back
    n, w, h, c = x.shape
    x = x.reshape(n, w, h // 2, c * 2).permute(0, 2, 1, 3).reshape(n, h // 2, w // 2, c * 4).permute(0, 2, 1, 3)
    x = x.reshape(n, -1, c * 4)
    x = F.layer_norm(x, (c * 4,), weights["mlp1.0.weight"], weights["mlp1.0.bias"], 1e-5)
    x = F.gelu(x @ weights["mlp1.1.weight"].T + weights["mlp1.1.bias"])
    return x @ weights["mlp1.3.weight"].T + weights["mlp1.3.bias"]


def test_vision_path_matches_an_independent_internvit_forward(converted, tiny_source, sa2va_dir):
    _, _, weights = tiny_source
    config = json.loads((sa2va_dir / "config.json").read_text())
    loaded = MaskCMAModel.from_pretrained(converted).eval()
    pixel_values = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(9))
    with torch.no_grad():
        expected = internvit_reference(weights, config, pixel_values)
        got = loaded.vlm.model.get_image_features(
            pixel_values, vision_feature_layer=-1, vision_feature_select_strategy="default"
        ).pooler_output
    assert got.shape == expected.shape == (2, 16, 64)
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)


def test_vision_variant_with_qkv_bias_qk_norm_and_rms_norm(tmp_path):
    """The InternViT options of the larger releases: qkv bias (InternViT-300M), RMS norms and q/k normalisation
    (InternViT-6B)."""
    vlm_config = tiny_vlm_config()
    vlm_config.vision_config.attention_bias = True
    vlm_config.vision_config.use_qk_norm = True
    vlm_config.vision_config.norm_type = "rms_norm"
    model, tokenizer = build_tiny_model(seed=4, vlm_config=vlm_config)
    generator = torch.Generator().manual_seed(6)
    with torch.no_grad():
        for parameter in model.vlm.parameters():
            parameter.add_(0.05 * torch.randn(parameter.shape, generator=generator))
    weights = {**vlm_to_sa2va(model.state_dict()), **sam2_to_official(model)}
    assert "vision_model.encoder.layers.0.attn.q_norm.weight" in weights
    folder = write_sa2va_folder(tmp_path / "Sa2VA-6B-like", model, tokenizer, weights)
    config = json.loads((folder / "config.json").read_text())
    conversion = build_sa2va_model(folder, sam2_config=model.config.sam2_config, show_progress=False)
    assert set(conversion.mapped) == set(weights)
    pixel_values = torch.randn(1, 3, 64, 64, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        expected = internvit_reference(weights, config, pixel_values)
        got = conversion.model.vlm.model.get_image_features(
            pixel_values, vision_feature_layer=-1, vision_feature_select_strategy="default"
        ).pooler_output
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)


def test_not_a_sa2va_folder_is_refused(tmp_path, tiny_source):
    model, tokenizer, _ = tiny_source
    with pytest.raises(FileNotFoundError, match="does not exist"):
        build_sa2va_model(tmp_path / "absent")
    with pytest.raises(FileNotFoundError, match="no config.json"):
        build_sa2va_model(tmp_path)
    saved = tmp_path / "maskcma"
    model.save_pretrained(saved)
    with pytest.raises(Sa2VAConversionError, match="not a Sa2VA checkpoint.*model_type='maskcma'"):
        build_sa2va_model(saved)
    code = main(["convert", "sa2va", str(saved), "--output", str(tmp_path / "out")])
    assert code == 2 and not (tmp_path / "out").exists()


def test_unsupported_llm_and_incomplete_checkpoints_are_refused(tmp_path, tiny_source, sam2_config_file):
    model, tokenizer, weights = tiny_source
    config = sa2va_config(model)
    config["llm_config"] = {**config["llm_config"], "architectures": ["InternLM2ForCausalLM"]}
    folder = write_sa2va_folder(tmp_path / "internlm", model, tokenizer, {}, config)
    with pytest.raises(Sa2VAConversionError, match="InternLM2ForCausalLM"):
        build_sa2va_model(folder)

    partial = {k: v for k, v in weights.items() if not k.startswith("text_hidden_fcs.")}
    folder = write_sa2va_folder(tmp_path / "no_seg_proj", model, tokenizer, partial)
    with pytest.raises(Sa2VAConversionError, match=r"no weight starts with \['text_hidden_fcs.'\]"):
        build_sa2va_model(folder, sam2_config=model.config.sam2_config)

    missing_key = "grounding_encoder.sam2_model.sam_mask_decoder.iou_token.weight"
    incomplete = {k: v for k, v in weights.items() if k != missing_key}
    folder = write_sa2va_folder(tmp_path / "no_iou", model, tokenizer, incomplete)
    with pytest.raises(Sa2VAConversionError, match="sam_mask_decoder.iou_token.weight"):
        build_sa2va_model(folder, sam2_config=model.config.sam2_config)


def test_unknown_source_keys_are_reported(tmp_path, tiny_source):
    model, tokenizer, weights = tiny_source
    extra = {**weights, "vision_model.encoder.layers.0.attn.extra_scale": torch.ones(3)}
    folder = write_sa2va_folder(tmp_path / "extra", model, tokenizer, extra)
    with pytest.raises(Sa2VAConversionError, match="1 Sa2VA key.*attn.extra_scale.*--skip-unmapped"):
        build_sa2va_model(folder, sam2_config=model.config.sam2_config, show_progress=False)
    output = convert_sa2va_checkpoint(
        folder, tmp_path / "out", sam2_config=model.config.sam2_config, skip_unmapped=True, show_progress=False
    )
    report = json.loads((output / CONVERSION_REPORT_NAME).read_text())
    assert list(report["dropped"]) == ["vision_model.encoder.layers.0.attn.extra_scale"]
    assert len(report["mapped"]) == len(weights)


# --------------------------------------------------------------------------------------------------------------
# Sa2VA's conventions in the converted folder
# --------------------------------------------------------------------------------------------------------------

PROMPT = "Please segment the red circle."


def release_tokenizer(sa2va_dir):
    """The release's tokenizer as Sa2VA's remote code reads it (its own files, its own chat template)."""
    return TokenizersBackend.from_pretrained(sa2va_dir)


def test_converted_folder_saves_sa2va_conventions(converted):
    saved = json.loads((converted / "processor_config.json").read_text())
    assert saved["video_frame_labels"] is False and saved["image_placeholder"] == "<image>"
    assert saved["num_key_frames"] == 5 and saved["key_frame_sampling"] == "first"
    assert saved["sam_resample"] == "bicubic" and saved["mask_intermediate_size"] == 128
    assert saved["sam_normalization"] == "sa2va_bfloat16"  # Sa2VA's arithmetic: bfloat16
    assert saved["sam_image_mean"] == [0.485, 0.456, 0.406] and saved["sam_image_std"] == [0.229, 0.224, 0.225]
    tiles = saved["image_processor"]
    assert tiles["crop_to_patches"] is True and (tiles["min_patches"], tiles["max_patches"]) == (1, 12)
    assert tiles["resample"] == 3  # PIL bicubic
    assert tiles["image_mean"] == [0.485, 0.456, 0.406] and tiles["image_std"] == [0.229, 0.224, 0.225]
    assert (converted / "chat_template.jinja").read_text() == DEFAULT_CHAT_TEMPLATE
    assert json.loads((converted / "config.json").read_text())["mask_intermediate_size"] == 128
    report = json.loads((converted / CONVERSION_REPORT_NAME).read_text())
    assert report["conventions"]["config"] == {"mask_intermediate_size": 128}
    assert report["conventions"]["processor"]["video_frame_labels"] is False


def test_converted_prompt_ids_are_sa2va_prompts_tokenized_whole(converted, sa2va_dir):
    """Sa2VA tokenizes its whole prompt at once: `tokenizer.encode(sa2va_prompt(text with <image> replaced))`."""
    processor = AutoProcessor.from_pretrained(converted, trust_remote_code=True)
    tokenizer = release_tokenizer(sa2va_dir)
    image, _ = draw_sample_shapes("shapes")  # 192×128 → a 3×2 grid + thumbnail
    blocks = image_blocks([7], TINY_IMAGE_SEQ_LENGTH)
    cases = {
        f"<image>{PROMPT}": sa2va_prompt(f"{blocks}{PROMPT}"),  # Sa2VA's README style
        f"<image>\n{PROMPT}": sa2va_prompt(f"{blocks}\n{PROMPT}"),  # Sa2VA's training style
        PROMPT: sa2va_prompt(f"{blocks}\n{PROMPT}"),  # no placeholder: the training style
    }
    for text, expected in cases.items():
        assert processor(images=image, text=text)["input_ids"][0].tolist() == tokenizer.encode(expected), text
    # the release tokenizer's own template would have added a system turn
    rendered = tokenizer.apply_chat_template([{"role": "user", "content": "x"}], tokenize=False)
    assert "You are a helpful assistant." in rendered
    # video: the first 5 frames, one tile each, blocks joined by new lines without labels
    frames = [gradient_image(96, 64, seed=seed) for seed in range(7)]
    video = processor(videos=frames, text=f"<image>{PROMPT}")
    expected = sa2va_prompt(image_blocks([1] * 5, TINY_IMAGE_SEQ_LENGTH) + PROMPT)
    assert video["input_ids"][0].tolist() == tokenizer.encode(expected)


def forced(processor, input_ids, answer: str) -> dict:
    ids = processor.tokenizer(answer, add_special_tokens=False).input_ids
    return forced_answer_generate_kwargs([ids], input_ids.shape[1], processor.end_of_turn_token_id)


def test_converted_folder_run_as_a_user_gives_sa2va_masks(converted, sa2va_dir):
    """The folder's own processor + `segment` against Sa2VA's pipeline recomputed independently: the same token ids,
    the same tiles and SAM2 input, and the masks of Sa2VA's 256 → 1024 → image-size chain."""
    processor = AutoProcessor.from_pretrained(converted, trust_remote_code=True)
    model = AutoModel.from_pretrained(converted, trust_remote_code=True).eval()
    image, _ = draw_sample_shapes("shapes")
    text = f"<image>{PROMPT}"
    user = processor(images=image, text=text)

    tiles = internvl_tiles(image, 64, 12)
    ids = release_tokenizer(sa2va_dir).encode(sa2va_prompt(image_blocks([len(tiles)], TINY_IMAGE_SEQ_LENGTH) + PROMPT))
    sam = sam2_reference(image, 128)
    assert user["input_ids"][0].tolist() == ids
    np.testing.assert_allclose(user["pixel_values"].numpy(), tiles, atol=1e-5)
    np.testing.assert_array_equal(user["sam_pixel_values"][0].numpy(), sam)

    reference_inputs = {
        "input_ids": torch.tensor([ids]),
        "attention_mask": torch.ones(1, len(ids), dtype=torch.long),
        "pixel_values": torch.from_numpy(tiles),
        "sam_pixel_values": torch.from_numpy(sam).float()[None],
        "original_sizes": torch.tensor([[128, 192]]),
        "text_token_mask": user["text_token_mask"],
    }
    with torch.no_grad():
        got = model.segment(**user, **forced(processor, user["input_ids"], "Sure, [SEG] and [SEG]."))
        reference = model.segment(**reference_inputs, **forced(processor, user["input_ids"], "Sure, [SEG] and [SEG]."))
    assert processor.decode_answers(got.answer_ids) == ["Sure, [SEG] and [SEG]."]
    torch.testing.assert_close(got.mask_logits[0], reference.mask_logits[0], rtol=0, atol=1e-5)
    expected = sa2va_masks(reference.mask_logits[0], 128, 128, 192)
    assert got.masks[0].shape == (2, 128, 192)
    assert torch.equal(got.masks[0], expected)
    assert 0 < int(expected.sum()) < expected.numel()  # a real mask, neither empty nor full
    one_step = F.interpolate(got.mask_logits[0][:, None], size=(128, 192), mode="bilinear", align_corners=False)
    assert not torch.equal(got.masks[0], one_step[:, 0] > 0)  # the two chains differ on these logits
    assert torch.equal(processor.post_process_masks(got.mask_logits, user["original_sizes"])[0], expected)


def test_converted_video_masks_follow_sa2va_chain_on_every_frame(converted, sa2va_dir):
    processor = AutoProcessor.from_pretrained(converted, trust_remote_code=True)
    model = AutoModel.from_pretrained(converted, trust_remote_code=True).eval()
    frames = [gradient_image(96, 64, seed=seed) for seed in range(7)]
    video = processor(videos=frames, text=f"<image>{PROMPT}")
    assert video["key_frame_indices"].tolist() == [0, 1, 2, 3, 4]
    key_tiles = np.concatenate([internvl_tiles(frame, 64, 1) for frame in frames[:5]])
    np.testing.assert_allclose(video["pixel_values"].numpy(), key_tiles, atol=1e-5)
    for index in range(7):
        np.testing.assert_array_equal(video["video_frames"][index].numpy(), sam2_reference(frames[index], 128, True))
    answer = processor.tokenizer("Sure, [SEG].", add_special_tokens=False).input_ids
    with torch.no_grad():
        out = model.segment(**video, answer_ids=[answer])
    assert out.masks[0].shape == (1, 7, 64, 96)
    assert torch.equal(out.masks[0], sa2va_masks(out.mask_logits[0], 128, 64, 96))


def test_mask_intermediate_size_is_validated():
    assert tiny_config().mask_intermediate_size is None  # our models: one upsampling step
    assert tiny_config(mask_intermediate_size=1024).mask_intermediate_size == 1024
    for bad in (0, -3, 2.5, True, "1024"):
        with pytest.raises(ValueError, match=r"mask_intermediate_size=.* is not valid; use a positive integer"):
            tiny_config(mask_intermediate_size=bad)


def test_convert_never_asks_to_run_remote_code(sa2va_dir, sam2_config_file, tmp_path, capsys):
    """The release's `auto_map` makes a plain `AutoTokenizer` call ask "run the custom code? [y/N]"; the converter
    reads the tokenizer without it. Under pytest stdin is closed: a prompt is printed, then its read fails."""
    AutoTokenizer.from_pretrained(sa2va_dir)
    assert "Do you wish to run the custom code? [y/N]" in capsys.readouterr().out  # the fixture reproduces it
    output = tmp_path / "out"
    code = main(["convert", "sa2va", str(sa2va_dir), "--output", str(output), "--sam2-config", str(sam2_config_file),
                 "--no-progress"])  # fmt: skip
    captured = capsys.readouterr()
    assert code == 0 and (output / "processor_config.json").is_file()
    assert "[y/N]" not in captured.out + captured.err and "custom code" not in captured.out + captured.err


def test_a_remote_code_tokenizer_class_is_read_from_tokenizer_json(sa2va_dir, tmp_path, tiny_source):
    from transformers_maskcma.hub_cards.convert_sa2va import load_sa2va_tokenizer

    model, tokenizer, _ = tiny_source
    folder = tmp_path / "remote-tokenizer"
    folder.mkdir()
    tokenizer.save_pretrained(folder)
    settings = json.loads((folder / "tokenizer_config.json").read_text())
    settings["tokenizer_class"] = "Sa2VATokenizer"
    settings["auto_map"] = {"AutoTokenizer": ["tokenization_sa2va.Sa2VATokenizer", None]}
    (folder / "tokenizer_config.json").write_text(json.dumps(settings))
    loaded = load_sa2va_tokenizer(folder)
    assert type(loaded) is TokenizersBackend
    sample = "<img><IMG_CONTEXT></img>Please segment the red circle.<|im_end|>"
    assert loaded.encode(sample) == tokenizer.encode(sample)
    (folder / "tokenizer.json").unlink()
    with pytest.raises(Sa2VAConversionError, match="exists only as remote code.*tokenizer.json"):
        load_sa2va_tokenizer(folder)


def test_a_non_chatml_template_is_refused(tmp_path, tiny_source):
    model, tokenizer, weights = tiny_source
    config = sa2va_config(model)
    config["template"] = "phi3_chat"
    folder = write_sa2va_folder(tmp_path / "phi3", model, tokenizer, {}, config)
    with pytest.raises(Sa2VAConversionError, match=r"template='phi3_chat'.*\['qwen_chat', 'internlm2_chat'\]"):
        build_sa2va_model(folder)
