"""One process of the evaluation runs of `bench_throughput`: `python -m benchmarks.throughput_eval_worker MODEL
SPLIT.jsonl OUTPUT GENERATE_KWARGS.json DEVICE`, alone or under `torchrun` (then each process predicts its share).
DEVICE `cuda` puts process k on GPU k (modulo the GPUs there are).

Every process runs one torch thread. The main process writes `OUTPUT/timing.json`: the seconds of the
`evaluate_dataset` call (after all processes loaded the model: they wait for each other first), the metrics, the
run counts and the SHA-256 of `predictions.jsonl`.
"""

from __future__ import annotations

import hashlib
import json
import sys
import time
from pathlib import Path

import torch


def main(argv: list[str]) -> int:
    model, split, output, kwargs_file = (Path(value) for value in argv[:4])
    device = argv[4]
    torch.set_num_threads(1)
    from transformers_maskcma.data.custom import load_custom
    from transformers_maskcma.evaluation.distributed import EvaluationProcesses
    from transformers_maskcma.evaluation.model_predict import model_predict_fn
    from transformers_maskcma.evaluation.runner import evaluate_dataset

    saved = json.loads(kwargs_file.read_text())
    generate_kwargs = {
        "max_new_tokens": saved["max_new_tokens"],
        "sequence_bias": {tuple(int(t) for t in key.split()): value for key, value in saved["sequence_bias"].items()},
    }
    processes = EvaluationProcesses.from_environment()
    try:
        if device == "cuda":
            device = f"cuda:{processes.local_rank % torch.cuda.device_count()}"
        predictor = model_predict_fn(model, device=device, generate_kwargs=generate_kwargs)
        dataset = load_custom(split)
        processes.gather(None)  # every process has its model: start together
        started = time.perf_counter()
        result = evaluate_dataset(dataset, predictor, output, show_progress=False, processes=processes)
        seconds = time.perf_counter() - started
        if processes.is_main:
            digest = hashlib.sha256((output / "predictions.jsonl").read_bytes()).hexdigest()
            report = {"evaluate_seconds": seconds, "metrics": result["metrics"], "run": result["run"],
                      "predictions_sha256": digest}
            (output / "timing.json").write_text(json.dumps(report, indent=2) + "\n")
    finally:
        processes.close()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
