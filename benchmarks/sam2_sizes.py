"""SAM2 sizes used by the benchmarks: the tiny default and the official SAM2.1 Hiera-T / Hiera-L architectures.

The Hiera-T and Hiera-L numbers are the facts of the official configs `configs/sam2.1/sam2.1_hiera_t.yaml` and
`configs/sam2.1/sam2.1_hiera_l.yaml` (trunk: embed_dim, num_heads, stages, global_att_blocks, window_spec,
window_pos_embed_bkg_spatial_size; neck: backbone_channel_list). Everything else (FPN width 256, prompt encoder,
two-layer mask decoder with 2048-wide MLPs, memory modules) takes transformers' `Sam2VideoConfig` defaults, which
are the SAM2.1 values. Weights are random: the benchmarks measure cost, not quality.
"""

from __future__ import annotations

import torch
from transformers import Sam2VideoConfig

from transformers_maskcma.modeling import MaskCMAModel
from transformers_maskcma.tiny import TINY_SAM2_IMAGE_SIZE, tiny_config, tiny_sam2_config

SAM2_BENCH_SIZES = ("tiny", "hiera_tiny", "hiera_large")
REAL_IMAGE_SIZE = 1024

# official SAM2.1 trunk settings: (embed_dim, num_heads, stages, global_att_blocks, window_spec, bkg window size)
_OFFICIAL_HIERA = {
    "hiera_tiny": (96, 1, (1, 2, 7, 2), (5, 7, 9), (8, 4, 14, 7), (7, 7)),
    "hiera_large": (144, 2, (2, 6, 36, 4), (23, 33, 43), (8, 4, 16, 8), (7, 7)),
}


def official_hiera_sam2_config(size: str, image_size: int = REAL_IMAGE_SIZE) -> Sam2VideoConfig:
    """`Sam2VideoConfig` of the official SAM2.1 `hiera_t` (`size="hiera_tiny"`) or `hiera_l` (`"hiera_large"`).

    Stage widths and heads double at every stage (the official `dim_mul = head_mul = 2`); the FPN neck reads the
    stages from the widest to the narrowest (`backbone_channel_list`).
    """
    if size not in _OFFICIAL_HIERA:
        raise ValueError(f"unknown Hiera size {size!r}; choose one of {sorted(_OFFICIAL_HIERA)}")
    embed_dim, heads, stages, global_blocks, windows, background = _OFFICIAL_HIERA[size]
    widths = [embed_dim * 2**stage for stage in range(len(stages))]
    heads_per_stage = [heads * 2**stage for stage in range(len(stages))]
    return Sam2VideoConfig(
        vision_config={
            "backbone_config": {
                "model_type": "sam2_hiera_det_model",
                "image_size": [image_size, image_size],
                "hidden_size": embed_dim,
                "num_attention_heads": heads,
                "blocks_per_stage": list(stages),
                "embed_dim_per_stage": widths,
                "num_attention_heads_per_stage": heads_per_stage,
                "window_size_per_stage": list(windows),
                "global_attention_blocks": list(global_blocks),
                "window_positional_embedding_background_size": list(background),
            },
            "backbone_channel_list": list(reversed(widths)),
            "backbone_feature_sizes": [[image_size // 4] * 2, [image_size // 8] * 2, [image_size // 16] * 2],
            "fpn_hidden_size": 256,
        },
        prompt_encoder_config={"image_size": image_size, "patch_size": 16, "hidden_size": 256},
        image_size=image_size,
        memory_attention_rope_feat_sizes=[image_size // 16, image_size // 16],
    )


def sam2_config_for(size: str) -> Sam2VideoConfig:
    """The SAM2 config of a benchmark size: `"tiny"` (128 px, the embedded default) or an official Hiera at 1024 px."""
    if size == "tiny":
        return tiny_sam2_config(TINY_SAM2_IMAGE_SIZE)
    return official_hiera_sam2_config(size)


def sam2_input_size(size: str) -> int:
    """SAM2 input side S for a benchmark size."""
    return TINY_SAM2_IMAGE_SIZE if size == "tiny" else REAL_IMAGE_SIZE


def build_sam2_bench_model(
    size: str, seed: int = 0, device: str = "cpu", dtype: torch.dtype = torch.float32, gamma: float = 0.5
) -> MaskCMAModel:
    """A MaskCMA model whose SAM2 has the given size and whose VLM is the tiny one, in eval mode.

    The SAM2 part (image encoder, prompt encoder, mask decoder, CMA) is what the image-side benchmarks run; the VLM
    only supplies the width of `seg_proj`/`text_proj` and is never called. γ is set to a non-zero value so that the
    CMA's residual really changes the embedding (γ = 0 at initialisation would not change the cost, but a
    non-zero γ keeps the measured path honest).
    """
    if size not in SAM2_BENCH_SIZES:
        raise ValueError(f"unknown benchmark size {size!r}; choose one of {list(SAM2_BENCH_SIZES)}")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = MaskCMAModel(tiny_config(sam2_config=sam2_config_for(size)))
    with torch.no_grad():
        model.cma.gamma.fill_(gamma)
    return model.to(device=device, dtype=dtype).eval()
