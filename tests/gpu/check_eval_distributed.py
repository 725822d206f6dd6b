"""GPU check of `maskcma evaluate` across processes and in batches: what the CPU tests
(tests/test_evaluate_distributed.py, tests/test_batched_inference.py) cannot run — one process per GPU on
`cuda:<LOCAL_RANK>`, and batches on CUDA kernels.

    PYTHONPATH=tests python tests/gpu/check_eval_distributed.py [WORK_DIR] [--nproc N]

Builds the answering tiny model of tests/test_pipeline.py (on the CPU, ~1 minute) and the image and video splits of
tests/distributed_eval_data.py, then runs `maskcma evaluate --model` on each split in one process (`--device cuda`)
and in N `torchrun` processes (N = the GPUs, at least 2: with one GPU both processes share it), and on the image
split in N processes with `--batch-size 8`. Checks: the N-process metrics and predictions equal the one-process
ones (exactly, or the largest difference is reported), and batch 8 is within the tolerance of docs/evaluation.md
(every mask IoU >= 0.999). Prints one JSON summary; exit code 0 when every check passed.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np


def _evaluate(command_prefix: list[str], model: Path, data: Path, split: str, output: Path, *extra: str) -> dict:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    command = [*command_prefix, "-m", "transformers_maskcma.cli", "evaluate", "--model", str(model), "--dataset",
               "custom", "--data-root", str(data), "--split", split, "--predictions", str(output), "--no-progress",
               "--overwrite", *extra]
    completed = subprocess.run(command, env=env, capture_output=True, text=True, check=False)
    if completed.returncode != 0:
        raise SystemExit(f"{' '.join(command)} failed:\n{completed.stderr[-4000:]}")
    return json.loads((output / "metrics.json").read_text())


def _min_iou(first: Path, second: Path) -> float:
    from transformers_maskcma.evaluation.predictions import PredictionStore

    one, two = PredictionStore(first), PredictionStore(second)
    if sorted(one.sample_ids()) != sorted(two.sample_ids()):
        return -1.0
    worst = 1.0
    for sample_id in one.sample_ids():
        a, b = one.masks(sample_id), two.masks(sample_id)
        union = np.count_nonzero(a | b)
        worst = min(worst, 1.0 if union == 0 else np.count_nonzero(a & b) / union)
    return worst


def main(argv: list[str] | None = None) -> int:
    import torch

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("work", nargs="?", default="eval_distributed_gpu", type=Path)
    parser.add_argument("--nproc", type=int, default=max(2, torch.cuda.device_count()))
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("check_eval_distributed.py: no CUDA device; the CPU version is tests/test_evaluate_distributed.py",
              file=sys.stderr)
        return 2
    from distributed_eval_data import IMAGE_SPLIT, VIDEO_SPLIT, write_image_split, write_video_split
    from test_pipeline import build_answering_folder

    work = args.work.resolve()
    work.mkdir(parents=True, exist_ok=True)
    model = work / "model"
    if not (model / "config.json").is_file():
        build_answering_folder(work)
    data = work / "data"
    write_image_split(data, 16)
    write_video_split(data, 4)
    one = [sys.executable]
    many = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={args.nproc}", "--nnodes=1",
            "--master_addr=127.0.0.1", f"--master_port={os.environ.get('PORT', '29561')}"]
    summary: dict = {"gpus": torch.cuda.device_count(), "gpu": torch.cuda.get_device_name(), "nproc": args.nproc}
    passed = True
    for split in (IMAGE_SPLIT, VIDEO_SPLIT):
        single = _evaluate(one, model, data, split, work / f"{split}-1", "--device", "cuda")
        multi = _evaluate(many, model, data, split, work / f"{split}-{args.nproc}")
        same = multi["metrics"] == single["metrics"]
        iou = _min_iou(work / f"{split}-1", work / f"{split}-{args.nproc}")
        summary[split] = {"metrics_1_process": single["metrics"], f"metrics_{args.nproc}_processes": multi["metrics"],
                          "metrics_equal": same, "min_mask_iou": iou, "run": multi["run"]}
        passed &= same and iou == 1.0 and multi["run"]["processes"] == args.nproc
    batched = _evaluate(many, model, data, IMAGE_SPLIT, work / "images-batch8", "--batch-size", "8")
    iou = _min_iou(work / f"{IMAGE_SPLIT}-1", work / "images-batch8")
    summary["batch_8"] = {"metrics": batched["metrics"], "min_mask_iou_vs_batch_1": iou}
    passed &= iou >= 0.999
    summary["passed"] = bool(passed)
    print(json.dumps(summary, indent=2))
    return 0 if passed else 1


if __name__ == "__main__":
    sys.exit(main())
