"""LoRA for MaskCMA: the recipe's adapter configuration and the merge for export.

`default_lora_config(model)` reproduces the Sa2VA / MaskCMA recipe:

- LoRA (r=128, alpha=256, dropout 0.05) on the attention and MLP projections of the VLM's *language model* only.
  The modules are found by name from the model — the language model is located with the VLM's `get_decoder()`
  and only its linear layers named like projections are targeted — so the vision tower, the VLM's projector and
  SAM2 never receive adapters;
- fully trained copies (`modules_to_save`) of the CMA, `seg_proj`, `text_proj`, the conv prior head (when the
  config has one) and SAM2's mask decoder, and with `video_training="propagate"` SAM2's memory modules (memory
  attention, memory encoder, object-pointer projection and its temporal encoding, `SAM2_MEMORY_MODULES`);
- trainable rows of the token embedding and of the LM head for the new special tokens (``[SEG]`` by default) with
  peft's `trainable_token_indices`, so the rest of the vocabulary stays frozen. When the LM head is tied to the
  embedding (small LLMs), use `apply_lora`: it ties the head's rows to the embedding's (peft only detects tying
  from a top-level ``tie_word_embeddings``, which the composite MaskCMA config does not have).

`merge_lora(peft_model)` folds the adapters, the trained copies and the trained token rows back into a plain
`MaskCMAModel` that `save_pretrained` / `maskcma export` write like any other checkpoint.

`load_adapter_strict(peft_model, folder)` loads saved adapter weights (a training checkpoint or the adapter folder
of a LoRA run) strictly: the file must hold exactly the tensors the model's adapter saves — LoRA matrices, every
`modules_to_save` copy, the trained token rows — with their shapes; a missing or unexpected key is an
`AdapterLoadError` naming the keys, and every tensor is compared after loading. peft's own `load_adapter` only warns
about missing keys and ignores unexpected ones.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path

import torch
from peft import LoraConfig, PeftModel, get_peft_model
from peft.utils import get_peft_model_state_dict, set_peft_model_state_dict
from peft.utils.other import TrainableTokensWrapper
from torch import nn

from ..modeling import MaskCMAModel
from ..modeling.video_training import SAM2_MEMORY_MODULES, trained_memory_names
from .callbacks import unwrap_maskcma

#: Leaf names of the language model's attention and MLP projections across common LLM families
#: (Qwen2/Llama/Mistral: q/k/v/o + gate/up/down; phi-3 style fused qkv and gate_up; InternLM2: wqkv, wo, w1–w3).
LLM_PROJECTION_NAMES: frozenset[str] = frozenset(
    {
        "q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj",
        "qkv_proj", "gate_up_proj", "wqkv", "wo", "w1", "w2", "w3",
    }
)

#: Modules trained in full next to the LoRA adapters (those that exist in the model).
FULLY_TRAINED_MODULES: tuple[str, ...] = ("cma", "seg_proj", "text_proj", "prior_head", "sam2.mask_decoder")

LORA_RECIPE = {"r": 128, "lora_alpha": 256, "lora_dropout": 0.05}


def language_model_prefix(model: MaskCMAModel) -> str:
    """Qualified name (inside `model`) of the VLM's language model, e.g. ``"vlm.model.language_model"``."""
    decoder = model.vlm.get_decoder()
    for name, module in model.named_modules():
        if module is decoder:
            return name
    raise ValueError(
        f"cannot locate the language model of {type(model.vlm).__name__} inside the MaskCMA model; "
        "its get_decoder() returned a module that is not a submodule"
    )


def llm_lora_target_modules(model: MaskCMAModel, projection_names: Iterable[str] = LLM_PROJECTION_NAMES) -> list[str]:
    """Qualified names of the `nn.Linear` projections of the language model (the LoRA targets).

    Raises `ValueError` when none is found (an LLM whose projections have other names: pass `target_modules`)."""
    prefix = language_model_prefix(model) + "."
    names = set(projection_names)
    targets = [
        name
        for name, module in model.named_modules()
        if name.startswith(prefix) and isinstance(module, nn.Linear) and name.rsplit(".", 1)[-1] in names
    ]
    if not targets:
        raise ValueError(
            f"no linear layer named {sorted(names)} inside {prefix[:-1]}; give the projection names of this LLM with "
            "default_lora_config(model, projection_names=[...])"
        )
    return targets


