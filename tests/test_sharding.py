"""Sharded-training plumbing that runs in one CPU process: the model is built before the TrainingArguments (so
DeepSpeed ZeRO-3's `zero.Init` cannot partition it while it loads), the ZeRO-3 export check, the strict load of a
gathered state into an unsharded meta copy. The 2-process FSDP2 runs are in tests/test_fsdp.py; the DeepSpeed runs
need a GPU (tests/gpu/run_sharded.sh)."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
import yaml
from transformers.integrations import deepspeed as hf_deepspeed

from transformers_maskcma.tiny import build_tiny_model
from transformers_maskcma.trainer import commands
from transformers_maskcma.trainer.config import TrainConfig, load_train_config
from transformers_maskcma.trainer.sharding import (
    ShardedTrainingError,
    build_model_before_arguments,
    check_export_possible,
    full_scalar_value,
    load_full_state_dict,
    meta_copy,
    zero3_enabled,
)


class _Zero3Config:
    """Stands for the HfDeepSpeedConfig that a `TrainingArguments(deepspeed=<ZeRO-3 json>)` registers: transformers
    asks it `is_zero3()` to decide whether to build models inside `deepspeed.zero.Init`."""

    def is_zero3(self):
        return True


@pytest.fixture
def zero3_switch():
    """Turn transformers' ZeRO-3 switch on (through its own registration function) for the duration of a test."""
    config = _Zero3Config()

    def switch_on():
        hf_deepspeed.set_hf_deepspeed_config(config)

    yield switch_on
    hf_deepspeed.unset_hf_deepspeed_config()


def _config(tmp_path) -> TrainConfig:
    content = {
        "model": {"tiny": {"seed": 0}},
        "data": {"sources": [{"dataset": "synthetic", "split": "train", "options": {"num_samples": 2}}]},
        "lora": {"enabled": False},
        "training": {"max_steps": 1, "use_cpu": True, "disable_tqdm": True, "report_to": []},
    }
    path = tmp_path / "train.yaml"
    path.write_text(yaml.safe_dump(content))
    return load_train_config(path)


def test_training_builds_the_model_before_the_arguments(tmp_path, monkeypatch, zero3_switch):
    """`run_training` builds the model (and its export copy) before it creates the TrainingArguments, which is when a
    ZeRO-3 config switches `zero.Init` on; the builder runs with the switch off."""
    events = []
    real_build = commands.build_model_and_processor

    def build(config):
        events.append(("build", zero3_enabled()))
        return real_build(config)

    class Stop(Exception):
        pass

    def training_arguments(self, output_dir=None):
        events.append(("arguments", zero3_enabled()))
        zero3_switch()  # what TrainingArguments(deepspeed=ZeRO-3 config) does
        raise Stop

    monkeypatch.setattr(commands, "build_model_and_processor", build)
    monkeypatch.setattr(TrainConfig, "training_arguments", training_arguments)
    with pytest.raises(Stop):
        commands.run_training(_config(tmp_path), output_dir=str(tmp_path / "run"))
    assert events == [("build", False), ("arguments", False)]


def test_building_under_an_active_zero3_config_is_refused(tmp_path, zero3_switch, capsys):
    zero3_switch()
    assert zero3_enabled()
    with pytest.raises(ShardedTrainingError, match="ZeRO-3 configuration is active"):
        commands.build_models_before_arguments(_config(tmp_path))
    calls = []
    with pytest.raises(ShardedTrainingError):
        build_model_before_arguments(lambda: calls.append(1))
    assert calls == []  # the builder never ran


@pytest.mark.parametrize(
    ("zero", "error"),
    [
        ({"stage": 3}, True),
        ({"stage": 3, "stage3_gather_16bit_weights_on_model_save": False}, True),
        ({"stage": 3, "stage3_gather_16bit_weights_on_model_save": True}, False),
        ({"stage": 2}, False),
    ],
)
def test_zero3_export_needs_gathered_weights(zero, error):
    args = SimpleNamespace(hf_deepspeed_config=SimpleNamespace(config={"zero_optimization": zero}))
    if error:
        with pytest.raises(ShardedTrainingError, match="stage3_gather_16bit_weights_on_model_save"):
            check_export_possible(args)
    else:
        check_export_possible(args)
    check_export_possible(SimpleNamespace())  # no DeepSpeed: nothing to check


def test_shipped_deepspeed_configs_can_export():
    """The ZeRO configs the docs show (and the GPU script runs) pass the export check."""
    import json
    from pathlib import Path

    import transformers_maskcma

    folder = Path(transformers_maskcma.__file__).parent / "configs" / "accelerate"
    for name in ("ds_zero2.json", "ds_zero3.json"):
        config = json.loads((folder / name).read_text())
        check_export_possible(SimpleNamespace(hf_deepspeed_config=SimpleNamespace(config=config)))
    assert json.loads((folder / "ds_zero3.json").read_text())["zero_optimization"]["stage"] == 3


def test_meta_copy_loads_a_full_state_strictly():
    model, _ = build_tiny_model(seed=3)
    copy = meta_copy(model)
    assert all(p.is_meta for p in copy.parameters())  # no memory until the weights arrive
    state = {name: tensor.clone() for name, tensor in model.state_dict().items()}
    loaded = load_full_state_dict(copy, state)
    for (name, mine), (_, theirs) in zip(loaded.state_dict().items(), model.state_dict().items()):
        assert torch.equal(mine, theirs), name
    lm_head, embedding = loaded.vlm.lm_head.weight, loaded.vlm.get_input_embeddings().weight
    assert lm_head is embedding  # tied again, as in the source model

    missing = dict(state)
    missing.pop("cma.gamma")
    with pytest.raises(ShardedTrainingError, match="missing keys \\['cma.gamma'\\]"):
        load_full_state_dict(meta_copy(model), missing)
    with pytest.raises(ShardedTrainingError, match="unexpected keys \\['extra.weight'\\]"):
        load_full_state_dict(meta_copy(model), {**state, "extra.weight": torch.zeros(1)})


def test_full_scalar_value_of_plain_parameters():
    assert full_scalar_value(torch.nn.Parameter(torch.tensor([0.25]))) == 0.25
    with pytest.raises(ShardedTrainingError, match="one-element"):
        full_scalar_value(torch.zeros(0))  # an empty view without a known engine: an error, never a silent skip


def test_docs_show_the_shipped_configs():
    """docs/training.md shows the accelerate / DeepSpeed files the GPU check runs, verbatim."""
    from pathlib import Path

    import transformers_maskcma

    docs = (Path(__file__).resolve().parents[1] / "docs" / "training.md").read_text()
    folder = Path(transformers_maskcma.__file__).parent / "configs" / "accelerate"
    for name in ("fsdp.yaml", "ds_zero2.json", "ds_zero3.json"):
        assert (folder / name).read_text().strip() in docs, name
