"""``maskcma train CONFIG.yaml [--resume [CHECKPOINT]] [--overwrite] [--output-dir DIR] [--threads N]``: train
MaskCMA from one YAML file.

The YAML holds the model, the data mix, LoRA and the TrainingArguments (`trainer.config`); its relative paths are
relative to the YAML file's folder. Multi-GPU and multi-node runs go through accelerate: ``accelerate launch -m
transformers_maskcma.cli train CONFIG.yaml`` runs DDP, and an accelerate config file selects FSDP or DeepSpeed
(docs/training.md).

The output folder belongs to one run (``maskcma_run.json``): a folder holding another or a finished run is refused
unless ``--resume`` continues the same run or ``--overwrite`` removes what that run wrote. The model is built before
the TrainingArguments (so DeepSpeed ZeRO-3's `zero.Init` cannot partition it while it loads). Before step 0 every
training record is validated (files, masks, templated prompt length against the model's limit): a bad record is
named and stops the run, or with ``data.drop_invalid: true`` is dropped and counted in the summary. At the end the
model is exported from the full weights the engine gathers to ``OUTPUT_DIR/model`` (LoRA merged into the weights)
with its processor, and a run summary is printed.
"""

from __future__ import annotations

import argparse
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path

import datasets
from transformers import AutoTokenizer, TrainerCallback
from transformers.trainer_utils import get_last_checkpoint

from ..data.errors import DataFormatError, UnknownDatasetError
from ..data.mix import MixConfig, load_mix, parse_mix, read_mix
from ..modeling import MaskCMAModel
from ..run_folder import RunFolder, check_weight_files, model_fingerprint
from .collator import MaskCMADataCollator
from .config import TrainConfig, TrainConfigError, load_train_config
from .data import ProcessedRecords, training_sequence_length
from .lora import apply_lora, default_lora_config, merge_lora
from .sharding import (
    ShardedTrainingError,
    build_model_before_arguments,
    check_export_possible,
    export_final_model,
    meta_copy,
)
from .trainer import MaskCMATrainer

FINAL_MODEL_DIR = "model"


@dataclass
class TrainingSummary:
    """What a `run_training` call did."""

    output_dir: str
    model_dir: str | None
    global_step: int
    epochs: float
    runtime_s: float
    num_records: int
    trainable_parameters: int
    total_parameters: int
    lora: bool
    final_logs: dict = field(default_factory=dict)
    dropped_records: int = 0

    def format(self) -> str:
        """A few human-readable lines."""
        logs = self.final_logs
        parts = [
            f"{name.replace('_loss', '').replace('mask_', '')} {logs[name]:.4f}"
            for name in ("lm_loss", "mask_bce", "mask_dice", "prior_loss", "iou_loss", "object_score_loss", "tmc_loss")
            if name in logs
        ]
        lines = [
            "MaskCMA training finished",
            f"  steps            {self.global_step} ({self.epochs:.2f} epochs) in {self.runtime_s:.1f} s",
            f"  training records {self.num_records}"
            + (f" ({self.dropped_records} invalid record(s) dropped: data.drop_invalid)" if self.dropped_records else ""),
            f"  trainable params {self.trainable_parameters / 1e6:.2f}M of {self.total_parameters / 1e6:.2f}M"
            + (" (LoRA)" if self.lora else " (full fine-tuning)"),
        ]
        if "loss" in logs:
            lines.append(f"  last logged loss {logs['loss']:.4f}" + (f"  ({', '.join(parts)})" if parts else ""))
        if "cma_gamma" in logs:
            lines.append(f"  CMA gamma        {logs['cma_gamma']:.4f} (warm-up factor {logs['cma_warmup_factor']:.2f})")
        lines.append(f"  checkpoints      {self.output_dir}")
        if self.model_dir:
            lines.append(f"  final model      {self.model_dir}")
        return "\n".join(lines)


# -- building blocks ------------------------------------------------------------------------------------------


