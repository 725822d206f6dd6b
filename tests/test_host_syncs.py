"""No host synchronisation per micro-batch in the trainer and the TMC loss: the logged sums stay on the device until
logging. A CPU has no real device synchronisation, so the test counts the calls that would synchronise on an
accelerator (`item`, `tolist`, `float()`, `int()`, `bool()` of a tensor) made from the trainer's own files."""

from __future__ import annotations

import os
import sys
from collections import Counter

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from transformers import TrainingArguments

from transformers_maskcma.data.synthetic import SyntheticConfig, generate_synthetic
from transformers_maskcma.processing.processing_maskcma import MaskCMAProcessor
from transformers_maskcma.tiny import build_tiny_model
from transformers_maskcma.modeling import tmc as tmc_module
from transformers_maskcma.trainer import trainer as trainer_module
from transformers_maskcma.trainer.collator import MaskCMADataCollator
from transformers_maskcma.trainer.data import ProcessedRecords
from transformers_maskcma.trainer.trainer import MaskCMATrainer

WATCHED_FILES = {os.path.abspath(trainer_module.__file__), os.path.abspath(tmc_module.__file__)}
SYNCING_METHODS = ("item", "tolist", "__float__", "__int__", "__bool__")


class SyncCounter:
    """Counts the calls of `SYNCING_METHODS` on tensors made from the watched files, by calling function."""

    def __init__(self, monkeypatch):
        self.calls: Counter = Counter()
        for name in SYNCING_METHODS:
            original = getattr(torch.Tensor, name)
            monkeypatch.setattr(torch.Tensor, name, self._wrap(original))

    def _wrap(self, original):
        counter = self

        def wrapper(tensor, *args, **kwargs):
            frame = sys._getframe(1)
            if os.path.abspath(frame.f_code.co_filename) in WATCHED_FILES:
                counter.calls[frame.f_code.co_name] += 1
            return original(tensor, *args, **kwargs)

        return wrapper


def _train(tmp_path, dataset, processor, accumulation: int, monkeypatch) -> tuple[Counter, MaskCMATrainer]:
    model, _ = build_tiny_model(seed=0)
    args = TrainingArguments(
        output_dir=str(tmp_path), per_device_train_batch_size=1, gradient_accumulation_steps=accumulation,
        max_steps=2, learning_rate=1e-3, optim="sgd", logging_steps=2, save_strategy="no", report_to=[],
        use_cpu=True, remove_unused_columns=False, disable_tqdm=True, seed=0, data_seed=0,
    )
    trainer = MaskCMATrainer(
        model=model, args=args, train_dataset=dataset, data_collator=MaskCMADataCollator(processor), tmc_weight=0.1
    )
    with monkeypatch.context() as patch:
        counter = SyncCounter(patch)
        trainer.train()
    return counter.calls, trainer


def test_no_host_sync_per_micro_batch(tmp_path, monkeypatch):
    model, tokenizer = build_tiny_model(seed=0)
    processor = MaskCMAProcessor.from_model_config(model.config, tokenizer)
    records = generate_synthetic(
        8, SyntheticConfig(video_fraction=0.0, multi_object_fraction=0.5, seed=3), show_progress=False
    )
    dataset = ProcessedRecords(records, processor)
    two, trainer_two = _train(tmp_path / "ga2", dataset, processor, 2, monkeypatch)
    four, trainer_four = _train(tmp_path / "ga4", dataset, processor, 4, monkeypatch)
    # nothing in the per-micro-batch path reads a tensor on the host
    for name in ("compute_loss", "_record_components", "text_mask_contrastive_loss", "group_rows", "_zero_loss",
                 "seg_visual_embeddings", "_lm_token_count", "_share"):
        assert two[name] == 0 and four[name] == 0, (name, two, four)
    # the remaining reads are per optimizer step or per log, so they do not grow with the micro-batches
    assert two == four, (two, four)
    assert two["get_batch_samples"] == 2  # one read of the step's counts per optimizer step
    # and the logs are still complete
    log = trainer_four.state.log_history[0]
    assert {"loss", "lm_loss", "mask_bce", "mask_dice", "tmc_loss", "tmc_skipped_fraction"} <= log.keys()
    assert 0.0 <= log["tmc_skipped_fraction"] <= 1.0
    assert trainer_four.tmc_skipped_micro_batches >= 0


class Float64Recorder(TorchDispatchMode):
    """Records the operations called from the watched files (first caller outside torch) that create float64."""

    def __init__(self):
        super().__init__()
        self.seen: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        outputs = out if isinstance(out, (tuple, list)) else (out,)
        if any(isinstance(t, torch.Tensor) and t.dtype == torch.float64 for t in outputs):
            frame = sys._getframe(1)
            while frame is not None and os.sep + "torch" + os.sep in frame.f_code.co_filename:
                frame = frame.f_back
            if frame is not None and os.path.abspath(frame.f_code.co_filename) in WATCHED_FILES:
                self.seen.append(f"{frame.f_code.co_name}: {func}")
        return out


def test_no_float64_on_the_training_device(tmp_path):
    """MPS has no float64: the step counts (int64) and the running sums (float32) avoid it."""
    model, tokenizer = build_tiny_model(seed=0)
    processor = MaskCMAProcessor.from_model_config(model.config, tokenizer)
    records = generate_synthetic(4, SyntheticConfig(video_fraction=0.0, seed=4), show_progress=False)
    args = TrainingArguments(
        output_dir=str(tmp_path), per_device_train_batch_size=1, gradient_accumulation_steps=2, max_steps=1,
        learning_rate=1e-3, optim="sgd", logging_steps=1, save_strategy="no", report_to=[], use_cpu=True,
        remove_unused_columns=False, disable_tqdm=True, seed=0,
    )
    trainer = MaskCMATrainer(
        model=model, args=args, train_dataset=ProcessedRecords(records, processor),
        data_collator=MaskCMADataCollator(processor), tmc_weight=0.1,
    )
    recorder = Float64Recorder()
    with recorder:
        trainer.train()
    assert recorder.seen == []
    assert "tmc_loss" in trainer.state.log_history[0]
