"""Registration of the processor and the pipeline with transformers, and their declaration for remote code.

- `register()`: `AutoProcessor` maps `MaskCMAConfig` to [`MaskCMAProcessor`] (marked for remote code, so that
  `save_pretrained` writes `auto_map` and copies `processing_maskcma.py` and its helpers), and the
  `referring-segmentation` task is added to `transformers.pipelines.PIPELINE_REGISTRY`.
- `add_pipeline_to_config(config)` + `save_pipeline_code(folder)`: declare the pipeline in `config.json`
  (`custom_pipelines`) and copy its code, so `pipeline("referring-segmentation", model=folder,
  trust_remote_code=True)` works where this package is not installed.
- `save_model_folder(model, processor, folder)`: all of the above for a complete, self-contained folder.
"""

from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path

from transformers import AutoModel, AutoProcessor
from transformers.dynamic_module_utils import get_relative_import_files
from transformers.pipelines import PIPELINE_REGISTRY

from ..modeling.configuration_maskcma import MaskCMAConfig
from .pipeline import PIPELINE_TASK, ReferringSegmentationPipeline
from .processing_maskcma import MaskCMAProcessor


def register_pipeline() -> None:
    """Add the `referring-segmentation` task (model class `AutoModel`) to transformers' pipeline registry."""
    current = PIPELINE_REGISTRY.supported_tasks.get(PIPELINE_TASK)
    if current is not None and current.get("impl") is ReferringSegmentationPipeline:
        return
    PIPELINE_REGISTRY.register_pipeline(
        PIPELINE_TASK, pipeline_class=ReferringSegmentationPipeline, pt_model=AutoModel, type="multimodal"
    )


def register() -> None:
    """Register the processor with `AutoProcessor` (and for remote code) and the pipeline task. Idempotent."""
    AutoProcessor.register(MaskCMAConfig, MaskCMAProcessor, exist_ok=True)
    MaskCMAProcessor.register_for_auto_class("AutoProcessor")
    register_pipeline()


def custom_pipeline_entry() -> dict:
    """The `custom_pipelines` entry of `config.json` for the remote-code pipeline (`pipeline.py` in the folder)."""
    module = ReferringSegmentationPipeline.__module__.split(".")[-1]
    return {
        PIPELINE_TASK: {
            "impl": f"{module}.{ReferringSegmentationPipeline.__name__}",
            "pt": ["AutoModel"],
            "tf": [],
            "type": "multimodal",
        }
    }


def add_pipeline_to_config(config):
    """Declare the `referring-segmentation` pipeline in a model config (its `custom_pipelines`, kept in
    `config.json`); other declared pipelines are kept. Returns the config. Save the pipeline's code beside it with
    `save_pipeline_code(folder)`."""
    pipelines = dict(getattr(config, "custom_pipelines", None) or {})
    pipelines.update(custom_pipeline_entry())
    config.custom_pipelines = pipelines
    return config


def save_pipeline_code(folder: str | os.PathLike) -> list[Path]:
    """Copy `pipeline.py` and the modules it imports (flat, relative imports) into `folder`. Returns the paths."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    source = Path(sys.modules[ReferringSegmentationPipeline.__module__].__file__)
    written = []
    for path in [source, *sorted(Path(p) for p in get_relative_import_files(source))]:
        target = folder / path.name
        shutil.copyfile(path, target)
        written.append(target)
    return written


def save_model_folder(model, processor: MaskCMAProcessor, folder: str | os.PathLike) -> Path:
    """Save a self-contained model folder: weights and config (with `auto_map` and the `custom_pipelines`
    declaration), the modeling code, the processor (tokenizer, image processor, chat template, processing code)
    and the pipeline code. The folder loads with `AutoModel`/`AutoProcessor`/`pipeline(...)` and
    `trust_remote_code=True` without this package."""
    register()
    folder = Path(folder)
    add_pipeline_to_config(model.config)
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    save_pipeline_code(folder)
    return folder


__all__ = [
    "add_pipeline_to_config",
    "custom_pipeline_entry",
    "register",
    "register_pipeline",
    "save_model_folder",
    "save_pipeline_code",
]
