"""A small LoRA training run, used by tests/test_lora_resume.py in separate processes.

``python lora_resume_script.py OUTPUT_DIR MODE [CHECKPOINT]`` with MODE:

- ``full``: train 4 steps without interruption;
- ``kill``: train, and kill the process with SIGKILL right after checkpoint-2 is written (a crash, not a clean
  stop);
- ``resume``: resume from CHECKPOINT in a fresh process, with other initial LoRA weights (everything trained must
  come from the checkpoint).

Writes ``OUTPUT_DIR/MODE.json``: the logged loss per step and the CMA warm-up factor at the start of each step.
"""

from __future__ import annotations

import json
import os
import signal
import sys

import torch

torch.set_num_threads(1)

from transformers import TrainerCallback, TrainingArguments  # noqa: E402

from transformers_maskcma.data.synthetic import SyntheticConfig, generate_synthetic  # noqa: E402
from transformers_maskcma.processing.processing_maskcma import MaskCMAProcessor  # noqa: E402
from transformers_maskcma.tiny import build_tiny_model  # noqa: E402
from transformers_maskcma.trainer.callbacks import active_cma  # noqa: E402
from transformers_maskcma.trainer.collator import MaskCMADataCollator  # noqa: E402
from transformers_maskcma.trainer.data import ProcessedRecords  # noqa: E402
from transformers_maskcma.trainer.lora import apply_lora, default_lora_config  # noqa: E402
from transformers_maskcma.trainer.trainer import MaskCMATrainer  # noqa: E402

KILL_AFTER_STEP = 2


class Recorder(TrainerCallback):
    def __init__(self, path: str, kill: bool):
        self.path, self.kill = path, kill
        self.factors: dict[int, float] = {}
        self.losses: dict[int, float] = {}

    def dump(self) -> None:
        with open(self.path, "w") as stream:
            json.dump({"losses": self.losses, "factors": self.factors}, stream)

    def on_step_begin(self, args, state, control, model=None, **kwargs):
        self.factors[state.global_step] = float(active_cma(model).warmup_factor)

    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs and "loss" in logs:
            self.losses[state.global_step] = float(logs["loss"])

    def on_save(self, args, state, control, **kwargs):
        if self.kill and state.global_step == KILL_AFTER_STEP:
            self.dump()
            os.kill(os.getpid(), signal.SIGKILL)


def build_trainer(output_dir: str, lora_seed: int) -> MaskCMATrainer:
    model, tokenizer = build_tiny_model(seed=0, warmup_ratio=0.5)  # the same base weights in every process
    processor = MaskCMAProcessor.from_model_config(model.config, tokenizer)
    records = generate_synthetic(
        8, SyntheticConfig(video_fraction=0.0, multi_object_fraction=0.4, seed=5), show_progress=False
    )
    torch.manual_seed(lora_seed)  # LoRA's initial A matrices
    peft_model = apply_lora(model, default_lora_config(model, r=4, lora_alpha=8, lora_dropout=0.1))
    args = TrainingArguments(
        output_dir=output_dir,
        per_device_train_batch_size=2,
        max_steps=4,
        learning_rate=1e-3,
        optim="adamw_torch",
        lr_scheduler_type="cosine",
        warmup_steps=0.25,
        max_grad_norm=1.0,
        logging_steps=1,
        save_strategy="steps",
        save_steps=KILL_AFTER_STEP,
        report_to=[],
        use_cpu=True,
        remove_unused_columns=False,
        disable_tqdm=True,
        seed=0,
        data_seed=0,
    )
    return MaskCMATrainer(
        model=peft_model,
        args=args,
        train_dataset=ProcessedRecords(records, processor),
        data_collator=MaskCMADataCollator(processor),
        tmc_weight=0.1,
    )


def main(output_dir: str, mode: str, checkpoint: str | None = None) -> None:
    trainer = build_trainer(output_dir, lora_seed=123 if mode == "resume" else 0)
    recorder = Recorder(os.path.join(output_dir, f"{mode}.json"), kill=mode == "kill")
    trainer.add_callback(recorder)
    trainer.train(resume_from_checkpoint=checkpoint if mode == "resume" else None)
    recorder.dump()


if __name__ == "__main__":
    main(*sys.argv[1:])
