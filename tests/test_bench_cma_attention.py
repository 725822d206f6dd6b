"""The CMA attention benchmark runs in quick mode, checks eager against SDPA and writes a valid result (no test
looks at its times)."""

import json
import math
import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

from benchmarks.bench_cma_attention import WORKLOADS, main  # noqa: E402


def test_quick_run_writes_ratios_for_every_workload_and_agreeing_outputs(tmp_path, capsys):
    main(["--quick", "--output-dir", str(tmp_path)])
    payload = json.loads((tmp_path / "cma_attention.json").read_text())
    results = payload["results"]
    labels = {f"{n}obj_k{'all' if k is None else k}" for n, k in WORKLOADS}
    assert set(results["max_abs_difference_eager_vs_sdpa"]) == labels
    assert all(value <= 1e-4 for value in results["max_abs_difference_eager_vs_sdpa"].values())
    expected = {
        f"{mode}/{label}/{variant}_vs_eager"
        for mode in ("inference", "training")
        for label in labels
        for variant in ("sdpa", "text_to_visual")
    }
    assert set(results["ratios"]) == expected
    assert all(math.isfinite(r["ratio_of_medians"]) and r["ratio_of_medians"] > 0 for r in results["ratios"].values())
    assert "inference/1obj_k2/sdpa_vs_eager" in capsys.readouterr().out
