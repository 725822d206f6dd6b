"""Tests of the benchmarks package: every benchmark runs in `--quick` mode and writes valid results, and the pieces
the numbers rest on (statistics, interleaving, the memory method, the SAM2 size configs, the re-encoding flow,
FLOP counts, the report) behave as documented. No test looks at wall-clock times."""

from __future__ import annotations

import json
import math
import os
import shutil
import statistics
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO_ROOT = Path(__file__).resolve().parent.parent
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

from benchmarks.common import BenchSettings, compare, summarize, time_interleaved  # noqa: E402
from benchmarks.report import BENCHMARK_ORDER, update_benchmarks_doc  # noqa: E402
from benchmarks.run_all import BENCHMARKS  # noqa: E402

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _strict_json(path: Path) -> dict:
    def reject(constant):
        raise ValueError(f"{path.name} contains the non-JSON constant {constant}")

    return json.loads(path.read_text(), parse_constant=reject)


def _assert_finite_numbers(value, where: str) -> None:
    if isinstance(value, dict):
        for key, item in value.items():
            _assert_finite_numbers(item, f"{where}.{key}")
    elif isinstance(value, list):
        for index, item in enumerate(value):
            _assert_finite_numbers(item, f"{where}[{index}]")
    elif isinstance(value, float):
        assert math.isfinite(value), f"{where} is {value}"


@pytest.fixture(scope="module")
def quick_results(tmp_path_factory) -> Path:
    """`python -m benchmarks.run_all --quick` into a temporary directory (one interpreter for all benchmarks)."""
    output_dir = tmp_path_factory.mktemp("bench_quick")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    completed = subprocess.run(
        [sys.executable, "-m", "benchmarks.run_all", "--quick", "--output-dir", str(output_dir)],
        cwd=REPO_ROOT,
        env=env,
        capture_output=True,
        text=True,
        check=False,
    )
    assert completed.returncode == 0, completed.stderr[-4000:]
    return output_dir


def test_quick_run_writes_valid_results(quick_results):
    assert list(BENCHMARKS) == list(BENCHMARK_ORDER)
    for name in BENCHMARKS:
        json_path, png_path = quick_results / f"{name}.json", quick_results / f"{name}.png"
        assert json_path.is_file(), f"{name}: no JSON written"
        payload = _strict_json(json_path)
        _assert_finite_numbers(payload, name)
        assert payload["benchmark"] == name
        assert payload["schema_version"] == 1
        machine = payload["machine"]
        for key in ("cpu", "logical_cores", "torch", "transformers", "device", "dtype", "torch_threads"):
            assert machine[key] not in (None, ""), f"{name}: machine.{key} missing"
        assert machine["torch"] == torch.__version__
        assert payload["settings"]["quick"] is True and payload["settings"]["device"] == "cpu"
        assert payload["results"], f"{name}: empty results"
        for row in payload["targets"]:
            assert set(row) >= {"name", "target", "value", "limit", "met"}
            assert row["met"] == (row["value"] < row["limit"] if row["target"].startswith("<") else row["value"] <= row["limit"])
        assert png_path.read_bytes()[:8] == PNG_MAGIC, f"{name}: the plot is not a PNG"


