"""Result tables of docs/benchmarks.md, rendered from the JSON files: `python -m benchmarks.report`.

docs/benchmarks.md holds hand-written text around generated blocks delimited by
`<!-- BEGIN GENERATED: <block> -->` … `<!-- END GENERATED: <block> -->`. This module re-renders every block from
`docs/benchmarks/*.json` (CPU) and `docs/benchmarks/gpu/*.json` (GPU column) and leaves the text outside alone.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from .common import DEFAULT_OUTPUT_DIR, GPU_OUTPUT_DIR, REPO_ROOT

DOC_PATH = REPO_ROOT / "docs" / "benchmarks.md"
BENCHMARK_ORDER = (
    "cma_overhead", "topk_scaling", "video_scaling", "training_step", "research_path", "one_pass", "data_pipeline",
    "throughput",
)
SIZE_LABELS = {"tiny": "tiny (128 px)", "hiera_tiny": "Hiera-T (1024 px)", "hiera_large": "Hiera-L (1024 px)"}
_BLOCK = re.compile(
    r"(<!-- BEGIN GENERATED: (?P<name>[\w:]+) -->\n)(?P<body>.*?)(<!-- END GENERATED: (?P=name) -->)", re.DOTALL
)


def load_results(directory: Path) -> dict[str, dict[str, Any]]:
    """name → payload for every `<name>.json` of the known benchmarks in `directory`."""
    payloads = {}
    for name in BENCHMARK_ORDER:
        path = directory / f"{name}.json"
        if path.is_file():
            payloads[name] = json.loads(path.read_text())
    return payloads


# ------------------------------------------------------------------------------------------------------------
# formatting helpers
# ------------------------------------------------------------------------------------------------------------


def _table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def _seconds(value: float) -> str:
    if value >= 1.0:
        return f"{value:.2f} s"
    return f"{value * 1e3:.2f} ms" if value >= 1e-3 else f"{value * 1e6:.0f} µs"


def _mib(value: float) -> str:
    return f"{value / 2**20:,.1f} MiB"


def _ratio(ratio: Mapping[str, float]) -> str:
    """Ratio of medians with the range of the paired round-by-round ratios."""
    return f"{ratio['ratio_of_medians']:.3f}× ({ratio['paired_min']:.2f}–{ratio['paired_max']:.2f})"


def _spread(summary: Mapping[str, float]) -> str:
    return f"{_seconds(summary['median'])} (IQR {100 * summary['relative_iqr']:.0f} %)"


def machine_line(payload: Mapping[str, Any]) -> str:
    machine = payload["machine"]
    device = machine.get("gpu") or f"{machine['cpu']}, {machine['usable_cores']} cores"
    load = machine.get("load_average_1_5_15min")
    load_text = f", load average at start {load[0]}" if load else ""
    mode = " — **quick mode: numbers are not meaningful**" if payload["settings"].get("quick") else ""
    return (
        f"*Machine: {device}, {machine['torch_threads']} torch threads, {machine['dtype']}, torch {machine['torch']}, "
        f"transformers {machine['transformers']}{load_text}; run {payload['created']}, "
        f"{payload.get('wall_seconds', 0):.0f} s, commit {str(machine.get('git_commit'))[:10]}.*{mode}"
    )


def targets_table(payload: Mapping[str, Any]) -> str:
    if not payload["targets"]:
        return "*No target at the sizes of this run.*"
    rows = [
        [row["name"], row["target"], f"{row['value']:.3f}{row['unit']}", "**met**" if row["met"] else "**missed**"]
        for row in payload["targets"]
    ]
    return _table(["measure", "target", "result", "verdict"], rows)


# ------------------------------------------------------------------------------------------------------------
# one table per benchmark
# ------------------------------------------------------------------------------------------------------------


def cma_overhead_table(payload: Mapping[str, Any]) -> str:
    rows = []
    for size, result in payload["results"].items():
        summary, memory = result["summary_s"], result["memory"]
        rows.append([
            SIZE_LABELS.get(size, size),
            _spread(summary["image_forward_no_cma"]),
            _spread(summary["image_forward_cma"]),
            _ratio(result["latency_ratio_image_forward"]),
            f"{result['latency_ratio_composed']:.4f}×",
            f"{result['flop_ratio_image_forward']:.4f}×",
            f"{_mib(memory['image_forward_no_cma']['peak_bytes'])} → {_mib(memory['image_forward_cma']['peak_bytes'])}",
            f"{result['memory_ratio_image_forward_peak']:.3f}×",
            f"{_mib(memory['image_forward_no_cma']['delta_bytes'])} → {_mib(memory['image_forward_cma']['delta_bytes'])}",
            _ratio(result["latency_ratio_decoder"]),
        ])
    header = ["SAM2 size", "image forward, no CMA", "image forward, CMA", "latency ratio, direct (paired range)",
              "latency ratio, forward + extra decoding", "FLOP ratio", "peak memory no CMA → CMA", "peak ratio", "activation increment no CMA → CMA",
              "decoder alone: latency ratio"]
    return _table(header, rows)


def topk_scaling_table(payload: Mapping[str, Any]) -> str:
    results = payload["results"]
    rows = []
    for count in payload["settings"]["token_counts"]:
        key = str(count)
        top2, everything = results["summary_s"][f"top2@{count}"], results["summary_s"][f"all@{count}"]
        flops_top2, flops_all = results["flops"]["top2"][key], results["flops"]["all"][key]
        rows.append([
            key,
            _spread(top2),
            _ratio(results["ratio_top2_vs_smallest"][key]),
            f"{flops_top2 / results['flops']['top2'][str(payload['settings']['token_counts'][0])]:.3f}×",
            _spread(everything),
            f"{results['ratio_all_vs_top2'][key]['ratio_of_medians']:.2f}×",
            f"{flops_all / flops_top2:.2f}×",
        ])
    first = payload["settings"]["token_counts"][0]
    header = ["text tokens T", "CMA, K = 2", f"time(T)/time({first}) (paired range)", f"FLOPs(T)/FLOPs({first})",
              "CMA, K = all", "time all / K=2", "FLOPs all / K=2"]
    return _table(header, rows)


def video_scaling_table(payload: Mapping[str, Any]) -> str:
    results = payload["results"]
    rows = []
    for count in payload["settings"]["frame_counts"]:
        key = str(count)
        summary = results["time_per_frame_summary_s"][key]
        memory = results["memory"][key]
        rows.append([
            key,
            f"{_seconds(summary['median'])} ({_seconds(summary['min'])}–{_seconds(summary['max'])})",
            _seconds(results["single_frame_step_summary_s"][key]["median"]),
            _seconds(results["answer_seconds"][key]["median"]),
            _mib(memory["delta_bytes"]),
            _mib(memory["peak_bytes"]),
        ])
    for count in payload["settings"].get("memory_only_frame_counts", []):
        memory = results["memory"][str(count)]
        rows.append([f"{count} (memory only)", "—", "—", "—", _mib(memory["delta_bytes"]), _mib(memory["peak_bytes"])])
    header = ["frames", "time per frame (min–max over rounds)", "median single frame step", "VLM answer (apart)",
              "memory added by the run", "peak memory (incl. model, runtime)"]
    return _table(header, rows)


def training_step_table(payload: Mapping[str, Any]) -> str:
    results = payload["results"]
    rows = []
    for variant in payload["settings"]["variants"]:
        parameters = results["parameters"][variant]
        memory = results["memory"][variant]
        rows.append([
            variant,
            f"{parameters['trainable']:,} / {parameters['total']:,}",
            _spread(results["summary_s"][variant]),
            f"{results['tokens_per_second'][variant]:,.0f}",
            _ratio(results["time_ratio_vs_full"][variant]),
            _mib(memory["peak_bytes"]),
            _mib(memory["delta_bytes"]),
            f"{results['memory_ratio_vs_full_increment'][variant]:.2f}×",
        ])
    header = ["variant", "trainable / total parameters", "step time", "tokens/s", "step time vs full",
              "peak memory", "step increment", "increment vs full"]
    return _table(header, rows)


def research_path_table(payload: Mapping[str, Any]) -> str:
    rows = []
    for size, result in payload["results"].items():
        summary = result["summary_s"]
        rows.append([
            SIZE_LABELS.get(size, size),
            _spread(summary["image_forward_no_cma"]),
            _spread(summary["image_forward_cma"]),
            _spread(summary["reencoding_cma"]),
            _ratio(result["latency_ratio_ours_vs_original"]),
            _seconds(result["seconds_saved_per_image"]["median"]),
            f"{result['flop_ratio_ours_vs_original']:.3f}×",
            f"{result['memory_ratio_ours_vs_original_peak']:.3f}×",
        ])
    header = ["SAM2 size", "CMA-free (1 pass)", "ours (encode once)", "original flow (re-encode)",
              "latency ours / original (paired range)", "saved per image", "FLOPs ours / original",
              "peak memory ours / original"]
    return _table(header, rows)


def one_pass_table(payload: Mapping[str, Any]) -> str:
    rows = []
    for result in payload["results"].values():
        memory = result["memory"]
        primary = "cpu" if result.get("primary_time") == "cpu" else "latency"
        summary = result["cpu_summary_s" if primary == "cpu" else "summary_s"]
        wall = result["summary_s"]
        rows.append([
            f"{result['num_tiles']} ({result['prompt_tokens']} prompt tokens)",
            _spread(summary["floor"]),
            _spread(summary["after"]),
            _spread(summary["before"]),
            _ratio(result[f"{primary}_ratio_after_vs_floor"]),
            _ratio(result[f"{primary}_ratio_before_vs_floor"]),
            _ratio(result[f"{primary}_ratio_after_vs_before"]),
            " / ".join(_seconds(wall[name]["median"]) for name in ("floor", "after", "before")),
            " → ".join(_mib(memory[name]["peak_bytes"]) for name in ("floor", "after", "before")),
            " → ".join(_mib(memory[name]["delta_bytes"]) for name in ("floor", "after", "before")),
            f"{'yes' if result['same_answers_before_after'] else '**no**'}; "
            f"{result['max_mask_logit_difference_before_after']:.1e}; "
            f"{result['mask_pixels_differing_before_after']} / {result['mask_pixels']:,}",
        ])
    header = ["VLM tiles", "floor (generate + SAM2)", "segment(), one pass", "two passes (former)",
              "one pass / floor (paired range)", "two passes / floor", "one pass / two passes",
              "wall clock floor / one pass / two passes",
              "peak memory floor → one pass → two passes", "increment floor → one pass → two passes",
              "two passes vs one pass: same answers; max Δ mask logit; mask pixels differing"]
    return _table(header, rows)


def data_pipeline_table(payload: Mapping[str, Any]) -> str:
    results = payload["results"]
    step = results["training_step"]
    rows = []
    for name, entries in results["loading"].items():
        for entry in entries:
            rows.append([
                f"{name} ({payload['settings']['processor_sizes'][name]} px SAM2 input)",
                str(entry["workers"]),
                f"{entry['samples_per_second']:,.1f}",
                _seconds(entry["first_batch_s"]),
                f"{step['samples_per_second']:,.1f}",
                "yes" if results["keeps_up"][name][str(entry["workers"])] else "**no**",
            ])
    header = ["pipeline", "workers", "samples/s (steady)", "first batch wait", "tiny training step samples/s",
              "keeps up"]
    video = results["video_prefetch"]
    size = f"{video['frames']} frames {video['frame_size'][1]}×{video['frame_size'][0]}"
    video_rows = [[
        f"{size} → {video['sam2_input']}², tiny SAM2 encoder on this device",
        _spread(video["summary_per_frame_s"]["prefetch_0"]),
        _spread(video["summary_per_frame_s"]["prefetch_2"]),
        _ratio(video["time_ratio_prefetch_vs_none"]),
    ], [
        f"{size} → {video['idle_sam2_input']}², idle consumer {1000 * video['idle_consumer_s']:.0f} ms a frame",
        _spread(video["summary_per_frame_s"]["idle_prefetch_0"]),
        _spread(video["summary_per_frame_s"]["idle_prefetch_2"]),
        _ratio(video["time_ratio_idle_prefetch_vs_none"]),
    ]]
    video_header = ["video stream (time per frame: read + consumer)", "prefetch 0", "prefetch 2", "prefetch 2 / 0"]
    return _table(header, rows) + "\n\n" + _table(video_header, video_rows)
def _rate(summary: Mapping[str, float]) -> str:
    return f"{summary['median']:.2f} /s (min {summary['min']:.2f}, max {summary['max']:.2f}, IQR {100 * summary['relative_iqr']:.0f} %)"


def throughput_table(payload: Mapping[str, Any]) -> str:
    batches, processes = payload["results"]["batches"], payload["results"]["processes"]
    rate, seconds = batches["images_per_second"], batches["seconds"]
    rows = [
        [f"segment(), batch size 1 ({batches['num_images']} images, {seconds['batch_1']['n']} rounds)",
         _rate(rate["batch_1"]), "1×", "—"],
        [f"segment(), batch size 8 ({batches['num_images']} images, {seconds['batch_8']['n']} rounds)",
         _rate(rate["batch_8"]), _ratio(batches["speedup_batch_8_vs_1"]),
         f"min mask IoU vs batch 1: {batches['min_mask_iou_batch_8_vs_1']:.4f} ({batches['num_masks_compared']} masks)"],
    ]
    prate, wall = processes["images_per_second"], processes["wall_seconds"]
    same = "same predictions file and metrics" if processes["same_predictions_file"] and processes["same_metrics"] else (
        "**predictions differ**")
    rows += [
        [f"evaluate_dataset, 1 process ({processes['num_images']} images, {processes['runs']} runs)",
         _rate(prate["1_process"]), "1×", f"command {_spread(wall['1_process'])}"],
        [f"evaluate_dataset, 2 processes ({processes['num_images']} images, {processes['runs']} runs)",
         _rate(prate["2_process"]), _ratio(processes["speedup_2_vs_1_process"]),
         f"command {_spread(wall['2_process'])}, command speed-up {_ratio(processes['wall_speedup_2_vs_1_process'])}; "
         f"{same}"],
    ]
    return _table(["workload", "images per second (median)", "speed-up (paired range)", "notes"], rows)


TABLES: dict[str, Callable[[Mapping[str, Any]], str]] = {
    "cma_overhead": cma_overhead_table,
    "topk_scaling": topk_scaling_table,
    "video_scaling": video_scaling_table,
    "training_step": training_step_table,
    "research_path": research_path_table,
    "one_pass": one_pass_table,
    "data_pipeline": data_pipeline_table,
    "throughput": throughput_table,
}


def benchmark_block(payload: Mapping[str, Any]) -> str:
    """Result table, target table and machine line of one benchmark run."""
    name = payload["benchmark"]
    return "\n\n".join([TABLES[name](payload), targets_table(payload), machine_line(payload)])


def summary_block(payloads: Mapping[str, Mapping[str, Any]]) -> str:
    rows = []
    for name in BENCHMARK_ORDER:
        payload = payloads.get(name)
        if payload is None:
            rows.append([name, "—", "—", "not run"])
            continue
        if not payload["targets"]:
            rows.append([name, "none at the sizes of this run", "see its table", "—"])
        for row in payload["targets"]:
            rows.append([f"{name}: {row['name']}", row["target"], f"{row['value']:.3f}{row['unit']}",
                         "**met**" if row["met"] else "**missed**"])
    return _table(["benchmark: measure", "target", "result", "verdict"], rows)


def render_blocks(cpu_dir: Path = DEFAULT_OUTPUT_DIR, gpu_dir: Path = GPU_OUTPUT_DIR) -> dict[str, str]:
    """Block name → generated Markdown: `summary`, `<benchmark>` for each CPU result, `gpu` for the GPU column."""
    cpu = load_results(cpu_dir)
    blocks = {"summary": summary_block(cpu)}
    for name in BENCHMARK_ORDER:
        blocks[name] = benchmark_block(cpu[name]) if name in cpu else "*Not run yet: `python -m benchmarks.run_all`.*"
    gpu = load_results(gpu_dir)
    if gpu:
        parts = ["Summary:\n\n" + summary_block(gpu)]
        for name in BENCHMARK_ORDER:
            if name in gpu:
                parts.append(f"#### {name} (GPU)\n\n" + benchmark_block(gpu[name]))
        blocks["gpu"] = "\n\n".join(parts)
    else:
        blocks["gpu"] = (
            "*Not run yet.* On a machine with a CUDA GPU: "
            "`python -m benchmarks.run_all --device cuda --dtype bfloat16` writes `docs/benchmarks/gpu/*.json` and "
            "fills this section."
        )
    return blocks


def update_benchmarks_doc(
    doc_path: Path = DOC_PATH, cpu_dir: Path = DEFAULT_OUTPUT_DIR, gpu_dir: Path = GPU_OUTPUT_DIR
) -> Path:
    """Replace every generated block of `doc_path` with the tables rendered from the JSON files."""
    if not doc_path.is_file():
        raise FileNotFoundError(f"{doc_path} does not exist; it holds the text around the generated tables")
    blocks = render_blocks(cpu_dir, gpu_dir)
    text = doc_path.read_text()
    found = set()

    def substitute(match: re.Match) -> str:
        name = match.group("name")
        if name not in blocks:
            raise ValueError(f"{doc_path}: unknown generated block {name!r}; known blocks are {sorted(blocks)}")
        found.add(name)
        return f"{match.group(1)}{blocks[name]}\n{match.group(4)}"

    updated = _BLOCK.sub(substitute, text)
    missing = sorted(set(blocks) - found)
    if missing:
        raise ValueError(
            f"{doc_path} lacks the generated blocks {missing}; add `<!-- BEGIN GENERATED: name -->` / "
            "`<!-- END GENERATED: name -->` pairs for them"
        )
    doc_path.write_text(updated)
    return doc_path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.report", description=__doc__.split("\n\n")[0])
    parser.add_argument("--doc", type=Path, default=DOC_PATH)
    parser.add_argument("--cpu-dir", type=Path, default=DEFAULT_OUTPUT_DIR)
    parser.add_argument("--gpu-dir", type=Path, default=GPU_OUTPUT_DIR)
    args = parser.parse_args(argv)
    path = update_benchmarks_doc(args.doc, args.cpu_dir, args.gpu_dir)
    print(f"updated {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
