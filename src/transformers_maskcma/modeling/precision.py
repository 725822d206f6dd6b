"""Float32 numerics for small, decision-making modules of a half-precision model.

SAM2's IoU head predicts the IoU of each of the three candidate masks, and the candidate with the highest score is
kept. In bfloat16 (8 bits of mantissa) two candidates whose float32 scores differ by less than about 0.4 % round to
the same value and the argmax keeps the first one, another mask than in float32. [`run_in_float32`] makes such a
module compute in float32 whatever the dtype of its weights and inputs, and return float32.

This file imports only torch (it is copied flat into Hub repositories as remote code).
"""

from __future__ import annotations

import torch
from torch import nn

HALF_DTYPES = (torch.float16, torch.bfloat16)


class Float32Forward:
    """A forward hook that re-runs its module on float32 copies of its weights and floating inputs when either is
    in half precision, and returns that float32 output instead (gradients flow to the half-precision weights and
    inputs through the casts). In float32 it does nothing. The half-precision output computed first is dropped:
    for a small head (an MLP on a few tokens) this costs a negligible second pass."""

    def __init__(self):
        self.running = False  # set while the float32 pass runs (it calls the module, and so this hook, again)

    def __call__(self, module: nn.Module, args: tuple, output):
        if self.running:
            return None
        tensors = [value for value in args if isinstance(value, torch.Tensor) and value.is_floating_point()]
        weights = dict(module.named_parameters())
        if not any(t.dtype in HALF_DTYPES for t in [*tensors, *weights.values()]):
            return None
        float_args = tuple(
            value.float() if isinstance(value, torch.Tensor) and value.is_floating_point() else value for value in args
        )
        self.running = True
        try:
            return torch.func.functional_call(module, {name: w.float() for name, w in weights.items()}, float_args)
        finally:
            self.running = False


def run_in_float32(module: nn.Module) -> nn.Module:
    """Make `module` compute in float32 and return float32 outputs, whatever the dtype of its weights and
    positional inputs (a [`Float32Forward`] hook; registered once). Returns `module`."""
    if not any(isinstance(hook, Float32Forward) for hook in module._forward_hooks.values()):
        module.register_forward_hook(Float32Forward())
    return module


__all__ = ["Float32Forward", "run_in_float32"]