def test_quick_results_are_internally_consistent(quick_results):
    overhead = _strict_json(quick_results / "cma_overhead.json")["results"]["tiny"]
    timings = overhead["timings_s"]
    assert len(timings["image_forward_cma"]) == len(timings["image_forward_no_cma"]) == overhead["repeats"]["forward"]
    for variant, samples in timings.items():
        assert overhead["summary_s"][variant]["median"] == pytest.approx(statistics.median(samples)), variant
        assert overhead["summary_s"][variant]["min"] == min(samples)
    ratio = overhead["latency_ratio_image_forward"]["ratio_of_medians"]
    assert ratio == pytest.approx(
        statistics.median(timings["image_forward_cma"]) / statistics.median(timings["image_forward_no_cma"])
    )
    for variant, memory in overhead["memory"].items():
        assert memory["peak_bytes"] - memory["baseline_bytes"] == memory["delta_bytes"], variant
        assert memory["delta_bytes"] >= 0 and memory["isolation"] == "inprocess"

    training = _strict_json(quick_results / "training_step.json")["results"]
    # same weights and batch: LoRA starts at B = 0 and checkpointing does not change the forward
    losses = training["first_step_loss"]
    assert losses["lora"] == pytest.approx(losses["full"], rel=1e-5)
    assert losses["lora_gc"] == pytest.approx(losses["full"], rel=1e-5)
    assert training["parameters"]["lora_gc"]["checkpointed_modules"] > 0
    assert training["parameters"]["lora"]["checkpointed_modules"] == 0
    assert training["tokens_per_second"]["full"] == pytest.approx(
        training["tokens_per_step"] / training["summary_s"]["full"]["median"]
    )

    pipeline = _strict_json(quick_results / "data_pipeline.json")["results"]
    step_rate = pipeline["training_step"]["samples_per_second"]
    assert step_rate == pytest.approx(pipeline["batch_size"] / pipeline["training_step"]["summary_s"]["median"])
    for name, entries in pipeline["loading"].items():
        for entry in entries:
            assert entry["samples_per_second"] == pytest.approx(entry["samples"] / entry["epoch_s"])
            assert pipeline["keeps_up"][name][str(entry["workers"])] == (entry["samples_per_second"] >= step_rate)

    video = _strict_json(quick_results / "video_scaling.json")
    counts = video["settings"]["frame_counts"]
    for count in counts:
        per_frame = video["results"]["time_per_frame_s"][str(count)]
        totals = video["results"]["stream_seconds"][str(count)]
        assert per_frame == pytest.approx([total / count for total in totals])


def test_report_fills_every_block(quick_results, tmp_path):
    doc = tmp_path / "benchmarks.md"
    shutil.copy(REPO_ROOT / "docs" / "benchmarks.md", doc)
    original = doc.read_text()
    update_benchmarks_doc(doc, cpu_dir=quick_results, gpu_dir=tmp_path / "no_gpu_results")
    text = doc.read_text()
    assert "| text tokens T |" in text and "| frames |" in text and "| variant |" in text
    assert "quick mode: numbers are not meaningful" in text
    assert "*Not run yet.* On a machine with a CUDA GPU" in text
    # the hand-written text outside the generated blocks is kept
    first_heading = original.splitlines()[0]
    assert text.splitlines()[0] == first_heading
    assert text.count("<!-- BEGIN GENERATED:") == original.count("<!-- BEGIN GENERATED:")

    broken = tmp_path / "broken.md"
    broken.write_text("# Benchmarks\n\n<!-- BEGIN GENERATED: summary -->\n<!-- END GENERATED: summary -->\n")
    with pytest.raises(ValueError, match="lacks the generated blocks"):
        update_benchmarks_doc(broken, cpu_dir=quick_results, gpu_dir=tmp_path / "no_gpu_results")


# ------------------------------------------------------------------------------------------------------------
# statistics and timing loop
# ------------------------------------------------------------------------------------------------------------


def test_summarize_matches_hand_computed_values():
    summary = summarize([10.0, 1.0, 3.0, 2.0, 4.0])
    assert summary["n"] == 5
    assert summary["median"] == 3.0 and summary["mean"] == 4.0
    assert (summary["min"], summary["max"]) == (1.0, 10.0)
    # linear-interpolation quartiles of 1, 2, 3, 4, 10: positions 1 and 3
    assert (summary["q1"], summary["q3"]) == (2.0, 4.0)
    assert summary["relative_iqr"] == pytest.approx(2.0 / 3.0)
    assert summarize([1.0, 2.0])["q1"] == pytest.approx(1.25)
    with pytest.raises(ValueError, match="empty sample"):
        summarize([])


def test_compare_pairs_rounds():
    ratio = compare([2.0, 4.0, 6.0], [1.0, 2.0, 4.0])
    assert ratio["ratio_of_medians"] == 2.0
    assert ratio["paired_median"] == 2.0
    assert (ratio["paired_min"], ratio["paired_max"]) == (1.5, 2.0)
    with pytest.raises(ValueError, match="differ in length"):
        compare([1.0], [1.0, 2.0])


