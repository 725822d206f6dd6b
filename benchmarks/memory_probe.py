"""Fresh-interpreter peak-memory probe: `python -m benchmarks.memory_probe '<request json>'`.

The request is `{"workload": MemoryWorkload.to_json(), "settings": BenchSettings.to_json(), "repeats": n,
"warmup": m}`; the result (see `benchmarks.memory.measure_peak_memory`) is printed on one line starting with
`MEMORY_PROBE_RESULT `.
"""

from __future__ import annotations

import json
import sys

from .memory import PROBE_MARKER, MemoryWorkload, fix_malloc_thresholds, measure_peak_memory


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 1:
        print("usage: python -m benchmarks.memory_probe '<request json>'", file=sys.stderr)
        return 2
    # fixed thresholds before anything large is allocated, so that the model's weights are mmapped too
    fix_malloc_thresholds()
    from .common import BenchSettings

    request = json.loads(argv[0])
    settings = BenchSettings.from_json(request["settings"])
    settings.apply()
    spec = request["workload"]
    workload = MemoryWorkload(module=spec["module"], builder=spec["builder"], params=spec["params"])
    function = workload.build(settings)
    result = measure_peak_memory(
        function, settings.device, repeats=int(request["repeats"]), warmup=int(request["warmup"])
    )
    print(PROBE_MARKER + json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
