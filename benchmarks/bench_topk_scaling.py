"""Benchmark 2 — Top-K scaling: CMA time against the number of candidate text tokens.

One object, SAM2's 64×64×256 embedding, the default CMA (8 heads, visual→text, output gate) with K = 2, and
16 → 1024 text tokens. The router scores every token (cost ∝ T) and attention runs over the K kept ones (cost ∝ K),
so the time should barely grow with T. The same module with K = all tokens (`top_k=None`) is timed in the same
rounds, as the cost the routing saves.

Target: time(T) / time(16) ≤ 1.2 for every T up to 1024 at K = 2.
"""

from __future__ import annotations

import time
from typing import Any

import torch
from torch.utils.flop_counter import FlopCounterMode

from transformers_maskcma.modeling import MaskCMAAttentionConfig, MaskGuidedCrossModalAttention, VisualToTextAttention

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

NAME = "topk_scaling"
TITLE = "Top-K scaling"
RATIO_LIMIT = 1.2
TOP_K = 2
EMBED_DIM = 256
MAP_SIDE = 64
TOKEN_COUNTS = (16, 32, 64, 128, 256, 512, 1024)
QUICK_TOKEN_COUNTS = (16, 1024)
CPU_REPEATS, GPU_REPEATS, QUICK_REPEATS = 30, 100, 2