def test_time_interleaved_alternates_variants_and_drops_warmup():
    calls = []
    samples = time_interleaved({"a": lambda: calls.append("a"), "b": lambda: calls.append("b")}, repeats=3, warmup=2)
    assert calls == ["a", "b"] * 5
    assert [len(samples["a"]), len(samples["b"])] == [3, 3]
    assert all(duration >= 0 for duration in samples["a"] + samples["b"])
    with pytest.raises(ValueError, match="repeats"):
        time_interleaved({"a": lambda: None}, repeats=0, warmup=0)


def test_settings_reject_bad_values():
    with pytest.raises(ValueError, match="device='tpu'"):
        BenchSettings(device="tpu")
    with pytest.raises(ValueError, match="memory_isolation"):
        BenchSettings(memory_isolation="thread")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="torch.cuda.is_available"):
            BenchSettings(device="cuda")
    settings = BenchSettings(quick=True, threads=1)
    assert BenchSettings.from_json(settings.to_json()).to_json() == settings.to_json()


# ------------------------------------------------------------------------------------------------------------
# memory method
# ------------------------------------------------------------------------------------------------------------


def test_memory_probe_measures_a_known_allocation():
    from benchmarks.memory import MemoryWorkload, measure_workload_memory

    settings = BenchSettings(quick=True, threads=1, memory_isolation="subprocess")
    result = measure_workload_memory(
        MemoryWorkload("benchmarks.memory", "build_allocation_workload", {"mebibytes": 96}), settings
    )
    assert result["isolation"] == "subprocess" and result["method"] == "cpu_vmhwm"
    # the call fills a fresh 96 MiB tensor: the peak rises by that much (within the kernel's per-CPU RSS counter slack), plus a little bookkeeping
    assert 95 * 2**20 <= result["delta_bytes"] <= 112 * 2**20
    # and it is freed again: a second probe starts from the same baseline (within a few MiB)
    again = measure_workload_memory(
        MemoryWorkload("benchmarks.memory", "build_allocation_workload", {"mebibytes": 32}), settings
    )
    assert 31 * 2**20 <= again["delta_bytes"] <= 48 * 2**20


# ------------------------------------------------------------------------------------------------------------
# what the image-side benchmarks run
# ------------------------------------------------------------------------------------------------------------


def test_official_hiera_configs_match_the_converter_presets():
    from benchmarks.sam2_sizes import official_hiera_sam2_config
    from transformers_maskcma.hub_cards.convert_sam2 import (
        sam2_architecture_for_size,
        sam2_video_config_from_architecture,
    )

    for ours_name, converter_name in (("hiera_tiny", "tiny"), ("hiera_large", "large")):
        ours = official_hiera_sam2_config(ours_name)
        reference = sam2_video_config_from_architecture(sam2_architecture_for_size(converter_name))
        for field in ("hidden_size", "num_attention_heads", "blocks_per_stage", "embed_dim_per_stage",
                      "num_attention_heads_per_stage", "window_size_per_stage", "global_attention_blocks",
                      "window_positional_embedding_background_size", "image_size"):
            ours_value = getattr(ours.vision_config.backbone_config, field)
            reference_value = getattr(reference.vision_config.backbone_config, field)
            assert list(ours_value) == list(reference_value) if isinstance(ours_value, list) else ours_value == reference_value, (
                f"{ours_name}.{field}: {ours_value} != {reference_value}"
            )
        assert ours.vision_config.backbone_channel_list == reference.vision_config.backbone_channel_list
        assert ours.vision_config.fpn_hidden_size == reference.vision_config.fpn_hidden_size == 256
        for field in ("hidden_size", "mlp_dim", "num_hidden_layers", "num_attention_heads"):
            assert getattr(ours.mask_decoder_config, field) == getattr(reference.mask_decoder_config, field)
        assert ours.image_size == reference.image_size == 1024
    large = official_hiera_sam2_config("hiera_large").vision_config.backbone_config
    assert large.embed_dim_per_stage == [144, 288, 576, 1152] and sum(large.blocks_per_stage) == 48
    with pytest.raises(ValueError, match="unknown Hiera size"):
        official_hiera_sam2_config("hiera_huge")


