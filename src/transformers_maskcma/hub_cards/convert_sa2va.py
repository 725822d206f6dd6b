"""Convert a Sa2VA checkpoint (its Hugging Face remote-code release) into a MaskCMA model with the CMA at γ = 0.

A Sa2VA folder (e.g. `ByteDance/Sa2VA-4B`) holds `config.json` (`model_type: "sa2va_chat"`, with the InternViT
`vision_config`, the LLM's `llm_config`, `downsample_ratio`, `select_layer`, `ps_version`, `template`), the
tokenizer and safetensors weights (`model.safetensors` or shards with `model.safetensors.index.json`) under five
prefixes:

===============================  ===============================================  ==================================
Sa2VA key prefix                 module (original remote-code layout)             MaskCMA key
===============================  ===============================================  ==================================
`vision_model.`                  InternViT (`embeddings`, `encoder.layers.{i}`,   `vlm.model.vision_tower.`
                                 fused `attn.qkv`, `ls1`/`ls2`, `norm1`/`norm2`)  (transformers' native InternVL)
`mlp1.{0,1,3}.`                  LayerNorm → Linear → GELU → Linear               `vlm.model.multi_modal_projector`
`language_model.model.` /        the LLM (`Qwen2ForCausalLM`, ...)                `vlm.model.language_model.` /
`language_model.lm_head.`                                                         `vlm.lm_head.`
`grounding_encoder.sam2_model.`  SAM2 in the official `sam2` naming               `sam2.` (transformers Sam2Video)
`text_hidden_fcs.{0,2}.`         Linear → ReLU → Linear → Dropout(0)              `seg_proj.{0,2}.`
===============================  ===============================================  ==================================

The SAM2 keys are renamed with the rules of `convert_sam2` (official SAM2 → transformers, memory modules
included), after undoing the `.gamma` → `.g_weight` rename of Sa2VA's own HF export. The CMA, `text_proj` (and
the conv prior head when configured) do not exist in Sa2VA: they are freshly initialised with γ = 0, so
`F' = F + 0·CMA(...)` and the second decoder pass equals the first one — the converted model gives exactly the
masks of the plain Sa2VA path (`use_cma=False`) until it is fine-tuned.

Every source key is either mapped (listed in `sa2va_conversion.json`) or reported: unmapped keys stop the
conversion with an error naming them (or, with `skip_unmapped=True`, are listed as dropped in the report).

The converted folder is run as Sa2VA runs (`predict_forward` of its remote code): its processor and config save
Sa2VA's conventions (`sa2va_processor_settings`, `mask_intermediate_size`) — the chat layout without a system
turn, dynamic tiling (1–12 tiles of 448 px + a thumbnail), the first 5 frames as key frames joined without labels,
a bicubic SAM2 resize normalised in bfloat16 as Sa2VA does, masks upsampled 256² → 1024² → image size.
The tokenizer is read without running the release's remote code, so the command never asks for permission.

Supported: the InternVL-based releases whose LLM transformers implements natively (Qwen2/Qwen2.5, Qwen3, Llama:
Sa2VA-1B/4B/8B and InternVL3-based ones). The InternLM2-based Sa2VA-26B (fused `wqkv`, no native transformers
class) and the Qwen2.5-VL / Qwen3-VL based variants (a different VLM layout) are refused with an error.
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import sys
from collections import Counter
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
import transformers
from safetensors import safe_open
from tqdm.auto import tqdm
from transformers import (
    AutoTokenizer,
    InternVLConfig,
    PreTrainedConfig,
    PreTrainedTokenizerBase,
    Sam2VideoConfig,
    TokenizersBackend,
)

from ..modeling import MaskCMAConfig, MaskCMAModel
from ..processing.image_io import IMAGENET_MEAN, IMAGENET_STD
from ..processing.processing_maskcma import DEFAULT_CHAT_TEMPLATE
from .convert_sam2 import (
    SAM2_SIZE_PRESETS,
    Sam2ConversionError,
    convert_sam2_state_dict,
    resolve_sam2_architecture,
    sam2_key_rules,
    sam2_video_config_from_architecture,
)

__all__ = [
    "SA2VA_PREFIXES",
    "Sa2VAConversionError",
    "Sa2VAConversion",
    "add_sa2va_parser",
    "build_sa2va_model",
    "convert_sa2va_checkpoint",
    "convert_sa2va_vlm_state_dict",
    "load_sa2va_state_dict",
    "load_sa2va_tokenizer",
    "read_sa2va_config",
    "sa2va_processor_settings",
    "sa2va_vlm_config",
]

SA2VA_MODEL_TYPE = "sa2va_chat"
SA2VA_ARCHITECTURE = "Sa2VAChatModel"
CONVERSION_REPORT_NAME = "sa2va_conversion.json"
SAM2_PREFIX = "grounding_encoder.sam2_model."
# Sa2VA's Hugging Face export renames `.gamma` parameters to `.g_weight` (see `official_sam2_state_dict`)
SAM2_RENAMED_GAMMA = ".g_weight"
SA2VA_PREFIXES = ("vision_model.", "mlp1.", "language_model.", SAM2_PREFIX, "text_hidden_fcs.")
# LLM classes of Sa2VA's llm_config that transformers' native InternVL can hold (text_config model types)
SUPPORTED_LLMS = {
    "Qwen2ForCausalLM": "qwen2",
    "Qwen3ForCausalLM": "qwen3",
    "LlamaForCausalLM": "llama",
}
# Sa2VA's `template` values (xtuner's PROMPT_TEMPLATE names) whose instruction is the ChatML turn
# `<|im_start|>user\n{input}<|im_end|>\n<|im_start|>assistant\n`, with no system turn
CHATML_TEMPLATES = ("qwen_chat", "internlm2_chat")
IMAGE_CONTEXT_TOKEN = "<IMG_CONTEXT>"
SEG_TOKEN = "[SEG]"
# MaskCMA modules that Sa2VA does not have: created fresh (γ = 0 keeps the masks unchanged)
NEW_MODULE_PREFIXES = ("cma.", "text_proj.", "prior_head.")
# fields of Sa2VA's llm_config that describe the original training run, not the architecture
_LLM_CONFIG_DROPPED_FIELDS = (
    "architectures",
    "_name_or_path",
    "auto_map",
    "attn_implementation",
    "_attn_implementation",
)


class Sa2VAConversionError(ValueError):
    """The folder is not a convertible Sa2VA checkpoint; the message names the file, key or field and the fix."""


# --------------------------------------------------------------------------------------------------------------
# Reading the checkpoint
# --------------------------------------------------------------------------------------------------------------


def read_sa2va_config(folder: str | Path) -> dict[str, Any]:
    """Read and check the `config.json` of a Sa2VA folder.

    Raises:
        FileNotFoundError: the folder or its config.json does not exist.
        Sa2VAConversionError: the config is not a Sa2VA (`sa2va_chat`) InternVL config.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(
            f"Sa2VA checkpoint folder {folder} does not exist; pass the folder of e.g. ByteDance/Sa2VA-4B"
        )
    config_file = folder / "config.json"
    if not config_file.is_file():
        raise FileNotFoundError(
            f"{folder} has no config.json, so it is not a Hugging Face Sa2VA checkpoint; download the complete "
            "release (e.g. `hf download ByteDance/Sa2VA-4B --local-dir DIR`)"
        )
    try:
        config = json.loads(config_file.read_text(encoding="utf-8"))
    except json.JSONDecodeError as error:
        raise Sa2VAConversionError(f"{config_file} is not valid JSON: {error}") from error
    model_type = config.get("model_type")
    architectures = config.get("architectures") or []
    if model_type != SA2VA_MODEL_TYPE and SA2VA_ARCHITECTURE not in architectures:
        raise Sa2VAConversionError(
            f"{folder} is not a Sa2VA checkpoint: config.json has model_type={model_type!r} and architectures="
            f"{architectures}, expected model_type {SA2VA_MODEL_TYPE!r} ({SA2VA_ARCHITECTURE}). For an official SAM2 "
            "checkpoint use `maskcma convert sam2`; a MaskCMA folder needs no conversion."
        )
    for section in ("vision_config", "llm_config"):
        if not isinstance(config.get(section), Mapping):
            raise Sa2VAConversionError(
                f"{config_file}: no `{section}` section; only the InternVL-based Sa2VA releases (InternViT + LLM) "
                "can be converted (Qwen2.5-VL / Qwen3-VL based Sa2VA use another layout)"
            )
    llm_arch = (config["llm_config"].get("architectures") or [None])[0]
    if llm_arch not in SUPPORTED_LLMS:
        raise Sa2VAConversionError(
            f"{config_file}: llm_config.architectures[0] is {llm_arch!r}; supported LLMs are {sorted(SUPPORTED_LLMS)} "
            "(InternLM2 / Phi-3 based Sa2VA have no native transformers class to convert into)"
        )
    template = str(config.get("template") or "").replace("-", "_")
    if template not in CHATML_TEMPLATES:
        raise Sa2VAConversionError(
            f"{config_file}: template={config.get('template')!r}; the converted processor reproduces Sa2VA's ChatML "
            f"prompt (templates {list(CHATML_TEMPLATES)}), the layout of every InternVL-based release"
        )
    if config.get("ps_version", "v1") != "v2":
        raise Sa2VAConversionError(
            f"{config_file}: ps_version={config.get('ps_version')!r}; transformers' InternVL implements the 'v2' pixel "
            "shuffle only (every released Sa2VA uses 'v2')"
        )
    return config


