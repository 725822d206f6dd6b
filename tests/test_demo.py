"""The demo end to end in its quick mode (a few steps): data, training with CMA on and off, evaluation against the
shuffled-prompt control, save/reload round trip, predictions with overlays, the ablation report."""

from __future__ import annotations

import json

import pytest

from transformers_maskcma.cli import main
from transformers_maskcma.modeling import MaskCMAModel


@pytest.mark.slow
def test_quick_demo_runs_end_to_end(tmp_path, capsys):
    output = tmp_path / "demo"
    assert main(["demo", "--quick", "--output", str(output)]) == 0
    printed = capsys.readouterr().out
    assert "== MaskCMA demo summary ==" in printed and "held-out cIoU" in printed

    results = json.loads((output / "results.json").read_text())
    assert [run["use_cma"] for run in results["runs"]] == [True, False]
    for run in results["runs"]:
        assert 0.0 <= run["ciou"] <= 1.0 and 0.0 <= run["shuffled_ciou"] <= 1.0
        assert run["final_logs"]["cma_warmup_factor"] >= 0.0 and "tmc_loss" in run["final_logs"]
    assert results["round_trip_identical"] is True
    # the CMA-off run trained in a second process: its log stays, its copy of the data is removed
    assert "training the tiny model (CMA off)" in (output / "work" / "cma_off.log").read_text()
    assert not (output / "work" / "cma_off_data").exists()
    assert results["settings"]["steps"] == 3
    # the demo trains on centred area targets, and its saved processor says so
    processor_config = json.loads((output / "model" / "processor_config.json").read_text())
    assert results["settings"]["gt_mask_resize"] == processor_config["gt_mask_resize"] == "area"

    # the saved folder loads strictly; predictions wrote overlays for a held-out image and clip
    MaskCMAModel.from_pretrained(output / "model")
    assert (output / "predict" / "image" / "overlay.png").is_file()
    assert (output / "predict" / "video" / "overlay.gif").is_file()
    assert [p["media_type"] for p in results["predictions"]] == ["image", "video"]
    report = (output / "cma_ablation.md").read_text()
    assert "| CMA on (`use_cma=True`) |" in report and "| CMA off" in report


def test_demo_rejects_bad_arguments(tmp_path, capsys):
    assert main(["demo", "--quick", "--steps", "0", "--output", str(tmp_path)]) == 2
    assert "--steps must be >= 1" in capsys.readouterr().err


def test_a_diverged_training_run_is_an_error_not_a_result(tmp_path):
    from dataclasses import replace

    from transformers_maskcma.demo import QUICK_SETTINGS, demo_data, train_model

    settings = replace(QUICK_SETTINGS, learning_rate=1e30, head_init_scale=None, paired_prompts=False)
    train, _ = demo_data(settings)
    with pytest.raises(RuntimeError, match="training diverged: .* NaN/inf"):
        train_model(settings, train, use_cma=True, output_dir=tmp_path)