def test_reencoding_flow_gives_our_masks():
    from benchmarks.image_workloads import make_image_inputs, variant_call
    from benchmarks.sam2_sizes import build_sam2_bench_model

    torch.manual_seed(0)
    model = build_sam2_bench_model("tiny", seed=1)
    inputs = make_image_inputs("tiny", num_objects=2, seed=3)
    ours = variant_call("image_forward_cma", model, inputs)()
    original = variant_call("reencoding_cma", model, inputs)()
    plain = variant_call("image_forward_no_cma", model, inputs)()
    torch.testing.assert_close(original["mask_logits"], ours["mask_logits"], rtol=0, atol=1e-6)
    torch.testing.assert_close(original["iou_scores"], ours["iou_scores"], rtol=0, atol=1e-6)
    torch.testing.assert_close(original["prior_logits"], ours["prior_logits"], rtol=0, atol=1e-6)
    # γ ≠ 0: the CMA really changes the masks, so the comparison is not between two copies of pass 1
    assert (ours["mask_logits"] - plain["mask_logits"]).abs().max() > 1e-5
    assert ours["mask_logits"].shape == (2, 1, 32, 32)


def test_flop_counts_add_up():
    from benchmarks.image_workloads import IMAGE_VARIANTS, count_flops

    flops = count_flops("tiny", IMAGE_VARIANTS)
    encoder_with_cma = flops["image_forward_cma"] - flops["decoder_cma"]
    encoder_without = flops["image_forward_no_cma"] - flops["decoder_no_cma"]
    assert encoder_with_cma == encoder_without > 0
    # the original flow is our flow plus one more run of the image encoder
    assert flops["reencoding_cma"] - flops["image_forward_cma"] == encoder_with_cma
    assert flops["decoder_cma"] > 2 * flops["decoder_no_cma"]  # two decoder passes and the CMA


def test_router_flops_grow_by_the_key_projection_only():
    from benchmarks.bench_topk_scaling import count_flops

    flops = count_flops((16, 1024), BenchSettings(quick=True, threads=1))
    # candidate tokens = T text tokens + [SEG]; the router projects each (2·256·256 FLOPs) and scores it (2·256)
    extra_tokens = 1024 - 16
    assert flops["top2"][1024] - flops["top2"][16] == extra_tokens * (2 * 256 * 256 + 2 * 256)
    assert flops["all"][1024] > 4 * flops["top2"][1024]


def test_synthetic_video_is_lazy_and_deterministic():
    from benchmarks.bench_video_scaling import SyntheticVideo

    video = SyntheticVideo(5, image_size=16, seed=2)
    assert len(video) == 5
    torch.testing.assert_close(video[3], SyntheticVideo(5, image_size=16, seed=2)[3])
    assert not torch.equal(video[3], video[4])
    assert video[0].shape == (3, 16, 16)
    with pytest.raises(IndexError, match="outside the video"):
        video[5]


def test_oracle_query_indices_name_each_field():
    from benchmarks.demo_ceiling import QUERY_FIELDS, OracleQueryEmbedding

    ids = OracleQueryEmbedding.encode({"color": "blue", "shape": None, "position": "left", "motion": None})
    assert ids == [
        QUERY_FIELDS["color"].index("blue"),
        len(QUERY_FIELDS["shape"]),  # "not used" row
        QUERY_FIELDS["position"].index("left"),
    ]
    oracle = OracleQueryEmbedding(8)
    tokens = oracle(torch.tensor([ids]))
    expected = (
        oracle.tables["color"].weight[ids[0]]
        + oracle.tables["shape"].weight[ids[1]]
        + oracle.tables["position"].weight[ids[2]]
    )
    torch.testing.assert_close(tokens[0], expected)


