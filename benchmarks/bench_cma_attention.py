"""Which attention function should the CMA use: the eager reference or SDPA?

`python -m benchmarks.bench_cma_attention [--quick] [--device cuda --dtype bfloat16] [--threads N]`

Times the visual→text CMA (the default direction) at SAM2's real size (a 64×64×256 image embedding, 8 heads) with
`attn_implementation="eager"` (`eager_attention_forward`) and `"sdpa"` (`ALL_ATTENTION_FUNCTIONS["sdpa"]`), same
weights and inputs, interleaved in the same rounds, for K = 2 routed tokens (the default) and all 32 prompt tokens,
1 and 4 objects, forward only (inference) and forward + backward (training). The text→visual direction always runs
the eager function (it reads the attention map) and is timed beside them for reference. Before timing, the script
checks that both implementations give the same refined embedding.

Writes `<output-dir>/cma_attention.json` (default `docs/benchmarks/`, or `docs/benchmarks/gpu/` with `--device
cuda`); docs/benchmarks.md ("CMA attention: eager or SDPA") reads it.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Any

import torch

from transformers_maskcma.modeling import MaskCMAAttentionConfig, TextToVisualAttention, VisualToTextAttention

from .common import (
    DEFAULT_OUTPUT_DIR,
    DTYPES,
    GPU_OUTPUT_DIR,
    BenchSettings,
    compare,
    parse_dtype,
    result_payload,
    summarize,
    time_interleaved,
    write_result,
)

NAME = "cma_attention"
EMBED_DIM, HEADS, MAP_SIDE, PROMPT_TOKENS = 256, 8, 64, 32
QUICK_MAP_SIDE = 8
CPU_REPEATS, GPU_REPEATS, QUICK_REPEATS = 10, 100, 2
WORKLOADS = [(objects, top_k) for objects in (1, 4) for top_k in (2, None)]


def build(attention_class, implementation: str, top_k: int | None, settings: BenchSettings):
    config = MaskCMAAttentionConfig(num_heads=HEADS, attn_implementation=implementation)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(settings.seed)
        module = attention_class(config, embed_dim=EMBED_DIM, top_k=top_k)
    with torch.no_grad():
        module.gamma.fill_(0.5)
    return module.to(device=settings.device, dtype=settings.dtype)


def make_inputs(num_objects: int, side: int, settings: BenchSettings) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(settings.seed + num_objects)

    def draw(*shape):
        return torch.randn(*shape, generator=generator).to(device=settings.device, dtype=settings.dtype)

    mask = torch.ones(num_objects, PROMPT_TOKENS, dtype=torch.bool)
    mask[1:, PROMPT_TOKENS // 2 :] = False  # objects after the first have shorter prompts (padding)
    return {
        "image_embeddings": draw(num_objects, EMBED_DIM, side, side),
        "text_tokens": draw(num_objects, PROMPT_TOKENS, EMBED_DIM),
        "text_token_mask": mask.to(settings.device),
        "seg_embeds": draw(num_objects, EMBED_DIM),
        "mask_prior_logits": draw(num_objects, 1, side, side),
    }


def inference_call(module, inputs):
    module.eval()

    def call():
        with torch.inference_mode():
            return module(**inputs).image_embeddings

    return call


def training_call(module, inputs):
    module.train()

    def call():
        module.zero_grad(set_to_none=True)
        module(**inputs).image_embeddings.float().square().mean().backward()

    return call


def measure(settings: BenchSettings, side: int, repeats: int) -> dict[str, Any]:
    calls, agreement = {}, {}
    for num_objects, top_k in WORKLOADS:
        label = f"{num_objects}obj_k{'all' if top_k is None else top_k}"
        inputs = make_inputs(num_objects, side, settings)
        eager = build(VisualToTextAttention, "eager", top_k, settings)
        sdpa = build(VisualToTextAttention, "sdpa", top_k, settings)
        text_to_visual = build(TextToVisualAttention, "eager", top_k, settings)
        with torch.inference_mode():
            difference = (eager.eval()(**inputs).image_embeddings - sdpa.eval()(**inputs).image_embeddings).abs()
        agreement[label] = float(difference.max())
        tolerance = 1e-4 if settings.dtype == torch.float32 else 5e-2
        if agreement[label] > tolerance:
            raise RuntimeError(f"eager and SDPA disagree on {label}: max |difference| {agreement[label]:.3g}")
        for mode, wrap in (("inference", inference_call), ("training", training_call)):
            calls[f"{mode}/{label}/eager"] = wrap(eager, inputs)
            calls[f"{mode}/{label}/sdpa"] = wrap(sdpa, inputs)
            calls[f"{mode}/{label}/text_to_visual"] = wrap(text_to_visual, inputs)
    timings = time_interleaved(calls, repeats=repeats, warmup=2, device=settings.device, progress=NAME)
    ratios = {}
    for name in calls:
        mode, label, variant = name.split("/")
        if variant != "eager":
            ratios[f"{mode}/{label}/{variant}_vs_eager"] = compare(timings[name], timings[f"{mode}/{label}/eager"])
    return {
        "summary_s": {name: summarize(samples) for name, samples in timings.items()},
        "ratios": ratios,
        "max_abs_difference_eager_vs_sdpa": agreement,
    }


def run(settings: BenchSettings) -> dict[str, Any]:
    """Run the benchmark, write `cma_attention.json` to `settings.output_dir`, return the payload."""
    started = time.perf_counter()
    settings.apply()
    side = QUICK_MAP_SIDE if settings.quick else MAP_SIDE
    if settings.quick:
        repeats = QUICK_REPEATS
    else:
        repeats = GPU_REPEATS if settings.device == "cuda" else CPU_REPEATS
    results = measure(settings, side, repeats)
    payload = result_payload(
        NAME,
        settings,
        {"map": [EMBED_DIM, side, side], "heads": HEADS, "prompt_tokens": PROMPT_TOKENS, "repeats": repeats,
         "workloads": [{"num_objects": n, "top_k": k} for n, k in WORKLOADS]},
        results,
        [],
        ["All variants of all workloads are timed in the same rounds (2 warm-up rounds not recorded).",
         "Ratios are time(variant) / time(eager visual_to_text), medians of paired rounds."],
        started,
    )
    write_result(payload, settings.output_dir)
    return payload


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.bench_cma_attention", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("--quick", action="store_true", help="smoke mode: 8×8 map, 2 rounds, no meaningful numbers")
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    parser.add_argument("--dtype", default="float32", choices=sorted(DTYPES))
    parser.add_argument("--threads", type=int, default=1, help="torch.set_num_threads (default 1, see run_all)")
    parser.add_argument("--output-dir", type=Path, default=None,
                        help="default: docs/benchmarks (cpu) or docs/benchmarks/gpu (cuda)")
    args = parser.parse_args(argv)
    output_dir = args.output_dir or (GPU_OUTPUT_DIR if args.device == "cuda" else DEFAULT_OUTPUT_DIR)
    settings = BenchSettings(quick=args.quick, device=args.device, dtype=parse_dtype(args.dtype),
                             threads=args.threads, output_dir=output_dir)
    payload = run(settings)
    for name, ratio in payload["results"]["ratios"].items():
        print(f"{name:45s} {ratio['ratio_of_medians']:.3f}×")


if __name__ == "__main__":
    main()
