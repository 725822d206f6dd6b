"""Trainer callbacks: the CMA warm-up schedule, and the check that trainable weights are float32 master weights."""

from __future__ import annotations

import torch
from torch import nn
from transformers import TrainerCallback, TrainerControl, TrainerState, TrainingArguments

from ..modeling import MaskCMAModel, MaskGuidedCrossModalAttention


def unwrap_maskcma(model: nn.Module) -> MaskCMAModel:
    """The `MaskCMAModel` inside `model`: the model itself, a peft `PeftModel` around it (`get_base_model()`),
    or a distributed wrapper (`.module`)."""
    seen = model
    for _ in range(4):
        if isinstance(seen, MaskCMAModel):
            return seen
        if hasattr(seen, "get_base_model"):
            seen = seen.get_base_model()
        elif hasattr(seen, "module"):
            seen = seen.module
        else:
            break
    if isinstance(seen, MaskCMAModel):
        return seen
    raise TypeError(
        f"expected a MaskCMAModel (optionally wrapped by peft or DDP), got {type(model).__name__}; "
        "the CMA warm-up and the MaskCMA losses only apply to MaskCMA models"
    )


def cma_modules(model: nn.Module) -> list[MaskGuidedCrossModalAttention]:
    """Every CMA module of `model`. Under peft, `modules_to_save` keeps the original CMA and a trained copy
    side by side; both are returned so that a setting reaches the one that runs."""
    modules = [module for module in model.modules() if isinstance(module, MaskGuidedCrossModalAttention)]
    if not modules:
        raise ValueError(f"{type(model).__name__} has no MaskGuidedCrossModalAttention module")
    return modules


def active_cma(model: nn.Module) -> MaskGuidedCrossModalAttention:
    """The CMA module that runs in the forward pass (under peft: the `modules_to_save` copy of the active
    adapter)."""
    cma = unwrap_maskcma(model).cma
    copies = getattr(cma, "modules_to_save", None)
    if copies is not None:
        active = getattr(cma, "active_adapters", None) or [getattr(cma, "active_adapter", "default")]
        name = active[0] if isinstance(active, (list, tuple)) else active
        if name in copies:
            return copies[name]
        return cma.original_module
    return cma


def warmup_factor_at(step: int, max_steps: int, warmup_ratio: float) -> float:
    """The CMA warm-up factor after `step` optimizer steps of `max_steps`: ``min(1, step / (ratio · max_steps))``,
    so 0 at the start, linear, and 1 from ``ratio · max_steps`` steps on; 1 when the ratio (or `max_steps`) is 0."""
    if not 0.0 <= warmup_ratio <= 1.0:
        raise ValueError(f"warmup_ratio={warmup_ratio!r} must lie in [0, 1]")
    warmup_steps = warmup_ratio * max(int(max_steps), 0)
    if warmup_steps <= 0:
        return 1.0
    return float(min(1.0, max(int(step), 0) / warmup_steps))


def set_warmup_factor(model: nn.Module, factor: float) -> None:
    """Set the CMA warm-up factor on a plain, peft-wrapped or DDP-wrapped MaskCMA model.

    Each CMA keeps the factor in its non-persistent 0-d buffer `warmup_factor_tensor`, filled in place: the tensor
    object never changes, so a `torch.compile`d forward reads the new value without recompiling (a Python float
    attribute that changes every step would be a new constant to guard on)."""
    base = unwrap_maskcma(model)
    base.set_cma_warmup_factor(factor)  # validates the range
    for module in cma_modules(base):
        module.warmup_factor = float(factor)


HALF_DTYPES = (torch.float16, torch.bfloat16)


