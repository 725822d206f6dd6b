"""Run the GPU benchmark set and the GPU checks in one go, within a time budget (ten minutes by default):

    python -m benchmarks.gpu.run_all_gpu [--dtype bfloat16] [--budget-s 600] [--output-dir docs/benchmarks/gpu]

Steps, each in its own process with the time left:

1. the GPU checks: `tests/gpu/check_split_devices.py` (the VLM on the GPU and SAM2 on the CPU through
   `device_map`, and the reverse; image and video), `tests/gpu/check_offload_state.py` and
   `benchmarks/gpu/check_determinism.py` (a training step under `torch.use_deterministic_algorithms(True)` on CUDA);
2. the precision tests (`tests/test_precision.py`, `tests/test_bf16.py`, `tests/test_mask_prior.py`) on the GPU
   machine's CPU side;
3. the benchmarks (`python -m benchmarks.run_all --device cuda --dtype DTYPE`): float32 weights under autocast, as
   the Trainer's `bf16=True` step, CUDA warmed up before timing and memory.

Every step's command, exit status, wall time and output tail go to `<output-dir>/gpu_run.json`; the benchmarks
write their `<name>.json`/`.png` beside it. It refuses to start (exit 2) without a CUDA GPU.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent.parent
DEFAULT_OUTPUT_DIR = REPO_ROOT / "docs" / "benchmarks" / "gpu"
DTYPES = ("bfloat16", "float16", "float32")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.gpu.run_all_gpu", description=__doc__.split("\n\n")[0])
    parser.add_argument("--dtype", default="bfloat16", choices=DTYPES, help="autocast dtype of the benchmarks")
    parser.add_argument("--budget-s", type=float, default=600.0, help="wall-clock budget of the whole run (seconds)")
    parser.add_argument("--output-dir", type=Path, default=DEFAULT_OUTPUT_DIR)
    parser.add_argument("--skip-benchmarks", action="store_true", help="run only the GPU checks and tests")
    parser.add_argument("--quick", action="store_true", help="pass --quick to the benchmarks (smoke run)")
    return parser


def plan(args: argparse.Namespace) -> list[tuple[str, list[str]]]:
    """The steps as `(name, command)`, in order."""
    python = sys.executable
    steps = [
        ("check_split_devices", [python, "tests/gpu/check_split_devices.py"]),
        ("check_offload_state", [python, "tests/gpu/check_offload_state.py"]),
        ("check_determinism", [python, "-m", "benchmarks.gpu.check_determinism"]),
        ("test_precision", [python, "-m", "pytest", "-q", "-n", "0", "tests/test_precision.py", "tests/test_bf16.py",
                            "tests/test_mask_prior.py"]),
    ]
    if not args.skip_benchmarks:
        bench = [python, "-m", "benchmarks.run_all", "--device", "cuda", "--dtype", args.dtype,
                 "--output-dir", str(args.output_dir)]  # fmt: skip
        steps.append(("benchmarks", bench + (["--quick"] if args.quick else [])))
    return steps


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    import torch

    if not torch.cuda.is_available():
        print(
            "error: run_all_gpu needs a CUDA GPU (torch.cuda.is_available() is False here); the CPU benchmarks are "
            "`python -m benchmarks.run_all`",
            file=sys.stderr,
        )
        return 2
    if args.budget_s <= 0:
        print(f"error: --budget-s {args.budget_s} must be > 0", file=sys.stderr)
        return 2
    args.output_dir.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    deadline = time.monotonic() + args.budget_s
    results = {"device": torch.cuda.get_device_name(), "dtype": args.dtype, "budget_s": args.budget_s, "steps": []}
    status = 0
    for name, command in plan(args):
        left = deadline - time.monotonic()
        if left < 5:
            results["steps"].append({"name": name, "command": command, "returncode": None, "note": "no time left"})
            status = 1
            continue
        started = time.monotonic()
        print(f"[gpu] {name}: {' '.join(command)}", flush=True)
        try:
            done = subprocess.run(command, cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=left)
            returncode, output = done.returncode, done.stdout + done.stderr
        except subprocess.TimeoutExpired as error:
            returncode, output = None, f"timed out after {left:.0f} s\n{error.stdout or ''}{error.stderr or ''}"
        wall = time.monotonic() - started
        print(f"[gpu] {name}: exit {returncode} in {wall:.1f} s", flush=True)
        print(output[-3000:], flush=True)
        results["steps"].append(
            {"name": name, "command": command, "returncode": returncode, "wall_s": round(wall, 1),
             "output_tail": output[-6000:]}  # fmt: skip
        )
        status = status or int(returncode != 0)
    (args.output_dir / "gpu_run.json").write_text(json.dumps(results, indent=2) + "\n")
    return status


if __name__ == "__main__":
    sys.exit(main())