def build_model_and_processor(config: TrainConfig):
    """The model and processor a configuration names (`model.tiny`, `model.path` or `model.parts`)."""
    from ..processing import MaskCMAProcessor

    settings = config.model
    if settings.source == "tiny":
        from ..tiny import build_tiny_model

        model, tokenizer = build_tiny_model(seed=settings.tiny_seed, **settings.config)
        return model, MaskCMAProcessor.from_model_config(model.config, tokenizer, **settings.processor)
    if settings.source == "path":
        path = str(config.resolve_path(settings.path))
        if not Path(path).is_dir():
            raise FileNotFoundError(f"{config.source}: model.path {path} is not a folder with a saved MaskCMA model")
        check_weight_files(path)
        model = MaskCMAModel.from_pretrained(path, **settings.config)
        if settings.processor or not (Path(path) / "processor_config.json").is_file():
            processor = MaskCMAProcessor.from_model_config(
                model.config, AutoTokenizer.from_pretrained(path), **settings.processor
            )
        else:
            processor = MaskCMAProcessor.from_pretrained(path)
        return model, processor
    vlm, sam2, tokenizer_name = (
        _folder_or_hub_id(config, name) for name in (settings.vlm, settings.sam2, settings.tokenizer or settings.vlm)
    )
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_name)
    model = MaskCMAModel.from_pretrained_parts(vlm, sam2, tokenizer=tokenizer, **settings.config)
    return model, MaskCMAProcessor.from_model_config(model.config, tokenizer, **settings.processor)


def _folder_or_hub_id(config: TrainConfig, name: str) -> str:
    """`model.parts` entries are Hub ids or folders: a folder (relative to the YAML's folder) when it exists there
    or the name is written as a path (``./``, ``../``, ``/``, ``~``), a Hub id otherwise."""
    folder = config.resolve_path(name)
    if folder.exists() or name.startswith((".", "/", "~")):
        return str(folder)
    return name


def mix_of(config: TrainConfig) -> tuple[MixConfig, Path | None]:
    """The data mix of a configuration and the data root to load it with."""
    data = config.data
    if data.mix is not None:
        mix = read_mix(config.resolve_path(data.mix))
    else:
        mix = parse_mix(
            {"sources": data.sources, "seed": data.seed, "shuffle": data.shuffle},
            where=f"{config.source}: data",
            base_dir=config.base_dir,
        )
    if data.data_root is not None:
        return mix, config.resolve_path(data.data_root)
    if mix.data_root is None and mix.config_path is None:
        return mix, config.base_dir
    return mix, None


def load_training_records(config: TrainConfig) -> datasets.Dataset:
    """The records of the configured mix (with repeats), cut to `data.max_samples` when set."""
    mix, data_root = mix_of(config)
    records = load_mix(mix, data_root=data_root)
    if config.data.max_samples is not None:
        records = records.select(range(min(config.data.max_samples, len(records))))
    if len(records) == 0:
        raise ValueError(f"{config.source}: the data mix has no records")
    return records


def validate_training_records(
    records: datasets.Dataset, processor, config: TrainConfig, progress: bool = True
) -> tuple[datasets.Dataset, int]:
    """The validation pass before step 0 (`data.validation.validate_records`): files, masks and every record's
    templated training sequence against the model's limit (`processor.max_length`).

    Returns:
        `(records, dropped)`: with ``data.drop_invalid`` the invalid records are dropped and counted.

    Raises:
        DataValidationError: invalid records (named by file and line or id) and ``drop_invalid`` is off, or every
            record is invalid.
    """
    from ..data.validation import drop_invalid, validate_records

    max_tokens = getattr(processor, "max_length", None)
    report = validate_records(
        records,
        prompt_length=(lambda record: training_sequence_length(processor, record)) if max_tokens else None,
        max_prompt_tokens=max_tokens,
        progress=progress,
        description="validating training records",
    )
    if not config.data.drop_invalid:
        if report.problems:
            report.raise_if_problems()
        return records, 0
    kept = drop_invalid(records, report)
    if len(kept) == 0:
        report.raise_if_problems()
    return kept, report.dropped


def prepare_model_for_training(model: MaskCMAModel, config: TrainConfig):
    """Wrap the model with the recipe's LoRA when `lora.enabled`."""
    if not config.lora.enabled:
        return model
    lora = config.lora
    kwargs = {"r": lora.r, "lora_alpha": lora.alpha, "lora_dropout": lora.dropout, "new_token_ids": lora.new_token_ids}
    if lora.projection_names is not None:
        kwargs["projection_names"] = lora.projection_names
    return apply_lora(model, default_lora_config(model, **kwargs))


