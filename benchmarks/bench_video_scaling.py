"""Benchmark 3 — video scaling: time per frame and peak memory of streaming video segmentation, 8 → 128 frames.

The tiny model segments one synthetic video with `model.segment(..., stream=True)` (streaming: frames are produced lazily one at
a time by `SyntheticVideo`, SAM2 state that no later frame reads is dropped, each frame's masks are consumed and
not kept). The VLM's answer is forced to one ``[SEG]`` (`answer_ids`) so that the random model always decodes one
object; frame 0 is the single key frame (SAM2's conditioning frame) and every other frame is propagated with the
CMA on the memory-conditioned embedding (the default `cma_on_propagation=True`).

Time per frame = time to iterate the stream / number of frames (the VLM's answer, a constant per video, is timed
apart). Lengths are timed in interleaved rounds. Peak memory is measured over the whole video (answer + all frames),
each length in a fresh interpreter on CPU.

Targets: time per frame flat within 10 % over 8, 32, 128 frames (max / min ≤ 1.10); peak memory increase from 8 to
128 frames ≤ 10 % (ratio ≤ 1.10 of the memory the video run adds on top of the loaded model).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import torch

from transformers_maskcma.tiny import TINY_IMAGE_SEQ_LENGTH, TINY_SAM2_IMAGE_SIZE, TINY_VLM_IMAGE_SIZE, build_tiny_model

from .common import (
    BenchSettings,
    compare,
    machine_caption,
    new_figure,
    plot_path,
    result_payload,
    save_figure,
    summarize,
    target_row,
    autocast_call,
    time_call,
    write_result,
)
from .memory import MemoryWorkload, measure_workload_memory

NAME = "video_scaling"
TITLE = "Video scaling (tiny model, streaming)"
FRAME_COUNTS = (8, 32, 128)
QUICK_FRAME_COUNTS = (4, 8)
# memory only (not timed): shows that the memory stays flat once SAM2's memory windows are full
PLATEAU_FRAME_COUNTS = (512,)
MEMORY_REPEATS = 2
TIME_LIMIT = 1.10
MEMORY_LIMIT = 1.10
PROMPT = "Please segment the red circle that moves left."
ANSWER = "Sure, it is [SEG]."
CPU_REPEATS, GPU_REPEATS, QUICK_REPEATS = 5, 10, 1


class SyntheticVideo:
    """A lazy video: frame `i` is generated when read (`(3, S, S)`, standard-normal values from seed + i), so no
    frame exists before SAM2 asks for it and none is kept after."""

    def __init__(self, num_frames: int, image_size: int = TINY_SAM2_IMAGE_SIZE, seed: int = 0, dtype=torch.float32):
        if num_frames < 1:
            raise ValueError(f"num_frames={num_frames} must be >= 1")
        self.num_frames = num_frames
        self.image_size = image_size
        self.seed = seed
        self.dtype = dtype

    def __len__(self) -> int:
        return self.num_frames

    def __getitem__(self, index: int) -> torch.Tensor:
        if not 0 <= index < self.num_frames:
            raise IndexError(f"frame {index} is outside the video of {self.num_frames} frames")
        generator = torch.Generator().manual_seed(self.seed * 100_003 + index)
        return torch.randn(3, self.image_size, self.image_size, generator=generator).to(self.dtype)


def prompt_inputs(tokenizer, settings: BenchSettings, num_key_frames: int = 1) -> dict[str, Any]:
    """Prompt ids (one `<img>` block per key frame, as the contract's video layout), the VLM tiles and the forced
    answer's token ids."""
    blocks = "".join(
        f"Frame{index + 1}: <img>" + "<IMG_CONTEXT>" * TINY_IMAGE_SEQ_LENGTH + "</img>\n" for index in range(num_key_frames)
    )
    text = f"<|im_start|>user\n{blocks}{PROMPT}<|im_end|>\n<|im_start|>assistant\n"
    encoded = tokenizer(text, return_tensors="pt")
    generator = torch.Generator().manual_seed(settings.seed)
    pixel_values = torch.randn(num_key_frames, 3, TINY_VLM_IMAGE_SIZE, TINY_VLM_IMAGE_SIZE, generator=generator)
    return {
        "input_ids": encoded.input_ids.to(settings.device),
        "attention_mask": encoded.attention_mask.to(settings.device),
        "pixel_values": pixel_values.to(device=settings.device, dtype=settings.weight_dtype),
        "answer_ids": [tokenizer(ANSWER).input_ids],
    }


def build_model(settings: BenchSettings):
    model, tokenizer = build_tiny_model(seed=settings.seed)
    with torch.no_grad():
        model.cma.gamma.fill_(0.5)  # a CMA that changes the embedding (γ = 0 would skip nothing, but stay honest)
    return model.to(device=settings.device, dtype=settings.weight_dtype).eval(), tokenizer


def start_stream(model, inputs: dict[str, Any], num_frames: int, settings: BenchSettings):
    """The VLM answers; returns the not yet consumed `VideoSegmentationStream`."""
    video = SyntheticVideo(num_frames, model.sam2.config.image_size, settings.seed, settings.weight_dtype)
    with torch.inference_mode():
        return model.segment(
            input_ids=inputs["input_ids"],
            attention_mask=inputs["attention_mask"],
            pixel_values=inputs["pixel_values"],
            video_frames=video,
            key_frame_indices=[0],
            answer_ids=inputs["answer_ids"],
            stream=True,
        )


def consume(stream, frame_times: list[float] | None = None, device: str = "cpu") -> int:
    """Iterate the stream to the end, dropping every frame's masks; returns the number of frames."""
    count = 0
    with torch.inference_mode():
        iterator = iter(stream)
        while True:
            started = time.perf_counter()
            item = next(iterator, None)
            if item is None:
                break
            if device == "cuda":
                torch.cuda.synchronize()
            if frame_times is not None:
                frame_times.append(time.perf_counter() - started)
            count += 1
            del item
    return count


def build_video_workload(params: dict[str, Any], settings: BenchSettings) -> Callable[[], int]:
    """Memory-probe builder: `params = {"num_frames"}`; the call segments the whole video (answer + frames)."""
    model, tokenizer = build_model(settings)
    inputs = prompt_inputs(tokenizer, settings)
    num_frames = int(params["num_frames"])

    def call() -> int:
        return consume(start_stream(model, inputs, num_frames, settings), device=settings.device)

    return call


def measure(
    settings: BenchSettings, frame_counts: tuple[int, ...], repeats: int, plateau_counts: tuple[int, ...] = ()
) -> dict[str, Any]:
    model, tokenizer = build_model(settings)
    inputs = prompt_inputs(tokenizer, settings)
    stream_seconds = {count: [] for count in frame_counts}
    answer_seconds = {count: [] for count in frame_counts}
    frame_seconds = {count: [] for count in frame_counts}
    from tqdm.auto import tqdm

    for round_index in tqdm(range(repeats + 1), desc=NAME, leave=False):  # round 0: warm-up, not recorded
        for count in frame_counts:
            holder = {}
            answer_time = time_call(autocast_call(
                lambda: holder.setdefault("stream", start_stream(model, inputs, count, settings)),
                settings.device, settings.autocast_dtype), settings.device)
            per_frame: list[float] = []
            frames_seen = {}
            total = time_call(autocast_call(
                lambda: frames_seen.setdefault("n", consume(holder["stream"], per_frame, settings.device)),
                settings.device, settings.autocast_dtype), settings.device)
            if frames_seen["n"] != count:
                raise RuntimeError(f"the stream yielded {frames_seen['n']} frames for a video of {count}")
            if round_index > 0:
                stream_seconds[count].append(total)
                answer_seconds[count].append(answer_time)
                frame_seconds[count].extend(per_frame)
    del model
    memory = {}
    for count in frame_counts + plateau_counts:
        workload = MemoryWorkload(module="benchmarks.bench_video_scaling", builder="build_video_workload",
                                  params={"num_frames": count})
        memory[str(count)] = measure_workload_memory(workload, settings, repeats=MEMORY_REPEATS, warmup=1)
    per_frame_means = {count: [total / count for total in stream_seconds[count]] for count in frame_counts}
    summaries = {str(count): summarize(per_frame_means[count]) for count in frame_counts}
    medians = {count: summaries[str(count)]["median"] for count in frame_counts}
    shortest, longest = frame_counts[0], frame_counts[-1]
    return {
        "stream_seconds": {str(count): values for count, values in stream_seconds.items()},
        "answer_seconds": {str(count): summarize(values) for count, values in answer_seconds.items()},
        "time_per_frame_s": {str(count): values for count, values in per_frame_means.items()},
        "time_per_frame_summary_s": summaries,
        "single_frame_step_summary_s": {str(count): summarize(values) for count, values in frame_seconds.items()},
        "time_per_frame_max_over_min": max(medians.values()) / min(medians.values()),
        "time_per_frame_ratio_longest_vs_shortest": compare(per_frame_means[longest], per_frame_means[shortest]),
        "memory": memory,
        "memory_ratio_longest_vs_shortest_increment": memory[str(longest)]["delta_bytes"]
        / max(memory[str(shortest)]["delta_bytes"], 1),
        "memory_ratio_longest_vs_shortest_peak": memory[str(longest)]["peak_bytes"] / memory[str(shortest)]["peak_bytes"],
        "memory_ratio_plateau_vs_longest_increment": {
            str(count): memory[str(count)]["delta_bytes"] / max(memory[str(longest)]["delta_bytes"], 1)
            for count in plateau_counts
        },
    }


def targets_from(results: dict[str, Any], frame_counts: tuple[int, ...]) -> list[dict[str, Any]]:
    counts = ", ".join(str(count) for count in frame_counts)
    return [
        target_row(f"time per frame, max / min over {counts} frames", f"≤ {TIME_LIMIT}× (flat within 10 %)",
                   results["time_per_frame_max_over_min"], TIME_LIMIT),
        target_row(f"peak memory added by the video run, {frame_counts[-1]} / {frame_counts[0]} frames",
                   f"≤ {MEMORY_LIMIT}× (+≤ 10 %)", results["memory_ratio_longest_vs_shortest_increment"], MEMORY_LIMIT),
    ]


def plot(payload: dict[str, Any], path) -> None:
    results = payload["results"]
    counts = [int(count) for count in payload["settings"]["frame_counts"]]
    figure, (time_axis, memory_axis) = new_figure(columns=2)
    summaries = results["time_per_frame_summary_s"]
    medians = [summaries[str(c)]["median"] * 1e3 for c in counts]
    lows = [summaries[str(c)]["min"] * 1e3 for c in counts]
    highs = [summaries[str(c)]["max"] * 1e3 for c in counts]
    time_axis.errorbar(counts, medians, yerr=[[m - lo for m, lo in zip(medians, lows)],
                                              [hi - m for m, hi in zip(medians, highs)]], fmt="o-", capsize=3)
    time_axis.axhspan(min(medians), min(medians) * TIME_LIMIT, color="green", alpha=0.15, label="target band (+10 %)")
    time_axis.set_xscale("log", base=2)
    time_axis.set_xlabel("frames")
    time_axis.set_ylabel("time per frame [ms] (bars: min–max)")
    time_axis.set_ylim(bottom=0)
    time_axis.legend(fontsize=7)
    memory_counts = counts + [int(c) for c in payload["settings"].get("memory_only_frame_counts", [])]
    deltas = [results["memory"][str(c)]["delta_bytes"] / 2**20 for c in memory_counts]
    peaks = [results["memory"][str(c)]["peak_bytes"] / 2**20 for c in memory_counts]
    memory_axis.plot(memory_counts, deltas, "o-", color="tab:blue", label="added by the video run (left)")
    memory_axis.axhspan(deltas[0], deltas[0] * MEMORY_LIMIT, color="green", alpha=0.15, label="target band (+10 %)")
    memory_axis.set_xscale("log", base=2)
    memory_axis.set_xlabel("frames")
    memory_axis.set_ylabel("memory added by the run [MiB]")
    memory_axis.set_ylim(bottom=0, top=max(deltas) * 1.5)
    peak_axis = memory_axis.twinx()
    peak_axis.plot(memory_counts, peaks, "s--", color="tab:orange", label="peak incl. model and runtime (right)")
    peak_axis.set_ylabel("peak memory [MiB]")
    peak_axis.set_ylim(bottom=0, top=max(peaks) * 1.2)
    lines = memory_axis.get_legend_handles_labels()
    peak_lines = peak_axis.get_legend_handles_labels()
    memory_axis.legend(lines[0] + peak_lines[0], lines[1] + peak_lines[1], fontsize=7, loc="lower right")
    figure.suptitle(f"{TITLE} — {machine_caption(payload)}", fontsize=8)
    save_figure(figure, path)


def run(settings: BenchSettings) -> dict[str, Any]:
    """Run the benchmark, write `video_scaling.json` and `.png` to `settings.output_dir`, return the payload."""
    started = time.perf_counter()
    settings.apply()
    frame_counts = QUICK_FRAME_COUNTS if settings.quick else FRAME_COUNTS
    if settings.quick:
        repeats = QUICK_REPEATS
    else:
        repeats = GPU_REPEATS if settings.device == "cuda" else CPU_REPEATS
    plateau_counts = () if settings.quick else PLATEAU_FRAME_COUNTS
    results = measure(settings, frame_counts, repeats, plateau_counts)
    payload = result_payload(
        NAME,
        settings,
        {"frame_counts": list(frame_counts), "memory_only_frame_counts": list(plateau_counts), "repeats": repeats,
         "memory_repeats": MEMORY_REPEATS, "key_frames": [0], "num_objects": 1,
         "sam2_input_size": TINY_SAM2_IMAGE_SIZE, "streaming": "segment(stream=True), lazy frames, bounded memory"},
        results,
        targets_from(results, frame_counts),
        [
            "Lengths are timed in interleaved rounds (1 warm-up round not recorded).",
            "time_per_frame = stream iteration time / frames; the VLM answer (answer_seconds) is excluded.",
            "Memory: peak of a full video run (answer + every frame) after one warm-up run, median of "
            f"{MEMORY_REPEATS} runs, each length in a fresh interpreter on CPU; the target uses delta_bytes, the "
            "memory the run adds to the loaded model. memory_only_frame_counts are measured (not timed) to show "
            "where the memory levels off.",
        ],
        started,
    )
    write_result(payload, settings.output_dir)
    plot(payload, plot_path(settings.output_dir, NAME))
    return payload
