"""Every `maskcma` error is one line with status 2 (a traceback only with --debug); --threads on every command."""

from __future__ import annotations

import pytest
import torch

from transformers_maskcma import cli
from transformers_maskcma.cli import _leaf_parsers, build_parser, main


def test_every_command_takes_threads_and_debug():
    parser = build_parser()
    leaves = [leaf for leaf in _leaf_parsers(parser) if leaf is not parser]
    assert {leaf.prog for leaf in leaves} >= {
        "maskcma demo", "maskcma predict", "maskcma train", "maskcma evaluate", "maskcma export", "maskcma push",
        "maskcma data check", "maskcma convert sam2",
    }  # fmt: skip
    for leaf in leaves:
        options = {option for action in leaf._actions for option in action.option_strings}
        assert {"--threads", "--debug"} <= options, leaf.prog


def test_threads_sets_torch_threads_only_when_given(monkeypatch):
    calls = []
    monkeypatch.setattr(torch, "set_num_threads", calls.append)
    cli.apply_threads(None)
    cli.apply_threads(0)
    assert calls == []  # torch's default is kept
    cli.apply_threads(3)
    assert calls == [3]
    with pytest.raises(ValueError, match="--threads must be >= 1"):
        cli.apply_threads(-2)


def test_threads_reaches_torch_through_the_command(monkeypatch, tmp_path, capsys):
    calls = []
    monkeypatch.setattr(torch, "set_num_threads", calls.append)
    assert main(["train", str(tmp_path / "missing.yaml"), "--threads", "2"]) == 2
    assert calls == [2]


def test_an_unexpected_error_is_one_line_and_debug_shows_the_traceback(monkeypatch, tmp_path, capsys):
    from transformers_maskcma.trainer import commands

    def broken(*args, **kwargs):
        raise KeyError("something internal")

    monkeypatch.setattr(commands, "load_train_config", broken)
    assert main(["train", str(tmp_path / "x.yaml")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1
    assert err.startswith("maskcma train: error: KeyError:") and "--debug" in err
    with pytest.raises(KeyError, match="something internal"):
        main(["--debug", "train", str(tmp_path / "x.yaml")])
    with pytest.raises(KeyError, match="something internal"):
        main(["train", str(tmp_path / "x.yaml"), "--debug"])


def test_a_read_only_output_folder_is_found_before_training(tmp_path, capsys, monkeypatch):
    import yaml

    from transformers_maskcma.trainer import commands

    def no_model(*args, **kwargs):
        raise AssertionError("the model was built before the output folder was checked")

    monkeypatch.setattr(commands, "build_model_and_processor", no_model)
    blocker = tmp_path / "file"
    blocker.write_text("x")
    config = tmp_path / "train.yaml"
    config.write_text(yaml.safe_dump({"data": {"sources": [{"dataset": "synthetic", "split": "train"}]},
                                      "training": {"use_cpu": True}}))  # fmt: skip
    assert main(["train", str(config), "--output-dir", str(blocker / "run")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "cannot be created" in err