def default_lora_config(
    model: MaskCMAModel,
    r: int = LORA_RECIPE["r"],
    lora_alpha: int = LORA_RECIPE["lora_alpha"],
    lora_dropout: float = LORA_RECIPE["lora_dropout"],
    new_token_ids: list[int] | None = None,
    projection_names: Iterable[str] = LLM_PROJECTION_NAMES,
    train_new_token_rows: bool = True,
) -> LoraConfig:
    """The recipe's `LoraConfig` for `model` (module docstring).

    Args:
        model: the `MaskCMAModel` (or a peft/DDP wrapper of it) the adapters are made for.
        r, lora_alpha, lora_dropout: LoRA hyper-parameters (recipe: 128, 256, 0.05).
        new_token_ids: vocabulary ids whose embedding (and tied LM-head) rows are trained; default the
            ``[SEG]`` id of the config.
        projection_names: leaf names of the language-model projections to adapt.
        train_new_token_rows: `False` leaves the token embeddings frozen.
    """
    base = unwrap_maskcma(model)
    if new_token_ids is None:
        if base.config.seg_token_id is None:
            raise ValueError("MaskCMAConfig.seg_token_id is not set; pass new_token_ids=[...] to default_lora_config")
        new_token_ids = [int(base.config.seg_token_id)]
    vocab = base.get_input_embeddings().weight.shape[0]
    bad = [i for i in new_token_ids if not 0 <= int(i) < vocab]
    if bad:
        raise ValueError(f"new_token_ids {bad} are outside the vocabulary of {vocab} embeddings")
    modules_to_save = [name for name in FULLY_TRAINED_MODULES if _has_module(base, name)]
    # video_training="propagate": SAM2's memory modules learn from the propagated frames' losses
    modules_to_save += [f"sam2.{name}" for name in SAM2_MEMORY_MODULES if name in trained_memory_names(base.config)]
    token_rows = None
    if train_new_token_rows:
        ids = [int(i) for i in new_token_ids]
        token_rows = {_module_name(base, base.get_input_embeddings()): ids}
        if not lm_head_is_tied(base):
            # separate LM-head weights get their own trained rows; a tied head is tied by `apply_lora`
            token_rows[_module_name(base, base.get_output_embeddings())] = ids
    return LoraConfig(
        r=r,
        lora_alpha=lora_alpha,
        lora_dropout=lora_dropout,
        target_modules=llm_lora_target_modules(base, projection_names),
        modules_to_save=modules_to_save,
        trainable_token_indices=token_rows,
        bias="none",
    )


def lm_head_is_tied(model: MaskCMAModel) -> bool:
    """Whether the VLM's LM head shares its weight with the input token embedding."""
    head = model.get_output_embeddings()
    embedding = model.get_input_embeddings()
    if isinstance(embedding, TrainableTokensWrapper):
        embedding = embedding.token_adapter.base_layer
    if isinstance(head, TrainableTokensWrapper):
        head = head.token_adapter.base_layer
    return head is not None and head.weight is embedding.weight


def _module_name(model: nn.Module, target: nn.Module) -> str:
    for name, module in model.named_modules():
        if module is target:
            return name
    raise ValueError(f"{type(target).__name__} is not a submodule of {type(model).__name__}")


def apply_lora(model: MaskCMAModel, lora_config: LoraConfig | None = None, adapter_name: str = "default") -> PeftModel:
    """`peft.get_peft_model` with `default_lora_config(model)` by default, plus the LM-head tying peft cannot see.

    peft ties trainable token rows of the LM head to those of the embedding only when the *top-level* config says
    ``tie_word_embeddings``; in MaskCMA the tying lives inside the VLM. When the head shares the embedding's weight,
    this wraps the head with a `TrainableTokensWrapper` tied to the embedding's adapter, so the trained ``[SEG]``
    row is used by both — during training and after `merge_lora` alike.
    """
    base = unwrap_maskcma(model)
    config = default_lora_config(base) if lora_config is None else lora_config
    tied = lm_head_is_tied(base)
    peft_model = get_peft_model(base, config, adapter_name=adapter_name)
    embedding = base.get_input_embeddings()
    head = base.get_output_embeddings()
    if tied and isinstance(embedding, TrainableTokensWrapper) and not isinstance(head, TrainableTokensWrapper):
        adapter = embedding.token_adapter
        wrapper = TrainableTokensWrapper(
            head, adapter_name, token_indices=adapter.token_indices[adapter_name], tied_adapter=adapter
        )
        wrapper.set_adapter(adapter_name)
        base.vlm.set_output_embeddings(wrapper)
    return peft_model


def _has_module(model: nn.Module, name: str) -> bool:
    module = model
    for part in name.split("."):
        module = getattr(module, part, None)
        if module is None:
            return False
    return isinstance(module, nn.Module)


class AdapterLoadError(ValueError):
    """Saved adapter weights do not match the model's adapter; the message names the file, the keys and the fix."""


ADAPTER_WEIGHT_FILES = ("adapter_model.safetensors", "adapter_model.bin")


def _name_keys(keys: list[str], limit: int = 12) -> str:
    shown = ", ".join(keys[:limit])
    return shown + (f" and {len(keys) - limit} more" if len(keys) > limit else "")


