"""Benchmark 7 — video training step: `video_training="propagate"` against `"independent"`, per frame.

One optimiser step of the tiny model on a batch of two synthetic clips of T frames (T = 4 and 8), as
`MaskCMATrainer` runs it (forward with a mask loss on every frame, LM loss, TMC, backward, clipping, AdamW):

- `independent`: every frame of the clip decoded from the ``[SEG]`` prompts through the image path (two decoder
  passes with the CMA per frame; the processor's `train_frames="all"`);
- `propagate`: the first T/2 frames (the key frames) decoded the same way and stored as SAM2 conditioning frames, the
  other T/2 propagated through SAM2's memory (memory attention, the CMA on the memory-conditioned embedding, one
  decoder pass, memory encoding of every frame), with gradients through the whole clip
  (`modeling/video_training.py`).

Both variants see the same features (same frames, prompts, targets); the model is the tiny default with its default
freezing, under which `"propagate"` also trains SAM2's memory modules. Step time and peak memory are divided by the
number of frames; the ratios propagate / independent are what the issue asks for. No target is set.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import torch

from transformers_maskcma.tiny import build_tiny_model

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
from .memory import MemoryWorkload, measure_workload_memory

NAME = "video_training"
TITLE = "Video training step per frame (tiny model)"
MODES = ("independent", "propagate")
CLIP_LENGTHS = (4, 8)
CLIPS_PER_BATCH = 2
LEARNING_RATE, WEIGHT_DECAY, GRAD_CLIP = 4e-5, 0.05, 1.0
CPU_REPEATS, GPU_REPEATS, QUICK_REPEATS = 10, 30, 1


def variant_name(mode: str, frames: int) -> str:
    return f"{mode}_T{frames}"


def make_batch(frames: int, mode: str, seed: int, device: str, dtype: torch.dtype) -> tuple[torch.nn.Module, dict]:
    """The tiny model for `mode` (training mode) and its collated batch of `CLIPS_PER_BATCH` synthetic clips of
    `frames` frames, `frames // 2` of them key frames."""
    from transformers_maskcma.data.synthetic import SyntheticConfig, load_synthetic
    from transformers_maskcma.processing import MaskCMAProcessor
    from transformers_maskcma.trainer.collator import MaskCMADataCollator
    from transformers_maskcma.trainer.data import ProcessedRecords

    model, tokenizer = build_tiny_model(seed=seed, video_training=mode, video_training_clip_frames=frames)
    processor = MaskCMAProcessor.from_model_config(
        model.config, tokenizer, num_key_frames=frames // 2, key_frame_sampling="first"
    )
    records = load_synthetic(
        "train", 4 * CLIPS_PER_BATCH, SyntheticConfig(seed=seed, num_frames=frames, video_fraction=1.0)
    ).select(range(CLIPS_PER_BATCH))
    dataset = ProcessedRecords(records, processor, video_clip_frames=frames)
    features = [dataset[i] for i in range(len(dataset))]
    if mode == "independent":  # the same frames and targets, each frame decoded from the prompts
        features = [{k: v for k, v in item.items() if k != "conditioning_frame_mask"} for item in features]
    batch = MaskCMADataCollator(processor)(features)
    batch = {
        key: value.to(device=device, dtype=dtype) if value.is_floating_point() else value.to(device)
        for key, value in batch.items()
    }
    model.to(device=device, dtype=dtype)
    model.train()
    return model, batch


def make_step(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> Callable[[], float]:
    """One optimiser step as `MaskCMATrainer` runs it; returns the loss."""
    trainable = [parameter for parameter in model.parameters() if parameter.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=LEARNING_RATE, weight_decay=WEIGHT_DECAY)

    def step() -> float:
        loss = model(**batch).loss  # LM + mask + tmc_weight·TMC (the model's total)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(trainable, GRAD_CLIP)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return float(loss.detach())

    return step


def build_step_workload(params: dict[str, Any], settings: BenchSettings) -> Callable[[], float]:
    """Memory-probe builder: `params = {"mode", "frames"}`; the warm-up step allocates the AdamW state."""
    model, batch = make_batch(params["frames"], params["mode"], settings.seed, settings.device, settings.weight_dtype)
    return make_step(model, batch)


def run(settings: BenchSettings) -> dict[str, Any]:
    """Run the benchmark, write `video_training.json` and `.png` to `settings.output_dir`, return the payload."""
    started = time.perf_counter()
    settings.apply()
    if settings.quick:
        repeats = QUICK_REPEATS
    else:
        repeats = GPU_REPEATS if settings.device == "cuda" else CPU_REPEATS
    steps, targets, frames_of = {}, {}, {}
    for frames in CLIP_LENGTHS:
        for mode in MODES:
            name = variant_name(mode, frames)
            model, batch = make_batch(frames, mode, settings.seed, settings.device, settings.weight_dtype)
            steps[name] = make_step(model, batch)
            targets[name] = int(batch["gt_masks"].shape[0])
            frames_of[name] = int(batch["sam_pixel_values"].shape[0])
    first_loss = {name: step() for name, step in steps.items()}
    timings = time_interleaved(
        steps, repeats=repeats, warmup=1, device=settings.device, autocast_dtype=settings.autocast_dtype, progress=NAME
    )
    del steps
    memory = {}
    for frames in CLIP_LENGTHS:
        for mode in MODES:
            workload = MemoryWorkload(
                module="benchmarks.bench_video_training", builder="build_step_workload",
                params={"mode": mode, "frames": frames},
            )
            memory[variant_name(mode, frames)] = measure_workload_memory(workload, settings, repeats=1, warmup=1)
    summaries = {name: summarize(samples) for name, samples in timings.items()}
    per_frame_time = {name: summaries[name]["median"] / frames_of[name] for name in timings}
    per_frame_memory = {name: memory[name]["delta_bytes"] / frames_of[name] for name in memory}
    ratios = {}
    for frames in CLIP_LENGTHS:
        propagate, independent = variant_name("propagate", frames), variant_name("independent", frames)
        ratios[str(frames)] = {
            "time_per_frame": compare(timings[propagate], timings[independent]),
            "peak_memory": memory[propagate]["peak_bytes"] / memory[independent]["peak_bytes"],
            "step_increment_per_frame": per_frame_memory[propagate] / max(per_frame_memory[independent], 1.0),
        }
    results = {
        "frames_per_step": frames_of,
        "targets_per_step": targets,
        "first_step_loss": first_loss,
        "timings_s": timings,
        "summary_s": summaries,
        "time_per_frame_s": per_frame_time,
        "memory": memory,
        "step_increment_per_frame_bytes": per_frame_memory,
        "propagate_vs_independent": ratios,
    }
    payload = result_payload(
        NAME,
        settings,
        {"modes": list(MODES), "clip_lengths": list(CLIP_LENGTHS), "clips_per_batch": CLIPS_PER_BATCH,
         "key_frames": "T/2 (first)", "optimizer": {"name": "AdamW", "lr": LEARNING_RATE,
         "weight_decay": WEIGHT_DECAY, "grad_clip": GRAD_CLIP}, "repeats": repeats},
        results,
        [],
        [
            "The four variants are timed in the same rounds (one warm-up round not recorded); a step's time and "
            "memory are divided by its frames (both modes decode every frame of the clips and put a loss on it).",
            "Memory: peak of one step after one warm-up step (which creates the AdamW state), each variant in a fresh "
            "interpreter on CPU; the step increment (activations and gradients) is what grows with the frames.",
            "No target: the issue asks for the ratios.",
        ],
        started,
    )
    write_result(payload, settings.output_dir)
    plot(payload, plot_path(settings.output_dir, NAME))
    return payload


def plot(payload: dict[str, Any], path) -> None:
    results = payload["results"]
    figure, (time_axis, memory_axis) = new_figure(columns=2)
    width = 0.38
    for offset, mode, color in ((-width / 2, "independent", "tab:blue"), (width / 2, "propagate", "tab:orange")):
        names = [variant_name(mode, frames) for frames in CLIP_LENGTHS]
        positions = [index + offset for index in range(len(CLIP_LENGTHS))]
        time_axis.bar(positions, [results["time_per_frame_s"][n] * 1e3 for n in names], width, label=mode,
                      color=color)
        memory_axis.bar(positions, [results["step_increment_per_frame_bytes"][n] / 2**20 for n in names], width,
                        label=mode, color=color)
    for axis in (time_axis, memory_axis):
        axis.set_xticks(range(len(CLIP_LENGTHS)), [f"T = {frames}" for frames in CLIP_LENGTHS])
        axis.legend(fontsize=7)
    time_axis.set_ylabel("step time per frame [ms] (median)")
    memory_axis.set_ylabel("step memory increment per frame [MiB]")
    figure.suptitle(f"{TITLE} — {machine_caption(payload)}", fontsize=8)
    save_figure(figure, path)
