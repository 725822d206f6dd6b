"""Peak memory of one call, measured soundly on CPU and on GPU.

GPU: `torch.cuda.reset_peak_memory_stats()` then `torch.cuda.max_memory_allocated()` — exact, every tensor goes
through the CUDA caching allocator.

CPU: torch allocates CPU tensors with the C library's `malloc`, which `tracemalloc` does not see, so we read the
kernel's own accounting of the process's resident memory:

1. `mallopt(M_MMAP_THRESHOLD, 4 KiB)` (one page) and `mallopt(M_TRIM_THRESHOLD, 4 KiB)`: every block of a page
   or more is its own `mmap` and goes back to the kernel on `free`, so RSS follows the live tensors. glibc's default
   *dynamic* threshold would otherwise start serving large tensors from the heap after the first ones are freed and
   keep that memory after the call, so a second call would re-use it and look free of cost. The threshold is one
   page, not glibc's usual 128 KiB, because the heap's high-water mark is not live memory: with a 128 KiB threshold
   the tiny model's tensors (mostly 4–64 KiB) came from the heap, whose fragmentation grew over a video run
   (+14 % from 8 to 128 frames, levelling off by 512) while the live tensors did not grow at all (one-page
   threshold: 4.69, 4.64, 4.62 MiB for 8, 32, 128 frames). `M_MMAP_MAX` is raised so that the number of mappings
   never forces blocks back onto the heap.
2. After a warm-up call (one-time allocations: thread pools, kernels' scratch space), `gc.collect()`, read `VmRSS`
   from `/proc/self/status` as the baseline (weights, inputs, interpreter).
   `malloc_trim(0)` first returns any free heap memory to the kernel.
3. Write `5` to `/proc/self/clear_refs`, which resets the peak-RSS counter `VmHWM` to the current RSS (Linux ≥ 4.0).
4. Run the call, read `VmHWM`: peak = `VmHWM`, increment = `VmHWM − baseline`.

With `memory_isolation="subprocess"` each variant runs in a fresh interpreter (`python -m benchmarks.memory_probe`),
so no variant inherits the heap layout, caches or fragmentation of another one. `"inprocess"` (used by `--quick`)
runs the same steps in the current process.
"""

from __future__ import annotations

import ctypes
import gc
import importlib
import json
import os
import statistics
import subprocess
import sys
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch

from .common import REPO_ROOT, BenchSettings

PROBE_MARKER = "MEMORY_PROBE_RESULT "
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
_M_MMAP_MAX = -4
FIXED_THRESHOLD_BYTES = 4096  # one page
_MAX_MAPPINGS = 1 << 24
_malloc_fixed = False


