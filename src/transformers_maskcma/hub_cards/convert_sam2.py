"""Convert an official SAM2 / SAM2.1 `.pt` checkpoint into transformers' native SAM2 weights.

The official `sam2` package (facebookresearch/sam2) saves checkpoints as `{"model": state_dict}` of its `SAM2Base`
module. This module turns such a file into a folder written with `save_pretrained` that
`transformers.Sam2Model.from_pretrained(folder)` (or `Sam2VideoModel`, with `video=True`) loads strictly:

1. read the state dict (`load_sam2_checkpoint`);
2. decide the architecture (`resolve_sam2_architecture`): a size preset (`tiny`, `small`, `base_plus`, `large`), the
   official hydra YAML the model was built from, or inferred from the weights' shapes;
3. build the matching `Sam2Config` / `Sam2VideoConfig` (`sam2_config_from_architecture`);
4. rename every key by module structure (`SAM2_KEY_RULES`, `convert_sam2_state_dict`); keys of the video-only
   modules are dropped for the image model, each with its reason (`IMAGE_MODEL_DROPPED_PREFIXES`); any other key
   that no rule maps, and any key the target model needs that the checkpoint lacks, is an error naming the keys;
5. load strictly into the transformers model and `save_pretrained` (`convert_sam2_checkpoint`).

The official image path that the converted `Sam2Model` reproduces is the one of `SAM2ImagePredictor`: Hiera trunk →
FPN neck (the lowest-resolution level dropped, `scalp=1`) → `conv_s0`/`conv_s1` on the two high-resolution levels →
`no_mem_embed` added to the stride-16 level → prompt encoder + mask decoder.
"""

from __future__ import annotations

import json
import math
import pickle
import re
import zipfile
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
import yaml
from transformers import Sam2Config, Sam2Model, Sam2VideoConfig, Sam2VideoModel

SAM2_SIZES = ("tiny", "small", "base_plus", "large")
CONVERSION_REPORT_NAME = "sam2_conversion.json"


class Sam2ConversionError(ValueError):
    """The checkpoint or the requested architecture cannot be converted; the message names the keys or fields."""


# --------------------------------------------------------------------------------------------------------------
# Architecture: the hyper-parameters of the official model that decide the transformers config
# --------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Sam2OfficialArchitecture:
    """Hyper-parameters of an official `SAM2Base` model, named as in the official hydra configs.

    Defaults are the values of the official SAM2.1 configs (`configs/sam2.1/sam2.1_hiera_*.yaml`) where all sizes
    agree; the Hiera fields have no default because they are what distinguishes the sizes.
    """

    # Hiera trunk (`model.image_encoder.trunk`)
    embed_dim: int
    num_heads: int
    stages: tuple[int, ...]
    global_att_blocks: tuple[int, ...]
    window_spec: tuple[int, ...]
    window_pos_embed_bkg_spatial_size: tuple[int, int]
    q_pool: int = 3
    q_stride: tuple[int, int] = (2, 2)
    dim_mul: float = 2.0
    head_mul: float = 2.0
    # FPN neck (`model.image_encoder.neck`) and image encoder
    d_model: int = 256
    backbone_channel_list: tuple[int, ...] = ()
    fpn_top_down_levels: tuple[int, ...] = (2, 3)
    fpn_kernel_size: int = 1
    fpn_stride: int = 1
    fpn_padding: int = 0
    fpn_interp_model: str = "nearest"
    fuse_type: str = "sum"
    scalp: int = 1
    # SAM heads (`model.*`)
    image_size: int = 1024
    backbone_stride: int = 16
    use_high_res_features_in_sam: bool = True
    iou_prediction_use_sigmoid: bool = True
    pred_obj_scores: bool = True
    pred_obj_scores_mlp: bool = True
    directly_add_no_mem_embed: bool = True
    # `build_sam2(..., apply_postprocessing=True)` (the official default) switches this on
    dynamic_multimask_via_stability: bool = True
    dynamic_multimask_stability_delta: float = 0.05
    dynamic_multimask_stability_thresh: float = 0.98
    # video: memory attention, memory encoder and tracking
    num_maskmem: int = 7
    sigmoid_scale_for_mem_enc: float = 20.0
    sigmoid_bias_for_mem_enc: float = -10.0
    multimask_output_in_sam: bool = True
    multimask_min_pt_num: int = 0
    multimask_max_pt_num: int = 1
    multimask_output_for_tracking: bool = True
    max_obj_ptrs_in_encoder: int = 16
    max_cond_frames_in_attn: int = -1
    use_obj_ptrs_in_encoder: bool = True
    use_mlp_for_obj_ptr_proj: bool = True
    add_tpos_enc_to_obj_ptrs: bool = True  # SAM2.1; SAM2 (2.0): False
    proj_tpos_enc_in_obj_ptrs: bool = True  # SAM2.1; SAM2 (2.0): False
    use_signed_tpos_enc_to_obj_ptrs: bool = True  # SAM2.1; SAM2 (2.0): False
    use_multimask_token_for_obj_ptr: bool = True
    fixed_no_obj_ptr: bool = True
    no_obj_embed_spatial: bool = True  # SAM2.1; SAM2 (2.0): False
    memory_attention_num_layers: int = 4
    memory_attention_num_heads: int = 1
    memory_attention_downsample_rate: int = 1
    memory_attention_dim_feedforward: int = 2048
    memory_attention_activation: str = "relu"
    memory_attention_dropout: float = 0.1
    memory_attention_rope_theta: float = 10000.0
    memory_attention_rope_feat_sizes: tuple[int, int] = (64, 64)
    memory_dim: int = 64
    mask_downsampler_kernel_size: int = 3
    mask_downsampler_stride: int = 2
    mask_downsampler_padding: int = 1
    mask_downsampler_total_stride: int = 16
    fuser_num_layers: int = 2
    fuser_kernel_size: int = 7
    fuser_padding: int = 3
    fuser_layer_scale_init_value: float = 1e-6

    @property
    def embed_dim_per_stage(self) -> list[int]:
        """Channel width of each Hiera stage, computed as the official `Hiera.__init__` does (int() at each shift)."""
        dims = [self.embed_dim]
        for _ in self.stages[1:]:
            dims.append(int(dims[-1] * self.dim_mul))
        return dims

    @property
    def num_heads_per_stage(self) -> list[int]:
        heads = [self.num_heads]
        for _ in self.stages[1:]:
            heads.append(int(heads[-1] * self.head_mul))
        return heads

    @property
    def is_sam2_1(self) -> bool:
        """SAM2.1 checkpoints add `no_obj_embed_spatial` and `obj_ptr_tpos_proj` to the SAM2 (2.0) ones."""
        return self.no_obj_embed_spatial and self.proj_tpos_enc_in_obj_ptrs


def _hiera_preset(
    embed_dim: int,
    num_heads: int,
    stages: tuple[int, ...],
    global_att_blocks: tuple[int, ...],
    window_pos_embed_bkg_spatial_size: tuple[int, int],
    window_spec: tuple[int, ...] = (8, 4, 14, 7),
) -> Sam2OfficialArchitecture:
    channels = [embed_dim * 2**i for i in range(len(stages))]
    return Sam2OfficialArchitecture(
        embed_dim=embed_dim,
        num_heads=num_heads,
        stages=stages,
        global_att_blocks=global_att_blocks,
        window_spec=window_spec,
        window_pos_embed_bkg_spatial_size=window_pos_embed_bkg_spatial_size,
        backbone_channel_list=tuple(reversed(channels)),
    )


