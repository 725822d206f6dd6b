"""Shared pieces of the benchmarks: settings, machine description, interleaved timing, statistics, result files.

Every benchmark reports *ratios measured within one run*: the variants are timed in rounds (A B A B …, after
warm-up calls that are not recorded) on the same process, threads and inputs, and the result compares medians.
The machines we run on are shared, so absolute times drift between runs; ratios of interleaved medians do not
drift with them. The spread of every sample (min, max, inter-quartile range) is written beside the median.
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import subprocess
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_OUTPUT_DIR = REPO_ROOT / "docs" / "benchmarks"
GPU_OUTPUT_DIR = DEFAULT_OUTPUT_DIR / "gpu"
RESULT_SCHEMA_VERSION = 1

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass
class BenchSettings:
    """How a benchmark runs.

    Args:
        quick (`bool`): smoke mode: tiny sizes only, one or two repeats; checks that the benchmark runs and writes
            a valid result, its numbers mean nothing.
        device (`str`): `"cpu"` or `"cuda"`.
        dtype (`torch.dtype`): parameter and input dtype (`float32` on CPU, `bfloat16` for the GPU column).
        threads (`int`): `torch.set_num_threads` value, fixed for the whole run.
        output_dir (`Path`): where `<name>.json` and `<name>.png` go.
        memory_isolation (`str`): `"subprocess"` measures the peak memory of every variant in a fresh interpreter,
            `"inprocess"` in this one (see `benchmarks.memory`).
        seed (`int`): seed of the random weights and inputs.
    """

    quick: bool = False
    device: str = "cpu"
    dtype: torch.dtype = torch.float32
    threads: int = 2
    output_dir: Path = field(default_factory=lambda: DEFAULT_OUTPUT_DIR)
    memory_isolation: str = "subprocess"
    seed: int = 0

    def __post_init__(self) -> None:
        if self.device not in ("cpu", "cuda"):
            raise ValueError(f"device={self.device!r} is not supported; use 'cpu' or 'cuda'")
        if self.device == "cuda" and not torch.cuda.is_available():
            raise ValueError("device='cuda' was asked for but torch.cuda.is_available() is False on this machine")
        if self.memory_isolation not in ("subprocess", "inprocess"):
            raise ValueError(f"memory_isolation={self.memory_isolation!r}; use 'subprocess' or 'inprocess'")
        if self.threads < 1:
            raise ValueError(f"threads={self.threads} must be >= 1")
        self.output_dir = Path(self.output_dir)

    @property
    def dtype_name(self) -> str:
        return str(self.dtype).removeprefix("torch.")

    def to_json(self) -> dict[str, Any]:
        return {
            "quick": self.quick,
            "device": self.device,
            "dtype": self.dtype_name,
            "threads": self.threads,
            "memory_isolation": self.memory_isolation,
            "seed": self.seed,
        }

    @classmethod
    def from_json(cls, data: Mapping[str, Any], output_dir: Path | None = None) -> BenchSettings:
        dtype_name = data["dtype"]
        if dtype_name not in DTYPES:
            raise ValueError(f"dtype={dtype_name!r} is not supported; use one of {sorted(DTYPES)}")
        return cls(
            quick=bool(data["quick"]),
            device=data["device"],
            dtype=DTYPES[dtype_name],
            threads=int(data["threads"]),
            output_dir=output_dir or DEFAULT_OUTPUT_DIR,
            memory_isolation=data["memory_isolation"],
            seed=int(data["seed"]),
        )

    def apply(self) -> None:
        """Fix the number of intra-op threads (and inter-op to 1) for the whole run."""
        torch.set_num_threads(self.threads)

    @property
    def weight_dtype(self) -> torch.dtype:
        """Dtype of the weights and inputs: float32 under mixed precision (see `autocast_dtype`), else `dtype`."""
        return weight_and_autocast_dtypes(self.device, self.dtype)[0]

    @property
    def autocast_dtype(self) -> torch.dtype | None:
        """The autocast dtype of the compute, or `None`: on CUDA a half `dtype` means the Trainer's mixed-precision
        step (`bf16=True`/`fp16=True`): float32 weights, autocast activations (not a pure half cast)."""
        return weight_and_autocast_dtypes(self.device, self.dtype)[1]


def weight_and_autocast_dtypes(device: str, dtype: torch.dtype) -> tuple[torch.dtype, torch.dtype | None]:
    """`(weight dtype, autocast dtype or None)` for a benchmark on `device` asked to run in `dtype`."""
    if device == "cuda" and dtype in (torch.bfloat16, torch.float16):
        return torch.float32, dtype
    return dtype, None


def autocast_call(function: Callable[[], Any], device: str, autocast_dtype: torch.dtype | None) -> Callable[[], Any]:
    """`function` run under `torch.autocast(device, autocast_dtype)` (unchanged when `autocast_dtype` is None)."""
    if autocast_dtype is None:
        return function

    def call():
        with torch.autocast(device_type=device, dtype=autocast_dtype):
            return function()

    return call


def warm_up_cuda(dtype: torch.dtype | None = None) -> None:
    """Create the CUDA context, the cuBLAS workspace and the cuDNN handles before anything is measured (a variant
    measured first would otherwise carry them in its peak memory). Afterwards they are part of every baseline."""
    if not torch.cuda.is_available():
        raise RuntimeError("warm_up_cuda needs a CUDA GPU")
    for compute_dtype in {torch.float32, dtype or torch.float32}:
        a = torch.randn(64, 64, device="cuda", dtype=compute_dtype, requires_grad=True)
        (a @ a).sum().backward()
        image = torch.randn(1, 4, 16, 16, device="cuda", dtype=compute_dtype)
        torch.nn.functional.conv2d(image, torch.randn(4, 4, 3, 3, device="cuda", dtype=compute_dtype))
    torch.cuda.synchronize()


def parse_dtype(name: str) -> torch.dtype:
    if name not in DTYPES:
        raise ValueError(f"--dtype {name!r} is not supported; use one of {', '.join(sorted(DTYPES))}")
    return DTYPES[name]


# ------------------------------------------------------------------------------------------------------------
# machine description
# ------------------------------------------------------------------------------------------------------------


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as handle:
            for line in handle:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except FileNotFoundError:
        pass
    return platform.processor() or platform.machine()


def _package_version(name: str) -> str | None:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(name)
    except PackageNotFoundError:
        return None


def _git_commit() -> str | None:
    result = subprocess.run(
        ["git", "rev-parse", "HEAD"], cwd=REPO_ROOT, capture_output=True, text=True, check=False
    )
    return result.stdout.strip() or None if result.returncode == 0 else None


def machine_info(settings: BenchSettings) -> dict[str, Any]:
    """CPU, cores, memory, library versions, device and the load average when the benchmark started."""
    import transformers

    info: dict[str, Any] = {
        "platform": platform.platform(),
        "python": platform.python_version(),
        "cpu": _cpu_model(),
        "logical_cores": os.cpu_count(),
        "usable_cores": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "peft": _package_version("peft"),
        "device": settings.device,
        "dtype": settings.dtype_name,
        "git_commit": _git_commit(),
    }
    if hasattr(os, "getloadavg"):
        info["load_average_1_5_15min"] = [round(value, 2) for value in os.getloadavg()]
    try:
        with open("/proc/meminfo") as handle:
            total_kib = int(handle.readline().split()[1])
        info["memory_total_gib"] = round(total_kib / 2**20, 1)
    except (FileNotFoundError, ValueError, IndexError):
        info["memory_total_gib"] = None
    if settings.device == "cuda":
        info["gpu"] = torch.cuda.get_device_name()
        info["cuda"] = torch.version.cuda
    return info


# ------------------------------------------------------------------------------------------------------------
# timing
# ------------------------------------------------------------------------------------------------------------


def synchronize(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def time_call(function: Callable[[], Any], device: str) -> float:
    """Seconds one call of `function` takes (the GPU queue is drained before and after)."""
    synchronize(device)
    start = time.perf_counter()
    function()
    synchronize(device)
    return time.perf_counter() - start


def time_interleaved(
    variants: Mapping[str, Callable[[], Any]],
    repeats: int,
    warmup: int,
    device: str = "cpu",
    progress: str | None = None,
    autocast_dtype: torch.dtype | None = None,
) -> dict[str, list[float]]:
    """Time several variants in rounds: every round calls each variant once, in the mapping's order.

    Args:
        variants: name → zero-argument callable.
        repeats: recorded rounds (the length of each returned list).
        warmup: rounds run first and not recorded (allocator, caches, lazy initialisation).
        device: `"cuda"` synchronises around each call.
        progress: a tqdm description, or `None` for no progress bar.
        autocast_dtype: run every call under `torch.autocast(device, autocast_dtype)` (mixed precision).

    Returns:
        name → list of `repeats` durations in seconds, round by round (so `result[a][i]` and `result[b][i]` were
        measured next to each other and can be paired).
    """
    if repeats < 1:
        raise ValueError(f"repeats={repeats} must be >= 1")
    if warmup < 0:
        raise ValueError(f"warmup={warmup} must be >= 0")
    from tqdm.auto import tqdm

    variants = {name: autocast_call(function, device, autocast_dtype) for name, function in variants.items()}
    if device == "cuda":
        warm_up_cuda(autocast_dtype)
    samples: dict[str, list[float]] = {name: [] for name in variants}
    rounds = range(warmup + repeats)
    for round_index in tqdm(rounds, desc=progress, disable=progress is None, leave=False):
        for name, function in variants.items():
            duration = time_call(function, device)
            if round_index >= warmup:
                samples[name].append(duration)
    return samples


# ------------------------------------------------------------------------------------------------------------
# statistics
# ------------------------------------------------------------------------------------------------------------


def _quantile(sorted_values: Sequence[float], fraction: float) -> float:
    """Linear-interpolation quantile of already sorted values."""
    if len(sorted_values) == 1:
        return float(sorted_values[0])
    position = fraction * (len(sorted_values) - 1)
    low = int(position)
    high = min(low + 1, len(sorted_values) - 1)
    weight = position - low
    return float(sorted_values[low] * (1.0 - weight) + sorted_values[high] * weight)


def summarize(samples: Sequence[float]) -> dict[str, float | int]:
    """Median, mean, min, max, quartiles and the relative inter-quartile range (IQR / median) of a sample."""
    if len(samples) == 0:
        raise ValueError("cannot summarise an empty sample")
    ordered = sorted(float(value) for value in samples)
    median = statistics.median(ordered)
    q1, q3 = _quantile(ordered, 0.25), _quantile(ordered, 0.75)
    return {
        "n": len(ordered),
        "median": median,
        "mean": statistics.fmean(ordered),
        "min": ordered[0],
        "max": ordered[-1],
        "q1": q1,
        "q3": q3,
        "relative_iqr": (q3 - q1) / median if median > 0 else 0.0,
    }


def compare(numerator: Sequence[float], denominator: Sequence[float]) -> dict[str, float]:
    """Ratio of two interleaved samples: the ratio of their medians, and the median, min and max of the
    round-by-round (paired) ratios, which cancel slow drifts of the machine's speed."""
    if len(numerator) != len(denominator):
        raise ValueError(f"paired samples differ in length: {len(numerator)} vs {len(denominator)}")
    paired = [a / b for a, b in zip(numerator, denominator)]
    return {
        "ratio_of_medians": statistics.median(numerator) / statistics.median(denominator),
        "paired_median": statistics.median(paired),
        "paired_min": min(paired),
        "paired_max": max(paired),
    }


