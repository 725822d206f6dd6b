"""MaskCMATrainer: exact gradient accumulation, per-component logging, resume, a short run that learns, peft."""

from __future__ import annotations

import pytest
import torch
from transformers import TrainerCallback, TrainingArguments

from transformers_maskcma.data.synthetic import SyntheticConfig, generate_synthetic
from transformers_maskcma.processing.processing_maskcma import MaskCMAProcessor
from transformers_maskcma.tiny import build_tiny_model
from transformers_maskcma.trainer.callbacks import active_cma
from transformers_maskcma.trainer.collator import MaskCMADataCollator
from transformers_maskcma.trainer.data import ProcessedRecords
from transformers_maskcma.trainer.lora import apply_lora, default_lora_config
from transformers_maskcma.trainer.trainer import MaskCMATrainer


@pytest.fixture(scope="module")
def processor():
    model, tokenizer = build_tiny_model(seed=0)
    return MaskCMAProcessor.from_model_config(model.config, tokenizer)


@pytest.fixture(scope="module")
def records():
    return generate_synthetic(24, SyntheticConfig(video_fraction=0.0, multi_object_fraction=0.4, seed=5), show_progress=False)


def _one_and_two_objects(records, processor) -> ProcessedRecords:
    """Two samples with different numbers of targets and of answer tokens: a plain mean over micro-batches would
    weight them differently from one batch of both."""
    counts = [len(masks) for masks in records["masks"]]
    rows = [counts.index(1), counts.index(2)]
    return ProcessedRecords(records.select(rows), processor)


class GradientRecorder(TrainerCallback):
    """Copies the gradients just before the optimizer step (clipping is off in these runs)."""

    def __init__(self):
        self.gradients = []

    def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
        self.gradients.append(
            {name: p.grad.detach().clone() for name, p in model.named_parameters() if p.grad is not None}
        )


class FactorRecorder(TrainerCallback):
    def __init__(self):
        self.factors = {}

    def on_step_begin(self, args, state, control, model=None, **kwargs):
        self.factors[state.global_step] = active_cma(model).warmup_factor


def _args(tmp_path, **overrides) -> TrainingArguments:
    values = dict(
        output_dir=str(tmp_path),
        per_device_train_batch_size=1,
        gradient_accumulation_steps=1,
        max_steps=1,
        learning_rate=1e-3,
        optim="sgd",
        max_grad_norm=0.0,
        lr_scheduler_type="constant",
        logging_steps=1,
        save_strategy="no",
        report_to=[],
        use_cpu=True,
        remove_unused_columns=False,
        disable_tqdm=True,
        seed=0,
        data_seed=0,
    )
    values.update(overrides)
    return TrainingArguments(**values)


def _train(tmp_path, dataset, processor, tmc_weight=0.0, callbacks=(), model_kwargs=None, **arg_overrides):
    model, _ = build_tiny_model(seed=0, **(model_kwargs or {}))
    trainer = MaskCMATrainer(
        model=model,
        args=_args(tmp_path, **arg_overrides),
        train_dataset=dataset,
        data_collator=MaskCMADataCollator(processor),
        tmc_weight=tmc_weight,
    )
    for callback in callbacks:
        trainer.add_callback(callback)
    trainer.train()
    return trainer


def test_gradient_accumulation_two_by_one_equals_one_batch_of_two(tmp_path, records, processor):
    dataset = _one_and_two_objects(records, processor)
    batch_run, accumulated_run = GradientRecorder(), GradientRecorder()
    batch_trainer = _train(tmp_path / "batch", dataset, processor, callbacks=[batch_run], per_device_train_batch_size=2)
    accumulated_trainer = _train(
        tmp_path / "accum", dataset, processor, callbacks=[accumulated_run], gradient_accumulation_steps=2
    )
    full, accumulated = batch_run.gradients[0], accumulated_run.gradients[0]
    assert full.keys() == accumulated.keys() and len(full) > 50
    for name in full:
        torch.testing.assert_close(accumulated[name], full[name], rtol=1e-4, atol=1e-6, msg=name)
    # the logged loss and components are those of the whole batch
    batch_log, accumulated_log = batch_trainer.state.log_history[0], accumulated_trainer.state.log_history[0]
    for key in ("loss", "lm_loss", "mask_bce", "mask_dice", "prior_loss", "iou_loss", "object_score_loss"):
        assert accumulated_log[key] == pytest.approx(batch_log[key], rel=1e-5), key

    # the test is sensitive: averaging the two micro-batch losses (the default for a model whose loss is a batch
    # mean) gives a different gradient
    model, _ = build_tiny_model(seed=0)
    collator = MaskCMADataCollator(processor)
    for index in range(2):
        (model(**collator([dataset[index]])).loss / 2).backward()
    name = "seg_proj.2.weight"
    naive = next(p.grad for n, p in model.named_parameters() if n == name)
    assert (naive - full[name]).abs().max() > 1e-3 * full[name].abs().max()