# Facts from the official configs `configs/sam2.1/sam2.1_hiera_{t,s,b+,l}.yaml` (identical Hiera settings in
# `configs/sam2/`); base_plus uses the `Hiera` class defaults for stages, global blocks and the background size.
SAM2_SIZE_PRESETS: dict[str, Sam2OfficialArchitecture] = {
    "tiny": _hiera_preset(96, 1, (1, 2, 7, 2), (5, 7, 9), (7, 7)),
    "small": _hiera_preset(96, 1, (1, 2, 11, 2), (7, 10, 13), (7, 7)),
    "base_plus": _hiera_preset(112, 2, (2, 3, 16, 3), (12, 16, 20), (14, 14)),
    "large": _hiera_preset(144, 2, (2, 6, 36, 4), (23, 33, 43), (7, 7), window_spec=(8, 4, 16, 8)),
}

# SAM2 (2.0) differs from SAM2.1 only in these video settings
_SAM2_0_OVERRIDES = {
    "add_tpos_enc_to_obj_ptrs": False,
    "proj_tpos_enc_in_obj_ptrs": False,
    "use_signed_tpos_enc_to_obj_ptrs": False,
    "no_obj_embed_spatial": False,
}

# official class defaults, used when an official YAML omits a value (it then gets the constructor's default)
_HIERA_CLASS_DEFAULTS = {
    "embed_dim": 96,
    "num_heads": 1,
    "q_pool": 3,
    "q_stride": (2, 2),
    "stages": (2, 3, 16, 3),
    "dim_mul": 2.0,
    "head_mul": 2.0,
    "window_pos_embed_bkg_spatial_size": (14, 14),
    "window_spec": (8, 4, 14, 7),
    "global_att_blocks": (12, 16, 20),
}
_SAM2_BASE_CLASS_DEFAULTS = {
    "image_size": 512,
    "backbone_stride": 16,
    "num_maskmem": 7,
    "sigmoid_scale_for_mem_enc": 1.0,
    "sigmoid_bias_for_mem_enc": 0.0,
    "use_high_res_features_in_sam": False,
    "iou_prediction_use_sigmoid": False,
    "pred_obj_scores": False,
    "pred_obj_scores_mlp": False,
    "directly_add_no_mem_embed": False,
    "multimask_output_in_sam": False,
    "multimask_min_pt_num": 1,
    "multimask_max_pt_num": 1,
    "multimask_output_for_tracking": False,
    "max_obj_ptrs_in_encoder": 16,
    "max_cond_frames_in_attn": -1,
    "use_obj_ptrs_in_encoder": False,
    "use_mlp_for_obj_ptr_proj": False,
    "add_tpos_enc_to_obj_ptrs": True,
    "proj_tpos_enc_in_obj_ptrs": False,
    "use_signed_tpos_enc_to_obj_ptrs": False,
    "use_multimask_token_for_obj_ptr": False,
    "fixed_no_obj_ptr": False,
    "no_obj_embed_spatial": False,
}


def sam2_architecture_for_size(size: str, sam2_1: bool = True) -> Sam2OfficialArchitecture:
    """The official architecture of a released checkpoint.

    Args:
        size (`str`): one of `tiny`, `small`, `base_plus`, `large`.
        sam2_1 (`bool`): SAM2.1 (default) or the first SAM2 release; they differ only in the video modules.
    """
    if size not in SAM2_SIZE_PRESETS:
        raise Sam2ConversionError(f"Unknown SAM2 size {size!r}: choose one of {', '.join(SAM2_SIZES)}.")
    preset = SAM2_SIZE_PRESETS[size]
    return preset if sam2_1 else replace(preset, **_SAM2_0_OVERRIDES)


def _section(mapping: Mapping[str, Any], key: str, where: str) -> Mapping[str, Any]:
    value = mapping.get(key)
    if value is None:
        return {}
    if not isinstance(value, Mapping):
        raise Sam2ConversionError(
            f"Official SAM2 config: `{where}.{key}` must be a mapping, got {type(value).__name__}."
        )
    return value


def _pick(section: Mapping[str, Any], key: str, default: Any) -> Any:
    value = section.get(key, default)
    if isinstance(default, bool):
        return bool(value)
    if isinstance(default, float):
        return float(value)  # PyYAML reads "1e-6" as a string
    if isinstance(default, int):
        return int(value)
    if isinstance(default, tuple):
        return tuple(value)
    return value


def sam2_architecture_from_official_config(config: str | Path | Mapping[str, Any]) -> Sam2OfficialArchitecture:
    """Read the architecture from an official hydra config (a `configs/sam2*/sam2*_hiera_*.yaml` file or its dict).

    Values the YAML omits take the default of the official class constructor (`Hiera`, `FpnNeck`, `SAM2Base`, ...),
    as hydra's `instantiate` would; the mask decoder's dynamic multimask settings default to what
    `build_sam2(apply_postprocessing=True)` adds.
    """
    if isinstance(config, (str, Path)):
        path = Path(config)
        if not path.is_file():
            raise FileNotFoundError(
                f"Official SAM2 config {path} does not exist; pass the YAML the model was built from."
            )
        with path.open() as handle:
            config = yaml.safe_load(handle)
        where = str(path)
    else:
        where = "config dict"
    if not isinstance(config, Mapping):
        raise Sam2ConversionError(f"Official SAM2 config ({where}) must be a mapping with a `model` section.")
    model = config.get("model")
    if model is None and isinstance(config.get("trainer"), Mapping):
        model = config["trainer"].get("model")  # training configs nest the model under `trainer`
    if not isinstance(model, Mapping):
        raise Sam2ConversionError(
            f"Official SAM2 config ({where}) has no `model` (or `trainer.model`) section; pass a file such as "
            "configs/sam2.1/sam2.1_hiera_t.yaml of the official sam2 repository."
        )
    image_encoder = _section(model, "image_encoder", "model")
    trunk = _section(image_encoder, "trunk", "model.image_encoder")
    neck = _section(image_encoder, "neck", "model.image_encoder")
    if not trunk or not neck:
        raise Sam2ConversionError(f"Official SAM2 config ({where}) lacks `model.image_encoder.trunk` or `.neck`.")
    position_encoding = _section(neck, "position_encoding", "model.image_encoder.neck")
    decoder_extra = _section(model, "sam_mask_decoder_extra_args", "model")
    memory_attention = _section(model, "memory_attention", "model")
    attention_layer = _section(memory_attention, "layer", "model.memory_attention")
    self_attention = _section(attention_layer, "self_attention", "model.memory_attention.layer")
    memory_encoder = _section(model, "memory_encoder", "model")
    mask_downsampler = _section(memory_encoder, "mask_downsampler", "model.memory_encoder")
    fuser = _section(memory_encoder, "fuser", "model.memory_encoder")
    fuser_layer = _section(fuser, "layer", "model.memory_encoder.fuser")

    hiera = {key: _pick(trunk, key, default) for key, default in _HIERA_CLASS_DEFAULTS.items()}
    base = {key: _pick(model, key, default) for key, default in _SAM2_BASE_CLASS_DEFAULTS.items()}
    d_model = _pick(neck, "d_model", 256)
    num_pos_feats = _pick(position_encoding, "num_pos_feats", d_model)
    if num_pos_feats != d_model:
        raise Sam2ConversionError(
            f"Official SAM2 config ({where}): neck position_encoding.num_pos_feats={num_pos_feats} differs from "
            f"d_model={d_model}; transformers' Sam2VisionNeck always uses d_model."
        )
    if "backbone_channel_list" not in neck:
        raise Sam2ConversionError(
            f"Official SAM2 config ({where}) lacks `model.image_encoder.neck.backbone_channel_list`."
        )
    return Sam2OfficialArchitecture(
        **hiera,
        d_model=d_model,
        backbone_channel_list=tuple(int(c) for c in neck["backbone_channel_list"]),
        fpn_top_down_levels=_pick(neck, "fpn_top_down_levels", (0, 1, 2, 3)),
        fpn_kernel_size=_pick(neck, "kernel_size", 1),
        fpn_stride=_pick(neck, "stride", 1),
        fpn_padding=_pick(neck, "padding", 0),
        fpn_interp_model=_pick(neck, "fpn_interp_model", "bilinear"),
        fuse_type=_pick(neck, "fuse_type", "sum"),
        scalp=_pick(image_encoder, "scalp", 0),
        **base,
        dynamic_multimask_via_stability=_pick(decoder_extra, "dynamic_multimask_via_stability", True),
        dynamic_multimask_stability_delta=_pick(decoder_extra, "dynamic_multimask_stability_delta", 0.05),
        dynamic_multimask_stability_thresh=_pick(decoder_extra, "dynamic_multimask_stability_thresh", 0.98),
        memory_attention_num_layers=_pick(memory_attention, "num_layers", 4),
        memory_attention_num_heads=_pick(self_attention, "num_heads", 1),
        memory_attention_downsample_rate=_pick(self_attention, "downsample_rate", 1),
        memory_attention_dim_feedforward=_pick(attention_layer, "dim_feedforward", 2048),
        memory_attention_activation=_pick(attention_layer, "activation", "relu"),
        memory_attention_dropout=_pick(attention_layer, "dropout", 0.1),
        memory_attention_rope_theta=_pick(self_attention, "rope_theta", 10000.0),
        memory_attention_rope_feat_sizes=_pick(self_attention, "feat_sizes", (64, 64)),
        memory_dim=_pick(memory_encoder, "out_dim", 64),
        mask_downsampler_kernel_size=_pick(mask_downsampler, "kernel_size", 4),
        mask_downsampler_stride=_pick(mask_downsampler, "stride", 4),
        mask_downsampler_padding=_pick(mask_downsampler, "padding", 0),
        mask_downsampler_total_stride=_pick(mask_downsampler, "total_stride", 16),
        fuser_num_layers=_pick(fuser, "num_layers", 2),
        fuser_kernel_size=_pick(fuser_layer, "kernel_size", 7),
        fuser_padding=_pick(fuser_layer, "padding", 3),
        fuser_layer_scale_init_value=_pick(fuser_layer, "layer_scale_init_value", 1e-6),
    )


