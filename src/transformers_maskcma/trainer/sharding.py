"""Training with sharded parameters (FSDP, DeepSpeed ZeRO): where the model is built, how γ is read, how the final
model is exported.

Three things differ from a DDP run when parameters are sharded:

- **Building the model.** While a ZeRO-3 configuration is alive (a `TrainingArguments` with `deepspeed=...`, or an
  accelerate DeepSpeed launch), transformers builds every `from_pretrained` / `from_config` model inside
  `deepspeed.zero.Init`, which partitions parameters as they are created. `MaskCMAModel.from_pretrained_parts`
  copies the state of a loaded VLM and SAM2 into a new model and would copy 0-element partitions.
  `build_model_before_arguments` builds the model before the arguments exist (and refuses to build it while a
  ZeRO-3 configuration is active); DeepSpeed partitions the finished model when training starts.
- **Reading γ.** Under FSDP2 γ is a sharded `DTensor`, under FSDP1 a view that is empty on the processes that do
  not hold it, under ZeRO-3 a 0-element partition. `full_scalar_value` gathers its full value (collectively).
- **Exporting.** `merge_lora` and `save_pretrained` need the full weights. `gather_full_state_dict` collects them
  through the engine (DeepSpeed's consolidated 16-bit state, FSDP's full state dict); `export_final_model` loads
  them strictly into an unsharded copy of the model (its parameters on the meta device, so it costs no memory until
  the weights arrive), merges LoRA there and saves it from the main process.
"""

from __future__ import annotations

import os

import torch
import torch.distributed as dist
from torch import nn

from ..modeling import MaskCMAModel


class ShardedTrainingError(RuntimeError):
    """A sharded (FSDP / DeepSpeed) run is set up in a way that would corrupt or lose the weights."""


def zero3_enabled() -> bool:
    """Whether a DeepSpeed ZeRO-3 configuration is active (transformers then builds models inside `zero.Init`)."""
    from transformers.integrations import is_deepspeed_zero3_enabled

    return bool(is_deepspeed_zero3_enabled())


def build_model_before_arguments(build, *args, **kwargs):
    """Call `build(*args, **kwargs)` (a model builder such as `build_model_and_processor`) where ZeRO-3 cannot
    partition the parameters as they are created.

    `maskcma train` calls it before it creates the `TrainingArguments`, so no ZeRO-3 configuration exists yet.
    Raises `ShardedTrainingError` when one is already active (a `TrainingArguments` with a ZeRO-3 `deepspeed`
    config alive in the same Python process): the model would be built from 0-element partitions.
    """
    if zero3_enabled():
        raise ShardedTrainingError(
            "a DeepSpeed ZeRO-3 configuration is active while the MaskCMA model is being built: transformers would "
            "partition the VLM and SAM2 as they load and MaskCMAModel.from_pretrained_parts would copy 0-element "
            "tensors. Build the model before creating the TrainingArguments (maskcma train does), or delete the "
            "TrainingArguments / HfDeepSpeedConfig that holds the ZeRO-3 config first."
        )
    return build(*args, **kwargs)


def meta_copy(model: MaskCMAModel) -> MaskCMAModel:
    """An unsharded `MaskCMAModel` with the architecture of `model`: its parameters on the meta device (no memory),
    its buffers (rotary frequencies, positional grids; small) built as usual.

    Build it where ZeRO-3 is not active (`build_model_before_arguments`); `load_full_state_dict` fills it."""
    from accelerate import init_empty_weights

    with init_empty_weights(include_buffers=False):
        copy = type(model)(model.config)
    return copy


def is_zero3_partitioned(parameter: torch.Tensor) -> bool:
    """DeepSpeed ZeRO-3 marks the parameters it partitions with a `ds_id`."""
    return hasattr(parameter, "ds_id")


def full_scalar_value(parameter: torch.Tensor, fsdp1_view: bool = False) -> float:
    """The full value of a one-element parameter (γ) on every process, whatever shards it.

    - DeepSpeed ZeRO-3: gathered with `deepspeed.zero.GatheredParameters`;
    - FSDP2: a sharded `DTensor`, gathered with `full_tensor()`;
    - FSDP1 (``fsdp1_view=True``): the local view holds the element on one process and is empty on the others; the
      value is summed over the processes;
    - otherwise (single process, DDP, ZeRO-1/2): the parameter itself.

    Collective in the first three cases: every process must call it. Raises `ShardedTrainingError` when the value
    cannot be found (never a silent 0).
    """
    if is_zero3_partitioned(parameter):
        import deepspeed

        with deepspeed.zero.GatheredParameters([parameter]):
            full = parameter.detach().reshape(-1).float().clone()
    elif hasattr(parameter, "full_tensor"):
        full = parameter.detach().full_tensor().reshape(-1).float()
    elif fsdp1_view:
        local = parameter.detach().reshape(-1).float()
        held = torch.stack([local.sum(), torch.tensor(float(local.numel()), device=local.device)])
        if dist.is_available() and dist.is_initialized():
            dist.all_reduce(held)
        if int(held[1]) != 1:
            raise ShardedTrainingError(
                f"expected one element in total over the processes' FSDP views of the parameter, found {int(held[1])}"
            )
        full = held[:1]
    else:
        full = parameter.detach().reshape(-1).float()
    if full.numel() != 1:
        raise ShardedTrainingError(
            f"expected a one-element parameter, got {full.numel()} elements (shape {tuple(parameter.shape)}); a "
            "sharding engine this code does not know may hold it"
        )
    return float(full[0])


