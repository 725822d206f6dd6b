"""The `maskcma train` configuration: one YAML file with the model, the data mix, LoRA and the TrainingArguments.

```yaml
model:                      # exactly one of tiny / path / parts
  tiny: {seed: 0}           # the embedded tiny default (random weights)
  # path: /models/maskcma   # a saved MaskCMA model (MaskCMAModel.from_pretrained)
  # parts: {vlm: OpenGVLab/InternVL3-1B-hf, sam2: facebook/sam2.1-hiera-large, tokenizer: null}
  config: {tmc_weight: 0.1} # MaskCMAConfig switches (use_cma, mask_source, cma_*, warmup_ratio, tmc_*, ...)
  processor: {num_key_frames: 5, key_frame_sampling: uniform, max_image_tiles: 1, gt_mask_resize: nearest}
data:                       # a mix: `mix: FILE` or inline `sources` (format of transformers_maskcma.data.mix)
  sources:
    - {dataset: synthetic, split: train, repeat: 1, options: {num_samples: 2000}}
  seed: 0
  shuffle: true
  data_root: null           # base of the data's relative paths (default: the config file's folder)
  max_samples: null         # keep only the first N records of the mix (smoke runs)
  drop_invalid: false       # true: drop records the validation pass finds invalid (counted in the summary)
  train_frames: key         # videos: decode the key frames ("key") or every frame ("all") with SAM2
  cache: false              # keep processed samples in memory (small data, several epochs)
lora:
  enabled: true             # false = full fine-tuning of the trainable parts
  r: 128
  alpha: 256
  dropout: 0.05
training:                   # any transformers.TrainingArguments field
  output_dir: runs/maskcma
  per_device_train_batch_size: 2
```

Relative paths: every relative path written in this file (`model.path`, `model.parts.*` when such a folder exists,
`data.mix`, `data.data_root`, and the `training` fields `output_dir`, `resume_from_checkpoint`, `deepspeed`,
`fsdp_config`, `accelerator_config` when given as file names) is relative to the folder of this
YAML file, whatever the working directory; a path given on the command line (``--output-dir``) is relative to the
working directory. A mix file's own paths are relative to the mix file's folder.

Unset training fields take the research recipe (`RECIPE_DEFAULTS`): AdamW, lr 4e-5, weight decay 0.05,
gradient clipping 1.0, cosine schedule with 5 % warm-up, one epoch, bf16 where a GPU supports it (off on CPU).
Every field is checked: an unknown name or a value of the wrong type raises `TrainConfigError` naming the field
(``training.learning_rate``) and what is expected.
"""

from __future__ import annotations

import dataclasses
import difflib
import enum
import sys
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import yaml
from transformers import TrainingArguments

from ..modeling import MaskCMAConfig
from ..processing.training_features import GT_MASK_RESIZES
from ..processing.video_io import KEY_FRAME_SAMPLINGS

#: Training settings of the recipe (docs/training.md) used for every field the YAML leaves out.
RECIPE_DEFAULTS: dict[str, Any] = {
    "learning_rate": 4e-5,
    "weight_decay": 0.05,
    "max_grad_norm": 1.0,
    "optim": "adamw_torch",
    "lr_scheduler_type": "cosine",
    "warmup_steps": 0.05,
    "num_train_epochs": 1.0,
    "logging_steps": 10,
    "save_strategy": "steps",
    "save_steps": 500,
    "save_total_limit": 2,
    "report_to": "none",
    "remove_unused_columns": False,
}

#: `MaskCMAProcessor.from_model_config` arguments the YAML may set, with their types.
PROCESSOR_FIELDS: dict[str, Any] = {
    "max_image_tiles": int,
    "num_key_frames": int,
    "key_frame_sampling": typing.Literal[KEY_FRAME_SAMPLINGS],
    "gt_mask_resize": typing.Literal[GT_MASK_RESIZES],
}