def validate_sam2_architecture(arch: Sam2OfficialArchitecture, video: bool = False) -> None:
    """Raise `Sam2ConversionError` for official settings that transformers' SAM2 cannot express.

    transformers' `Sam2Model` hard-codes the choices of every released SAM2 / SAM2.1 checkpoint: high-resolution
    features in the decoder, sigmoid IoU head, object-score MLP, nearest-neighbour top-down FPN with sum fusion,
    three feature levels and the no-memory embedding added to the image embedding.
    """
    required = {
        "use_high_res_features_in_sam": True,
        "iou_prediction_use_sigmoid": True,
        "pred_obj_scores": True,
        "pred_obj_scores_mlp": True,
        "directly_add_no_mem_embed": True,
        "fpn_interp_model": "nearest",
        "fuse_type": "sum",
        "backbone_stride": 16,
        "q_stride": (2, 2),
    }
    if video:
        required |= {
            "use_obj_ptrs_in_encoder": True,
            "use_mlp_for_obj_ptr_proj": True,
            "use_multimask_token_for_obj_ptr": True,
            "fixed_no_obj_ptr": True,
        }
    problems = [
        f"{name}={getattr(arch, name)!r} (transformers supports only {value!r})"
        for name, value in required.items()
        if getattr(arch, name) != value
    ]
    if len(arch.stages) != 4:
        problems.append(f"stages={arch.stages} (a 4-stage Hiera is required)")
    elif arch.scalp != len(arch.stages) - 3:
        problems.append(f"scalp={arch.scalp} (transformers keeps the 3 highest-resolution FPN levels: scalp=1)")
    if len(arch.window_spec) != len(arch.stages):
        problems.append(f"window_spec={arch.window_spec} needs one entry per stage {arch.stages}")
    if list(arch.backbone_channel_list) != arch.embed_dim_per_stage[::-1]:
        problems.append(
            f"backbone_channel_list={list(arch.backbone_channel_list)} must be the reversed stage widths "
            f"{arch.embed_dim_per_stage[::-1]}"
        )
    if arch.image_size % 32 != 0:
        problems.append(f"image_size={arch.image_size} (must be a multiple of 32, the Hiera total stride)")
    if video and arch.proj_tpos_enc_in_obj_ptrs != arch.add_tpos_enc_to_obj_ptrs:
        problems.append(
            f"add_tpos_enc_to_obj_ptrs={arch.add_tpos_enc_to_obj_ptrs} with proj_tpos_enc_in_obj_ptrs="
            f"{arch.proj_tpos_enc_in_obj_ptrs} (transformers has one switch for both)"
        )
    if video and arch.add_tpos_enc_to_obj_ptrs and not arch.use_signed_tpos_enc_to_obj_ptrs:
        problems.append(
            "use_signed_tpos_enc_to_obj_ptrs=False with temporal encoding of object pointers (transformers uses "
            "signed temporal offsets)"
        )
    if problems:
        raise Sam2ConversionError(
            "This official SAM2 model cannot be expressed as a transformers SAM2 model: " + "; ".join(problems) + "."
        )


# --------------------------------------------------------------------------------------------------------------
# transformers configs
# --------------------------------------------------------------------------------------------------------------


