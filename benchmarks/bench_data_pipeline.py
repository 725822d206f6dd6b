"""Benchmark 7 — data pipeline: does loading keep up with the training step, and does frame prefetching hide the
video reading at inference?

Training side. The pipeline is what `maskcma train` runs: `trainer.data.ProcessedRecords` (decode the record's PNG
frames, the VLM tiles, SAM2's resize and normalisation, the ground-truth masks) and `MaskCMADataCollator`, batched
by a `torch.utils.data.DataLoader` with 0 workers (the transformers default) and with worker processes
(`persistent_workers=True`, `prefetch_factor=2`, as in the recipe). The records are the synthetic shapes
(`data.synthetic`, 30 % videos of 8 frames, 128-px frames). Two processor sizes:

- `tiny`: SAM2 input 128² (the tiny model's);
- `sam2_1024`: SAM2 input 1024² (released SAM2), the same records upsampled — the per-sample cost of a real run.

Samples/s are measured over a second epoch (the workers already started: steady state); the first batch's wait
(worker start-up) is reported separately. The training step is the tiny model's optimiser step on a batch from the
`tiny` pipeline, as `bench_training_step` runs it. `keeps_up` = pipeline samples/s ≥ training samples/s. For the
released size the tiny step is no reference; the table gives the samples/s one worker delivers, so that
`workers needed = training samples/s ÷ per-worker samples/s` can be read off for a real step time.

Inference side. A video of `VIDEO_FRAMES` 480×640 PNG frames in a folder is streamed through
`Sam2FrameSource(prefetch=0)` and `Sam2FrameSource(prefetch=2)` while the tiny model's SAM2 image encoder runs on
each frame (the per-frame work of propagation): the time per frame with and without the background read-ahead.
On a CPU-only run the encoder competes with the read-ahead for the same cores; with an accelerator the CPU idles
while the frame is computed. The `idle_*` variants measure that case: frames preprocessed to released SAM2's 1024²
while the consumer waits `IDLE_CONSUMER_S` per frame (standing in for the accelerator's step).
"""

from __future__ import annotations

import math
import os
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from transformers_maskcma.tiny import build_tiny_model, build_tiny_processor