_TOP_LEVEL = ("model", "data", "lora", "training")
_MODEL_FIELDS = {"tiny": dict | bool, "path": str, "parts": dict, "config": dict, "processor": dict}
_TINY_FIELDS = {"seed": int}
_PARTS_FIELDS = {"vlm": str, "sam2": str, "tokenizer": str | None}
_DATA_FIELDS = {
    "mix": str,
    "sources": list,
    "seed": int,
    "shuffle": bool,
    "data_root": str | None,
    "max_samples": int | None,
    "train_frames": str,
    "cache": bool,
    "drop_invalid": bool,
}
_LORA_FIELDS = {
    "enabled": bool,
    "r": int,
    "alpha": int,
    "dropout": float,
    "new_token_ids": list[int] | None,
    "projection_names": list[str] | None,
}
# MaskCMAConfig fields that are not switches a YAML should set
_NOT_CONFIGURABLE = {"vlm_config", "sam2_config", "seg_token_id"}


class TrainConfigError(ValueError):
    """A `maskcma train` configuration problem; the message names the file and the field."""


@dataclass
class ModelSettings:
    """Where the model comes from. `source` is ``"tiny"``, ``"path"`` or ``"parts"``."""

    source: str = "tiny"
    tiny_seed: int = 0
    path: str | None = None
    vlm: str | None = None
    sam2: str | None = None
    tokenizer: str | None = None
    config: dict = field(default_factory=dict)
    processor: dict = field(default_factory=dict)


@dataclass
class DataSettings:
    """The training mix (`mix` file or inline `sources`) and how records become features."""

    mix: str | None = None
    sources: list | None = None
    seed: int = 0
    shuffle: bool = True
    data_root: str | None = None
    max_samples: int | None = None
    train_frames: str = "key"
    cache: bool = False
    drop_invalid: bool = False


@dataclass
class LoraSettings:
    """LoRA on the language model (`trainer.lora.default_lora_config`); `enabled=False` = full fine-tuning."""

    enabled: bool = True
    r: int = 128
    alpha: int = 256
    dropout: float = 0.05
    new_token_ids: list[int] | None = None
    projection_names: list[str] | None = None


@dataclass
class TrainConfig:
    """A parsed and validated `maskcma train` configuration."""

    model: ModelSettings
    data: DataSettings
    lora: LoraSettings
    training: dict
    source: str = "<config>"
    base_dir: Path = Path(".")

    def resolve_path(self, path: str | Path) -> Path:
        """A path written in the YAML: absolute as is, relative to the YAML file's folder (`base_dir`) otherwise."""
        candidate = Path(path).expanduser()
        return candidate if candidate.is_absolute() else self.base_dir / candidate

    def output_dir(self, override: str | None = None) -> str:
        """The run's output folder: `override` (a command-line path, relative to the working directory) or the
        YAML's `training.output_dir` (relative to the YAML's folder)."""
        if override is not None:
            return str(Path(override).expanduser())
        value = self.training.get("output_dir")
        if not value:
            raise TrainConfigError(
                f"{self.source}: training.output_dir is not set; set it in the YAML or pass --output-dir DIR"
            )
        return str(self.resolve_path(value))

    def training_arguments(self, output_dir: str | None = None, **overrides) -> TrainingArguments:
        """`TrainingArguments` from the recipe defaults, the YAML's `training` section and `overrides`
        (`output_dir` from the command line wins over the YAML's)."""
        values = dict(RECIPE_DEFAULTS)
        values["bf16"] = _bf16_available()
        values.update(self.training)
        for name in YAML_PATH_FIELDS:  # relative to the YAML's folder (module docstring)
            if isinstance(values.get(name), str) and values[name]:
                values[name] = str(self.resolve_path(values[name]))
        values.update(overrides)
        if output_dir is not None or "output_dir" not in overrides:
            values["output_dir"] = self.output_dir(output_dir)
        if values.get("remove_unused_columns"):
            raise TrainConfigError(
                f"{self.source}: training.remove_unused_columns must be false: the MaskCMA collator needs every "
                "processed field"
            )
        try:
            return TrainingArguments(**values)
        except (ValueError, TypeError) as error:
            raise TrainConfigError(f"{self.source}: training: {error}") from error


#: `training` fields that are (or may be given as) paths, resolved against the YAML's folder when they are strings.
YAML_PATH_FIELDS = ("output_dir", "resume_from_checkpoint", "deepspeed", "fsdp_config", "accelerator_config")


def _bf16_available() -> bool:
    return bool(torch.cuda.is_available() and torch.cuda.is_bf16_supported())


# -- type checking ---------------------------------------------------------------------------------------------