def test_demo_ceiling_quick_run_writes_every_run(tmp_path):
    from benchmarks.demo_ceiling import main

    assert main(["--quick", "--output-dir", str(tmp_path)]) == 0
    payload = _strict_json(tmp_path / "demo_ceiling.json")
    assert payload["benchmark"] == "demo_ceiling" and payload["quick"] is True
    assert set(payload["results"]) == {
        "generator_defaults", "demo_scenes", "demo_scenes_area_targets", "demo_scenes_lr_1e-3"
    }
    assert payload["results"]["demo_scenes_lr_1e-3"]["learning_rate"] == 1e-3
    assert payload["results"]["demo_scenes_area_targets"]["gt_mask_resize"] == "area"
    assert payload["results"]["demo_scenes"]["gt_mask_resize"] == "nearest"
    for result in payload["results"].values():
        assert 0.0 <= result["ciou"] <= 1.0 and 0.0 <= result["giou"] <= 1.0
        assert sum(kind["images"] for kind in result["per_prompt_kind"].values()) == 6
    assert payload["results"]["demo_scenes"]["scenes"]["max_shapes"] == 3


def test_demo_video_ceiling_builds_the_asked_memory_and_names_its_file(tmp_path):
    from benchmarks.demo_video_ceiling import main

    argv = ["--steps", "2", "--eval-at", "1", "2", "--train-clips", "6", "--eval-clips", "2",
            "--memory-layers", "2", "--memory-mlp", "64", "--output-dir", str(tmp_path)]
    assert main(argv) == 0
    assert [path.name for path in tmp_path.iterdir()] == ["demo_video_ceiling_propagate_memory_2x64.json"]
    payload = _strict_json(tmp_path / "demo_video_ceiling_propagate_memory_2x64.json")
    assert (payload["memory_attention_layers"], payload["memory_attention_mlp"]) == (2, 64)
    assert [row["step"] for row in payload["history"]] == [1, 2]
    first, second = payload["history"]
    assert 0.0 < first["train_s"] < second["train_s"] < second["elapsed_s"]
    for row in payload["history"]:
        for scores in (row["held_out"], row["shuffled_queries"]):
            for frames in ("key_frames", "propagated_frames"):
                assert 0.0 <= scores[frames]["J&F"] <= 1.0


def test_training_md_table_of_the_four_layer_memory_is_the_recorded_run():
    """docs/training.md's table of the 4-layer-memory ceiling repeats the numbers of its recorded JSON."""
    recorded = json.loads((REPO_ROOT / "docs/benchmarks/demo_video_ceiling_propagate_memory_4x2048.json").read_text())
    assert (recorded["memory_attention_layers"], recorded["memory_attention_mlp"]) == (4, 2048)
    training_md = (REPO_ROOT / "docs/training.md").read_text()
    for row in recorded["history"]:
        key = row["held_out"]["key_frames"]["J&F"]
        propagated = row["held_out"]["propagated_frames"]["J&F"]
        shuffled_key = row["shuffled_queries"]["key_frames"]["J&F"]
        shuffled_propagated = row["shuffled_queries"]["propagated_frames"]["J&F"]
        cells = [f"{row['clips_seen']:,}".replace(",", " "), f"{key:.3f}", f"{shuffled_key:.3f}", f"{propagated:.3f}",
                 f"{shuffled_propagated:.3f}", f"{propagated / key:.3f}", f"{propagated - shuffled_propagated:+.2f}"]
        row_start = f"| {cells[0]} | {cells[1]} |"
        line = next((line for line in training_md.splitlines() if line.strip().startswith(row_start)), None)
        assert line is not None, f"no row for {cells[0]} clips in docs/training.md"
        assert [cell.strip().strip("*") for cell in line.strip().strip("|").split("|")] == cells