def build_cma(top_k: int | None, settings: BenchSettings, seed: int) -> MaskGuidedCrossModalAttention:
    """The model's CMA with its default switches (`MaskCMAConfig` defaults, eager attention), random weights and
    γ = 0.5."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        module = VisualToTextAttention(MaskCMAAttentionConfig(num_heads=8), embed_dim=EMBED_DIM, top_k=top_k)
    with torch.no_grad():
        module.gamma.fill_(0.5)
    return module.to(device=settings.device, dtype=settings.weight_dtype).eval()


def make_inputs(num_tokens: int, settings: BenchSettings, seed: int, device: str | None = None) -> dict[str, torch.Tensor]:
    """`image_embeddings (1, 256, 64, 64)`, `text_tokens (1, T, 256)`, `text_token_mask (1, T)`,
    `seg_embeds (1, 256)`, `mask_prior_logits (1, 1, 64, 64)`."""
    device = device or settings.device
    generator = torch.Generator().manual_seed(seed + num_tokens)

    def draw(*shape):
        if device == "meta":
            return torch.empty(*shape, device="meta", dtype=settings.weight_dtype)
        return torch.randn(*shape, generator=generator).to(device=device, dtype=settings.weight_dtype)

    return {
        "image_embeddings": draw(1, EMBED_DIM, MAP_SIDE, MAP_SIDE),
        "text_tokens": draw(1, num_tokens, EMBED_DIM),
        "text_token_mask": torch.ones(1, num_tokens, dtype=torch.bool, device=device),
        "seg_embeds": draw(1, EMBED_DIM),
        "mask_prior_logits": draw(1, 1, MAP_SIDE, MAP_SIDE),
    }


def cma_call(module: MaskGuidedCrossModalAttention, inputs: dict[str, torch.Tensor]):
    def call():
        with torch.inference_mode():
            return module(**inputs)

    return call


def count_flops(token_counts: tuple[int, ...], settings: BenchSettings) -> dict[str, dict[int, int]]:
    """FLOPs of the CMA at K = 2 and K = all for every token count (meta device, exact)."""
    flops: dict[str, dict[int, int]] = {"top2": {}, "all": {}}
    with torch.device("meta"):
        config = MaskCMAAttentionConfig(num_heads=8)
        modules = {"top2": VisualToTextAttention(config, EMBED_DIM, top_k=TOP_K),
                   "all": VisualToTextAttention(config, EMBED_DIM, top_k=None)}
    for label, module in modules.items():
        for count in token_counts:
            inputs = make_inputs(count, settings, 0, device="meta")
            with FlopCounterMode(display=False) as counter, torch.inference_mode():
                module(**inputs)
            flops[label][count] = int(counter.get_total_flops())
    return flops


def measure(settings: BenchSettings, token_counts: tuple[int, ...], repeats: int) -> dict[str, Any]:
    routed = build_cma(TOP_K, settings, settings.seed)
    full = build_cma(None, settings, settings.seed)
    full.load_state_dict(routed.state_dict())
    calls = {}
    for count in token_counts:
        inputs = make_inputs(count, settings, settings.seed)
        calls[f"top2@{count}"] = cma_call(routed, inputs)
        calls[f"all@{count}"] = cma_call(full, inputs)
    timings = time_interleaved(calls, repeats=repeats, warmup=2, device=settings.device, autocast_dtype=settings.autocast_dtype, progress=NAME)
    base = timings[f"top2@{token_counts[0]}"]
    return {
        "timings_s": timings,
        "summary_s": {name: summarize(samples) for name, samples in timings.items()},
        # JSON object keys are strings, so the per-count tables are keyed by str(T)
        "ratio_top2_vs_smallest": {str(count): compare(timings[f"top2@{count}"], base) for count in token_counts},
        "ratio_all_vs_top2": {
            str(count): compare(timings[f"all@{count}"], timings[f"top2@{count}"]) for count in token_counts
        },
        "flops": {
            label: {str(count): value for count, value in table.items()}
            for label, table in count_flops(token_counts, settings).items()
        },
    }


def targets_from(results: dict[str, Any], token_counts: tuple[int, ...]) -> list[dict[str, Any]]:
    ratios = results["ratio_top2_vs_smallest"]
    worst_count = max(token_counts, key=lambda count: ratios[str(count)]["ratio_of_medians"])
    return [
        target_row(
            f"CMA time at K={TOP_K}, max over T ≤ {token_counts[-1]} of time(T)/time({token_counts[0]}) "
            f"(worst at T={worst_count})",
            f"≤ {RATIO_LIMIT}×",
            ratios[str(worst_count)]["ratio_of_medians"],
            RATIO_LIMIT,
        )
    ]


def plot(payload: dict[str, Any], path) -> None:
    results = payload["results"]
    counts = [int(c) for c in payload["settings"]["token_counts"]]
    figure, (time_axis, ratio_axis) = new_figure(columns=2)
    for label, style in (("top2", "o-"), ("all", "s--")):
        medians = [results["summary_s"][f"{label}@{c}"]["median"] * 1e3 for c in counts]
        lows = [results["summary_s"][f"{label}@{c}"]["q1"] * 1e3 for c in counts]
        highs = [results["summary_s"][f"{label}@{c}"]["q3"] * 1e3 for c in counts]
        name = f"K = {TOP_K}" if label == "top2" else "K = all tokens"
        time_axis.plot(counts, medians, style, label=name)
        time_axis.fill_between(counts, lows, highs, alpha=0.2)
    time_axis.set_xscale("log", base=2)
    time_axis.set_xlabel("text tokens T")
    time_axis.set_ylabel("CMA time [ms] (band: IQR)")
    time_axis.set_title("CMA on a 64×64×256 map")
    time_axis.legend(fontsize=8)
    ratios = [results["ratio_top2_vs_smallest"][str(c)]["ratio_of_medians"] for c in counts]
    ratio_axis.plot(counts, ratios, "o-", label=f"time(T) / time({counts[0]}), K = {TOP_K}")
    ratio_axis.axhline(RATIO_LIMIT, color="red", linestyle="--", linewidth=1, label=f"target ≤ {RATIO_LIMIT}×")
    ratio_axis.axhline(1.0, color="black", linewidth=0.5)
    ratio_axis.set_xscale("log", base=2)
    ratio_axis.set_xlabel("text tokens T")
    ratio_axis.set_ylabel("ratio")
    ratio_axis.legend(fontsize=8)
    figure.suptitle(f"{TITLE} — {machine_caption(payload)}", fontsize=8)
    save_figure(figure, path)


def run(settings: BenchSettings) -> dict[str, Any]:
    """Run the benchmark, write `topk_scaling.json` and `.png` to `settings.output_dir`, return the payload."""
    started = time.perf_counter()
    settings.apply()
    token_counts = QUICK_TOKEN_COUNTS if settings.quick else TOKEN_COUNTS
    if settings.quick:
        repeats = QUICK_REPEATS
    else:
        repeats = GPU_REPEATS if settings.device == "cuda" else CPU_REPEATS
    results = measure(settings, token_counts, repeats)
    targets = targets_from(results, token_counts)
    payload = result_payload(
        NAME,
        settings,
        {"token_counts": list(token_counts), "top_k": TOP_K, "map": [EMBED_DIM, MAP_SIDE, MAP_SIDE], "repeats": repeats,
         "num_objects": 1, "cma": "MaskCMAConfig defaults: 8 heads, visual_to_text, output gate, residual warm-up"},
        results,
        targets,
        ["All token counts and both K settings are timed in the same rounds (2 warm-up rounds not recorded).",
         "FLOPs: torch.utils.flop_counter on the meta device."],
        started,
    )
    write_result(payload, settings.output_dir)
    plot(payload, plot_path(settings.output_dir, NAME))
    return payload
