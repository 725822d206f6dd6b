"""Benchmark 5 — the research path: our two-pass decoding against the original research code's flow.

Ours (`image_forward_cma`): SAM2's image encoder runs once; pass 1, the CMA and pass 2 all read the same features.
The original flow (`reencoding_cma`, re-implemented in `benchmarks.image_workloads.reencoding_forward`): the image
is encoded again before the CMA and pass 2. Both produce the same masks (the test suite checks it), so the
difference is pure cost. The CMA-free one-pass path (`image_forward_no_cma`) is timed in the same rounds as the
floor. Sizes: the tiny default (128 px) and the official SAM2.1 Hiera-T and Hiera-L (1024 px, random weights).

Target: our path is cheaper than the re-encoding flow (ratio ours / original < 1), in latency and FLOPs, at every size.
"""

from __future__ import annotations

import time
from typing import Any

from .common import (
    BenchSettings,
    compare,
    machine_caption,
    new_figure,
    plot_path,
    result_payload,
    save_figure,
    summarize,
    target_row,
    time_interleaved,
    write_result,
)
from .image_workloads import count_flops, make_image_inputs, memory_warmup, variant_call
from .memory import MemoryWorkload, measure_workload_memory
from .sam2_sizes import build_sam2_bench_model, sam2_input_size

NAME = "research_path"
TITLE = "Research path: encode once vs re-encode for pass 2"
VARIANTS = ("image_forward_no_cma", "image_forward_cma", "reencoding_cma")
CPU_REPEATS = {"tiny": 30, "hiera_tiny": 5, "hiera_large": 3}
GPU_REPEATS = {"tiny": 50, "hiera_tiny": 30, "hiera_large": 20}
QUICK_REPEATS = 2
TARGET_LIMIT = 1.0


def sizes_for(settings: BenchSettings) -> tuple[str, ...]:
    return ("tiny",) if settings.quick else ("tiny", "hiera_tiny", "hiera_large")


def measure_size(size: str, settings: BenchSettings) -> dict[str, Any]:
    if settings.quick:
        repeats = QUICK_REPEATS
    else:
        repeats = (GPU_REPEATS if settings.device == "cuda" else CPU_REPEATS)[size]
    model = build_sam2_bench_model(size, seed=settings.seed, device=settings.device, dtype=settings.weight_dtype)
    inputs = make_image_inputs(size, seed=settings.seed, device=settings.device, dtype=settings.weight_dtype)
    calls = {variant: variant_call(variant, model, inputs) for variant in VARIANTS}
    timings = time_interleaved(calls, repeats=repeats, warmup=1, device=settings.device, autocast_dtype=settings.autocast_dtype, progress=f"{NAME} {size}")
    del model, calls
    memory = {}
    for variant in VARIANTS:
        workload = MemoryWorkload(
            module="benchmarks.image_workloads", builder="build_image_variant", params={"size": size, "variant": variant}
        )
        memory[variant] = measure_workload_memory(workload, settings, repeats=1, warmup=memory_warmup(size))
    flops = count_flops(size, VARIANTS)
    ours, original = timings["image_forward_cma"], timings["reencoding_cma"]
    return {
        "sam2_input_size": sam2_input_size(size),
        "num_objects": inputs.num_objects,
        "repeats": repeats,
        "timings_s": timings,
        "summary_s": {variant: summarize(samples) for variant, samples in timings.items()},
        "latency_ratio_ours_vs_original": compare(ours, original),
        "latency_ratio_ours_vs_no_cma": compare(ours, timings["image_forward_no_cma"]),
        "seconds_saved_per_image": summarize([b - a for a, b in zip(ours, original)]),
        "memory": memory,
        "memory_ratio_ours_vs_original_peak": memory["image_forward_cma"]["peak_bytes"]
        / memory["reencoding_cma"]["peak_bytes"],
        "flops": flops,
        "flop_ratio_ours_vs_original": flops["image_forward_cma"] / flops["reencoding_cma"],
    }


def targets_from(results: dict[str, Any]) -> list[dict[str, Any]]:
    rows = []
    for size, result in results.items():
        rows.append(
            target_row(
                f"latency ours / re-encoding flow ({size}, {result['sam2_input_size']} px)",
                f"< {TARGET_LIMIT}×",
                result["latency_ratio_ours_vs_original"]["ratio_of_medians"],
                TARGET_LIMIT,
                strict=True,
            )
        )
    return rows


def plot(payload: dict[str, Any], path) -> None:
    results = payload["results"]
    sizes = list(results)
    figure, (latency_axis, ratio_axis) = new_figure(columns=2)
    width = 0.27
    labels = {"image_forward_no_cma": "CMA-free (1 pass)", "image_forward_cma": "ours (encode once, 2 passes)",
              "reencoding_cma": "original flow (re-encode for pass 2)"}
    for offset, variant in enumerate(VARIANTS):
        medians = [results[size]["summary_s"][variant]["median"] for size in sizes]
        lows = [results[size]["summary_s"][variant]["min"] for size in sizes]
        highs = [results[size]["summary_s"][variant]["max"] for size in sizes]
        positions = [index + (offset - 1) * width for index in range(len(sizes))]
        errors = [[m - lo for m, lo in zip(medians, lows)], [hi - m for m, hi in zip(medians, highs)]]
        latency_axis.bar(positions, medians, width, yerr=errors, capsize=2, label=labels[variant])
    latency_axis.set_yscale("log")
    latency_axis.set_xticks(range(len(sizes)), sizes)
    latency_axis.set_ylabel("median latency per image, one object [s]")
    latency_axis.legend(fontsize=7)
    series = {
        "latency": [results[s]["latency_ratio_ours_vs_original"]["ratio_of_medians"] for s in sizes],
        "FLOPs": [results[s]["flop_ratio_ours_vs_original"] for s in sizes],
        "peak memory": [results[s]["memory_ratio_ours_vs_original_peak"] for s in sizes],
    }
    for offset, (label, values) in enumerate(series.items()):
        positions = [index + (offset - 1) * width for index in range(len(sizes))]
        ratio_axis.bar(positions, values, width, label=label)
    ratio_axis.axhline(1.0, color="black", linewidth=0.8)
    ratio_axis.set_xticks(range(len(sizes)), sizes)
    ratio_axis.set_ylabel("ours / original flow (lower is better)")
    ratio_axis.legend(fontsize=7)
    figure.suptitle(f"{TITLE} — {machine_caption(payload)}", fontsize=8)
    save_figure(figure, path)


def run(settings: BenchSettings) -> dict[str, Any]:
    """Run the benchmark, write `research_path.json` and `.png` to `settings.output_dir`, return the payload."""
    started = time.perf_counter()
    settings.apply()
    results = {size: measure_size(size, settings) for size in sizes_for(settings)}
    payload = result_payload(
        NAME,
        settings,
        {"sizes": list(results), "variants": list(VARIANTS), "num_text_tokens": 16},
        results,
        targets_from(results),
        [
            "The three variants are timed in the same rounds (1 warm-up round not recorded).",
            "Memory: peak of one call (after one warm-up call at the tiny size, none at the real sizes), each variant "
            "in a fresh interpreter on CPU (see benchmarks/memory.py).",
            "FLOPs: torch.utils.flop_counter on the meta device.",
        ],
        started,
    )
    write_result(payload, settings.output_dir)
    plot(payload, plot_path(settings.output_dir, NAME))
    return payload