def list_sa2va_weights(folder: str | Path) -> dict[str, Path]:
    """Map every weight name of the checkpoint to the safetensors file holding it."""
    folder = Path(folder)
    index_file = folder / "model.safetensors.index.json"
    if index_file.is_file():
        weight_map = json.loads(index_file.read_text(encoding="utf-8")).get("weight_map")
        if not isinstance(weight_map, Mapping) or not weight_map:
            raise Sa2VAConversionError(f"{index_file} has no `weight_map`; the shard index is damaged")
        files = {name: folder / shard for name, shard in weight_map.items()}
        absent = sorted({str(path) for path in files.values() if not path.is_file()})
        if absent:
            raise FileNotFoundError(f"{index_file} lists shards that are missing: {absent}; download them again")
        return files
    single = folder / "model.safetensors"
    if single.is_file():
        with safe_open(single, framework="pt") as handle:
            return {name: single for name in handle.keys()}
    others = sorted(path.name for path in folder.glob("*.bin")) + sorted(path.name for path in folder.glob("*.pth"))
    hint = f" (found {others}: convert them to safetensors first)" if others else ""
    raise FileNotFoundError(
        f"{folder} holds neither model.safetensors nor model.safetensors.index.json{hint}; the Hugging Face Sa2VA "
        "releases ship safetensors weights"
    )