def _type_name(annotation: Any) -> str:
    if annotation is type(None):
        return "null"
    if isinstance(annotation, type) and issubclass(annotation, enum.Enum):
        return "one of " + ", ".join(repr(member.value) for member in annotation)
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(annotation)
        if any(isinstance(arg, type) and issubclass(arg, enum.Enum) for arg in args):
            args = tuple(arg for arg in args if arg is not str)
        return " or ".join(_type_name(arg) for arg in args)
    if origin is typing.Literal:
        return "one of " + ", ".join(repr(arg) for arg in typing.get_args(annotation))
    if origin in (list, tuple):
        args = typing.get_args(annotation)
        return f"a list of {_type_name(args[0])}" if args else "a list"
    if origin is dict or annotation is dict:
        return "a mapping"
    names = {bool: "true/false", int: "an integer", float: "a number", str: "a string", list: "a list"}
    return names.get(annotation, getattr(annotation, "__name__", str(annotation)))


_NO_MATCH = object()


def _coerce(value: Any, annotation: Any) -> Any:
    """`value` converted to `annotation`, or `_NO_MATCH`. Numbers written like ``4e-5`` (which YAML 1.1 reads as a
    string) are accepted for float fields."""
    if annotation is Any:
        return value
    if annotation is type(None):
        return None if value is None else _NO_MATCH
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(annotation)
        enums = [arg for arg in args if isinstance(arg, type) and issubclass(arg, enum.Enum)]
        if enums and str in args:  # "SchedulerType | str": the string must name a member
            args = tuple(arg for arg in args if arg is not str)
        for arg in args:
            result = _coerce(value, arg)
            if result is not _NO_MATCH:
                return result
        return _NO_MATCH
    if origin is typing.Literal:
        return value if value in typing.get_args(annotation) else _NO_MATCH
    if origin in (list, tuple):
        if not isinstance(value, list):
            return _NO_MATCH
        args = typing.get_args(annotation)
        if not args:
            return value
        items = [_coerce(item, args[0]) for item in value]
        return _NO_MATCH if any(item is _NO_MATCH for item in items) else items
    if origin is dict or annotation is dict:
        return value if isinstance(value, dict) else _NO_MATCH
    if annotation is bool:
        return value if isinstance(value, bool) else _NO_MATCH
    if annotation is int:
        return value if isinstance(value, int) and not isinstance(value, bool) else _NO_MATCH
    if annotation is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                return _NO_MATCH
        return _NO_MATCH
    if annotation is str:
        return value if isinstance(value, str) else _NO_MATCH
    if annotation is list:
        return value if isinstance(value, list) else _NO_MATCH
    if isinstance(annotation, type) and issubclass(annotation, enum.Enum):
        values = {member.value for member in annotation}
        return value if isinstance(value, str) and value in values else _NO_MATCH
    if isinstance(annotation, type):
        return value if isinstance(value, annotation) else _NO_MATCH
    return value


def _check_fields(content: Any, fields: dict[str, Any], where: str, source: str) -> dict:
    """Validate a mapping against ``{name: type}``; returns the coerced values."""
    if content is None:
        return {}
    if not isinstance(content, dict):
        raise TrainConfigError(f"{source}: {where} must be a mapping, got {type(content).__name__}")
    result = {}
    for name, value in content.items():
        qualified = f"{where}.{name}" if where else str(name)
        if name not in fields:
            close = difflib.get_close_matches(str(name), list(fields), n=1)
            hint = f"; did you mean {close[0]!r}?" if close else f"; known fields: {', '.join(sorted(fields))}"
            raise TrainConfigError(f"{source}: {qualified} is not a known field{hint}")
        coerced = _coerce(value, fields[name])
        if coerced is _NO_MATCH:
            raise TrainConfigError(
                f"{source}: {qualified} must be {_type_name(fields[name])}, got {value!r} ({type(value).__name__})"
            )
        result[name] = coerced
    return result


def training_argument_fields() -> dict[str, Any]:
    """``{name: annotation}`` of every `TrainingArguments` field set at construction."""
    hints = typing.get_type_hints(TrainingArguments)
    return {f.name: hints.get(f.name, Any) for f in dataclasses.fields(TrainingArguments) if f.init}