def build_models_before_arguments(config: TrainConfig):
    """The model, its processor and an unsharded copy for the final export (parameters on the meta device), built
    before any `TrainingArguments` exists: under DeepSpeed ZeRO-3 the arguments switch on `zero.Init`, which would
    partition the VLM and SAM2 while `from_pretrained_parts` copies them (`sharding.build_model_before_arguments`).
    Returns `(model, processor, export_copy)`."""

    def build():
        model, processor = build_model_and_processor(config)
        return model, processor, meta_copy(model)

    return build_model_before_arguments(build)


def _numel(parameter) -> int:
    """Elements of a parameter, also when DeepSpeed ZeRO-3 has partitioned it (`ds_numel`)."""
    return int(getattr(parameter, "ds_numel", parameter.numel()))


def resolve_resume(resume: str | bool | None, output_dir: str) -> str | None:
    """`--resume` without a value: the latest checkpoint in `output_dir` (an error when there is none)."""
    if resume is None or resume is False:
        return None
    if resume is True:
        last = get_last_checkpoint(output_dir) if os.path.isdir(output_dir) else None
        if last is None:
            raise FileNotFoundError(
                f"--resume: no checkpoint-* folder in {output_dir}; pass the checkpoint folder explicitly or start "
                "without --resume"
            )
        return last
    if not os.path.isdir(resume):
        raise FileNotFoundError(f"--resume: checkpoint folder {resume} does not exist")
    return str(resume)


#: `training` fields that may change when a run is resumed (they do not change what was trained so far).
RESUMABLE_TRAINING_FIELDS = frozenset(
    {
        "output_dir", "logging_dir", "max_steps", "num_train_epochs", "logging_steps", "logging_strategy",
        "save_steps", "save_strategy", "save_total_limit", "report_to", "run_name", "disable_tqdm",
        "dataloader_num_workers", "dataloader_prefetch_factor", "dataloader_persistent_workers", "eval_steps",
        "push_to_hub", "hub_model_id",
    }
)


def run_fingerprint(config: TrainConfig) -> dict:
    """What identifies a training run, for its output folder: the model (a folder's config and weight headers), the
    data, LoRA and the training settings except those a resume may change (`RESUMABLE_TRAINING_FIELDS`)."""
    from dataclasses import asdict

    model = asdict(config.model)
    if config.model.source == "path":
        model["path"] = model_fingerprint(config.resolve_path(config.model.path))
    return {
        "model": model,
        "data": asdict(config.data),
        "lora": asdict(config.lora),
        "training": {k: v for k, v in sorted(config.training.items()) if k not in RESUMABLE_TRAINING_FIELDS},
    }


class RecordWrittenFiles(TrainerCallback):
    """Records every entry the run adds to its output folder (checkpoints, logs) in the folder's manifest as soon as
    it is saved, so that ``--overwrite`` removes what a crashed run left too."""

    def __init__(self, folder: RunFolder):
        self.folder = folder
        self.before = {entry.name for entry in folder.path.iterdir()} - set(folder.files)

    def record_new(self) -> None:
        new = sorted(
            entry.name
            for entry in self.folder.path.iterdir()
            if entry.name not in self.before and entry.name not in self.folder.files and not entry.name.startswith(".")
        )
        new = [name for name in new if name != "maskcma_run.json"]
        if new:
            self.folder.record(*new)

    def on_save(self, args, state, control, **kwargs):
        self.record_new()

    def on_train_end(self, args, state, control, **kwargs):
        self.record_new()


def claim_output_dir(config: TrainConfig, output_dir: str, resume: bool, overwrite: bool) -> RunFolder:
    """Claim the training output folder for this run (module docstring; `run_folder.RunFolder`)."""
    return RunFolder.claim(
        output_dir, command="train", fingerprint=run_fingerprint(config), resume=resume, overwrite=overwrite
    )