def read_adapter_weights(folder: str | os.PathLike) -> tuple[dict[str, torch.Tensor], Path]:
    """The tensors of ``adapter_model.safetensors`` (or ``.bin``) in `folder`, on the CPU, and the file read.

    Raises:
        FileNotFoundError: `folder` holds no adapter weights.
        AdapterLoadError: the file is truncated or corrupt (the message names it).
    """
    from ..run_folder import check_safetensors_file

    folder = Path(folder)
    for name in ADAPTER_WEIGHT_FILES:
        path = folder / name
        if not path.is_file():
            continue
        if name.endswith(".safetensors"):
            check_safetensors_file(path)
            from safetensors.torch import load_file

            return load_file(str(path), device="cpu"), path
        try:
            return torch.load(path, map_location="cpu", weights_only=True), path
        except Exception as error:  # torch raises several types for a damaged pickle
            raise AdapterLoadError(f"{path} cannot be read ({error}); re-copy the file or train again") from None
    raise FileNotFoundError(
        f"{folder} holds no adapter weights ({' or '.join(ADAPTER_WEIGHT_FILES)}); pass the checkpoint or adapter "
        "folder written by a LoRA run"
    )


def adapter_state_dict(peft_model: PeftModel, adapter_name: str = "default") -> dict[str, torch.Tensor]:
    """The tensors peft saves for `adapter_name` (LoRA matrices, `modules_to_save` copies, trained token rows), with
    a check that every trainable parameter is among them (so saving and resuming lose nothing).

    Raises:
        AdapterLoadError: a trainable parameter is not part of the saved adapter state.
    """
    state = get_peft_model_state_dict(peft_model, adapter_name=adapter_name)
    saved = {tensor.data_ptr() for tensor in state.values()}
    unsaved = [
        name
        for name, parameter in peft_model.named_parameters()
        if parameter.requires_grad and parameter.data_ptr() not in saved
    ]
    if unsaved:
        raise AdapterLoadError(
            f"trainable parameters that the adapter would not save: {_name_keys(unsaved)}; add their modules to "
            "LoraConfig.modules_to_save"
        )
    return state


def load_adapter_strict(
    peft_model: PeftModel, folder: str | os.PathLike, adapter_name: str = "default"
) -> dict[str, torch.Tensor]:
    """Load the adapter weights saved in `folder` into `peft_model`'s adapter `adapter_name`, strictly.

    Every tensor the adapter saves must be in the file with the same shape, and the file must hold nothing else;
    after loading, every tensor is compared with the file. Returns the loaded tensors (peft's key names).

    Raises:
        AdapterLoadError: missing, unexpected or mis-shaped keys (named), or a tensor that did not load.
        FileNotFoundError: no adapter weights in `folder`.
    """
    weights, path = read_adapter_weights(folder)
    expected = adapter_state_dict(peft_model, adapter_name)
    missing = sorted(set(expected) - set(weights))
    unexpected = sorted(set(weights) - set(expected))
    mismatched = sorted(
        f"{key} {tuple(weights[key].shape)} vs {tuple(expected[key].shape)}"
        for key in set(expected) & set(weights)
        if weights[key].shape != expected[key].shape
    )
    if missing or unexpected or mismatched:
        problems = []
        if missing:
            problems.append(f"missing keys {_name_keys(missing)}")
        if unexpected:
            problems.append(f"unexpected keys {_name_keys(unexpected)}")
        if mismatched:
            problems.append(f"shapes differ (file vs model) for {_name_keys(mismatched)}")
        raise AdapterLoadError(
            f"the adapter weights in {path} do not match the model's adapter: {'; '.join(problems)}. Load them into "
            "a model built with the same LoRA settings (r, target modules, modules_to_save, trained token ids) "
            "they were trained with"
        )
    result = set_peft_model_state_dict(peft_model, weights, adapter_name=adapter_name)
    unexpected_after = list(getattr(result, "unexpected_keys", []) or [])
    if unexpected_after:
        raise AdapterLoadError(f"peft did not place these tensors of {path}: {_name_keys(sorted(unexpected_after))}")
    loaded = get_peft_model_state_dict(peft_model, adapter_name=adapter_name)
    differing = [
        key for key, value in weights.items()
        if not torch.equal(loaded[key].detach().cpu(), value.to(loaded[key].dtype))
    ]
    if differing:
        raise AdapterLoadError(f"these tensors of {path} did not load: {_name_keys(sorted(differing))}")
    return weights


def merge_lora(peft_model: PeftModel) -> MaskCMAModel:
    """Fold LoRA adapters, `modules_to_save` copies and trained token rows into the base weights.

    Returns the plain `MaskCMAModel` (the same object as ``peft_model.get_base_model()`` after unloading), ready
    for `save_pretrained`."""
    if not isinstance(peft_model, PeftModel):
        raise TypeError(f"merge_lora expects a peft PeftModel, got {type(peft_model).__name__}")
    merged = peft_model.merge_and_unload()
    if not isinstance(merged, MaskCMAModel):
        raise TypeError(f"merging returned {type(merged).__name__}, expected MaskCMAModel")
    return merged


__all__ = [
    "ADAPTER_WEIGHT_FILES",
    "AdapterLoadError",
    "FULLY_TRAINED_MODULES",
    "LLM_PROJECTION_NAMES",
    "LORA_RECIPE",
    "adapter_state_dict",
    "apply_lora",
    "default_lora_config",
    "lm_head_is_tied",
    "language_model_prefix",
    "llm_lora_target_modules",
    "load_adapter_strict",
    "merge_lora",
    "read_adapter_weights",
]