def maskcma_config_fields() -> dict[str, Any]:
    """``{name: annotation}`` of the `MaskCMAConfig` switches a YAML may set."""
    namespace = vars(sys.modules[MaskCMAConfig.__module__])
    fields = {}
    for name, annotation in MaskCMAConfig.__annotations__.items():
        if isinstance(annotation, str):
            annotation = eval(annotation, dict(namespace))  # the class's own annotations, e.g. "int | None"
        if typing.get_origin(annotation) is typing.ClassVar or name.startswith("_") or name in _NOT_CONFIGURABLE:
            continue
        fields[name] = annotation
    return fields


# -- parsing ---------------------------------------------------------------------------------------------------


def parse_train_config(content: Any, source: str = "<config>", base_dir: str | Path = ".") -> TrainConfig:
    """Validate a parsed YAML mapping (see the module docstring) into a `TrainConfig`."""
    if content is None:
        content = {}
    if not isinstance(content, dict):
        raise TrainConfigError(f"{source}: the configuration must be a mapping with {', '.join(_TOP_LEVEL)}")
    _check_fields(content, {name: Any for name in _TOP_LEVEL}, "", source)

    model_content = _check_fields(content.get("model"), _MODEL_FIELDS, "model", source)
    chosen = [name for name in ("tiny", "path", "parts") if model_content.get(name) not in (None, False)]
    if len(chosen) > 1:
        raise TrainConfigError(f"{source}: model: give exactly one of tiny, path or parts (got {', '.join(chosen)})")
    model = ModelSettings(source=chosen[0] if chosen else "tiny")
    if model.source == "tiny":
        tiny = model_content.get("tiny")
        tiny_fields = _check_fields(tiny if isinstance(tiny, dict) else None, _TINY_FIELDS, "model.tiny", source)
        model.tiny_seed = tiny_fields.get("seed", 0)
    elif model.source == "path":
        model.path = model_content["path"]
    else:
        parts = _check_fields(model_content["parts"], _PARTS_FIELDS, "model.parts", source)
        for name in ("vlm", "sam2"):
            if not parts.get(name):
                raise TrainConfigError(f"{source}: model.parts.{name} is required (a folder or Hub id)")
        model.vlm, model.sam2, model.tokenizer = parts["vlm"], parts["sam2"], parts.get("tokenizer")
    model.config = _check_fields(model_content.get("config"), maskcma_config_fields(), "model.config", source)
    model.processor = _check_fields(model_content.get("processor"), PROCESSOR_FIELDS, "model.processor", source)

    data_content = _check_fields(content.get("data"), _DATA_FIELDS, "data", source)
    data = DataSettings(**data_content)
    if (data.mix is None) == (data.sources is None):
        raise TrainConfigError(f"{source}: data: give either 'mix' (a mix YAML file) or inline 'sources', not both")
    if data.train_frames not in ("key", "all"):
        raise TrainConfigError(f"{source}: data.train_frames must be 'key' or 'all', got {data.train_frames!r}")
    if data.max_samples is not None and data.max_samples < 1:
        raise TrainConfigError(f"{source}: data.max_samples must be a positive integer, got {data.max_samples}")

    lora = LoraSettings(**_check_fields(content.get("lora"), _LORA_FIELDS, "lora", source))
    for name in ("r", "alpha"):
        if getattr(lora, name) < 1:
            raise TrainConfigError(f"{source}: lora.{name} must be >= 1, got {getattr(lora, name)}")
    if not 0.0 <= lora.dropout < 1.0:
        raise TrainConfigError(f"{source}: lora.dropout must lie in [0, 1), got {lora.dropout}")

    training = _check_fields(content.get("training"), training_argument_fields(), "training", source)
    return TrainConfig(model=model, data=data, lora=lora, training=training, source=source, base_dir=Path(base_dir))


def load_train_config(path: str | Path) -> TrainConfig:
    """Read and validate a `maskcma train` YAML file."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"training configuration not found: {path}")
    try:
        content = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as error:
        raise TrainConfigError(f"{path}: malformed YAML: {error}") from None
    return parse_train_config(content, source=str(path), base_dir=path.parent)


__all__ = [
    "PROCESSOR_FIELDS",
    "RECIPE_DEFAULTS",
    "DataSettings",
    "LoraSettings",
    "ModelSettings",
    "TrainConfig",
    "TrainConfigError",
    "load_train_config",
    "maskcma_config_fields",
    "parse_train_config",
    "training_argument_fields",
]