from .common import (
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

NAME = "data_pipeline"
TITLE = "Data pipeline vs training step (tiny model)"
PROCESSOR_SIZES = {"tiny": None, "sam2_1024": 1024}
BATCH_SIZE = 4
VIDEO_FRAMES, QUICK_VIDEO_FRAMES = 24, 6
SAM2_RELEASED_SIZE = 1024
IDLE_CONSUMER_S = 0.1  # per frame: an accelerator's step during which the CPU has nothing to do
VIDEO_SIZE = (480, 640)
CPU_SAMPLES, QUICK_SAMPLES = 32, 8
CPU_STEP_REPEATS, GPU_STEP_REPEATS, QUICK_STEP_REPEATS = 10, 30, 2


def worker_counts(quick: bool) -> list[int]:
    """0 (the transformers default) and 2 worker processes (1 in quick mode); 4 as well where the machine has the
    cores."""
    if quick:
        return [0, 1]
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return [0, 2, 4] if cores >= 4 else [0, 2]


def build_pipeline(records, size: int | None, tokenizer):
    """`(dataset, collator)` of `maskcma train` for the records, with SAM2's input `size` (None: the tiny 128)."""
    from transformers_maskcma.trainer.collator import MaskCMADataCollator
    from transformers_maskcma.trainer.data import ProcessedRecords

    processor = build_tiny_processor(tokenizer) if size is None else build_tiny_processor(tokenizer, sam_image_size=size)
    return ProcessedRecords(records, processor), MaskCMADataCollator(processor)


def measure_loader(dataset, collator, workers: int) -> dict[str, float]:
    """Samples/s of one steady-state epoch (the second) and the wait for the first batch (worker start-up)."""
    from torch.utils.data import DataLoader

    options = {"persistent_workers": True, "prefetch_factor": 2} if workers > 0 else {}
    loader = DataLoader(dataset, batch_size=BATCH_SIZE, shuffle=False, num_workers=workers, collate_fn=collator, **options)
    started = time.perf_counter()
    iterator = iter(loader)
    next(iterator)
    first_batch_s = time.perf_counter() - started
    for _ in iterator:
        pass
    started = time.perf_counter()
    samples = sum(int(batch["input_ids"].shape[0]) for batch in loader)
    epoch_s = time.perf_counter() - started
    del loader
    return {"workers": workers, "samples": samples, "epoch_s": epoch_s, "samples_per_second": samples / epoch_s,
            "first_batch_s": first_batch_s}


def training_step_time(settings: BenchSettings, dataset, collator, repeats: int) -> dict[str, Any]:
    """The tiny model's optimiser step on one batch of the `tiny` pipeline: timings and samples/s."""
    from .bench_training_step import make_step

    model, _ = build_tiny_model(seed=settings.seed)
    model.to(device=settings.device, dtype=settings.weight_dtype).train()
    batch = collator([dataset[index] for index in range(BATCH_SIZE)])
    batch = {
        key: value.to(settings.device, dtype=settings.weight_dtype) if value.is_floating_point() else value.to(settings.device)
        for key, value in batch.items()
        if key != "original_sizes"
    }
    step = make_step(model, batch)
    timings = time_interleaved({"step": step}, repeats=repeats, warmup=2, device=settings.device,
                               autocast_dtype=settings.autocast_dtype, progress=f"{NAME} step")["step"]
    summary = summarize(timings)
    return {"timings_s": timings, "summary_s": summary, "samples_per_second": BATCH_SIZE / summary["median"]}


def write_video_folder(folder: Path, seed: int, num_frames: int) -> None:
    """`num_frames` PNG frames of smooth random colour fields (PNG decoding costs as for real frames)."""
    rng = np.random.default_rng(seed)
    height, width = VIDEO_SIZE
    base = rng.integers(0, 255, (height // 16, width // 16, 3), dtype=np.uint8)
    for index in range(num_frames):
        shifted = np.roll(base, index, axis=1)
        frame = Image.fromarray(shifted).resize((width, height), Image.BILINEAR)
        noise = rng.integers(0, 24, (height, width, 3), dtype=np.uint8)
        Image.fromarray(np.asarray(frame) // 2 + noise).save(folder / f"{index:05d}.png")


def measure_prefetch(settings: BenchSettings, repeats: int, num_frames: int) -> dict[str, Any]:
    """Seconds per frame of streaming the video folder through the tiny SAM2 image encoder, without and with
    prefetching (interleaved rounds, one pass over the video each)."""
    from transformers_maskcma.processing.video_io import FolderFrameSource, Sam2FrameSource

    model, _ = build_tiny_model(seed=settings.seed)
    model.to(device=settings.device, dtype=settings.weight_dtype).eval()
    size = model.config.sam2_config.image_size
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        write_video_folder(folder, settings.seed, num_frames)

        def stream(prefetch: int):
            def run() -> None:
                source = Sam2FrameSource(FolderFrameSource(folder), size, prefetch=prefetch,
                                         device=settings.device, dtype=settings.weight_dtype)
                with torch.no_grad():
                    for frame in source:
                        model.encode_frames(frame[None])
                source.close()

            return run

        def idle_stream(prefetch: int):
            def run() -> None:
                source = Sam2FrameSource(FolderFrameSource(folder), SAM2_RELEASED_SIZE, prefetch=prefetch)
                for _ in source:
                    time.sleep(IDLE_CONSUMER_S)  # the CPU idles while an accelerator computes the frame
                source.close()

            return run

        variants = {"prefetch_0": stream(0), "prefetch_2": stream(2),
                    "idle_prefetch_0": idle_stream(0), "idle_prefetch_2": idle_stream(2)}
        timings = time_interleaved(variants, repeats=repeats, warmup=1, device=settings.device,
                                   autocast_dtype=settings.autocast_dtype, progress=f"{NAME} video")
    per_frame = {name: [value / num_frames for value in values] for name, values in timings.items()}
    return {
        "frames": num_frames,
        "frame_size": list(VIDEO_SIZE),
        "sam2_input": size,
        "timings_per_frame_s": per_frame,
        "summary_per_frame_s": {name: summarize(values) for name, values in per_frame.items()},
        "time_ratio_prefetch_vs_none": compare(timings["prefetch_2"], timings["prefetch_0"]),
        "idle_consumer_s": IDLE_CONSUMER_S,
        "idle_sam2_input": SAM2_RELEASED_SIZE,
        "time_ratio_idle_prefetch_vs_none": compare(timings["idle_prefetch_2"], timings["idle_prefetch_0"]),
    }


def run(settings: BenchSettings) -> dict[str, Any]:
    """Run the benchmark, write `data_pipeline.json` and `.png` to `settings.output_dir`, return the payload."""
    from transformers_maskcma.data.synthetic import SyntheticConfig, load_synthetic

    started = time.perf_counter()
    settings.apply()
    num_samples = QUICK_SAMPLES if settings.quick else CPU_SAMPLES
    if settings.quick:
        step_repeats = QUICK_STEP_REPEATS
    else:
        step_repeats = GPU_STEP_REPEATS if settings.device == "cuda" else CPU_STEP_REPEATS
    records = load_synthetic("train", num_samples, SyntheticConfig(seed=settings.seed, video_fraction=0.3))
    tokenizer = build_tiny_model(seed=settings.seed)[1]
    workers = worker_counts(settings.quick)
    pipelines = {name: build_pipeline(records, size, tokenizer) for name, size in PROCESSOR_SIZES.items()}
    loading = {name: [measure_loader(dataset, collator, count) for count in workers]
               for name, (dataset, collator) in pipelines.items()}
    step = training_step_time(settings, *pipelines["tiny"], repeats=step_repeats)
    prefetch = measure_prefetch(settings, repeats=2 if settings.quick else 5,
                                num_frames=QUICK_VIDEO_FRAMES if settings.quick else VIDEO_FRAMES)
    training_sps = step["samples_per_second"]
    per_worker = {
        name: max(entry["samples_per_second"] / max(entry["workers"], 1) for entry in entries)
        for name, entries in loading.items()
    }
    results = {
        "samples": num_samples,
        "batch_size": BATCH_SIZE,
        "video_fraction": 0.3,
        "loading": loading,
        "training_step": step,
        "keeps_up": {
            name: {str(entry["workers"]): entry["samples_per_second"] >= training_sps for entry in entries}
            for name, entries in loading.items()
        },
        "samples_per_second_per_worker": per_worker,
        "workers_needed_for_tiny_step": {name: math.ceil(training_sps / rate) for name, rate in per_worker.items()},
        "video_prefetch": prefetch,
    }
    payload = result_payload(
        NAME,
        settings,
        {"processor_sizes": {name: size or 128 for name, size in PROCESSOR_SIZES.items()}, "workers": workers,
         "persistent_workers": True, "prefetch_factor": 2, "step_repeats": step_repeats},
        results,
        [],
        [
            "Loader samples/s: the second epoch of a persistent DataLoader (start-up excluded, reported as "
            "first_batch_s); one pass, so the spread is not measured.",
            "Training step: the tiny model (3.8 M parameters) — a real step (Hiera-L + a 1B VLM on a GPU) is far "
            "slower, so read per-worker samples/s against your step time.",
            "Video: per-frame time of reading + SAM2's image encoder, prefetch 0 vs 2, interleaved rounds.",
        ],
        started,
    )
    write_result(payload, settings.output_dir)
    plot(payload, plot_path(settings.output_dir, NAME))
    return payload


def plot(payload: dict[str, Any], path) -> None:
    results = payload["results"]
    figure, (loader_axis, video_axis) = new_figure(columns=2)
    names = list(results["loading"])
    width = 0.8 / len(names)
    for offset, name in enumerate(names):
        entries = results["loading"][name]
        positions = [index + offset * width for index in range(len(entries))]
        loader_axis.bar(positions, [entry["samples_per_second"] for entry in entries], width=width, label=name)
    counts = [entry["workers"] for entry in results["loading"][names[0]]]
    loader_axis.set_xticks([index + width * (len(names) - 1) / 2 for index in range(len(counts))])
    loader_axis.set_xticklabels([f"{count} workers" for count in counts])
    loader_axis.axhline(results["training_step"]["samples_per_second"], color="black", linestyle="--",
                        label="tiny training step")
    loader_axis.set_ylabel("samples / s")
    loader_axis.set_yscale("log")
    loader_axis.legend(fontsize=7)
    loader_axis.set_title("DataLoader (steady state) vs training step", fontsize=9)
    video = results["video_prefetch"]["summary_per_frame_s"]
    video_axis.bar(list(video), [1000 * video[name]["median"] for name in video],
                   color=["tab:gray", "tab:green", "tab:gray", "tab:green"])
    video_axis.tick_params(axis="x", labelsize=7)
    video_axis.set_ylabel("ms per frame (read + consumer)")
    video_axis.set_title(f"video stream, {results['video_prefetch']['frames']} frames {VIDEO_SIZE[1]}×{VIDEO_SIZE[0]}", fontsize=9)
    figure.suptitle(f"{TITLE} — {machine_caption(payload)}", fontsize=8)
    save_figure(figure, path)