def load_sa2va_state_dict(folder: str | Path, show_progress: bool = True) -> dict[str, torch.Tensor]:
    """Read every tensor of the checkpoint (CPU), checking that the five Sa2VA parts are present."""
    files = list_sa2va_weights(folder)
    absent = [prefix for prefix in SA2VA_PREFIXES if not any(name.startswith(prefix) for name in files)]
    if absent:
        raise Sa2VAConversionError(
            f"{folder} is not a complete Sa2VA checkpoint: no weight starts with {absent} (expected all of "
            f"{list(SA2VA_PREFIXES)})"
        )
    by_file: dict[Path, list[str]] = {}
    for name, path in files.items():
        by_file.setdefault(path, []).append(name)
    state_dict: dict[str, torch.Tensor] = {}
    for path, names in tqdm(by_file.items(), desc="reading Sa2VA shards", disable=not show_progress):
        with safe_open(path, framework="pt") as handle:
            for name in names:
                state_dict[name] = handle.get_tensor(name)
    return state_dict


def load_sa2va_tokenizer(folder: str | Path) -> PreTrainedTokenizerBase:
    """The release's tokenizer, read without executing any of its remote code and without asking for permission.

    `AutoTokenizer.from_pretrained(folder)` would read the release's `config.json`, whose `auto_map` names Sa2VA's
    own configuration class, and ask on the terminal whether to run it. Here the model config is not consulted
    (`config=PreTrainedConfig()`) and remote code is refused (`trust_remote_code=False`): the tokenizer class named
    in `tokenizer_config.json` is used when transformers has it (`Qwen2Tokenizer` in the releases); a class that
    exists only as remote code is replaced by transformers' generic `TokenizersBackend` over `tokenizer.json`.

    Raises:
        Sa2VAConversionError: no tokenizer files, or only a remote-code tokenizer without `tokenizer.json`.
    """
    folder = Path(folder)
    config_file = folder / "tokenizer_config.json"
    tokenizer_config = json.loads(config_file.read_text(encoding="utf-8")) if config_file.is_file() else {}
    auto_map = tokenizer_config.get("auto_map") or {}
    remote_class = auto_map if isinstance(auto_map, (list, tuple)) else auto_map.get("AutoTokenizer")
    class_name = str(tokenizer_config.get("tokenizer_class") or "")
    native_class = bool(class_name) and (
        hasattr(transformers, class_name) or hasattr(transformers, class_name.removesuffix("Fast"))
    )
    if remote_class and not native_class and not (folder / "tokenizer.json").is_file():
        raise Sa2VAConversionError(
            f"{folder}: the tokenizer class {class_name!r} exists only as remote code and there is no tokenizer.json "
            "to read the tokenizer without that code; add the release's tokenizer.json"
        )
    try:
        if remote_class and not native_class:
            return TokenizersBackend.from_pretrained(folder)
        return AutoTokenizer.from_pretrained(folder, config=PreTrainedConfig(), trust_remote_code=False)
    except (OSError, ValueError) as error:
        raise Sa2VAConversionError(f"cannot load the tokenizer of {folder}: {error}") from error


def sa2va_processor_settings(sam_image_size: int) -> dict[str, Any]:
    """`MaskCMAProcessor.from_model_config` arguments that reproduce how Sa2VA's `predict_forward` prepares its
    inputs; `convert_sa2va_checkpoint` saves them in the converted folder's `processor_config.json`.

    - `chat_template`: ``<|im_start|>user\n{content}<|im_end|>\n<|im_start|>assistant\n``, no system turn (the
      release tokenizer's own template adds one);
    - `max_image_tiles=12`: dynamic tiling, 1 to 12 tiles plus a thumbnail, bicubic, ImageNet mean/std;
    - `num_key_frames=5`, `key_frame_sampling="first"`, `video_frame_labels=False`: the first 5 frames, one tile
      each, their image blocks joined by new lines without ``FrameK: `` labels;
    - `image_placeholder="<image>"`: a Sa2VA-style prompt (``"<image>Please segment …"``) places the image blocks;
    - `sam_resample="bicubic"`, `sam_normalization="sa2va_bfloat16"`: SAM2's input as Sa2VA computes it whatever
      the model's dtype (PIL's default filter; an image normalised in bfloat16 arithmetic, its ImageNet mean/std
      rounded to bfloat16; a video frame normalised in float32, then rounded to bfloat16);
    - `mask_intermediate_size=sam_image_size`: `post_process_masks` upsamples 256² → 1024² → image size, like the
      model (`MaskCMAConfig.mask_intermediate_size`).

    Args:
        sam_image_size: SAM2's input size (1024 in the releases).
    """
    return {
        "chat_template": DEFAULT_CHAT_TEMPLATE,
        "max_image_tiles": 12,
        "num_key_frames": 5,
        "key_frame_sampling": "first",
        "video_frame_labels": False,
        "image_placeholder": "<image>",
        "sam_resample": "bicubic",
        "sam_normalization": "sa2va_bfloat16",
        "sam_image_mean": list(IMAGENET_MEAN),
        "sam_image_std": list(IMAGENET_STD),
        "mask_intermediate_size": int(sam_image_size),
    }


# --------------------------------------------------------------------------------------------------------------
# Configs
# --------------------------------------------------------------------------------------------------------------


