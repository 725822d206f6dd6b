"""Run the benchmarks: `python -m benchmarks.run_all [--quick] [--device cuda --dtype bfloat16] [--only NAME ...]`.

Each benchmark writes `<output-dir>/<name>.json` and `<name>.png`. The default output directory is
`docs/benchmarks/` on CPU and `docs/benchmarks/gpu/` with `--device cuda`; a full run into the default directory
also refreshes the result tables of `docs/benchmarks.md` (`python -m benchmarks.report` does that alone).

`--quick` is a smoke test (tiny sizes, one or two rounds, memory measured in-process): it checks that every
benchmark runs and writes a valid result; its numbers mean nothing.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
import time
from pathlib import Path

from .common import DEFAULT_OUTPUT_DIR, GPU_OUTPUT_DIR, DTYPES, BenchSettings, parse_dtype

# name → module; in the order of docs/benchmarks.md
BENCHMARKS = {
    "cma_overhead": "benchmarks.bench_cma_overhead",
    "topk_scaling": "benchmarks.bench_topk_scaling",
    "video_scaling": "benchmarks.bench_video_scaling",
    "training_step": "benchmarks.bench_training_step",
    "research_path": "benchmarks.bench_research_path",
    "one_pass": "benchmarks.bench_one_pass",
    "data_pipeline": "benchmarks.bench_data_pipeline",
    "throughput": "benchmarks.bench_throughput",
}


def default_threads(device: str) -> int:
    """One thread on CPU, all usable cores with a GPU.

    On a shared CPU, multi-threaded OpenMP regions amplify interference: a thread that waits at a barrier for a
    preempted sibling idles, so one busy neighbour slows every parallel op. In our runs on two shared cores the
    CMA's inter-quartile range was 65–115 % of the median with two threads and 1–2 % with one. One thread makes the
    ratios reproducible; `--threads N` measures the multi-threaded case on a quiet machine.
    """
    if device == "cpu":
        return 1
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.run_all", description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="smoke mode: tiny sizes, 1-2 rounds, no meaningful numbers")
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    parser.add_argument("--dtype", default="float32", choices=sorted(DTYPES))
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: 1 on CPU, usable cores with --device cuda)")
    parser.add_argument("--only", nargs="+", choices=list(BENCHMARKS), default=None, help="run only these benchmarks")
    parser.add_argument("--output-dir", type=Path, default=None,
                        help="default: docs/benchmarks (cpu) or docs/benchmarks/gpu (cuda)")
    parser.add_argument("--memory-isolation", choices=("subprocess", "inprocess"), default=None,
                        help="CPU peak memory in a fresh interpreter per variant (default) or in this process "
                             "(default with --quick)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no-report", action="store_true", help="do not refresh the tables of docs/benchmarks.md")
    return parser


def settings_from_args(args: argparse.Namespace) -> BenchSettings:
    output_dir = args.output_dir
    if output_dir is None:
        output_dir = GPU_OUTPUT_DIR if args.device == "cuda" else DEFAULT_OUTPUT_DIR
    isolation = args.memory_isolation or ("inprocess" if args.quick else "subprocess")
    return BenchSettings(
        quick=args.quick,
        device=args.device,
        dtype=parse_dtype(args.dtype),
        threads=args.threads or default_threads(args.device),
        output_dir=output_dir,
        memory_isolation=isolation,
        seed=args.seed,
    )


def run_benchmarks(settings: BenchSettings, names: list[str]) -> dict[str, dict]:
    """Run the named benchmarks in order; returns name → result payload."""
    payloads = {}
    for name in names:
        module = importlib.import_module(BENCHMARKS[name])
        started = time.perf_counter()
        print(f"[bench] {name} ...", flush=True)
        payloads[name] = module.run(settings)
        met = [row["met"] for row in payloads[name]["targets"]]
        verdict = "no target at these sizes" if not met else ("target met" if all(met) else "target MISSED")
        print(f"[bench] {name}: {time.perf_counter() - started:.1f} s, {verdict}", flush=True)
    return payloads


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    try:
        settings = settings_from_args(args)
    except ValueError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    names = args.only or list(BENCHMARKS)
    run_benchmarks(settings, names)
    writes_docs = settings.output_dir.resolve() in (DEFAULT_OUTPUT_DIR.resolve(), GPU_OUTPUT_DIR.resolve())
    if writes_docs and not settings.quick and not args.no_report:
        from .report import update_benchmarks_doc

        path = update_benchmarks_doc()
        print(f"[bench] tables refreshed in {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