def check_float32_master_weights(model: nn.Module, args: TrainingArguments) -> None:
    """Refuse to train half-precision trainable weights with a plain optimizer.

    AdamW applied to bfloat16 weights rounds every update to 8 bits of mantissa: γ (initialised to 0 and moved by
    steps of about the learning rate) and the heads lose their small updates. Train a float32 model with
    `bf16=True` (the Trainer's autocast: float32 master weights, bfloat16 activations) instead. DeepSpeed's bf16/fp16
    optimizers keep float32 master copies of half-precision weights, so `args.deepspeed` is accepted.

    Args:
        model: the model handed to the Trainer (plain, peft-wrapped or distributed-wrapped).
        args: the Trainer's `TrainingArguments`.

    Raises:
        ValueError: naming the half-precision trainable parameters and the fix.
    """
    if getattr(args, "deepspeed", None):
        return
    half = [
        f"{name} ({parameter.dtype})"
        for name, parameter in model.named_parameters()
        if parameter.requires_grad and parameter.dtype in HALF_DTYPES
    ]
    if half:
        # the CMA and the heads first: γ is the weight that suffers most (it starts at 0 and moves by ~lr a step)
        half.sort(key=lambda entry: ("gamma" not in entry, not entry.startswith(("cma.", "seg_proj.", "text_proj."))))
        shown = ", ".join(half[:4]) + (f" and {len(half) - 4} more" if len(half) > 4 else "")
        raise ValueError(
            f"{len(half)} trainable parameters are in half precision: {shown}. An optimizer on bfloat16/float16 "
            "weights loses small updates (the CMA's gamma starts at 0). Load the model in float32 (dtype=torch.float32"
            ", the default) and train with bf16=True (or fp16=True): the Trainer's autocast keeps float32 master "
            "weights and computes in half precision. (DeepSpeed's bf16 optimizer, which keeps float32 master copies, "
            "is accepted.)"
        )


class GammaWarmupCallback(TrainerCallback):
    """Ramps the CMA warm-up factor from 0 to 1 over the first `warmup_ratio` of the training steps.

    With ``cma_config.warmup_target="residual"`` (default) the factor scales the residual scale γ; with ``"mask"`` it
    is ω in ``gate = 1 + ω (sigmoid(G) − 1)`` — the model applies it to the right place. The factor is a function of
    ``state.global_step`` and ``state.max_steps`` only, so resuming from a checkpoint restores it exactly. It is set
    at the start of training and before every optimizer step (for all micro-batches of that step), and reset to 1
    when training ends, so the trained model runs at full strength at inference.

    Args:
        warmup_ratio (`float`, *optional*): fraction of the training steps of the ramp; default the model's
            ``config.warmup_ratio``.
    """

    def __init__(self, warmup_ratio: float | None = None):
        if warmup_ratio is not None and not 0.0 <= float(warmup_ratio) <= 1.0:
            raise ValueError(f"GammaWarmupCallback: warmup_ratio={warmup_ratio!r} must lie in [0, 1]")
        self.warmup_ratio = None if warmup_ratio is None else float(warmup_ratio)
        self.current_factor: float | None = None

    def ratio_for(self, model: nn.Module) -> float:
        if self.warmup_ratio is not None:
            return self.warmup_ratio
        return float(unwrap_maskcma(model).config.warmup_ratio)

    def _apply(self, state: TrainerState, model: nn.Module | None) -> None:
        if model is None:
            raise ValueError("GammaWarmupCallback needs the model; it is passed by Trainer to every callback event")
        factor = warmup_factor_at(state.global_step, state.max_steps, self.ratio_for(model))
        set_warmup_factor(model, factor)
        self.current_factor = factor

    def on_train_begin(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs):
        self._apply(state, kwargs.get("model"))

    def on_step_begin(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs):
        self._apply(state, kwargs.get("model"))

    def on_train_end(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs):
        model = kwargs.get("model")
        if model is not None:
            set_warmup_factor(model, 1.0)
        self.current_factor = 1.0


__all__ = [
    "GammaWarmupCallback",
    "active_cma",
    "check_float32_master_weights",
    "cma_modules",
    "set_warmup_factor",
    "unwrap_maskcma",
    "warmup_factor_at",
]
