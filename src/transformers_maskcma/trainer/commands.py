"""``maskcma train CONFIG.yaml [--resume [CHECKPOINT]] [--output-dir DIR]``: train MaskCMA from one YAML file.

The YAML holds the model, the data mix, LoRA and the TrainingArguments (`trainer.config`). Multi-GPU and multi-node
runs go through accelerate: ``accelerate launch -m transformers_maskcma.cli train CONFIG.yaml`` runs DDP, and an
accelerate config file selects FSDP or DeepSpeed (docs/training.md). At the end the model is saved to
``OUTPUT_DIR/model`` (LoRA merged into the weights) with its processor, and a run summary is printed.
"""

from __future__ import annotations

import argparse
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path

import datasets
from transformers import AutoTokenizer
from transformers.trainer_utils import get_last_checkpoint

from ..data.errors import DataFormatError, UnknownDatasetError
from ..data.mix import MixConfig, load_mix, parse_mix, read_mix
from ..modeling import MaskCMAModel
from .collator import MaskCMADataCollator
from .config import TrainConfig, TrainConfigError, load_train_config
from .data import ProcessedRecords
from .lora import apply_lora, default_lora_config, merge_lora
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
            f"  training records {self.num_records}",
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
        path = _resolve(settings.path, config.base_dir)
        if not Path(path).is_dir():
            raise FileNotFoundError(f"{config.source}: model.path {path} is not a folder with a saved MaskCMA model")
        model = MaskCMAModel.from_pretrained(path, **settings.config)
        if model.tokenizer is None:
            model.tokenizer = AutoTokenizer.from_pretrained(path)
        if settings.processor or not (Path(path) / "processor_config.json").is_file():
            processor = MaskCMAProcessor.from_model_config(model.config, model.tokenizer, **settings.processor)
        else:
            processor = MaskCMAProcessor.from_pretrained(path)
        return model, processor
    tokenizer = AutoTokenizer.from_pretrained(settings.tokenizer or settings.vlm)
    model = MaskCMAModel.from_pretrained_parts(settings.vlm, settings.sam2, tokenizer=tokenizer, **settings.config)
    return model, MaskCMAProcessor.from_model_config(model.config, tokenizer, **settings.processor)


def _resolve(path: str | None, base_dir: Path) -> str | None:
    if path is None:
        return None
    candidate = Path(path).expanduser()
    if not candidate.is_absolute() and (base_dir / candidate).exists():
        return str(base_dir / candidate)
    return str(candidate)


def mix_of(config: TrainConfig) -> tuple[MixConfig, Path | None]:
    """The data mix of a configuration and the data root to load it with."""
    data = config.data
    if data.mix is not None:
        mix_path = Path(_resolve(data.mix, config.base_dir))
        mix = read_mix(mix_path)
    else:
        mix = parse_mix(
            {"sources": data.sources, "seed": data.seed, "shuffle": data.shuffle},
            where=f"{config.source}: data",
            base_dir=config.base_dir,
        )
    if data.data_root is not None:
        return mix, Path(_resolve(data.data_root, config.base_dir))
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


def prepare_model_for_training(model: MaskCMAModel, config: TrainConfig):
    """Wrap the model with the recipe's LoRA when `lora.enabled`."""
    if not config.lora.enabled:
        return model
    lora = config.lora
    kwargs = {"r": lora.r, "lora_alpha": lora.alpha, "lora_dropout": lora.dropout, "new_token_ids": lora.new_token_ids}
    if lora.projection_names is not None:
        kwargs["projection_names"] = lora.projection_names
    return apply_lora(model, default_lora_config(model, **kwargs))


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


def run_training(
    config: TrainConfig, output_dir: str | None = None, resume: str | bool | None = None
) -> TrainingSummary:
    """Train as configured; returns the summary (printed by the command on the main process)."""
    args = config.training_arguments(output_dir=output_dir)
    resume_from = resolve_resume(resume, args.output_dir)
    model, processor = build_model_and_processor(config)
    records = load_training_records(config)
    train_model = prepare_model_for_training(model, config)
    dataset = ProcessedRecords(records, processor, cache=config.data.cache, train_frames=config.data.train_frames)
    trainer = MaskCMATrainer(
        model=train_model,
        args=args,
        train_dataset=dataset,
        data_collator=MaskCMADataCollator(processor),
        processing_class=processor,
    )
    result = trainer.train(resume_from_checkpoint=resume_from)
    trainable = sum(p.numel() for p in train_model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())

    model_dir = os.path.join(args.output_dir, FINAL_MODEL_DIR)
    final = merge_lora(train_model) if config.lora.enabled else model
    if trainer.is_world_process_zero():
        final.save_pretrained(model_dir)
        processor.save_pretrained(model_dir)
    trainer.accelerator.wait_for_everyone()
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
    parser.add_argument("--output-dir", default=None, help="output folder (overrides training.output_dir)")
    parser.set_defaults(func=train_command)


def train_command(args: argparse.Namespace) -> int:
    try:
        config = load_train_config(args.config)
        summary = run_training(config, output_dir=args.output_dir, resume=args.resume)
    except (TrainConfigError, DataFormatError, UnknownDatasetError, FileNotFoundError) as error:
        print(f"maskcma train: error: {error}", file=sys.stderr)
        return 2
    if int(os.environ.get("RANK", "0")) == 0:
        print(summary.format())
    return 0


__all__ = [
    "TrainingSummary",
    "build_model_and_processor",
    "load_training_records",
    "mix_of",
    "prepare_model_for_training",
    "register",
    "resolve_resume",
    "run_training",
    "train_command",
]
