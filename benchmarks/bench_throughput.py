"""Benchmark 7 — throughput as ratios: images per second at batch size 1 vs 8, and an evaluation run in 1 vs 2
processes.

1. **Batched images.** The same images go through `ModelPredictor.predict_batch` (what `maskcma evaluate
   --batch-size` calls: one processor call and one `model.segment` call per batch) 1 at a time and 8 at a time,
   timed in interleaved rounds; images per second and the paired ratio batch 8 / batch 1.
2. **Processes.** `evaluate_dataset` over an image split in one process and in two `torchrun` processes (gloo),
   one torch thread each, alternating runs; the time of the `evaluate_dataset` call in the main process (model
   loaded, split checked, predictions, merge, scoring) and the wall-clock time of the whole command (interpreter
   start and model loading included). Each run starts from an empty predictions folder.

Model: the tiny default (random weights, 128 px SAM2, 64 px VLM tiles), its answers made to be `[SEG]` then the end
of sequence (a `sequence_bias`), so that every image decodes one mask — a fixed workload, not a model's behaviour.
Images: the bundled sample scenes shifted, prompts of 2 to 14 words (batches are left-padded).

No target: the ratios describe this machine (two shared cores in our runs, where a second process competes with the
neighbours for the second core); on a GPU, batches amortise the launches and the processes run on their own devices.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .common import (
    REPO_ROOT,
    BenchSettings,
    compare,
    machine_caption,
    new_figure,
    plot_path,
    result_payload,
    save_figure,
    summarize,
    time_interleaved,
    write_result,
)

NAME = "throughput"
TITLE = "Throughput: batch 1 vs 8, evaluation in 1 vs 2 processes"
BATCH_SIZES = (1, 8)
PROMPTS = (
    "the red circle",
    "Please segment the blue square.",
    "triangle",
    "Segment the green triangle at the bottom right of the picture, please.",
    "the yellow circle on the left",
    "Please segment the purple circle that is the largest round shape here.",
    "orange square",
    "the shape in the middle of the scene",
)
# (images, recorded rounds, warm-up rounds) of the batch comparison; (images, runs per process count) of the
# process comparison
CPU_BATCH = (32, 5, 1)
QUICK_BATCH = (8, 1, 0)
CPU_PROCESSES = (64, 3)
QUICK_PROCESSES = (4, 1)


def build_model_folder(folder: Path, seed: int) -> tuple[Path, dict]:
    """The tiny model saved as a model folder; returns the folder and the generation arguments of the workload."""
    from transformers_maskcma.processing import save_model_folder
    from transformers_maskcma.tiny import build_tiny_model, build_tiny_processor

    model, tokenizer = build_tiny_model(seed=seed)
    save_model_folder(model, build_tiny_processor(tokenizer), folder)
    seg_id, eos_id = tokenizer.convert_tokens_to_ids("[SEG]"), tokenizer.eos_token_id
    generate_kwargs = {"max_new_tokens": 4, "sequence_bias": {(seg_id,): 50.0, (seg_id, eos_id): 200.0}}
    return folder, generate_kwargs


def write_image_split(root: Path, num_images: int) -> Path:
    """`num_images` records in the custom JSONL format (docs/custom_data.md); returns the file."""
    from PIL import Image

    from transformers_maskcma.processing.samples import SAMPLE_SCENES, draw_sample_shapes

    scenes = sorted(SAMPLE_SCENES)
    lines = []
    for k in range(num_images):
        image, masks = draw_sample_shapes(scenes[k % len(scenes)])
        shift = 2 * (k // len(scenes))
        image_path = root / f"{k:03d}.png"
        Image.fromarray(np.roll(np.asarray(image), shift, axis=1)).save(image_path)
        name = sorted(masks)[k % len(masks)]
        mask_path = root / f"{k:03d}_mask.png"
        Image.fromarray(np.roll(masks[name], shift, axis=1).astype(np.uint8) * 255).save(mask_path)
        lines.append({"image": str(image_path), "prompt": PROMPTS[k % len(PROMPTS)], "masks": [str(mask_path)],
                      "id": f"image{k:03d}"})
    path = root / "images.jsonl"
    path.write_text("".join(json.dumps(line) + "\n" for line in lines))
    return path


def measure_batches(folder: Path, generate_kwargs: dict, split: Path, settings: BenchSettings) -> dict[str, Any]:
    from transformers_maskcma.data.custom import load_custom
    from transformers_maskcma.evaluation.model_predict import model_predict_fn

    num_images, repeats, warmup = QUICK_BATCH if settings.quick else CPU_BATCH
    predictor = model_predict_fn(folder, device=settings.device, generate_kwargs=generate_kwargs)
    dataset = load_custom(split)
    records = [dataset[k] for k in range(num_images)]

    def run(batch_size: int):
        def call():
            for start in range(0, len(records), batch_size):
                predictor.predict_batch(records[start : start + batch_size])

        return call

    samples = time_interleaved(
        {f"batch_{size}": run(size) for size in BATCH_SIZES}, repeats=repeats, warmup=warmup,
        device=settings.device, progress="batches",
    )
    rates = {name: [num_images / seconds for seconds in values] for name, values in samples.items()}
    # the masks of both batch sizes, compared with the tolerance of docs/evaluation.md
    singles = [predictor(record) for record in records]
    batched = [masks for start in range(0, num_images, 8) for masks in predictor.predict_batch(records[start : start + 8])]
    ious = []
    for one, eight in zip(singles, batched):
        for first, second in zip(one, eight):
            union = np.count_nonzero(first | second)
            ious.append(1.0 if union == 0 else np.count_nonzero(first & second) / union)
    return {
        "num_images": num_images,
        "seconds": {name: summarize(values) for name, values in samples.items()},
        "images_per_second": {name: summarize(values) for name, values in rates.items()},
        "speedup_batch_8_vs_1": compare(rates["batch_8"], rates["batch_1"]),
        "min_mask_iou_batch_8_vs_1": min(ious) if ious else None,
        "num_masks_compared": len(ious),
    }


def _run_evaluation(
    processes: int, folder: Path, split: Path, output: Path, kwargs_file: Path, device: str
) -> dict[str, Any]:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(name, None)
    worker = ["-m", "benchmarks.throughput_eval_worker", str(folder), str(split), str(output), str(kwargs_file), device]
    if processes == 1:
        command = [sys.executable, *worker]
    else:
        import socket

        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            port = probe.getsockname()[1]
        command = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={processes}", "--nnodes=1",
                   "--master_addr=127.0.0.1", f"--master_port={port}", *worker]
    started = time.perf_counter()
    completed = subprocess.run(command, cwd=REPO_ROOT, env=env, capture_output=True, text=True, check=False)
    wall = time.perf_counter() - started
    if completed.returncode != 0:
        raise RuntimeError(f"the {processes}-process evaluation failed: {completed.stderr[-3000:]}")
    report = json.loads((output / "timing.json").read_text())
    return {"evaluate_seconds": report["evaluate_seconds"], "wall_seconds": wall, "metrics": report["metrics"],
            "predictions_sha": report["predictions_sha256"], "run": report["run"]}


def measure_processes(folder: Path, generate_kwargs: dict, root: Path, settings: BenchSettings) -> dict[str, Any]:
    num_images, runs = QUICK_PROCESSES if settings.quick else CPU_PROCESSES
    split_dir = root / "process_split"
    split_dir.mkdir()
    split = write_image_split(split_dir, num_images)
    kwargs_file = root / "generate_kwargs.json"
    bias = {" ".join(map(str, key)): value for key, value in generate_kwargs["sequence_bias"].items()}
    kwargs_file.write_text(json.dumps({"max_new_tokens": generate_kwargs["max_new_tokens"], "sequence_bias": bias}))
    runs_by_count: dict[int, list[dict]] = {1: [], 2: []}
    for index in range(runs):
        for count in (1, 2):
            output = root / f"eval_{count}_{index}"
            runs_by_count[count].append(_run_evaluation(count, folder, split, output, kwargs_file, settings.device))
    evaluate = {count: [run["evaluate_seconds"] for run in values] for count, values in runs_by_count.items()}
    wall = {count: [run["wall_seconds"] for run in values] for count, values in runs_by_count.items()}
    rate = {count: [num_images / seconds for seconds in values] for count, values in evaluate.items()}
    same = all(run["predictions_sha"] == runs_by_count[1][0]["predictions_sha"] for v in runs_by_count.values() for run in v)
    same_metrics = all(run["metrics"] == runs_by_count[1][0]["metrics"] for v in runs_by_count.values() for run in v)
    return {
        "num_images": num_images,
        "runs": runs,
        "evaluate_seconds": {f"{count}_process": summarize(values) for count, values in evaluate.items()},
        "wall_seconds": {f"{count}_process": summarize(values) for count, values in wall.items()},
        "images_per_second": {f"{count}_process": summarize(values) for count, values in rate.items()},
        "speedup_2_vs_1_process": compare(rate[2], rate[1]),
        "wall_speedup_2_vs_1_process": compare(wall[1], wall[2]),
        "same_predictions_file": same,
        "same_metrics": same_metrics,
        "metrics": runs_by_count[1][0]["metrics"],
    }


def plot(payload: dict[str, Any], path: Path) -> Path:
    figure, axes = new_figure(columns=2, width=4.5)
    batches = payload["results"]["batches"]["images_per_second"]
    names = list(batches)
    axes[0].bar(names, [batches[name]["median"] for name in names],
                yerr=[[batches[n]["median"] - batches[n]["min"] for n in names],
                      [batches[n]["max"] - batches[n]["median"] for n in names]], capsize=4)
    axes[0].set_ylabel("images / s (median, min–max)")
    axes[0].set_title("segment() batch size")
    processes = payload["results"]["processes"]["images_per_second"]
    names = list(processes)
    axes[1].bar(names, [processes[name]["median"] for name in names],
                yerr=[[processes[n]["median"] - processes[n]["min"] for n in names],
                      [processes[n]["max"] - processes[n]["median"] for n in names]], capsize=4)
    axes[1].set_title("evaluate_dataset, 1 thread per process")
    figure.suptitle(machine_caption(payload), fontsize=8)
    return save_figure(figure, path)


def run(settings: BenchSettings) -> dict[str, Any]:
    """Run the benchmark, write `throughput.json` and `.png` to `settings.output_dir`, return the payload."""
    started = time.perf_counter()
    settings.apply()
    torch.manual_seed(settings.seed)
    with tempfile.TemporaryDirectory(prefix="maskcma_throughput_") as temporary:
        root = Path(temporary)
        folder, generate_kwargs = build_model_folder(root / "model", settings.seed)
        batch_split_dir = root / "batch_split"
        batch_split_dir.mkdir()
        batch_split = write_image_split(batch_split_dir, (QUICK_BATCH if settings.quick else CPU_BATCH)[0])
        results = {
            "batches": measure_batches(folder, generate_kwargs, batch_split, settings),
            "processes": measure_processes(folder, generate_kwargs, root, settings),
        }
    batch_repeats = (QUICK_BATCH if settings.quick else CPU_BATCH)[1]
    payload = result_payload(
        NAME,
        settings,
        {"batch_sizes": list(BATCH_SIZES), "process_counts": [1, 2], "batch_rounds": batch_repeats,
         "process_runs": results["processes"]["runs"]},
        results,
        [],
        [
            "Batches: the two batch sizes are timed in the same rounds over the same images (1 warm-up round).",
            "Processes: 1- and 2-process runs alternate; every process has one torch thread (OMP_NUM_THREADS=1).",
            "evaluate_seconds: the evaluate_dataset call in the main process; wall_seconds: the whole command.",
        ],
        started,
    )
    write_result(payload, settings.output_dir)
    plot(payload, plot_path(settings.output_dir, NAME))
    return payload