# ------------------------------------------------------------------------------------------------------------
# result files
# ------------------------------------------------------------------------------------------------------------


def result_payload(
    name: str,
    settings: BenchSettings,
    parameters: Mapping[str, Any],
    results: Mapping[str, Any],
    targets: Sequence[Mapping[str, Any]],
    notes: Sequence[str] = (),
    started: float | None = None,
) -> dict[str, Any]:
    """The JSON document of one benchmark run.

    `targets` is a list of `{"name", "target", "value", "met"}` rows (the table of docs/benchmarks.md).
    """
    payload = {
        "schema_version": RESULT_SCHEMA_VERSION,
        "benchmark": name,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "machine": machine_info(settings),
        "settings": {**settings.to_json(), **dict(parameters)},
        "results": dict(results),
        "targets": [dict(row) for row in targets],
        "notes": list(notes),
    }
    if started is not None:
        payload["wall_seconds"] = round(time.perf_counter() - started, 2)
    return payload


def write_result(payload: Mapping[str, Any], output_dir: Path) -> Path:
    """Write `<output_dir>/<benchmark>.json` (strict JSON: no NaN/inf)."""
    output_dir.mkdir(parents=True, exist_ok=True)
    path = output_dir / f"{payload['benchmark']}.json"
    text = json.dumps(payload, indent=2, allow_nan=False, sort_keys=False)
    path.write_text(text + "\n")
    return path


def target_row(
    name: str, target: str, value: float, limit: float, unit: str = "×", strict: bool = False
) -> dict[str, Any]:
    """One line of a target table: met when `value <= limit` (`value < limit` when `strict`)."""
    return {
        "name": name,
        "target": target,
        "value": round(float(value), 4),
        "limit": limit,
        "unit": unit,
        "met": bool(value < limit if strict else value <= limit),
    }


def plot_path(output_dir: Path, name: str) -> Path:
    output_dir.mkdir(parents=True, exist_ok=True)
    return output_dir / f"{name}.png"


def new_figure(columns: int = 1, width: float = 5.5, height: float = 4.0):
    """A matplotlib figure with the non-interactive backend (the benchmarks run headless)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(1, columns, figsize=(width * columns, height), squeeze=False)
    return figure, axes[0]


def save_figure(figure, path: Path) -> Path:
    import matplotlib.pyplot as plt

    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return path


def machine_caption(payload: Mapping[str, Any]) -> str:
    machine = payload["machine"]
    device = machine.get("gpu") or machine["cpu"]
    return f"{device} · {machine['torch_threads']} threads · {machine['dtype']} · torch {machine['torch']}"
