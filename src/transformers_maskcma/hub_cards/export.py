"""Export a trained MaskCMA model as a Hub-ready folder (`maskcma export`).

The folder holds everything `AutoModel` / `AutoProcessor` / `pipeline("referring-segmentation")` need with
`trust_remote_code=True`, where this package is not installed:

- sharded safetensors weights (`max_shard_size`), LoRA adapters merged into the base weights;
- `config.json` with `auto_map` for `AutoConfig`, `AutoModel` and `AutoProcessor`, and `custom_pipelines` declaring
  the `referring-segmentation` pipeline (`{"impl": "pipeline.ReferringSegmentationPipeline", "pt": ["AutoModel"],
  "type": "multimodal"}`, the format transformers' `pipeline()` reads);
- the remote code, copied flat: the modeling files, the processor's files, the pipeline's files;
- the processor (tokenizer, chat template, image processor, `processor_config.json` with its own `auto_map`);
- `README.md`, the model card (`model_card.py`).

`--model` is either a saved MaskCMA folder (`save_pretrained`, loaded strictly) or a peft adapter folder written by
training with LoRA (`adapter_config.json`), whose base model is read from `base_model_name_or_path` (or
`--base-model`) and into which the adapters are merged (`trainer.lora.merge_lora`).

Adapters are loaded strictly (`trainer.lora.load_adapter_strict`): the adapter file must hold exactly the tensors
of its `adapter_config.json` (LoRA matrices, every `modules_to_save` copy, the trained token rows).

After writing, `verify_export` loads the trained model again *from disk* (the base model plus the adapter, merged
anew, or the saved MaskCMA folder), loads the export strictly, and compares every tensor: a weight dropped or
changed anywhere between the files on disk and the export fails. `verify=False` skips that (it needs two copies of
the weights in memory).
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import yaml
from transformers import AutoTokenizer

from ..modeling import MaskCMAConfig, MaskCMAModel
from ..run_folder import check_weight_files
from .model_card import CardInputs, build_model_card, collect_benchmarks

__all__ = [
    "ExportResult",
    "build_processor_for_model",
    "export_model",
    "load_trained_model",
    "save_hub_folder",
    "verify_export",
]

ADAPTER_CONFIG = "adapter_config.json"
PROCESSOR_CONFIG = "processor_config.json"
PROCESSOR_AUTO_MAP = "processing_maskcma.MaskCMAProcessor"


class ExportError(ValueError):
    """The trained model cannot be exported as asked; the message names the file and the fix."""


@dataclass
class ExportResult:
    """What `export_model` wrote.

    Args:
        output_dir (`Path`): the folder.
        files (`list[str]`): its files, relative.
        weight_files (`list[str]`): the safetensors shards.
        num_parameters (`int`): parameters of the exported model.
        merged_lora (`bool`): whether LoRA adapters were merged.
        verified (`bool`): whether the strict reload comparison ran.
    """

    output_dir: Path
    files: list[str]
    weight_files: list[str]
    num_parameters: int
    merged_lora: bool
    verified: bool
    card_metadata: dict[str, Any] = field(default_factory=dict)


# --------------------------------------------------------------------------------------------------------------
# Loading the trained model
# --------------------------------------------------------------------------------------------------------------


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as error:
        raise ExportError(f"{path} is not valid JSON: {error}") from error


def _is_maskcma_folder(folder: Path) -> bool:
    config = folder / "config.json"
    return config.is_file() and _read_json(config).get("model_type") == MaskCMAConfig.model_type


def _resolve_base(adapter_dir: Path, base_model: str | os.PathLike | None) -> Path:
    adapter_config = _read_json(adapter_dir / ADAPTER_CONFIG)
    base = base_model or adapter_config.get("base_model_name_or_path")
    if not base:
        raise ExportError(
            f"{adapter_dir / ADAPTER_CONFIG} names no base model (base_model_name_or_path); pass --base-model with the "
            "MaskCMA folder the adapters were trained on"
        )
    base_path = Path(base)
    if not base_path.is_absolute() and not base_path.exists() and (adapter_dir / base_path).exists():
        base_path = adapter_dir / base_path
    if not _is_maskcma_folder(base_path):
        raise ExportError(
            f"the base model {base!r} of the LoRA adapters in {adapter_dir} is not a saved MaskCMA folder (a folder "
            "with config.json of model_type 'maskcma'); pass --base-model with that folder"
        )
    return base_path


def load_trained_model(
    path: str | os.PathLike,
    base_model: str | os.PathLike | None = None,
    dtype: torch.dtype | None = None,
) -> tuple[MaskCMAModel, Path, bool]:
    """Load a trained model for export.

    Args:
        path: a saved MaskCMA folder, or a peft adapter folder (LoRA trained on a MaskCMA base).
        base_model: the base MaskCMA folder of an adapter folder (default: from `adapter_config.json`).
        dtype: cast the weights (e.g. `torch.bfloat16`); default as saved.

    Returns:
        `(model, folder holding the tokenizer/processor files, merged_lora)`; the model is in eval mode, adapters
        merged.

    Raises:
        FileNotFoundError: `path` does not exist.
        ExportError: neither a MaskCMA folder nor an adapter folder on one.
        ValueError: a MaskCMA checkpoint whose weights do not match its config (strict loading), adapter weights
            that do not match their `adapter_config.json` (`AdapterLoadError`), a truncated weights file
            (`WeightsFileError`, naming it).
    """
    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"trained model {path} does not exist; pass the output folder of `maskcma train`")
    merged = False
    if (path / ADAPTER_CONFIG).is_file():
        from peft import PeftConfig

        from ..trainer.lora import apply_lora, load_adapter_strict, merge_lora

        base_path = _resolve_base(path, base_model)
        check_weight_files(base_path)
        base = MaskCMAModel.from_pretrained(base_path)
        peft_model = apply_lora(base, PeftConfig.from_pretrained(str(path)))
        load_adapter_strict(peft_model, path)
        model = merge_lora(peft_model)
        merged = True
        files_dir = path if _has_tokenizer_files(path) else base_path
    elif _is_maskcma_folder(path):
        check_weight_files(path)
        model = MaskCMAModel.from_pretrained(path)
        files_dir = path
    else:
        raise ExportError(
            f"{path} is neither a saved MaskCMA model (config.json with model_type 'maskcma') nor a LoRA adapter "
            f"folder ({ADAPTER_CONFIG}); pass the output folder of `maskcma train`"
        )
    if dtype is not None:
        model = model.to(dtype)
    model.eval()
    return model, files_dir, merged


def _has_tokenizer_files(folder: Path) -> bool:
    return (folder / "tokenizer_config.json").is_file() or (folder / PROCESSOR_CONFIG).is_file()


def build_processor_for_model(model: MaskCMAModel, tokenizer, **kwargs):
    """The package's `MaskCMAProcessor` for `model` and `tokenizer` (sizes from the model config; `kwargs`: further
    `MaskCMAProcessor.from_model_config` arguments)."""
    from ..processing import MaskCMAProcessor

    return MaskCMAProcessor.from_model_config(model.config, tokenizer, **kwargs)


def load_processor(files_dir: Path, model: MaskCMAModel):
    """The processor saved with the trained model, or one built from its tokenizer and the model config."""
    from ..processing import MaskCMAProcessor

    if (files_dir / PROCESSOR_CONFIG).is_file():
        return MaskCMAProcessor.from_pretrained(files_dir)
    if not (files_dir / "tokenizer_config.json").is_file():
        raise ExportError(
            f"{files_dir} holds no tokenizer (tokenizer_config.json) nor processor ({PROCESSOR_CONFIG}); save the "
            "tokenizer beside the trained model (tokenizer.save_pretrained) and export again"
        )
    return build_processor_for_model(model, AutoTokenizer.from_pretrained(files_dir))


# --------------------------------------------------------------------------------------------------------------
# Writing
# --------------------------------------------------------------------------------------------------------------


def _load_training_recipe(path: str | os.PathLike | None) -> dict | None:
    if path is None:
        return None
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"training config {path} does not exist")
    text = path.read_text(encoding="utf-8")
    recipe = json.loads(text) if path.suffix == ".json" else yaml.safe_load(text)
    if not isinstance(recipe, dict):
        raise ExportError(f"training config {path} must hold a mapping (YAML or JSON object)")
    return recipe


def _add_processor_to_auto_map(output_dir: Path) -> None:
    """`save_pretrained` writes `auto_map` for AutoConfig/AutoModel; add AutoProcessor so config.json names all."""
    config_file = output_dir / "config.json"
    config = json.loads(config_file.read_text(encoding="utf-8"))
    auto_map = dict(config.get("auto_map") or {})
    auto_map["AutoProcessor"] = PROCESSOR_AUTO_MAP
    config["auto_map"] = auto_map
    config_file.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n", encoding="utf-8")


def save_hub_folder(model: MaskCMAModel, processor, output_dir: Path, max_shard_size: str | int = "2GB") -> None:
    """Write weights, config (`auto_map` + `custom_pipelines`), remote code, processor and pipeline code."""
    from ..processing.registration import add_pipeline_to_config, register, save_pipeline_code

    register()
    add_pipeline_to_config(model.config)
    output_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(output_dir, max_shard_size=max_shard_size)
    processor.save_pretrained(output_dir)
    save_pipeline_code(output_dir)
    _add_processor_to_auto_map(output_dir)


def verify_export(
    output_dir: str | os.PathLike,
    model_path: str | os.PathLike,
    base_model_path: str | os.PathLike | None = None,
    dtype: torch.dtype | None = None,
    progress: bool = True,
) -> None:
    """Compare the export with the trained model loaded afresh from disk.

    The reference is `load_trained_model(model_path, base_model_path, dtype)` (for an adapter folder: the base model
    plus the adapter read strictly from disk and merged); the export is loaded strictly with
    `MaskCMAModel.from_pretrained`. Every tensor must be present in both and equal.

    Raises:
        ValueError: a weight is missing, unexpected (strict loading) or differs.
    """
    from tqdm.auto import tqdm

    output_dir = Path(output_dir)
    check_weight_files(output_dir)
    reference, _, _ = load_trained_model(model_path, base_model=base_model_path, dtype=dtype)
    expected = reference.state_dict()
    reloaded = MaskCMAModel.from_pretrained(output_dir, dtype=next(reference.parameters()).dtype)
    found = reloaded.state_dict()
    if set(expected) != set(found):
        raise ValueError(
            f"the export in {output_dir} does not hold the weights of {model_path}: missing "
            f"{sorted(set(expected) - set(found))}, unexpected {sorted(set(found) - set(expected))}"
        )
    differing = [
        key
        for key in tqdm(expected, desc="verifying the export", unit="tensor", disable=not progress)
        if not torch.equal(expected[key].cpu(), found[key].cpu())
    ]
    if differing:
        raise ValueError(
            f"the export in {output_dir} differs from {model_path} loaded from disk in {len(differing)} weight(s): "
            f"{differing[:20]}; export again (and report it if it repeats)"
        )


def export_model(
    model_path: str | os.PathLike,
    output_dir: str | os.PathLike,
    *,
    max_shard_size: str | int = "2GB",
    metrics: Sequence[str] = (),
    model_name: str | None = None,
    repo_id: str | None = None,
    license: str = "apache-2.0",
    base_models: Sequence[str] = (),
    datasets: Sequence[str] = (),
    tags: Sequence[str] = (),
    training_config: str | os.PathLike | None = None,
    base_model_path: str | os.PathLike | None = None,
    dtype: torch.dtype | None = None,
    overwrite: bool = False,
    verify: bool = True,
    space_dir: str | os.PathLike | None = None,
    space_id: str | None = None,
) -> ExportResult:
    """Write the Hub-ready folder of a trained model (module docstring).

    Args:
        model_path: saved MaskCMA folder or LoRA adapter folder.
        output_dir: folder to write (empty or absent unless `overwrite`).
        max_shard_size: largest safetensors shard (e.g. `"2GB"`).
        metrics: metrics JSONs of `maskcma evaluate` (`PATH` or `DATASET:SPLIT=PATH`), for the card's model-index.
        model_name: name in the card (default: the output folder's name).
        repo_id: Hub id used in the card's usage snippet (default `your-username/<model_name>`).
        license, base_models, datasets, tags: card metadata.
        training_config: YAML/JSON of the training run, shown in the card.
        base_model_path: base MaskCMA folder of an adapter folder.
        dtype: cast the weights before writing.
        overwrite: replace a non-empty `output_dir`.
        verify: load the trained model again from disk and the export strictly, and compare every tensor
            (`verify_export`).
        space_dir: also write a Hugging Face Space folder here (`app.space.write_space`): the web demo running this
            model through remote code. The card then links the Space and shows the overlays of the demo's example
            images, made now and stored in `output_dir/examples/`.
        space_id: the Space's Hub id in the card's link (default `<repo_id>-demo`).
    """
    output_dir = Path(output_dir)
    if output_dir.exists() and any(output_dir.iterdir()):
        if not overwrite:
            raise FileExistsError(f"{output_dir} is not empty; pass --overwrite to replace its contents")
        shutil.rmtree(output_dir)
    # read every input before writing anything, so that a bad argument leaves no half-written folder
    if space_dir is not None:
        from ..app.space import check_space_dir

        check_space_dir(space_dir)
    benchmarks = collect_benchmarks(metrics)
    recipe = _load_training_recipe(training_config)
    model, files_dir, merged = load_trained_model(model_path, base_model=base_model_path, dtype=dtype)
    processor = load_processor(files_dir, model)
    model_name = model_name or output_dir.resolve().name
    repo_id = repo_id or f"your-username/{model_name}"
    example_overlays = []
    if space_dir is not None:
        from ..app.space import default_space_id, render_example_overlays

        space_id = space_id or default_space_id(repo_id)
        example_overlays = render_example_overlays(model, processor, output_dir)
    card_inputs = CardInputs(
        model_name=model_name,
        repo_id=repo_id,
        license=license,
        base_models=list(base_models),
        datasets=list(datasets),
        tags=list(tags),
        benchmarks=benchmarks,
        training_recipe=recipe,
        cma_gamma=float(model.cma.gamma.detach().float().item()),
        notes=["LoRA adapters were merged into the base weights for this export."] if merged else [],
        space_id=space_id if space_dir is not None else None,
        example_overlays=example_overlays,
    )
    card = build_model_card(model.config, card_inputs)

    save_hub_folder(model, processor, output_dir, max_shard_size=max_shard_size)
    card.save(output_dir / "README.md")
    num_parameters = sum(parameter.numel() for parameter in model.parameters())
    if verify:
        del model  # the comparison loads the trained model again from disk: keep two copies in memory, not three
        verify_export(output_dir, model_path, base_model_path=base_model_path, dtype=dtype)
    if space_dir is not None:
        from ..app.space import write_space

        write_space(space_dir, repo_id=repo_id, license=license)
    files = sorted(str(path.relative_to(output_dir)) for path in output_dir.rglob("*") if path.is_file())
    return ExportResult(
        output_dir=output_dir,
        files=files,
        weight_files=[name for name in files if name.endswith(".safetensors")],
        num_parameters=num_parameters,
        merged_lora=merged,
        verified=verify,
        card_metadata=card.data.to_dict(),
    )