def test_tmc_term_is_the_mean_over_micro_batches(tmp_path, records, processor):
    """Under accumulation each micro-batch contrasts its own objects: the one-object sample contributes 0 (and is
    counted as skipped), the two-object sample its own TMC loss."""
    dataset = _one_and_two_objects(records, processor)
    trainer = _train(tmp_path, dataset, processor, tmc_weight=0.1, gradient_accumulation_steps=2)
    log = trainer.state.log_history[0]
    model, _ = build_tiny_model(seed=0)
    model.set_cma_warmup_factor(0.0)  # the first step of training runs at warm-up factor 0
    with torch.no_grad():
        two_objects = model(**MaskCMADataCollator(processor)([dataset[1]]))
    assert not two_objects.tmc_skipped
    assert log["tmc_loss"] == pytest.approx(two_objects.tmc_loss.item() / 2, rel=1e-4)
    assert log["tmc_skipped_fraction"] == pytest.approx(0.5)
    expected = (
        log["lm_loss"] + 2.0 * log["mask_bce"] + 0.5 * log["mask_dice"] + log["iou_loss"] + log["object_score_loss"]
    ) + 0.1 * log["tmc_loss"]
    assert log["loss"] == pytest.approx(expected, rel=1e-5)


def test_resume_gives_the_same_loss_curve_and_warmup(tmp_path, records, processor):
    dataset = ProcessedRecords(records.select(range(8)), processor)
    settings = dict(
        per_device_train_batch_size=2,
        max_steps=4,
        optim="adamw_torch",
        lr_scheduler_type="cosine",
        warmup_steps=0.25,
        max_grad_norm=1.0,
        save_strategy="steps",
        save_steps=2,
    )
    model_kwargs = {"warmup_ratio": 0.5}
    straight = FactorRecorder()
    full = _train(
        tmp_path / "full", dataset, processor, tmc_weight=0.1, callbacks=[straight], model_kwargs=model_kwargs, **settings
    )
    resumed_factors = FactorRecorder()
    model, _ = build_tiny_model(seed=1, **model_kwargs)  # other initial weights: all state comes from the checkpoint
    trainer = MaskCMATrainer(
        model=model,
        args=_args(tmp_path / "full", **settings),
        train_dataset=dataset,
        data_collator=MaskCMADataCollator(processor),
        tmc_weight=0.1,
    )
    trainer.add_callback(resumed_factors)
    trainer.train(resume_from_checkpoint=str(tmp_path / "full" / "checkpoint-2"))

    def curve(history):
        return {entry["step"]: entry["loss"] for entry in history if "loss" in entry}

    full_curve, resumed_curve = curve(full.state.log_history), curve(trainer.state.log_history)
    assert sorted(full_curve) == [1, 2, 3, 4]
    for step in (3, 4):
        assert resumed_curve[step] == pytest.approx(full_curve[step], rel=1e-5), step
    # warm-up over 2 of the 4 steps: 0, 0.5, then 1; the resumed run restarts at step 2 with the same factor
    assert straight.factors == {0: 0.0, 1: 0.5, 2: 1.0, 3: 1.0}
    assert resumed_factors.factors == {2: 1.0, 3: 1.0}
    assert active_cma(trainer.model).warmup_factor == 1.0  # reset for inference


def test_short_training_lowers_the_loss(tmp_path, records, processor):
    dataset = ProcessedRecords(records.select(range(8)), processor, cache=True)
    trainer = _train(
        tmp_path, dataset, processor, tmc_weight=0.1, per_device_train_batch_size=4, max_steps=12,
        optim="adamw_torch", learning_rate=2e-3, max_grad_norm=1.0,
    )
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    assert len(losses) == 12
    assert sum(losses[-3:]) / 3 < 0.7 * sum(losses[:3]) / 3
    logged = [entry for entry in trainer.state.log_history if "loss" in entry]
    for entry in logged:  # the logged total is the sum of the logged weighted components
        total = entry["lm_loss"] + 2.0 * entry["mask_bce"] + 0.5 * entry["mask_dice"] + 0.1 * entry["tmc_loss"]
        total += 1.0 * entry["iou_loss"] + 1.0 * entry["object_score_loss"]  # SAM2's head losses, weights 1
        assert entry["loss"] == pytest.approx(total, rel=1e-4)
        assert {"cma_gamma", "cma_warmup_factor", "prior_loss"} <= entry.keys()


def test_trains_a_peft_model(tmp_path, records, processor):
    model, _ = build_tiny_model(seed=0)
    peft_model = apply_lora(model, default_lora_config(model, r=4, lora_alpha=8))
    before = {n: p.detach().clone() for n, p in peft_model.named_parameters() if p.requires_grad}
    frozen_before = peft_model.get_base_model().vlm.model.vision_tower.embeddings.patch_embeddings.projection.weight.clone()
    factors = FactorRecorder()
    trainer = MaskCMATrainer(
        model=peft_model,
        args=_args(tmp_path, per_device_train_batch_size=2, max_steps=2, optim="adamw_torch"),
        train_dataset=ProcessedRecords(records.select(range(4)), processor),
        data_collator=MaskCMADataCollator(processor),
        cma_warmup_ratio=1.0,
    )
    trainer.add_callback(factors)
    trainer.train()
    assert factors.factors == {0: 0.0, 1: 0.5}
    changed = [n for n, p in peft_model.named_parameters() if p.requires_grad and not torch.equal(p, before[n])]
    assert any("lora_B" in n for n in changed) and any("cma.modules_to_save" in n for n in changed)
    frozen_after = peft_model.get_base_model().vlm.model.vision_tower.embeddings.patch_embeddings.projection.weight
    assert torch.equal(frozen_after, frozen_before)
    assert "cma_gamma" in trainer.state.log_history[0]
