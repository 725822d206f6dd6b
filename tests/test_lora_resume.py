"""Strict LoRA resume: a LoRA run killed with SIGKILL and resumed in a new process continues the uninterrupted run's
loss curve and CMA warm-up; an adapter checkpoint with a missing or unexpected key is refused, naming the key."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

SCRIPT = Path(__file__).with_name("lora_resume_script.py")
sys.path.insert(0, str(SCRIPT.parent))


def _run(output_dir: Path, mode: str, checkpoint: Path | None = None) -> subprocess.CompletedProcess:
    command = [sys.executable, str(SCRIPT), str(output_dir), mode] + ([str(checkpoint)] if checkpoint else [])
    env = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false")
    return subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)


@pytest.fixture(scope="module")
def killed_run(tmp_path_factory) -> Path:
    """A LoRA run killed with SIGKILL right after writing checkpoint-2."""
    folder = tmp_path_factory.mktemp("killed")
    result = _run(folder, "kill")
    assert result.returncode == -signal.SIGKILL, result.stderr[-2000:]
    assert (folder / "checkpoint-2" / "adapter_model.safetensors").is_file()
    assert not (folder / "checkpoint-4").exists()
    return folder


def _read(path: Path) -> tuple[dict[int, float], dict[int, float]]:
    content = json.loads(path.read_text())
    return (
        {int(k): v for k, v in content["losses"].items()},
        {int(k): v for k, v in content["factors"].items()},
    )


def test_killed_lora_run_resumes_on_the_uninterrupted_curve(killed_run, tmp_path):
    full = _run(tmp_path, "full")
    assert full.returncode == 0, full.stderr[-2000:]
    resumed = _run(killed_run, "resume", killed_run / "checkpoint-2")
    assert resumed.returncode == 0, resumed.stderr[-2000:]

    full_losses, full_factors = _read(tmp_path / "full.json")
    killed_losses, _ = _read(killed_run / "kill.json")
    resumed_losses, resumed_factors = _read(killed_run / "resume.json")
    assert sorted(full_losses) == [1, 2, 3, 4]
    assert sorted(killed_losses) == [1, 2] and sorted(resumed_losses) == [3, 4]
    for step in (1, 2):
        assert abs(killed_losses[step] - full_losses[step]) <= 1e-5, step
    for step in (3, 4):
        assert abs(resumed_losses[step] - full_losses[step]) <= 1e-5, step
    # the resumed process started from other LoRA weights: the curve can only match if the checkpoint restored them
    assert full_factors == {0: 0.0, 1: 0.5, 2: 1.0, 3: 1.0}
    assert resumed_factors == {2: 1.0, 3: 1.0}


def _damaged_copy(source: Path, target: Path, edit) -> Path:
    shutil.copytree(source, target)
    weights_path = target / "adapter_model.safetensors"
    weights = load_file(str(weights_path))
    edit(weights)
    save_file(weights, str(weights_path))
    return target


CMA_KEY = "base_model.model.cma.router.query_proj.weight"
SEG_ROWS_KEY = "base_model.model.vlm.model.language_model.embed_tokens.token_adapter.trainable_tokens_delta"


def test_trainer_refuses_a_checkpoint_missing_a_modules_to_save_weight(killed_run, tmp_path):
    from lora_resume_script import build_trainer

    from transformers_maskcma.trainer.lora import AdapterLoadError

    damaged = _damaged_copy(killed_run / "checkpoint-2", tmp_path / "checkpoint-2", lambda w: w.pop(CMA_KEY))
    trainer = build_trainer(str(tmp_path), lora_seed=0)
    with pytest.raises(AdapterLoadError, match=rf"missing keys {CMA_KEY.replace('.', '[.]')}"):
        trainer.train(resume_from_checkpoint=str(damaged))


def test_strict_adapter_loading_names_missing_unexpected_and_misshaped_keys(killed_run, tmp_path):
    from lora_resume_script import build_trainer

    from transformers_maskcma.trainer.lora import AdapterLoadError, load_adapter_strict

    peft_model = build_trainer(str(tmp_path), lora_seed=7).model
    source = killed_run / "checkpoint-2"
    missing_rows = _damaged_copy(source, tmp_path / "rows", lambda w: w.pop(SEG_ROWS_KEY))
    with pytest.raises(AdapterLoadError, match="missing keys .*trainable_tokens_delta"):
        load_adapter_strict(peft_model, missing_rows)

    def add_extra(weights):
        weights["base_model.model.cma.extra_head.weight"] = torch.zeros(2)

    unexpected = _damaged_copy(source, tmp_path / "extra", add_extra)
    with pytest.raises(AdapterLoadError, match="unexpected keys base_model.model.cma.extra_head.weight"):
        load_adapter_strict(peft_model, unexpected)

    def reshape(weights):
        weights[CMA_KEY] = torch.zeros(3, 3)

    misshaped = _damaged_copy(source, tmp_path / "shape", reshape)
    with pytest.raises(AdapterLoadError, match="shapes differ"):
        load_adapter_strict(peft_model, misshaped)

    # the intact checkpoint loads, and every saved tensor (LoRA, modules_to_save, [SEG] rows) is now in the model
    from peft.utils import get_peft_model_state_dict

    loaded = load_adapter_strict(peft_model, source)
    state = get_peft_model_state_dict(peft_model)
    assert {CMA_KEY, SEG_ROWS_KEY} <= loaded.keys()
    assert all(torch.equal(state[key], value) for key, value in loaded.items())


def test_truncated_adapter_file_names_the_file(killed_run, tmp_path):
    from lora_resume_script import build_trainer

    from transformers_maskcma.run_folder import WeightsFileError
    from transformers_maskcma.trainer.lora import load_adapter_strict

    folder = tmp_path / "cut"
    shutil.copytree(killed_run / "checkpoint-2", folder)
    path = folder / "adapter_model.safetensors"
    path.write_bytes(path.read_bytes()[:-100])
    peft_model = build_trainer(str(tmp_path), lora_seed=0).model
    with pytest.raises(WeightsFileError, match=r"adapter_model.safetensors is truncated"):
        load_adapter_strict(peft_model, folder)