def _pair(value: Any) -> list[int]:
    return [int(value), int(value)] if isinstance(value, int) else [int(v) for v in value]


def sa2va_vlm_config(
    sa2va_config: Mapping[str, Any],
    image_token_id: int,
    vocab_size: int,
    tie_word_embeddings: bool,
) -> InternVLConfig:
    """transformers' native `InternVLConfig` equivalent to a Sa2VA config.

    Args:
        sa2va_config: the Sa2VA `config.json` (see `read_sa2va_config`).
        image_token_id: id of ``<IMG_CONTEXT>`` in the checkpoint's tokenizer.
        vocab_size: rows of the checkpoint's token embedding (Sa2VA resizes it for its special tokens).
        tie_word_embeddings: whether the LM head shares the embedding's weight.
    """
    vision = sa2va_config["vision_config"]
    image_size = _pair(sa2va_config.get("force_image_size") or vision["image_size"])
    patch_size = _pair(vision["patch_size"])
    downsample_ratio = float(sa2va_config.get("downsample_ratio", 0.5))
    tokens_per_tile = int((image_size[0] // patch_size[0]) * (image_size[1] // patch_size[1]) * downsample_ratio**2)
    llm_config = sa2va_config["llm_config"]
    text_config = {key: value for key, value in llm_config.items() if key not in _LLM_CONFIG_DROPPED_FIELDS}
    text_config["model_type"] = SUPPORTED_LLMS[sa2va_config["llm_config"]["architectures"][0]]
    text_config["vocab_size"] = int(vocab_size)
    text_config["tie_word_embeddings"] = bool(tie_word_embeddings)
    return InternVLConfig(
        vision_config={
            "hidden_size": int(vision["hidden_size"]),
            "num_hidden_layers": int(vision["num_hidden_layers"]),
            "num_attention_heads": int(vision["num_attention_heads"]),
            "intermediate_size": int(vision["intermediate_size"]),
            "attention_bias": bool(vision.get("qkv_bias", True)),
            "use_qk_norm": bool(vision.get("qk_normalization", False)),
            "norm_type": vision.get("norm_type", "layer_norm"),
            "layer_norm_eps": float(vision.get("layer_norm_eps", 1e-6)),
            "hidden_act": vision.get("hidden_act", "gelu"),
            "layer_scale_init_value": float(vision.get("initializer_factor", 0.1)),
            "image_size": image_size,
            "patch_size": patch_size,
            "use_mean_pooling": True,  # InternViT has no final norm: transformers then uses an identity
        },
        text_config=text_config,
        image_token_id=int(image_token_id),
        image_seq_length=tokens_per_tile,
        downsample_ratio=downsample_ratio,
        projector_hidden_act="gelu",
        vision_feature_layer=int(sa2va_config.get("select_layer", -1)),
        vision_feature_select_strategy="default",  # InternVL drops the class token
        tie_word_embeddings=bool(tie_word_embeddings),
    )


def _sam2_rules_for_config(sam2_config: Sam2VideoConfig):
    """The official → transformers rename rules for a given target config. The rules depend on the architecture
    only through the depth of the memory encoder's mask downsampler, which the config fixes."""
    arch = replace(
        SAM2_SIZE_PRESETS["tiny"],
        mask_downsampler_stride=int(sam2_config.mask_downsampler_stride),
        mask_downsampler_total_stride=int(sam2_config.mask_downsampler_total_stride),
    )
    return sam2_key_rules(arch, video=True)


def official_sam2_state_dict(
    state_dict: Mapping[str, torch.Tensor],
) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """The `grounding_encoder.sam2_model.*` weights under the official SAM2 names.

    Sa2VA's export to the Hugging Face format renamed every `.gamma` parameter to `.g_weight` (old transformers
    versions rewrote `gamma` to `weight` when loading); in SAM2 that is the layer scale of the memory fuser's
    `CXBlock`s (`memory_encoder.fuser.layers.{i}.gamma`), which gets its official name back here.

    Returns:
        `(official state dict, official key → Sa2VA key)`.
    """
    official: dict[str, torch.Tensor] = {}
    source_names: dict[str, str] = {}
    for key, value in state_dict.items():
        if not key.startswith(SAM2_PREFIX):
            continue
        name = key[len(SAM2_PREFIX) :]
        if name.endswith(SAM2_RENAMED_GAMMA):
            name = name[: -len(SAM2_RENAMED_GAMMA)] + ".gamma"
        official[name] = value
        source_names[name] = key
    return official, source_names


def _resolve_sam2(sam2_state: Mapping[str, torch.Tensor], sam2_config: Sam2VideoConfig | None):
    """The target SAM2 config and its rename rules: given explicitly, or from the official architecture the weights
    belong to (Sa2VA ships SAM2 Hiera-L)."""
    if sam2_config is not None:
        return sam2_config, _sam2_rules_for_config(sam2_config), "given config"
    arch, source = resolve_sam2_architecture(sam2_state)
    return sam2_video_config_from_architecture(arch), sam2_key_rules(arch, video=True), source


# --------------------------------------------------------------------------------------------------------------
# Key mapping of the VLM and the [SEG] projection
# --------------------------------------------------------------------------------------------------------------

_VIT = "vlm.model.vision_tower"
_Transform = Callable[[torch.Tensor], list[torch.Tensor]]


@dataclass(frozen=True)
class KeyRule:
    """A rename rule: source keys matching `pattern` become `targets` (templates over the pattern's named groups).

    With several targets the tensor is split into that many equal chunks along dim 0 (fused q/k/v → q, k, v).
    """

    pattern: str
    targets: tuple[str, ...]

    def apply(self, key: str, tensor: torch.Tensor) -> dict[str, torch.Tensor] | None:
        match = re.fullmatch(self.pattern, key)
        if match is None:
            return None
        names = [target.format(**match.groupdict()) for target in self.targets]
        if len(names) == 1:
            return {names[0]: tensor}
        if tensor.shape[0] % len(names) != 0:
            raise Sa2VAConversionError(
                f"{key} of shape {tuple(tensor.shape)} cannot be split into {len(names)} equal parts for {names}"
            )
        return dict(zip(names, (chunk.clone() for chunk in tensor.chunk(len(names), dim=0)), strict=True))


VLM_KEY_RULES: tuple[KeyRule, ...] = (
    # InternViT embeddings
    KeyRule(r"vision_model\.embeddings\.class_embedding", (f"{_VIT}.embeddings.cls_token",)),
    KeyRule(r"vision_model\.embeddings\.position_embedding", (f"{_VIT}.embeddings.position_embeddings",)),
    KeyRule(
        r"vision_model\.embeddings\.patch_embedding\.(?P<p>weight|bias)",
        (f"{_VIT}.embeddings.patch_embeddings.projection.{{p}}",),
    ),
    # InternViT layers: the fused qkv projection is split (rows ordered q, k, v, as the original reshape reads them)
    KeyRule(
        r"vision_model\.encoder\.layers\.(?P<i>\d+)\.attn\.qkv\.(?P<p>weight|bias)",
        tuple(f"{_VIT}.encoder.layer.{{i}}.attention.{name}_proj.{{p}}" for name in ("q", "k", "v")),
    ),
    KeyRule(
        r"vision_model\.encoder\.layers\.(?P<i>\d+)\.attn\.(?P<n>q|k)_norm\.weight",
        (f"{_VIT}.encoder.layer.{{i}}.attention.{{n}}_norm.weight",),
    ),
    KeyRule(
        r"vision_model\.encoder\.layers\.(?P<i>\d+)\.attn\.proj\.(?P<p>weight|bias)",
        (f"{_VIT}.encoder.layer.{{i}}.attention.projection_layer.{{p}}",),
    ),
    KeyRule(
        r"vision_model\.encoder\.layers\.(?P<i>\d+)\.mlp\.(?P<fc>fc1|fc2)\.(?P<p>weight|bias)",
        (f"{_VIT}.encoder.layer.{{i}}.mlp.{{fc}}.{{p}}",),
    ),
    KeyRule(
        r"vision_model\.encoder\.layers\.(?P<i>\d+)\.norm1\.(?P<p>weight|bias)",
        (f"{_VIT}.encoder.layer.{{i}}.layernorm_before.{{p}}",),
    ),
    KeyRule(
        r"vision_model\.encoder\.layers\.(?P<i>\d+)\.norm2\.(?P<p>weight|bias)",
        (f"{_VIT}.encoder.layer.{{i}}.layernorm_after.{{p}}",),
    ),
    KeyRule(r"vision_model\.encoder\.layers\.(?P<i>\d+)\.ls1", (f"{_VIT}.encoder.layer.{{i}}.lambda_1",)),
    KeyRule(r"vision_model\.encoder\.layers\.(?P<i>\d+)\.ls2", (f"{_VIT}.encoder.layer.{{i}}.lambda_2",)),
    # mlp1 = Sequential(LayerNorm, Linear, GELU, Linear)
    KeyRule(r"mlp1\.0\.(?P<p>weight|bias)", ("vlm.model.multi_modal_projector.layer_norm.{p}",)),
    KeyRule(r"mlp1\.1\.(?P<p>weight|bias)", ("vlm.model.multi_modal_projector.linear_1.{p}",)),
    KeyRule(r"mlp1\.3\.(?P<p>weight|bias)", ("vlm.model.multi_modal_projector.linear_2.{p}",)),
    # the LLM: its decoder moves under the VLM, the head to the top of the VLM
    KeyRule(r"language_model\.model\.(?P<rest>.+)", ("vlm.model.language_model.{rest}",)),
    KeyRule(r"language_model\.lm_head\.weight", ("vlm.lm_head.weight",)),
    # text_hidden_fcs = Sequential(Linear, ReLU, Linear, Dropout(0)) → seg_proj (same layout)
    KeyRule(r"text_hidden_fcs\.(?P<n>0|2)\.(?P<p>weight|bias)", ("seg_proj.{n}.{p}",)),
)


def convert_sa2va_vlm_state_dict(
    state_dict: Mapping[str, torch.Tensor],
) -> tuple[dict[str, torch.Tensor], dict[str, list[str]], list[str]]:
    """Rename the VLM, projector, LLM and `text_hidden_fcs` keys (every key outside `grounding_encoder.`).

    Returns:
        `(converted, mapped, unmapped)`: MaskCMA-named tensors, source key → target key(s), and the source keys no
        rule matches.
    """
    converted: dict[str, torch.Tensor] = {}
    mapped: dict[str, list[str]] = {}
    unmapped: list[str] = []
    for key, tensor in state_dict.items():
        if key.startswith(SAM2_PREFIX):
            continue
        results = [result for rule in VLM_KEY_RULES if (result := rule.apply(key, tensor)) is not None]
        if len(results) > 1:
            raise AssertionError(f"Sa2VA key rules overlap on {key!r}")
        if not results:
            unmapped.append(key)
            continue
        mapped[key] = list(results[0])
        converted.update(results[0])
    return converted, mapped, unmapped


# --------------------------------------------------------------------------------------------------------------
# Building the converted model
# --------------------------------------------------------------------------------------------------------------


@dataclass
class Sa2VAConversion:
    """The converted model and the account of every key.

    Args:
        model (`MaskCMAModel`): in eval mode, CMA at γ = 0.
        tokenizer: the checkpoint's tokenizer.
        mapped (`dict[str, list[str]]`): Sa2VA key → MaskCMA key(s).
        added (`list[str]`): MaskCMA keys Sa2VA does not have (freshly initialised; the tied LM head when absent).
        dropped (`dict[str, str]`): Sa2VA keys not converted, with the reason (only with `skip_unmapped=True`).
        report (`dict`): JSON-able summary written to `sa2va_conversion.json`.
    """

    model: MaskCMAModel
    tokenizer: PreTrainedTokenizerBase
    mapped: dict[str, list[str]]
    added: list[str]
    dropped: dict[str, str] = field(default_factory=dict)
    report: dict[str, Any] = field(default_factory=dict)


def _token_id(tokenizer: PreTrainedTokenizerBase, token: str, folder: Path) -> int:
    token_id = tokenizer.convert_tokens_to_ids(token)
    if token_id is None or token_id == tokenizer.unk_token_id or tokenizer.convert_ids_to_tokens(token_id) != token:
        raise Sa2VAConversionError(
            f"the tokenizer in {folder} has no {token!r} token; a Sa2VA tokenizer adds {SEG_TOKEN!r} and "
            f"{IMAGE_CONTEXT_TOKEN!r} (is this folder a Sa2VA release?)"
        )
    return int(token_id)


def _source_dtype(state_dict: Mapping[str, torch.Tensor]) -> torch.dtype:
    counts = Counter(tensor.dtype for tensor in state_dict.values() if tensor.is_floating_point())
    return counts.most_common(1)[0][0] if counts else torch.float32


def _format(keys, limit: int = 30) -> str:
    keys = sorted(keys)
    return ", ".join(keys[:limit]) + (f", ... ({len(keys) - limit} more)" if len(keys) > limit else "")


def build_sa2va_model(
    folder: str | Path,
    sam2_config: Sam2VideoConfig | None = None,
    dtype: torch.dtype | None = None,
    skip_unmapped: bool = False,
    show_progress: bool = True,
    **config_overrides,
) -> Sa2VAConversion:
    """Convert a Sa2VA folder into a `MaskCMAModel` in memory.

    Args:
        folder: the Sa2VA checkpoint folder (config.json, tokenizer, safetensors).
        sam2_config: the transformers SAM2 config of the target; default: derived from the official SAM2
            architecture that the `grounding_encoder.sam2_model.*` weights have (Hiera-L for the releases).
        dtype: dtype of the converted model; default the dtype of most source tensors.
        skip_unmapped: report unmapped source keys as dropped instead of stopping with an error.
        show_progress: tqdm bars while reading shards.
        config_overrides: further `MaskCMAConfig` fields (e.g. `cma_topk_tokens=None`).

    Raises:
        FileNotFoundError / Sa2VAConversionError: not a (supported) Sa2VA checkpoint; keys unmapped, missing or of
            the wrong shape (named in the message).
    """
    folder = Path(folder)
    sa2va_config = read_sa2va_config(folder)
    state_dict = load_sa2va_state_dict(folder, show_progress=show_progress)
    tokenizer = load_sa2va_tokenizer(folder)
    image_token_id = _token_id(tokenizer, IMAGE_CONTEXT_TOKEN, folder)
    seg_token_id = _token_id(tokenizer, SEG_TOKEN, folder)

    embed_key, head_key = "language_model.model.embed_tokens.weight", "language_model.lm_head.weight"
    if embed_key not in state_dict:
        raise Sa2VAConversionError(f"{folder}: the checkpoint lacks the LLM token embedding {embed_key!r}")
    embedding = state_dict[embed_key]
    head = state_dict.get(head_key)
    configured_tie = bool(sa2va_config["llm_config"].get("tie_word_embeddings", False))
    if head is None and not configured_tie:
        raise Sa2VAConversionError(
            f"{folder}: the checkpoint lacks {head_key!r} and llm_config.tie_word_embeddings is false"
        )
    tie = head is None or (configured_tie and torch.equal(head, embedding))
    vlm_config = sa2va_vlm_config(sa2va_config, image_token_id, embedding.shape[0], tie)

    sam2_state, sam2_source_names = official_sam2_state_dict(state_dict)
    try:
        sam2_config, sam2_rules, sam2_source = _resolve_sam2(sam2_state, sam2_config)
    except Sam2ConversionError as error:
        raise Sa2VAConversionError(f"{folder}: the grounding_encoder SAM2 weights: {error}") from error

    # Sa2VA's mask chain: SAM2's low-resolution logits → SAM2's input size → image size
    config_overrides.setdefault("mask_intermediate_size", int(sam2_config.image_size))
    config = MaskCMAConfig(
        vlm_config=vlm_config, sam2_config=sam2_config, seg_token_id=seg_token_id, use_cma=True, **config_overrides
    )
    dtype = dtype or _source_dtype(state_dict)
    model = MaskCMAModel._from_config(config, dtype=dtype)
    model.eval()
    target_shapes = {key: tensor.shape for key, tensor in model.state_dict().items()}

    converted, mapped, unmapped = convert_sa2va_vlm_state_dict(state_dict)
    expected_sam2 = {key[len("sam2.") :]: shape for key, shape in target_shapes.items() if key.startswith("sam2.")}
    try:
        sam2_result = convert_sam2_state_dict(sam2_state, expected_sam2, sam2_rules, drop_video_keys=False)
    except Sam2ConversionError as error:
        raise Sa2VAConversionError(
            f"{folder}: the grounding_encoder SAM2 weights do not convert (names below are relative to "
            f"{SAM2_PREFIX!r}): {error}"
        ) from error
    for key, targets in sam2_result.mapped.items():
        mapped[sam2_source_names[key]] = [f"sam2.{target}" for target in targets]
    converted.update({f"sam2.{key}": value for key, value in sam2_result.state_dict.items()})

    dropped: dict[str, str] = {}
    if unmapped:
        if not skip_unmapped:
            raise Sa2VAConversionError(
                f"{folder}: {len(unmapped)} Sa2VA key(s) match no conversion rule: {_format(unmapped)}. This Sa2VA "
                "variant has modules MaskCMA does not hold; pass --skip-unmapped to drop them (they are listed in "
                f"{CONVERSION_REPORT_NAME})"
            )
        dropped = {key: "no MaskCMA module holds this weight (dropped with --skip-unmapped)" for key in unmapped}

    unexpected = sorted(set(converted) - set(target_shapes))
    mismatched = [
        f"{key}: checkpoint {tuple(converted[key].shape)}, model {tuple(target_shapes[key])}"
        for key in converted
        if key in target_shapes and converted[key].shape != target_shapes[key]
    ]
    tied_head = {"vlm.lm_head.weight"} if tie else set()
    missing = sorted(
        key
        for key in set(target_shapes) - set(converted)
        if not key.startswith(NEW_MODULE_PREFIXES) and key not in tied_head
    )
    problems = []
    if unexpected:
        problems.append(f"converted keys the model does not have: {_format(unexpected)}")
    if mismatched:
        problems.append("shapes differ from the config: " + "; ".join(mismatched[:20]))
    if missing:
        problems.append(f"model weights the checkpoint does not provide: {_format(missing)}")
    if problems:
        raise Sa2VAConversionError(f"{folder}: cannot convert: " + " | ".join(problems))

    converted = {key: value.to(dtype) if value.is_floating_point() else value for key, value in converted.items()}
    incompatible = model.load_state_dict(converted, strict=False)
    added = sorted(incompatible.missing_keys)
    if incompatible.unexpected_keys or any(
        not key.startswith(NEW_MODULE_PREFIXES) and key not in tied_head for key in added
    ):
        raise AssertionError(f"load after the checks still failed: {incompatible}")
    with torch.no_grad():
        model.cma.gamma.zero_()
    eos = tokenizer.convert_tokens_to_ids("<|im_end|>")
    if eos is not None and eos != tokenizer.unk_token_id:
        model.vlm.generation_config.eos_token_id = eos
    if tokenizer.pad_token_id is not None:
        model.vlm.generation_config.pad_token_id = tokenizer.pad_token_id

    report = {
        "source": str(folder),
        "num_source_keys": len(state_dict),
        "num_mapped_keys": len(mapped),
        "mapped": {key: mapped[key] for key in sorted(mapped)},
        "added": {
            "keys": added,
            "reason": "MaskCMA modules Sa2VA does not have, freshly initialised with CMA gamma = 0 (masks equal "
            "the plain Sa2VA path until fine-tuning); vlm.lm_head.weight when tied to the embedding",
        },
        "dropped": dropped,
        "sam2_architecture": sam2_source,
        "tie_word_embeddings": tie,
        "dtype": str(dtype).replace("torch.", ""),
        "seg_token_id": seg_token_id,
        "image_token_id": image_token_id,
        "template": sa2va_config.get("template"),
        "conventions": {
            "processor": sa2va_processor_settings(int(sam2_config.image_size)),
            "config": {"mask_intermediate_size": config.mask_intermediate_size},
        },
    }
    return Sa2VAConversion(model=model, tokenizer=tokenizer, mapped=mapped, added=added, dropped=dropped, report=report)


def convert_sa2va_checkpoint(
    source: str | Path,
    output_dir: str | Path,
    sam2_config: Sam2VideoConfig | str | Path | None = None,
    dtype: torch.dtype | str | None = None,
    skip_unmapped: bool = False,
    overwrite: bool = False,
    show_progress: bool = True,
) -> Path:
    """Convert a Sa2VA folder and save the MaskCMA model like `maskcma export` does (weights, config with `auto_map`
    and `custom_pipelines`, remote code, processor with the Sa2VA tokenizer, pipeline code), plus
    `sa2va_conversion.json`.

    Args:
        source: the Sa2VA folder.
        output_dir: folder to write (must be empty or absent unless `overwrite`).
        sam2_config: target SAM2 config, or the path of a `config.json` holding one (a `Sam2VideoConfig`, or a
            MaskCMA config whose `sam2_config` is used); default from the weights.
        dtype: e.g. `"bfloat16"`; default the source dtype.
        skip_unmapped, show_progress: see `build_sa2va_model`.

    Returns:
        The output folder; `MaskCMAModel.from_pretrained(output_dir)` loads it strictly.
    """
    output_dir = Path(output_dir)
    if output_dir.exists() and any(output_dir.iterdir()):
        if not overwrite:
            raise FileExistsError(f"{output_dir} is not empty; pass --overwrite to replace its contents")
        shutil.rmtree(output_dir)
    if isinstance(sam2_config, (str, Path)):
        sam2_config = load_sam2_config(sam2_config)
    if isinstance(dtype, str):
        resolved = getattr(torch, dtype, None)
        if not isinstance(resolved, torch.dtype):
            raise ValueError(f"--dtype {dtype!r} is not a torch dtype; use e.g. bfloat16, float16 or float32")
        dtype = resolved
    conversion = build_sa2va_model(
        source, sam2_config=sam2_config, dtype=dtype, skip_unmapped=skip_unmapped, show_progress=show_progress
    )
    from .export import build_processor_for_model, save_hub_folder

    processor = build_processor_for_model(
        conversion.model,
        conversion.tokenizer,
        **sa2va_processor_settings(int(conversion.model.config.sam2_config.image_size)),
    )
    save_hub_folder(conversion.model, processor, output_dir)
    (output_dir / CONVERSION_REPORT_NAME).write_text(json.dumps(conversion.report, indent=2) + "\n", encoding="utf-8")
    return output_dir


def load_sam2_config(path: str | Path) -> Sam2VideoConfig:
    """Read a target SAM2 config from a `config.json` (a Sam2VideoConfig, or a MaskCMA config's `sam2_config`)."""
    path = Path(path)
    if path.is_dir():
        path = path / "config.json"
    if not path.is_file():
        raise FileNotFoundError(f"SAM2 config {path} does not exist")
    payload = json.loads(path.read_text(encoding="utf-8"))
    if payload.get("model_type") == MaskCMAConfig.model_type:
        payload = payload["sam2_config"]
    if payload.get("model_type") not in ("sam2_video", "sam2"):
        raise Sa2VAConversionError(
            f"{path} holds a {payload.get('model_type')!r} config; pass a Sam2VideoConfig (model_type 'sam2_video') "
            "or a MaskCMA config.json"
        )
    payload = {key: value for key, value in payload.items() if key != "model_type"}
    return Sam2VideoConfig(**payload)


# --------------------------------------------------------------------------------------------------------------
# CLI: `maskcma convert sa2va`
# --------------------------------------------------------------------------------------------------------------


def add_sa2va_parser(convert_subparsers: argparse._SubParsersAction) -> None:
    """Add `sa2va` to the sub-parsers of `maskcma convert`."""
    parser = convert_subparsers.add_parser(
        "sa2va",
        help="Sa2VA Hugging Face checkpoint folder → MaskCMA model with the CMA at gamma = 0",
        description=(
            "Convert a Sa2VA release (InternVL + Qwen/Llama LLM + SAM2, e.g. ByteDance/Sa2VA-4B downloaded to a "
            "folder) into a MaskCMA folder loadable with AutoModel.from_pretrained(DIR, trust_remote_code=True). "
            "The CMA is added with gamma = 0, so the masks equal Sa2VA's until fine-tuning. The folder saves Sa2VA's "
            "conventions (chat layout without a system turn, 1-12 tiles + thumbnail, 5 unlabelled key frames, "
            "<image> placeholder, bicubic bfloat16 SAM2 input, masks via 1024x1024) and the tokenizer is read "
            "without running remote code (no prompt). Every source key is mapped or reported "
            f"({CONVERSION_REPORT_NAME})."
        ),
    )
    parser.add_argument("source", metavar="SRC_DIR", help="the Sa2VA checkpoint folder")
    parser.add_argument("--output", required=True, help="folder to write (must be empty or absent)")
    parser.add_argument(
        "--sam2-config",
        default=None,
        help="config.json of the target SAM2 (Sam2VideoConfig or MaskCMA config); default: inferred from the weights",
    )
    parser.add_argument("--dtype", default=None, help="dtype of the written weights (default: the source dtype)")
    parser.add_argument(
        "--skip-unmapped",
        action="store_true",
        help="drop source keys no rule maps (listed in the report) instead of failing",
    )
    parser.add_argument("--overwrite", action="store_true", help="replace the contents of an existing --output")
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bars")
    parser.set_defaults(func=run_convert_sa2va)


def run_convert_sa2va(args: argparse.Namespace) -> int:
    """Handler of `maskcma convert sa2va`; returns the exit code."""
    try:
        output = convert_sa2va_checkpoint(
            args.source,
            args.output,
            sam2_config=args.sam2_config,
            dtype=args.dtype,
            skip_unmapped=args.skip_unmapped,
            overwrite=args.overwrite,
            show_progress=not args.no_progress,
        )
    except (Sa2VAConversionError, FileNotFoundError, FileExistsError, ValueError) as error:
        print(f"maskcma convert sa2va: error: {error}", file=sys.stderr)
        return 2
    report = json.loads((output / CONVERSION_REPORT_NAME).read_text())
    print(
        f"Wrote a MaskCMA model to {output}: {report['num_mapped_keys']} of {report['num_source_keys']} Sa2VA keys "
        f"mapped, {len(report['added']['keys'])} new keys (CMA at gamma = 0), {len(report['dropped'])} dropped; "
        f"details in {CONVERSION_REPORT_NAME}."
    )
    return 0