def _vision_config(arch: Sam2OfficialArchitecture) -> dict[str, Any]:
    size = arch.image_size
    return {
        "backbone_config": {
            "model_type": "sam2_hiera_det_model",
            "hidden_size": arch.embed_dim,
            "num_attention_heads": arch.num_heads,
            "image_size": [size, size],
            "query_stride": list(arch.q_stride),
            "window_positional_embedding_background_size": list(arch.window_pos_embed_bkg_spatial_size),
            "num_query_pool_stages": arch.q_pool,
            "blocks_per_stage": list(arch.stages),
            "embed_dim_per_stage": arch.embed_dim_per_stage,
            "num_attention_heads_per_stage": arch.num_heads_per_stage,
            "window_size_per_stage": list(arch.window_spec),
            "global_attention_blocks": list(arch.global_att_blocks),
        },
        "backbone_channel_list": list(arch.backbone_channel_list),
        "backbone_feature_sizes": [[size // 4, size // 4], [size // 8, size // 8], [size // 16, size // 16]],
        "fpn_hidden_size": arch.d_model,
        "fpn_kernel_size": arch.fpn_kernel_size,
        "fpn_stride": arch.fpn_stride,
        "fpn_padding": arch.fpn_padding,
        "fpn_top_down_levels": list(arch.fpn_top_down_levels),
        "num_feature_levels": 3,
    }


def _heads_configs(arch: Sam2OfficialArchitecture) -> tuple[dict[str, Any], dict[str, Any]]:
    # official `SAM2Base._build_sam_heads`: mask_in_chans=16, 3 multimask outputs, 2-layer two-way transformer
    # (mlp_dim 2048, 8 heads), IoU head of depth 3 and width 256
    prompt_encoder = {
        "hidden_size": arch.d_model,
        "image_size": arch.image_size,
        "patch_size": arch.backbone_stride,
        "mask_input_channels": 16,
        "num_point_embeddings": 4,
    }
    mask_decoder = {
        "hidden_size": arch.d_model,
        "mlp_dim": 2048,
        "num_hidden_layers": 2,
        "num_attention_heads": 8,
        "attention_downsample_rate": 2,
        "num_multimask_outputs": 3,
        "iou_head_depth": 3,
        "iou_head_hidden_dim": 256,
        "dynamic_multimask_via_stability": arch.dynamic_multimask_via_stability,
        "dynamic_multimask_stability_delta": arch.dynamic_multimask_stability_delta,
        "dynamic_multimask_stability_thresh": arch.dynamic_multimask_stability_thresh,
    }
    return prompt_encoder, mask_decoder


def sam2_config_from_architecture(arch: Sam2OfficialArchitecture) -> Sam2Config:
    """The `Sam2Config` (image model) equivalent to an official architecture."""
    validate_sam2_architecture(arch, video=False)
    prompt_encoder, mask_decoder = _heads_configs(arch)
    return Sam2Config(
        vision_config=_vision_config(arch), prompt_encoder_config=prompt_encoder, mask_decoder_config=mask_decoder
    )


def sam2_video_config_from_architecture(arch: Sam2OfficialArchitecture) -> Sam2VideoConfig:
    """The `Sam2VideoConfig` (image + memory modules) equivalent to an official architecture."""
    validate_sam2_architecture(arch, video=True)
    prompt_encoder, mask_decoder = _heads_configs(arch)
    return Sam2VideoConfig(
        vision_config=_vision_config(arch),
        prompt_encoder_config=prompt_encoder,
        mask_decoder_config=mask_decoder,
        image_size=arch.image_size,
        num_maskmem=arch.num_maskmem,
        sigmoid_scale_for_mem_enc=arch.sigmoid_scale_for_mem_enc,
        sigmoid_bias_for_mem_enc=arch.sigmoid_bias_for_mem_enc,
        enable_occlusion_spatial_embedding=arch.no_obj_embed_spatial,
        multimask_output_in_sam=arch.multimask_output_in_sam,
        multimask_min_pt_num=arch.multimask_min_pt_num,
        multimask_max_pt_num=arch.multimask_max_pt_num,
        multimask_output_for_tracking=arch.multimask_output_for_tracking,
        max_object_pointers_in_encoder=arch.max_obj_ptrs_in_encoder,
        max_cond_frame_num=arch.max_cond_frames_in_attn,
        enable_temporal_pos_encoding_for_object_pointers=arch.add_tpos_enc_to_obj_ptrs,
        memory_attention_hidden_size=arch.d_model,
        memory_attention_num_layers=arch.memory_attention_num_layers,
        memory_attention_num_attention_heads=arch.memory_attention_num_heads,
        memory_attention_downsample_rate=arch.memory_attention_downsample_rate,
        memory_attention_feed_forward_hidden_size=arch.memory_attention_dim_feedforward,
        memory_attention_feed_forward_hidden_act=arch.memory_attention_activation,
        memory_attention_dropout=arch.memory_attention_dropout,
        memory_attention_rope_feat_sizes=list(arch.memory_attention_rope_feat_sizes),
        memory_attention_rope_dropout=arch.memory_attention_dropout,
        rope_parameters={"rope_type": "axial", "rope_theta": arch.memory_attention_rope_theta},
        memory_encoder_hidden_size=arch.d_model,
        memory_encoder_output_channels=arch.memory_dim,
        mask_downsampler_embed_dim=arch.d_model,
        mask_downsampler_kernel_size=arch.mask_downsampler_kernel_size,
        mask_downsampler_stride=arch.mask_downsampler_stride,
        mask_downsampler_padding=arch.mask_downsampler_padding,
        mask_downsampler_total_stride=arch.mask_downsampler_total_stride,
        memory_fuser_num_layers=arch.fuser_num_layers,
        memory_fuser_embed_dim=arch.d_model,
        memory_fuser_intermediate_dim=4 * arch.d_model,  # official CXBlock: Linear(dim, 4 * dim)
        memory_fuser_kernel_size=arch.fuser_kernel_size,
        memory_fuser_padding=arch.fuser_padding,
        memory_fuser_layer_scale_init_value=arch.fuser_layer_scale_init_value,
    )


# --------------------------------------------------------------------------------------------------------------
# Reading the checkpoint and inferring its size
# --------------------------------------------------------------------------------------------------------------

_PATCH_EMBED_KEY = "image_encoder.trunk.patch_embed.proj.weight"
_BLOCK_KEY = re.compile(r"^image_encoder\.trunk\.blocks\.(\d+)\.")
_BLOCK_PROJ_KEY = re.compile(r"^image_encoder\.trunk\.blocks\.(\d+)\.proj\.weight$")


def load_sam2_checkpoint(path: str | Path) -> dict[str, torch.Tensor]:
    """Read the state dict of an official SAM2 `.pt` checkpoint (`{"model": state_dict}`, or a bare state dict).

    Returns:
        `dict[str, torch.Tensor]`: the official `SAM2Base` parameter names and tensors, on CPU.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(
            f"SAM2 checkpoint {path} does not exist; pass the official .pt file (e.g. sam2.1_hiera_tiny.pt)."
        )
    with path.open("rb") as handle:
        head = handle.read(2)
    # torch.save writes a zip archive; the legacy format is a pickle (protocol 2+: first byte 0x80)
    if not zipfile.is_zipfile(path) and head[:1] != b"\x80":
        raise Sam2ConversionError(
            f"{path} is not a PyTorch checkpoint (neither a torch.save zip archive nor a pickle); pass an official "
            "SAM2 .pt file such as sam2.1_hiera_tiny.pt."
        )
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, zipfile.BadZipFile, EOFError, RuntimeError, IndexError, ValueError) as error:
        raise Sam2ConversionError(
            f"{path} is not a PyTorch checkpoint that torch.load can read safely ({type(error).__name__}: "
            f"{str(error).splitlines()[0] if str(error) else 'no detail'}); pass an official SAM2 .pt file."
        ) from error
    state_dict = payload.get("model", payload) if isinstance(payload, Mapping) else None
    if not isinstance(state_dict, Mapping) or not any(
        isinstance(key, str) and key.startswith("image_encoder.") for key in state_dict
    ):
        found = sorted(payload)[:8] if isinstance(payload, Mapping) else type(payload).__name__
        raise Sam2ConversionError(
            f"{path} is not an official SAM2 checkpoint: expected {{'model': state_dict}} with keys such as "
            f"{_PATCH_EMBED_KEY!r}, found {found}."
        )
    non_tensors = [key for key, value in state_dict.items() if not isinstance(value, torch.Tensor)]
    if non_tensors:
        raise Sam2ConversionError(f"{path}: state dict entries that are not tensors: {non_tensors[:10]}.")
    return dict(state_dict)


@dataclass(frozen=True)
class Sam2CheckpointShape:
    """What the weights alone tell about the Hiera trunk."""

    embed_dim: int
    stages: tuple[int, ...]
    window_pos_embed_bkg_spatial_size: tuple[int, int]
    backbone_channel_list: tuple[int, ...]
    sam2_1: bool


def inspect_sam2_state_dict(state_dict: Mapping[str, torch.Tensor]) -> Sam2CheckpointShape:
    """Read the Hiera widths, blocks per stage and the SAM2 / SAM2.1 generation from the weights' names and shapes.

    A stage starts at each block with a `proj` (its channel width changes), so the stage lengths are the gaps
    between those blocks.
    """
    required = [_PATCH_EMBED_KEY, "image_encoder.trunk.pos_embed"]
    absent = [key for key in required if key not in state_dict]
    if absent:
        raise Sam2ConversionError(
            f"Cannot infer the SAM2 size: the checkpoint lacks {absent}; pass --size or --config explicitly."
        )
    block_ids = {int(match.group(1)) for key in state_dict if (match := _BLOCK_KEY.match(key))}
    if not block_ids:
        raise Sam2ConversionError(
            "Cannot infer the SAM2 size: the checkpoint has no image_encoder.trunk.blocks.* keys."
        )
    depth = max(block_ids) + 1
    stage_starts = sorted(int(match.group(1)) for key in state_dict if (match := _BLOCK_PROJ_KEY.match(key)))
    bounds = [0, *stage_starts, depth]
    stages = tuple(end - start for start, end in zip(bounds[:-1], bounds[1:]))
    neck_channels = []
    level = 0
    while f"image_encoder.neck.convs.{level}.conv.weight" in state_dict:
        neck_channels.append(int(state_dict[f"image_encoder.neck.convs.{level}.conv.weight"].shape[1]))
        level += 1
    pos_embed = state_dict["image_encoder.trunk.pos_embed"]
    return Sam2CheckpointShape(
        embed_dim=int(state_dict[_PATCH_EMBED_KEY].shape[0]),
        stages=stages,
        window_pos_embed_bkg_spatial_size=(int(pos_embed.shape[-2]), int(pos_embed.shape[-1])),
        backbone_channel_list=tuple(neck_channels),
        sam2_1=_has_sam2_1_keys(state_dict),
    )


def _has_sam2_1_keys(state_dict: Mapping[str, torch.Tensor]) -> bool:
    return "no_obj_embed_spatial" in state_dict or "obj_ptr_tpos_proj.weight" in state_dict


def _shape_disagreements(arch: Sam2OfficialArchitecture, found: Sam2CheckpointShape) -> list[str]:
    wanted = {
        "embed_dim": arch.embed_dim,
        "stages": tuple(arch.stages),
        "window_pos_embed_bkg_spatial_size": tuple(arch.window_pos_embed_bkg_spatial_size),
        "backbone_channel_list": tuple(arch.backbone_channel_list),
    }
    return [
        f"{name}: architecture {value}, checkpoint {getattr(found, name)}"
        for name, value in wanted.items()
        if getattr(found, name) != value
    ]


def infer_sam2_size(state_dict: Mapping[str, torch.Tensor]) -> str:
    """The preset (`tiny`, `small`, `base_plus`, `large`) whose Hiera shapes match the weights."""
    found = inspect_sam2_state_dict(state_dict)
    for size in SAM2_SIZES:
        if not _shape_disagreements(SAM2_SIZE_PRESETS[size], found):
            return size
    raise Sam2ConversionError(
        f"The checkpoint's Hiera (embed_dim={found.embed_dim}, stages={found.stages}, background pos-embed "
        f"{found.window_pos_embed_bkg_spatial_size}) matches no official size ({', '.join(SAM2_SIZES)}); pass "
        "--config with the official YAML the model was built from."
    )


def resolve_sam2_architecture(
    state_dict: Mapping[str, torch.Tensor],
    size: str | None = None,
    config: str | Path | Mapping[str, Any] | None = None,
) -> tuple[Sam2OfficialArchitecture, str]:
    """Decide the architecture of a checkpoint: from `config`, from `size`, or inferred from the weights.

    Returns:
        `(architecture, source)` where `source` says how it was decided (for the conversion report).
    """
    if size is not None and config is not None:
        raise Sam2ConversionError("Pass either a size preset or an official config, not both.")
    try:
        found = inspect_sam2_state_dict(state_dict)
    except Sam2ConversionError:
        if size is None and config is None:
            raise
        found = None  # the key mapping reports what is missing, in the checkpoint's own names
    sam2_1 = _has_sam2_1_keys(state_dict)
    if config is not None:
        arch = sam2_architecture_from_official_config(config)
        source = f"config {config}" if isinstance(config, (str, Path)) else "config dict"
    elif size is not None:
        arch = sam2_architecture_for_size(size, sam2_1=sam2_1)
        source = f"size {size}"
    else:
        size = infer_sam2_size(state_dict)
        arch = sam2_architecture_for_size(size, sam2_1=sam2_1)
        source = f"size {size} (inferred from the weights)"
    disagreements = _shape_disagreements(arch, found) if found is not None else []
    if disagreements:
        hint = ""
        if config is None:
            try:
                hint = f" The weights look like size {infer_sam2_size(state_dict)!r}."
            except Sam2ConversionError:
                hint = " The weights match no official size; pass --config with the model's official YAML."
        raise Sam2ConversionError(
            f"The checkpoint does not have the shapes of {source}: " + "; ".join(disagreements) + "." + hint
        )
    return arch, source


# --------------------------------------------------------------------------------------------------------------
# Key mapping
# --------------------------------------------------------------------------------------------------------------

# placeholder name → regular expression it matches; a placeholder never matches a dot
_PLACEHOLDERS = {
    "i": r"\d+",
    "j": r"\d+",
    "k": r"\d+",
    "p": r"weight|bias",
    "qkv": r"q|k|v",
    "attn": r"self_attn|cross_attn_token_to_image|cross_attn_image_to_token|cross_attn_image",
    "head": r"output_hypernetworks_mlps\.\d+|iou_prediction_head|pred_obj_score_head",
}


def _template_regex(template: str) -> re.Pattern[str]:
    pattern = ""
    for piece in re.split(r"(\{[a-z]+\})", template):
        if piece.startswith("{") and piece.endswith("}"):
            name = piece[1:-1]
            pattern += f"(?P<{name}>{_PLACEHOLDERS[name]})"
        else:
            pattern += re.escape(piece)
    return re.compile(f"^{pattern}$")


@dataclass(frozen=True)
class Sam2KeyRule:
    """Maps official key(s) matching `source` to transformers key(s) `targets` (same placeholders on both sides).

    With `stack_rows=True` the official tensors `source` (one per value of its `{i}`) are concatenated along dim 0
    into the single target, in increasing `{i}` (the official `point_embeddings.{i}` embeddings become the rows of
    transformers' `point_embed`). With several targets the tensor is copied to each (transformers keeps the prompt
    encoder's random-Fourier matrix twice).
    """

    source: str
    targets: tuple[str, ...]
    stack_rows: bool = False
    source_regex: re.Pattern[str] = field(init=False, repr=False, compare=False)
    target_regexes: tuple[re.Pattern[str], ...] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "source_regex", _template_regex(self.source))
        object.__setattr__(self, "target_regexes", tuple(_template_regex(target) for target in self.targets))

    def map_source(self, key: str) -> list[str] | None:
        match = self.source_regex.match(key)
        if match is None:
            return None
        values = match.groupdict()
        if self.stack_rows:
            values = {name: value for name, value in values.items() if name != "i"}
        return [target.format(**values) for target in self.targets]

    def map_target(self, key: str, shape: torch.Size) -> list[str] | None:
        """Official key(s) that produce the transformers key `key` of shape `shape`, or None if not this rule's."""
        for regex in self.target_regexes:
            match = regex.match(key)
            if match is not None:
                if self.stack_rows:
                    return [self.source.format(**match.groupdict(), i=row) for row in range(shape[0])]
                return [self.source.format(**match.groupdict())]
        return None


def _mlp3(source_prefix: str, target_prefix: str) -> list[Sam2KeyRule]:
    """Official `MLP(num_layers=3).layers.{0,1,2}` ↔ transformers `Sam2FeedForward` (`proj_in`, `layers.0`,
    `proj_out`)."""
    return [
        Sam2KeyRule(f"{source_prefix}.layers.0.{{p}}", (f"{target_prefix}.proj_in.{{p}}",)),
        Sam2KeyRule(f"{source_prefix}.layers.1.{{p}}", (f"{target_prefix}.layers.0.{{p}}",)),
        Sam2KeyRule(f"{source_prefix}.layers.2.{{p}}", (f"{target_prefix}.proj_out.{{p}}",)),
    ]


def _attention(source_prefix: str, target_prefix: str) -> list[Sam2KeyRule]:
    """Official attention (`q_proj`, `k_proj`, `v_proj`, `out_proj`) ↔ transformers (`..._proj`, `o_proj`)."""
    return [
        Sam2KeyRule(f"{source_prefix}.{{qkv}}_proj.{{p}}", (f"{target_prefix}.{{qkv}}_proj.{{p}}",)),
        Sam2KeyRule(f"{source_prefix}.out_proj.{{p}}", (f"{target_prefix}.o_proj.{{p}}",)),
    ]


_TRUNK, _HF_TRUNK = "image_encoder.trunk", "vision_encoder.backbone"
_DEC, _HF_DEC = "sam_mask_decoder", "mask_decoder"
_HF_DEC_LAYER = "mask_decoder.transformer.layers.{i}"
_IMAGE_RULES: list[Sam2KeyRule] = [
    # Hiera trunk
    Sam2KeyRule(f"{_TRUNK}.pos_embed", (f"{_HF_TRUNK}.pos_embed",)),
    Sam2KeyRule(f"{_TRUNK}.pos_embed_window", (f"{_HF_TRUNK}.pos_embed_window",)),
    Sam2KeyRule(f"{_TRUNK}.patch_embed.proj.{{p}}", (f"{_HF_TRUNK}.patch_embed.projection.{{p}}",)),
    Sam2KeyRule(f"{_TRUNK}.blocks.{{i}}.norm{{k}}.{{p}}", (f"{_HF_TRUNK}.blocks.{{i}}.layer_norm{{k}}.{{p}}",)),
    Sam2KeyRule(f"{_TRUNK}.blocks.{{i}}.attn.qkv.{{p}}", (f"{_HF_TRUNK}.blocks.{{i}}.attn.qkv.{{p}}",)),
    Sam2KeyRule(f"{_TRUNK}.blocks.{{i}}.attn.proj.{{p}}", (f"{_HF_TRUNK}.blocks.{{i}}.attn.proj.{{p}}",)),
    Sam2KeyRule(f"{_TRUNK}.blocks.{{i}}.mlp.layers.0.{{p}}", (f"{_HF_TRUNK}.blocks.{{i}}.mlp.proj_in.{{p}}",)),
    Sam2KeyRule(f"{_TRUNK}.blocks.{{i}}.mlp.layers.1.{{p}}", (f"{_HF_TRUNK}.blocks.{{i}}.mlp.proj_out.{{p}}",)),
    Sam2KeyRule(f"{_TRUNK}.blocks.{{i}}.proj.{{p}}", (f"{_HF_TRUNK}.blocks.{{i}}.proj.{{p}}",)),
    # FPN neck: each official lateral conv sits in a Sequential under the name `conv`
    Sam2KeyRule("image_encoder.neck.convs.{i}.conv.{p}", ("vision_encoder.neck.convs.{i}.{p}",)),
    # prompt encoder
    Sam2KeyRule(
        "sam_prompt_encoder.pe_layer.positional_encoding_gaussian_matrix",
        ("prompt_encoder.shared_embedding.positional_embedding", "shared_image_embedding.positional_embedding"),
    ),
    Sam2KeyRule(
        "sam_prompt_encoder.point_embeddings.{i}.weight", ("prompt_encoder.point_embed.weight",), stack_rows=True
    ),
    Sam2KeyRule("sam_prompt_encoder.not_a_point_embed.weight", ("prompt_encoder.not_a_point_embed.weight",)),
    Sam2KeyRule("sam_prompt_encoder.no_mask_embed.weight", ("prompt_encoder.no_mask_embed.weight",)),
    # official mask_downscaling = Sequential(conv, LayerNorm2d, GELU, conv, LayerNorm2d, GELU, conv)
    Sam2KeyRule("sam_prompt_encoder.mask_downscaling.0.{p}", ("prompt_encoder.mask_embed.conv1.{p}",)),
    Sam2KeyRule("sam_prompt_encoder.mask_downscaling.1.{p}", ("prompt_encoder.mask_embed.layer_norm1.{p}",)),
    Sam2KeyRule("sam_prompt_encoder.mask_downscaling.3.{p}", ("prompt_encoder.mask_embed.conv2.{p}",)),
    Sam2KeyRule("sam_prompt_encoder.mask_downscaling.4.{p}", ("prompt_encoder.mask_embed.layer_norm2.{p}",)),
    Sam2KeyRule("sam_prompt_encoder.mask_downscaling.6.{p}", ("prompt_encoder.mask_embed.conv3.{p}",)),
    # mask decoder: two-way transformer
    *_attention(f"{_DEC}.transformer.layers.{{i}}.{{attn}}", f"{_HF_DEC}.transformer.layers.{{i}}.{{attn}}"),
    Sam2KeyRule(f"{_DEC}.transformer.layers.{{i}}.norm{{k}}.{{p}}", (f"{_HF_DEC_LAYER}.layer_norm{{k}}.{{p}}",)),
    Sam2KeyRule(f"{_DEC}.transformer.layers.{{i}}.mlp.layers.0.{{p}}", (f"{_HF_DEC_LAYER}.mlp.proj_in.{{p}}",)),
    Sam2KeyRule(f"{_DEC}.transformer.layers.{{i}}.mlp.layers.1.{{p}}", (f"{_HF_DEC_LAYER}.mlp.proj_out.{{p}}",)),
    *_attention(f"{_DEC}.transformer.final_attn_token_to_image", f"{_HF_DEC}.transformer.final_attn_token_to_image"),
    Sam2KeyRule(f"{_DEC}.transformer.norm_final_attn.{{p}}", (f"{_HF_DEC}.transformer.layer_norm_final_attn.{{p}}",)),
    # mask decoder: tokens, upscaling (Sequential(convT, LayerNorm2d, GELU, convT, GELU)), heads
    Sam2KeyRule(f"{_DEC}.iou_token.weight", (f"{_HF_DEC}.iou_token.weight",)),
    Sam2KeyRule(f"{_DEC}.mask_tokens.weight", (f"{_HF_DEC}.mask_tokens.weight",)),
    Sam2KeyRule(f"{_DEC}.obj_score_token.weight", (f"{_HF_DEC}.obj_score_token.weight",)),
    Sam2KeyRule(f"{_DEC}.output_upscaling.0.{{p}}", (f"{_HF_DEC}.upscale_conv1.{{p}}",)),
    Sam2KeyRule(f"{_DEC}.output_upscaling.1.{{p}}", (f"{_HF_DEC}.upscale_layer_norm.{{p}}",)),
    Sam2KeyRule(f"{_DEC}.output_upscaling.3.{{p}}", (f"{_HF_DEC}.upscale_conv2.{{p}}",)),
    Sam2KeyRule(f"{_DEC}.conv_s0.{{p}}", (f"{_HF_DEC}.conv_s0.{{p}}",)),
    Sam2KeyRule(f"{_DEC}.conv_s1.{{p}}", (f"{_HF_DEC}.conv_s1.{{p}}",)),
    *_mlp3(f"{_DEC}.{{head}}", f"{_HF_DEC}.{{head}}"),
    # the embedding added to the stride-16 features of a frame without memories (every still image)
    Sam2KeyRule("no_mem_embed", ("no_memory_embedding",)),
]


def _mask_downsampler_rules(num_layers: int) -> list[Sam2KeyRule]:
    """Official `MaskDownSampler.encoder` = `num_layers` × (conv, LayerNorm2d, GELU) then a 1×1 conv."""
    rules = []
    for layer in range(num_layers):
        source, target = "memory_encoder.mask_downsampler.encoder", "memory_encoder.mask_downsampler.layers"
        rules.append(Sam2KeyRule(f"{source}.{3 * layer}.{{p}}", (f"{target}.{layer}.conv.{{p}}",)))
        rules.append(Sam2KeyRule(f"{source}.{3 * layer + 1}.{{p}}", (f"{target}.{layer}.layer_norm.{{p}}",)))
    rules.append(
        Sam2KeyRule(
            f"memory_encoder.mask_downsampler.encoder.{3 * num_layers}.{{p}}",
            ("memory_encoder.mask_downsampler.final_conv.{p}",),
        )
    )
    return rules


def _video_rules(arch: Sam2OfficialArchitecture) -> list[Sam2KeyRule]:
    # official MaskDownSampler: log(total_stride) / log(stride) stages of (conv, LayerNorm2d, GELU)
    num_downsampler_layers = round(
        math.log2(arch.mask_downsampler_total_stride) / math.log2(arch.mask_downsampler_stride)
    )
    fuser, hf_fuser = "memory_encoder.fuser.layers.{i}", "memory_encoder.memory_fuser.layers.{i}"
    return [
        Sam2KeyRule("no_mem_pos_enc", ("no_memory_positional_encoding",)),
        Sam2KeyRule("maskmem_tpos_enc", ("memory_temporal_positional_encoding",)),
        Sam2KeyRule("no_obj_ptr", ("no_object_pointer",)),
        Sam2KeyRule("no_obj_embed_spatial", ("occlusion_spatial_embedding_parameter",)),
        Sam2KeyRule("mask_downsample.{p}", ("mask_downsample.{p}",)),
        *_mlp3("obj_ptr_proj", "object_pointer_proj"),
        Sam2KeyRule("obj_ptr_tpos_proj.{p}", ("temporal_positional_encoding_projection_layer.{p}",)),
        # memory attention
        *_attention("memory_attention.layers.{i}.{attn}", "memory_attention.layers.{i}.{attn}"),
        Sam2KeyRule("memory_attention.layers.{i}.linear{k}.{p}", ("memory_attention.layers.{i}.linear{k}.{p}",)),
        Sam2KeyRule("memory_attention.layers.{i}.norm{k}.{p}", ("memory_attention.layers.{i}.layer_norm{k}.{p}",)),
        Sam2KeyRule("memory_attention.norm.{p}", ("memory_attention.layer_norm.{p}",)),
        # memory encoder
        *_mask_downsampler_rules(num_downsampler_layers),
        Sam2KeyRule("memory_encoder.pix_feat_proj.{p}", ("memory_encoder.feature_projection.{p}",)),
        Sam2KeyRule(f"{fuser}.gamma", (f"{hf_fuser}.scale",)),
        Sam2KeyRule(f"{fuser}.dwconv.{{p}}", (f"{hf_fuser}.depthwise_conv.{{p}}",)),
        Sam2KeyRule(f"{fuser}.norm.{{p}}", (f"{hf_fuser}.layer_norm.{{p}}",)),
        Sam2KeyRule(f"{fuser}.pwconv{{k}}.{{p}}", (f"{hf_fuser}.pointwise_conv{{k}}.{{p}}",)),
        Sam2KeyRule("memory_encoder.out_proj.{p}", ("memory_encoder.projection.{p}",)),
    ]


def sam2_key_rules(arch: Sam2OfficialArchitecture, video: bool) -> list[Sam2KeyRule]:
    """The rename rules for the image model, plus the memory / tracking modules when `video`."""
    return _IMAGE_RULES + (_video_rules(arch) if video else [])


# official keys that the image-only `Sam2Model` has no module for, by prefix, with the reason
IMAGE_MODEL_DROPPED_PREFIXES: dict[str, str] = {
    "memory_attention.": "memory attention: conditions a frame's features on the memory bank of earlier frames "
    "(video tracking only)",
    "memory_encoder.": "memory encoder: turns a frame's features and predicted mask into a memory (video tracking "
    "only)",
    "maskmem_tpos_enc": "temporal position encoding of the memory slots (video tracking only)",
    "no_mem_pos_enc": "position encoding of the no-memory token inside memory attention (video tracking only; a still "
    "image only adds no_mem_embed, which is kept)",
    "no_obj_ptr": "object pointer used when the object is absent from a frame (video tracking only)",
    "no_obj_embed_spatial": "spatial embedding added to memories of frames where the object is occluded (video "
    "tracking only, SAM2.1)",
    "obj_ptr_proj.": "projects the decoder's mask token into an object pointer for memory attention (video tracking "
    "only)",
    "obj_ptr_tpos_proj.": "temporal position projection of object pointers (video tracking only, SAM2.1)",
    "mask_downsample.": "downsamples a mask given as a frame's input into an object pointer (video tracking only)",
}


def _dropped_reason(key: str) -> str | None:
    for prefix, reason in IMAGE_MODEL_DROPPED_PREFIXES.items():
        if key == prefix or (prefix.endswith(".") and key.startswith(prefix)):
            return reason
    return None


@dataclass
class Sam2ConversionResult:
    """The converted weights and an account of every official key."""

    state_dict: dict[str, torch.Tensor]
    mapped: dict[str, list[str]]  # official key → transformers key(s)
    dropped: dict[str, str]  # official key → reason it has no place in the target model


def _format_keys(keys: Iterable[str], limit: int = 40) -> str:
    keys = sorted(keys)
    shown = ", ".join(keys[:limit])
    return shown + (f", ... ({len(keys) - limit} more)" if len(keys) > limit else "")


def convert_sam2_state_dict(
    state_dict: Mapping[str, torch.Tensor],
    expected: Mapping[str, torch.Size],
    rules: list[Sam2KeyRule],
    drop_video_keys: bool,
) -> Sam2ConversionResult:
    """Rename an official state dict into the transformers one.

    Args:
        state_dict: the official `SAM2Base` state dict.
        expected: the target model's `{key: shape}` (its `state_dict()`), used to report missing keys in official
            names and to check shapes.
        rules: from `sam2_key_rules`.
        drop_video_keys: drop the keys of `IMAGE_MODEL_DROPPED_PREFIXES` (image model) instead of failing on them.

    Raises:
        Sam2ConversionError: naming official keys that no rule maps, official keys the target needs that the
            checkpoint lacks, or tensors whose shape differs from the target's.
    """
    mapped: dict[str, list[str]] = {}
    dropped: dict[str, str] = {}
    unmapped: list[str] = []
    stacked: dict[str, dict[int, torch.Tensor]] = {}
    converted: dict[str, torch.Tensor] = {}
    for key, tensor in state_dict.items():
        matches = [(rule, targets) for rule in rules if (targets := rule.map_source(key)) is not None]
        if len(matches) > 1:
            raise AssertionError(f"SAM2 key rules overlap on {key!r}: {[rule.source for rule, _ in matches]}")
        if not matches:
            reason = _dropped_reason(key) if drop_video_keys else None
            if reason is None:
                unmapped.append(key)
            else:
                dropped[key] = reason
            continue
        rule, targets = matches[0]
        mapped[key] = targets
        if rule.stack_rows:
            row = int(rule.source_regex.match(key).group("i"))
            stacked.setdefault(targets[0], {})[row] = tensor
        else:
            for target in targets:
                converted[target] = tensor.clone()

    # official key names the target model needs
    needed: set[str] = set()
    unexplained_targets: list[str] = []
    for target_key, shape in expected.items():
        sources = next((found for rule in rules if (found := rule.map_target(target_key, shape)) is not None), None)
        if sources is None:
            unexplained_targets.append(target_key)
        else:
            needed.update(sources)
    if unexplained_targets:
        raise AssertionError(f"No SAM2 key rule produces these transformers keys: {_format_keys(unexplained_targets)}")
    missing = needed - set(state_dict)
    problems = []
    if missing:
        problems.append(f"the checkpoint lacks {len(missing)} key(s) the model needs: {_format_keys(missing)}")
    if unmapped:
        problems.append(f"{len(unmapped)} checkpoint key(s) match no rename rule: {_format_keys(unmapped)}")
    if problems:
        raise Sam2ConversionError("Cannot convert the SAM2 checkpoint: " + "; ".join(problems) + ".")

    for target, rows in stacked.items():
        converted[target] = torch.cat([rows[row] for row in sorted(rows)], dim=0)
    extra = set(converted) - set(expected)
    if extra:  # e.g. a fifth point embedding, or a memory-encoder layer beyond the configured count
        sources = [key for key, targets in mapped.items() if set(targets) & extra]
        raise Sam2ConversionError(
            f"Checkpoint keys with no place in the target model (wrong size or config?): {_format_keys(sources)}."
        )
    mismatched = [
        f"{source} {tuple(state_dict[source].shape)} → {target} expects {tuple(expected[target])}"
        for source, targets in mapped.items()
        for target in targets
        if not (source in state_dict and target in converted and converted[target].shape == expected[target])
    ]
    if mismatched:
        raise Sam2ConversionError(
            "Tensor shapes of the checkpoint differ from the architecture (wrong --size or --config?): "
            + "; ".join(sorted(set(mismatched))[:20])
            + "."
        )
    return Sam2ConversionResult(state_dict=converted, mapped=mapped, dropped=dropped)


# --------------------------------------------------------------------------------------------------------------
# End to end
# --------------------------------------------------------------------------------------------------------------


def build_sam2_model(
    state_dict: Mapping[str, torch.Tensor],
    size: str | None = None,
    config: str | Path | Mapping[str, Any] | None = None,
    video: bool = False,
) -> tuple[Sam2Model | Sam2VideoModel, Sam2ConversionResult, dict[str, Any]]:
    """Convert an official state dict into a transformers `Sam2Model` (or `Sam2VideoModel` when `video`).

    Returns:
        `(model, result, report)`: the model in eval mode holding exactly the converted weights (strict load), the
        key account, and a JSON-able report (architecture, source of the architecture, dropped keys and reasons).
    """
    arch, source = resolve_sam2_architecture(state_dict, size=size, config=config)
    hf_config = sam2_video_config_from_architecture(arch) if video else sam2_config_from_architecture(arch)
    model_class = Sam2VideoModel if video else Sam2Model
    model = model_class(hf_config)
    expected = {key: value.shape for key, value in model.state_dict().items()}
    result = convert_sam2_state_dict(
        state_dict, expected, sam2_key_rules(arch, video=video), drop_video_keys=not video
    )
    incompatible = model.load_state_dict(result.state_dict, strict=True)
    if incompatible.missing_keys or incompatible.unexpected_keys:  # strict=True raises first; kept as a guard
        raise Sam2ConversionError(f"Strict load failed: {incompatible}")
    model.eval()
    report = {
        "target": model_class.__name__,
        "architecture_source": source,
        "generation": "SAM2.1" if arch.is_sam2_1 else "SAM2",
        "architecture": asdict(arch),
        "num_source_keys": len(state_dict),
        "num_mapped_keys": len(result.mapped),
        "dropped_keys": result.dropped,
    }
    return model, result, report


def convert_sam2_checkpoint(
    checkpoint: str | Path,
    output_dir: str | Path,
    size: str | None = None,
    config: str | Path | Mapping[str, Any] | None = None,
    video: bool = False,
    overwrite: bool = False,
) -> Path:
    """Convert an official SAM2 / SAM2.1 `.pt` into a transformers folder (`config.json` + `model.safetensors`).

    Args:
        checkpoint: the official `.pt` (`{"model": state_dict}`).
        output_dir: folder to write; `Sam2Model.from_pretrained(output_dir)` (or `Sam2VideoModel` when `video`)
            loads it.
        size: `tiny`, `small`, `base_plus` or `large`; inferred from the weights when neither `size` nor `config`.
        config: the official hydra YAML (path or dict) the model was built from, for non-standard architectures.
        video: write `Sam2VideoModel` weights (memory attention, memory encoder, object pointers included) instead
            of the image-only `Sam2Model`.
        overwrite: replace an existing conversion in `output_dir`.

    Returns:
        `Path` of the written folder, which also holds `sam2_conversion.json` (the key account).
    """
    output_dir = Path(output_dir)
    if output_dir.exists() and not output_dir.is_dir():
        raise FileExistsError(f"--output {output_dir} is a file; pass a folder path.")
    if output_dir.is_dir() and any(output_dir.iterdir()) and not overwrite:
        raise FileExistsError(f"--output {output_dir} is not empty; pass --overwrite or choose another folder.")
    state_dict = load_sam2_checkpoint(checkpoint)
    model, _, report = build_sam2_model(state_dict, size=size, config=config, video=video)
    output_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(output_dir)
    report["checkpoint"] = str(Path(checkpoint).resolve())
    (output_dir / CONVERSION_REPORT_NAME).write_text(json.dumps(report, indent=2) + "\n")
    return output_dir


__all__ = [
    "IMAGE_MODEL_DROPPED_PREFIXES",
    "SAM2_SIZES",
    "SAM2_SIZE_PRESETS",
    "Sam2CheckpointShape",
    "Sam2ConversionError",
    "Sam2ConversionResult",
    "Sam2KeyRule",
    "Sam2OfficialArchitecture",
    "build_sam2_model",
    "convert_sam2_checkpoint",
    "convert_sam2_state_dict",
    "infer_sam2_size",
    "inspect_sam2_state_dict",
    "load_sam2_checkpoint",
    "resolve_sam2_architecture",
    "sam2_architecture_for_size",
    "sam2_architecture_from_official_config",
    "sam2_config_from_architecture",
    "sam2_key_rules",
    "sam2_video_config_from_architecture",
    "validate_sam2_architecture",
]