def test_linear_probe_reads_a_separable_field_and_not_a_random_one():
    from benchmarks.demo_diagnostics import linear_probe_accuracy

    generator = torch.Generator().manual_seed(0)
    labels = [("red", "green", "blue")[i % 3] for i in range(300)]
    codes = torch.tensor([("red", "green", "blue").index(label) for label in labels])
    separable = torch.nn.functional.one_hot(codes, 3).float() * 3 + torch.randn(300, 3, generator=generator) * 0.1
    noise = torch.randn(300, 16, generator=generator)
    readable = linear_probe_accuracy(torch.cat([separable, noise], dim=1), labels)
    assert readable["accuracy"] == 1.0 and readable["classes"] == ["blue", "green", "red"]
    assert readable["train_samples"] == 225 and readable["test_samples"] == 75
    assert readable["majority_rate"] == pytest.approx(25 / 75)
    unreadable = linear_probe_accuracy(noise, labels)
    assert unreadable["accuracy"] < 0.6  # chance is 1/3: the probe does not invent the field
    with pytest.raises(ValueError, match="cannot be split"):
        linear_probe_accuracy(noise[:1], labels[:1])


def test_demo_diagnostics_on_a_saved_tiny_model(tmp_path):
    """The script runs on a saved (untrained) demo model folder and writes every part."""
    import json as json_module

    from benchmarks.demo_diagnostics import main as diagnostics_main
    from transformers_maskcma.processing import MaskCMAProcessor, save_model_folder
    from transformers_maskcma.tiny import build_tiny_model

    model, tokenizer = build_tiny_model(seed=0)
    save_model_folder(model.eval(), MaskCMAProcessor.from_model_config(model.config, tokenizer), tmp_path / "model")
    assert diagnostics_main([str(tmp_path / "model"), "--probe-scenes", "8", "--eval-samples", "6",
                             "--answer-style", "prompt", "--output-dir", str(tmp_path / "out")]) == 0
    payload = json_module.loads((tmp_path / "out" / "demo_diagnostics.json").read_text())
    held_out = payload["held_out"]
    assert held_out["images"] == sum(kind["images"] for kind in held_out["per_prompt_kind"].values())
    assert len(held_out["answers"]) == min(8, held_out["images"])
    assert set(payload["seg_probes"]) == {"color", "shape", "position"} and payload["answer_style"] == "prompt"
    with pytest.raises(SystemExit):
        diagnostics_main([str(tmp_path / "missing")])


def test_gpu_runner_parses_its_arguments_and_refuses_without_cuda(capsys, monkeypatch):
    from benchmarks.common import weight_and_autocast_dtypes
    from benchmarks.gpu import run_all_gpu

    args = run_all_gpu.build_parser().parse_args(["--dtype", "float16", "--budget-s", "300", "--quick"])
    names = [name for name, _ in run_all_gpu.plan(args)]
    assert names == ["check_split_devices", "check_offload_state", "check_determinism", "test_precision", "benchmarks"]
    bench_command = dict(run_all_gpu.plan(args))["benchmarks"]
    assert bench_command[-7:] == ["--device", "cuda", "--dtype", "float16", "--output-dir", str(args.output_dir), "--quick"]
    skipping = run_all_gpu.build_parser().parse_args(["--skip-benchmarks"])
    assert "benchmarks" not in dict(run_all_gpu.plan(skipping))
    with pytest.raises(SystemExit):
        run_all_gpu.build_parser().parse_args(["--dtype", "float8"])
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert run_all_gpu.main([]) == 2
    assert "needs a CUDA GPU" in capsys.readouterr().err
    # the CUDA half path is the Trainer's mixed-precision step: float32 weights under autocast
    assert weight_and_autocast_dtypes("cuda", torch.bfloat16) == (torch.float32, torch.bfloat16)
    assert weight_and_autocast_dtypes("cuda", torch.float32) == (torch.float32, None)
    assert weight_and_autocast_dtypes("cpu", torch.bfloat16) == (torch.bfloat16, None)


def test_gpu_split_check_refuses_without_cuda():
    import subprocess
    import sys

    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "HF_HUB_OFFLINE": "1"}  # no GPU visible, even on a GPU machine
    done = subprocess.run([sys.executable, "tests/gpu/check_split_devices.py"], capture_output=True, text=True,
                          timeout=120, cwd=Path(__file__).resolve().parent.parent, env=env)  # fmt: skip
    assert done.returncode == 2, done.stderr[-2000:]
    assert "no CUDA GPU" in done.stdout
