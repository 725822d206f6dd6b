"""The embedded tiny default: a complete MaskCMA model with random weights, small enough for CPU tests and demos."""

from __future__ import annotations

import torch

from .modeling import MaskCMAConfig, MaskCMAModel
from .modeling.tiny_configs import TINY_SEG_TOKEN_ID
from .processing.tiny_tokenizer import build_tiny_tokenizer


def tiny_config(**overrides) -> MaskCMAConfig:
    """`MaskCMAConfig.tiny()` with the tiny tokenizer's ``[SEG]`` id."""
    overrides.setdefault("seg_token_id", TINY_SEG_TOKEN_ID)
    return MaskCMAConfig.tiny(**overrides)


def build_tiny_model(seed: int = 0, **config_overrides) -> tuple[MaskCMAModel, object]:
    """Build the tiny model (random weights from `seed`) and its tokenizer.

    Returns:
        `(model, tokenizer)`; the tokenizer is also attached as `model.tokenizer`.
    """
    config = tiny_config(**config_overrides)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = MaskCMAModel(config)
    tokenizer = build_tiny_tokenizer()
    model.tokenizer = tokenizer
    model.vlm.generation_config.eos_token_id = tokenizer.eos_token_id
    model.vlm.generation_config.pad_token_id = tokenizer.pad_token_id
    return model, tokenizer
