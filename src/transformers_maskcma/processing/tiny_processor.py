"""The processor of the embedded tiny default (package-only: it builds the tiny tokenizer locally)."""

from __future__ import annotations

from .processing_maskcma import MaskCMAProcessor
from .tiny_tokenizer import build_tiny_tokenizer


def build_tiny_processor(tokenizer=None, **kwargs) -> MaskCMAProcessor:
    """The processor of `transformers_maskcma.tiny.build_tiny_model()`: 64×64 VLM tiles (16 image tokens a tile),
    SAM2 input 128×128, training masks at 32×32, the tiny tokenizer (built when not given).

    Args:
        tokenizer: the tiny tokenizer (e.g. the one `build_tiny_model()` returned); built when `None`.
        kwargs: further `MaskCMAProcessor.from_model_config` arguments (`num_key_frames`, …).
    """
    from ..tiny import tiny_config

    if tokenizer is None:
        tokenizer = build_tiny_tokenizer()
    return MaskCMAProcessor.from_model_config(tiny_config(), tokenizer, **kwargs)


__all__ = ["build_tiny_processor"]