def run_training(
    config: TrainConfig,
    output_dir: str | None = None,
    resume: str | bool | None = None,
    overwrite: bool = False,
    progress: bool = True,
) -> TrainingSummary:
    """Train as configured; returns the summary (printed by the command on the main process).

    The output folder is claimed first (on the main process; `claim_output_dir`), then the model is built before the
    TrainingArguments (`build_models_before_arguments`), the records are validated (`validate_training_records`),
    and training runs."""
    folder = None
    if int(os.environ.get("RANK", "0")) == 0:
        folder = claim_output_dir(config, config.output_dir(output_dir), resume=bool(resume), overwrite=overwrite)
    try:
        model, processor, export_copy = build_models_before_arguments(config)
    except (TypeError, ValueError) as error:
        if isinstance(error, (TrainConfigError, DataFormatError)):
            raise
        raise TrainConfigError(f"{config.source}: model: {' '.join(str(error).split())}") from error
    args = config.training_arguments(output_dir=output_dir)
    check_export_possible(args)
    resume_from = resolve_resume(resume, args.output_dir)
    records = load_training_records(config)
    records, dropped = validate_training_records(records, processor, config, progress=progress)
    train_model = prepare_model_for_training(model, config)
    propagate = model.config.video_training == "propagate"  # clips through SAM2's memory
    dataset = ProcessedRecords(
        records,
        processor,
        cache=config.data.cache,
        video_clip_frames=model.config.video_training_clip_frames if propagate else None,
        clip_seed=config.data.seed,
        train_frames=config.data.train_frames,
    )
    trainer = MaskCMATrainer(
        model=train_model,
        args=args,
        train_dataset=dataset,
        data_collator=MaskCMADataCollator(processor),
        processing_class=processor,
    )
    recorder = RecordWrittenFiles(folder) if folder is not None else None
    if recorder is not None:
        trainer.add_callback(recorder)
    result = trainer.train(resume_from_checkpoint=resume_from)
    trainable = sum(_numel(p) for p in train_model.parameters() if p.requires_grad)
    total = sum(_numel(p) for p in model.parameters())

    model_dir = os.path.join(args.output_dir, FINAL_MODEL_DIR)
    export_final_model(
        trainer,
        prepare_model_for_training(export_copy, config),
        processor,
        model_dir,
        merge=merge_lora if config.lora.enabled else None,
    )
    if recorder is not None:
        recorder.record_new()
    train_logs = [entry for entry in trainer.state.log_history if "loss" in entry]
    return TrainingSummary(
        output_dir=args.output_dir,
        model_dir=model_dir,
        global_step=trainer.state.global_step,
        epochs=float(trainer.state.epoch or 0.0),
        runtime_s=float(result.metrics.get("train_runtime", 0.0)),
        num_records=len(records),
        trainable_parameters=trainable,
        total_parameters=total,
        lora=config.lora.enabled,
        final_logs=train_logs[-1] if train_logs else {},
        dropped_records=dropped,
    )


# -- the command ----------------------------------------------------------------------------------------------


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "train",
        help="train MaskCMA from a YAML config (model, data mix, LoRA, TrainingArguments)",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("config", help="the training YAML (see docs/training.md)")
    parser.add_argument(
        "--resume",
        nargs="?",
        const=True,
        default=None,
        metavar="CHECKPOINT",
        help="resume from CHECKPOINT, or from the latest checkpoint in the output folder when no value is given",
    )
    parser.add_argument(
        "--overwrite",
        action="store_true",
        help="replace the run in the output folder (removes only the files that run wrote)",
    )
    parser.add_argument(
        "--output-dir",
        default=None,
        help="output folder, relative to the working directory (overrides training.output_dir)",
    )
    parser.set_defaults(func=train_command)


def train_command(args: argparse.Namespace) -> int:
    from ..run_folder import RunFolderError

    try:
        config = load_train_config(args.config)
        summary = run_training(config, output_dir=args.output_dir, resume=args.resume, overwrite=args.overwrite)
    except (
        TrainConfigError,
        DataFormatError,
        UnknownDatasetError,
        FileNotFoundError,
        RunFolderError,
        ShardedTrainingError,
    ) as error:
        print(f"maskcma train: error: {' '.join(str(error).split())}", file=sys.stderr)
        return 2
    if int(os.environ.get("RANK", "0")) == 0:
        print(summary.format())
    return 0


__all__ = [
    "TrainingSummary",
    "RESUMABLE_TRAINING_FIELDS",
    "RecordWrittenFiles",
    "build_model_and_processor",
    "build_models_before_arguments",
    "claim_output_dir",
    "load_training_records",
    "mix_of",
    "prepare_model_for_training",
    "register",
    "resolve_resume",
    "run_fingerprint",
    "run_training",
    "train_command",
    "validate_training_records",
]