@dataclass(frozen=True)
class MemoryWorkload:
    """A call to measure, described so that a fresh interpreter can rebuild it.

    Args:
        module (`str`): importable module holding the builder (e.g. `"benchmarks.bench_cma_overhead"`).
        builder (`str`): name of `builder(params: dict, settings: BenchSettings) -> Callable[[], Any]` in it; the
            builder creates the model and inputs (counted in the baseline) and returns the call to measure.
        params (`dict`): JSON-serialisable arguments of the builder.
    """

    module: str
    builder: str
    params: Mapping[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return {"module": self.module, "builder": self.builder, "params": dict(self.params)}

    def build(self, settings: BenchSettings) -> Callable[[], Any]:
        module = importlib.import_module(self.module)
        builder = getattr(module, self.builder, None)
        if builder is None:
            raise AttributeError(f"memory workload builder {self.module}.{self.builder} does not exist")
        return builder(dict(self.params), settings)


def _read_status_kib(field_name: str) -> int:
    with open("/proc/self/status") as handle:
        for line in handle:
            if line.startswith(field_name + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"/proc/self/status has no {field_name} line; peak-RSS measurement needs Linux")


def current_rss_bytes() -> int:
    """Resident memory of this process now (`VmRSS`)."""
    return _read_status_kib("VmRSS") * 1024


def peak_rss_bytes() -> int:
    """Peak resident memory of this process since the last reset (`VmHWM`)."""
    return _read_status_kib("VmHWM") * 1024


def reset_peak_rss() -> None:
    """Reset `VmHWM` to the current RSS (Linux ≥ 4.0)."""
    with open("/proc/self/clear_refs", "w") as handle:
        handle.write("5")


def fix_malloc_thresholds() -> None:
    """Make glibc give every block of a page or more its own mapping, returned to the kernel on free (see the
    module docstring). Idempotent."""
    global _malloc_fixed
    if _malloc_fixed:
        return
    libc = ctypes.CDLL(None)
    mallopt = getattr(libc, "mallopt", None)
    if mallopt is None:
        raise RuntimeError("the C library has no mallopt(); CPU peak-memory measurement needs glibc")
    accepted = [
        mallopt(_M_MMAP_THRESHOLD, FIXED_THRESHOLD_BYTES),
        mallopt(_M_TRIM_THRESHOLD, FIXED_THRESHOLD_BYTES),
        mallopt(_M_MMAP_MAX, _MAX_MAPPINGS),
    ]
    if accepted != [1, 1, 1]:
        raise RuntimeError("mallopt() refused the fixed mmap/trim thresholds; CPU peak memory cannot be measured")
    _malloc_fixed = True


def release_free_memory() -> None:
    """`gc.collect()` then glibc's `malloc_trim(0)`: freed heap memory goes back to the kernel, so that RSS counts
    live memory only (memory freed before `fix_malloc_thresholds` was called could otherwise be re-used unseen)."""
    gc.collect()
    libc = ctypes.CDLL(None)
    trim = getattr(libc, "malloc_trim", None)
    if trim is not None:
        trim(0)


def _measure_cpu(function: Callable[[], Any], repeats: int, warmup: int) -> dict[str, Any]:
    fix_malloc_thresholds()
    for _ in range(warmup):
        function()
    baselines, peaks = [], []
    for _ in range(repeats):
        release_free_memory()
        baseline = current_rss_bytes()
        reset_peak_rss()
        function()
        peaks.append(peak_rss_bytes())
        baselines.append(baseline)
    return {"baselines": baselines, "peaks": peaks, "method": "cpu_vmhwm", "mmap_threshold_bytes": FIXED_THRESHOLD_BYTES}


def _measure_cuda(function: Callable[[], Any], repeats: int, warmup: int) -> dict[str, Any]:
    from .common import warm_up_cuda

    warm_up_cuda()  # context, cuBLAS workspace, cuDNN: in every variant's baseline, in none's delta
    for _ in range(max(warmup, 1)):
        function()
    baselines, peaks = [], []
    for _ in range(repeats):
        gc.collect()
        torch.cuda.synchronize()
        baseline = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        function()
        torch.cuda.synchronize()
        peaks.append(torch.cuda.max_memory_allocated())
        baselines.append(baseline)
    return {"baselines": baselines, "peaks": peaks, "method": "cuda_max_memory_allocated"}


def measure_peak_memory(
    function: Callable[[], Any], device: str = "cpu", repeats: int = 1, warmup: int = 1
) -> dict[str, Any]:
    """Peak memory of `function()` in this process.

    Returns:
        dict with `baseline_bytes` (memory before the call: weights, inputs, runtime), `peak_bytes` (the highest
        point during the call) and `delta_bytes` (their difference), each the median over `repeats` calls, plus the
        raw `samples` and the `method`.
    """
    if repeats < 1:
        raise ValueError(f"repeats={repeats} must be >= 1")
    measure = _measure_cuda if device == "cuda" else _measure_cpu
    raw = measure(function, repeats, warmup)
    deltas = [peak - base for peak, base in zip(raw["peaks"], raw["baselines"])]
    return {
        "baseline_bytes": int(statistics.median(raw["baselines"])),
        "peak_bytes": int(statistics.median(raw["peaks"])),
        "delta_bytes": int(statistics.median(deltas)),
        "samples": {"baseline_bytes": raw["baselines"], "peak_bytes": raw["peaks"], "delta_bytes": deltas},
        "method": raw["method"],
        **({"mmap_threshold_bytes": raw["mmap_threshold_bytes"]} if "mmap_threshold_bytes" in raw else {}),
    }


def measure_workload_memory(
    workload: MemoryWorkload, settings: BenchSettings, repeats: int = 1, warmup: int = 1
) -> dict[str, Any]:
    """Peak memory of a workload, in a fresh interpreter (CPU, `memory_isolation="subprocess"`) or in this process
    (GPU, or `"inprocess"`)."""
    if settings.device == "cuda" or settings.memory_isolation == "inprocess":
        from .common import autocast_call

        function = autocast_call(workload.build(settings), settings.device, settings.autocast_dtype)
        result = measure_peak_memory(function, settings.device, repeats=repeats, warmup=warmup)
        del function
        gc.collect()
        result["isolation"] = "inprocess"
        return result
    request = {
        "workload": workload.to_json(),
        "settings": settings.to_json(),
        "repeats": repeats,
        "warmup": warmup,
    }
    env = dict(os.environ)
    env.setdefault("HF_HUB_OFFLINE", "1")
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    env["OMP_NUM_THREADS"] = str(settings.threads)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO_ROOT), env.get("PYTHONPATH", "")]))
    completed = subprocess.run(
        [sys.executable, "-m", "benchmarks.memory_probe", json.dumps(request)],
        cwd=REPO_ROOT,
        env=env,
        capture_output=True,
        text=True,
        check=False,
    )
    if completed.returncode != 0:
        raise RuntimeError(
            f"memory probe for {workload.module}.{workload.builder}({dict(workload.params)}) failed with exit code "
            f"{completed.returncode}:\n{completed.stderr[-4000:]}"
        )
    lines = [line for line in completed.stdout.splitlines() if line.startswith(PROBE_MARKER)]
    if not lines:
        raise RuntimeError(f"memory probe printed no result line; its output was:\n{completed.stdout[-2000:]}")
    result = json.loads(lines[-1][len(PROBE_MARKER):])
    result["isolation"] = "subprocess"
    return result


def build_allocation_workload(params: Mapping[str, Any], settings: BenchSettings) -> Callable[[], Any]:
    """Calibration workload: the call fills a new tensor of `params["mebibytes"]` MiB and frees it, so a sound
    measurement reports an increment of that size (the test suite checks it)."""
    size = int(params["mebibytes"]) * 2**20 // 4

    def call() -> float:
        block = torch.ones(size, dtype=torch.float32)
        return float(block[-1])

    return call
