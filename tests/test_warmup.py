"""The CMA warm-up schedule: values at chosen steps, on a plain and a peft model, and after a resume."""

from __future__ import annotations

import pytest
import torch
from transformers import TrainerControl, TrainerState, TrainingArguments

from transformers_maskcma.tiny import build_tiny_model
from transformers_maskcma.trainer.callbacks import GammaWarmupCallback, active_cma, warmup_factor_at
from transformers_maskcma.trainer.lora import apply_lora, default_lora_config


@pytest.mark.parametrize(
    ("step", "max_steps", "ratio", "expected"),
    [
        (0, 100, 0.1, 0.0),
        (1, 100, 0.1, 0.1),
        (5, 100, 0.1, 0.5),
        (10, 100, 0.1, 1.0),
        (57, 100, 0.1, 1.0),
        (100, 100, 0.1, 1.0),
        (1, 8, 0.25, 0.5),
        (3, 8, 0.25, 1.0),
        (1, 30, 0.1, 1.0 / 3.0),
        (0, 50, 0.0, 1.0),  # no ramp
        (7, 10, 1.0, 0.7),  # the whole run is the ramp
    ],
)
def test_warmup_factor_values(step, max_steps, ratio, expected):
    assert warmup_factor_at(step, max_steps, ratio) == pytest.approx(expected)


def test_warmup_ratio_is_validated():
    with pytest.raises(ValueError, match="warmup_ratio=1.5"):
        warmup_factor_at(0, 10, 1.5)
    with pytest.raises(ValueError, match="warmup_ratio=-0.1"):
        GammaWarmupCallback(-0.1)


def _state(step: int, max_steps: int) -> TrainerState:
    state = TrainerState()
    state.global_step, state.max_steps = step, max_steps
    return state


@pytest.mark.parametrize("use_peft", [False, True])
def test_callback_sets_the_running_cma(tmp_path, use_peft):
    model, _ = build_tiny_model(seed=0, warmup_ratio=0.2)
    if use_peft:
        model = apply_lora(model, default_lora_config(model, r=2, lora_alpha=4))
    callback = GammaWarmupCallback()  # ratio from the config: 0.2
    args = TrainingArguments(output_dir=str(tmp_path), report_to=[], use_cpu=True)
    control = TrainerControl()
    callback.on_train_begin(args, _state(0, 20), control, model=model)
    assert active_cma(model).warmup_factor == 0.0
    callback.on_step_begin(args, _state(3, 20), control, model=model)
    assert active_cma(model).warmup_factor == pytest.approx(0.75)
    callback.on_step_begin(args, _state(4, 20), control, model=model)
    assert active_cma(model).warmup_factor == 1.0
    callback.on_train_end(args, _state(20, 20), control, model=model)
    assert active_cma(model).warmup_factor == 1.0


def test_factor_scales_the_cma_residual():
    """With γ ≠ 0, the CMA's update is proportional to the factor (the "residual" warm-up target)."""
    model, _ = build_tiny_model(seed=0)
    cma = model.cma
    with torch.no_grad():
        cma.gamma.fill_(0.5)
    generator = torch.Generator().manual_seed(0)
    image = torch.randn(2, 256, 4, 4, generator=generator)
    tokens = torch.randn(2, 3, 256, generator=generator)
    token_mask = torch.ones(2, 3, dtype=torch.bool)
    seg = torch.randn(2, 256, generator=generator)
    prior = torch.randn(2, 1, 4, 4, generator=generator)
    updates = {}
    for factor in (0.0, 0.4, 1.0):
        cma.warmup_factor = factor
        updates[factor] = cma(image, tokens, token_mask, seg, prior).image_embeddings - image
    assert updates[0.0].abs().max() == 0.0
    torch.testing.assert_close(updates[0.4], 0.4 * updates[1.0], rtol=1e-5, atol=1e-6)


def test_mask_target_ramps_the_gate():
    model, _ = build_tiny_model(seed=0, cma_warmup_target="mask")
    prior = torch.tensor([[[[-3.0, 0.0], [2.0, 5.0]]]])
    callback = GammaWarmupCallback(0.5)
    args = TrainingArguments(output_dir="unused", report_to=[], use_cpu=True)
    callback.on_step_begin(args, _state(0, 10), TrainerControl(), model=model)
    torch.testing.assert_close(model.cma.gate_values(prior), torch.ones(1, 4, 1))  # ω = 0: gate 1 everywhere
    callback.on_step_begin(args, _state(5, 10), TrainerControl(), model=model)
    torch.testing.assert_close(model.cma.gate_values(prior), torch.sigmoid(prior).flatten(2).transpose(1, 2))


def test_factor_after_resume_is_derived_from_the_restored_state(tmp_path):
    """A state saved at step 3 of 40 and loaded back gives the factor of step 3, whatever ran before."""
    model, _ = build_tiny_model(seed=0)
    callback = GammaWarmupCallback(0.25)
    args = TrainingArguments(output_dir=str(tmp_path), report_to=[], use_cpu=True)
    saved = _state(3, 40)
    saved.save_to_json(str(tmp_path / "trainer_state.json"))
    callback.on_step_begin(args, _state(39, 40), TrainerControl(), model=model)  # a finished run
    assert active_cma(model).warmup_factor == 1.0
    restored = TrainerState.load_from_json(str(tmp_path / "trainer_state.json"))
    callback.on_train_begin(args, restored, TrainerControl(), model=model)
    assert active_cma(model).warmup_factor == pytest.approx(3 / 10)