def gather_full_state_dict(trainer) -> dict[str, torch.Tensor]:
    """The full (unsharded) state dict of `trainer.model`, on the main process; other processes may get an empty
    dict. Collective: call it on every process.

    DeepSpeed: the engine's state (ZeRO-3 needs ``stage3_gather_16bit_weights_on_model_save: true``, checked by
    `check_export_possible`); FSDP launched by accelerate: accelerate's full state dict; anything else (one process,
    DDP, a model sharded with `torch.distributed.fsdp.fully_shard`): torch's `get_model_state_dict` with
    ``full_state_dict=True``.
    """
    if getattr(trainer, "is_deepspeed_enabled", False) or getattr(trainer, "is_fsdp_enabled", False):
        return trainer.accelerator.get_state_dict(trainer.model_wrapped)
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    distributed = dist.is_available() and dist.is_initialized()
    options = StateDictOptions(full_state_dict=True, cpu_offload=distributed)
    return get_model_state_dict(trainer.model, options=options)


def load_full_state_dict(model: nn.Module, state_dict: dict[str, torch.Tensor]) -> nn.Module:
    """Load a gathered full state dict into an unsharded model (or its `meta_copy`), strictly.

    Every parameter and persistent buffer must be in `state_dict` except the second name of a tied pair (the LM
    head of a tied-embedding LLM); a missing or unexpected key raises `ShardedTrainingError` naming it. Tensors are
    assigned (meta-device parameters are replaced); a plain model's tied weights are tied again."""
    tied = tied_parameter_names(model)
    result = model.load_state_dict(state_dict, strict=False, assign=True)
    missing = [key for key in result.missing_keys if key not in tied]
    if missing or result.unexpected_keys:
        raise ShardedTrainingError(
            f"the gathered state does not match the model: missing keys {missing[:20]}, unexpected keys "
            f"{list(result.unexpected_keys)[:20]}"
        )
    if not hasattr(model, "get_base_model"):  # a plain model: tie the LM head to the embedding again
        model.tie_weights()  # (peft wraps both in token adapters whose keys are all in the state dict)
    _check_no_meta(model, buffers=False)
    return model


def _check_no_meta(model: nn.Module, buffers: bool) -> None:
    tensors = [*model.named_parameters(), *(model.named_buffers() if buffers else [])]
    still_meta = [name for name, tensor in tensors if tensor.is_meta]
    if still_meta:
        raise ShardedTrainingError(f"tensors without a value after loading the gathered state: {still_meta[:20]}")


def tied_parameter_names(model: nn.Module) -> set[str]:
    """Names of parameters that share their tensor with an earlier-named parameter."""
    seen: dict[int, str] = {}
    tied = set()
    for name, parameter in model.named_parameters(remove_duplicate=False):
        if id(parameter) in seen:
            tied.add(name)
        else:
            seen[id(parameter)] = name
    return tied


def check_export_possible(args) -> None:
    """Before training: the final export needs the full weights, which ZeRO-3 only gathers with
    ``stage3_gather_16bit_weights_on_model_save: true``. Raise now rather than after the run."""
    config = getattr(getattr(args, "hf_deepspeed_config", None), "config", None)
    if not config:
        return
    zero = config.get("zero_optimization", {})
    if int(zero.get("stage", 0)) == 3 and not zero.get("stage3_gather_16bit_weights_on_model_save", False):
        raise ShardedTrainingError(
            "DeepSpeed ZeRO-3 without `stage3_gather_16bit_weights_on_model_save: true` cannot gather the full "
            "weights for the final model (OUTPUT_DIR/model); add it to `zero_optimization` in the DeepSpeed config"
        )


def export_final_model(trainer, unsharded_copy: nn.Module, processor, model_dir: str, merge=None) -> str:
    """Save the trained model to `model_dir` from the full state the engine gathers.

    Args:
        trainer: the `MaskCMATrainer` after `train()`.
        unsharded_copy (`nn.Module`): the training model's architecture, unsharded (a `meta_copy`, wrapped with the
            same LoRA when the run used LoRA).
        processor: saved with the model.
        model_dir (`str`): the output folder.
        merge (*optional*): called on the loaded copy before saving (`merge_lora` for LoRA runs).

    Collective (every process calls it); only the main process loads and writes.
    """
    state_dict = gather_full_state_dict(trainer)
    if trainer.is_world_process_zero():
        if not state_dict:
            raise ShardedTrainingError(
                "the engine gathered no weights on the main process; the Trainer's process numbering and the "
                "engine's disagree (DeepSpeed and Trainer must see the same processes)"
            )
        model = load_full_state_dict(unsharded_copy, state_dict)
        final = merge(model) if merge is not None else model
        _check_no_meta(final, buffers=True)
        final.save_pretrained(model_dir)
        processor.save_pretrained(model_dir)
    trainer.accelerator.wait_for_everyone()
    return os.path.abspath(model_dir)


__all__ = [
    "ShardedTrainingError",
    "build_model_before_arguments",
    "check_export_possible",
    "export_final_model",
    "full_scalar_value",
    "gather_full_state_dict",
    "is_zero3_partitioned",
    "load_full_state_dict",
    "meta_copy",
    "zero3_enabled",
]
