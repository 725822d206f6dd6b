"""Training MaskCMA: the trainer (loss weighting, exact gradient accumulation, per-component logging), the CMA warm-up
callback, the collator for mixed image/video batches, the LoRA recipe, and `maskcma train`."""

from .callbacks import GammaWarmupCallback, active_cma, set_warmup_factor, unwrap_maskcma, warmup_factor_at
from .collator import MaskCMADataCollator
from .data import ProcessedRecords
from .lora import apply_lora, default_lora_config, merge_lora
from .trainer import AccumulationCounts, MaskCMATrainer

__all__ = [
    "AccumulationCounts",
    "GammaWarmupCallback",
    "MaskCMADataCollator",
    "MaskCMATrainer",
    "ProcessedRecords",
    "active_cma",
    "apply_lora",
    "default_lora_config",
    "merge_lora",
    "set_warmup_factor",
    "unwrap_maskcma",
    "warmup_factor_at",
]
