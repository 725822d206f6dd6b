"""Benchmark 6 — one VLM pass: the whole `segment()` (processor to masks) against the former two-pass path and the floor.

`segment()` reads the ``[SEG]`` and prompt-token states from its own `generate` call (`after`). Before, it generated
the answer and then ran the whole VLM again — vision tower included — over prompt + answer to read them (`before`,
kept here as `two_pass_generate_answer`, the former code, for this benchmark only). The floor is the work no path
can avoid: one plain `generate` + one SAM2 image encode + the mask decoding (with the CMA) and the upsampling; it decodes
stand-in ``[SEG]`` and text-token embeddings of the real shapes, since it reads no state of the VLM.
Every variant starts from the PIL image and the prompt (the processor runs in each) and ends with the masks.

Model: InternVL2.5-1B-shaped VLM (InternViT-300M vision tower at 448 px, 256 tokens a tile; Qwen2.5-0.5B-shaped LLM)
and SAM2.1 Hiera-L at 1024 px, random weights, built from configs; the tiny tokenizer's ids (a subset of the LLM's
vocabulary). The answer is forced to `Sure, [SEG].` + end-of-sequence (6 new tokens). Image sizes: one tile (a plain
resize to 448²) and InternVL's dynamic tiling at 12 tiles + a thumbnail (a 4:3 image, 13 × 256 image tokens).

Timing and peak memory come from the same calls: a 12-tile call takes minutes on one CPU thread, so a separate
memory round would double the run. glibc's page-size mmap threshold (see `benchmarks.memory`) is set before the first
call, in-process, for every variant alike.

Each call's wall-clock time and the CPU time of the process (`time.process_time`, all threads) are recorded. On a
CPU the target reads the CPU time: on a shared machine the wall-clock time of a call measures the neighbours' load
(our first run's three 1-tile calls took 587, 325 and 272 s while the load average fell from 16 to 7); with one
thread the CPU time does not see them. On a GPU it reads the wall-clock time.

Target: `after` / floor ≤ 1.1× at both tile counts.
"""

from __future__ import annotations

import statistics
import time
from typing import Any

import torch

from .common import (
    BenchSettings,
    compare,
    machine_caption,
    new_figure,
    plot_path,
    result_payload,
    save_figure,
    summarize,
    synchronize,
    target_row,
    write_result,
)
from .memory import current_rss_bytes, fix_malloc_thresholds, peak_rss_bytes, release_free_memory, reset_peak_rss

NAME = "one_pass"
TITLE = "One VLM pass: segment() vs the two-pass path and the floor"
VARIANTS = ("after", "floor", "before")
TILE_SETTINGS = {"1_tile": 1, "12_tiles": 12}
FORCED_ANSWER = "Sure, [SEG]."
PROMPT = "Please segment the red car on the left."
# (recorded rounds, warm-up rounds) per tile setting
# On a shared CPU a 12-tile round takes tens of minutes: one recorded round each, no warm-up round; the first call of
# the run is the one-pass `segment()` (`VARIANTS` order), so one-time costs count against it, not for it.
CPU_ROUNDS = {"1_tile": (2, 0), "12_tiles": (1, 0)}
GPU_ROUNDS = {"1_tile": (10, 2), "12_tiles": (10, 2)}
QUICK_ROUNDS = (2, 1)
TARGET_LIMIT = 1.1
IMAGE_SIZES = {"1_tile": (480, 640), "12_tiles": (1344, 1792)}  # (height, width); 4:3 → a 4×3 grid + thumbnail


# ------------------------------------------------------------------------------------------------------------
# the model
# ------------------------------------------------------------------------------------------------------------


def internvl_1b_vlm_config():
    """`InternVLConfig` of InternVL2.5-1B's shape: InternViT-300M-448px (24 layers, width 1024, 16 heads, MLP 4096,
    patch 14, layer norm, layer scale) + pixel shuffle 0.5 + Qwen2.5-0.5B (24 layers, width 896, 14 query / 2
    key-value heads, MLP 4864, vocabulary 151674, tied embeddings). Special-token ids are the tiny tokenizer's."""
    from transformers import InternVLConfig

    from transformers_maskcma.tiny import TINY_IMAGE_TOKEN_ID, TINY_PAD_TOKEN_ID

    return InternVLConfig(
        vision_config={
            "hidden_size": 1024,
            "num_hidden_layers": 24,
            "num_attention_heads": 16,
            "intermediate_size": 4096,
            "image_size": [448, 448],
            "patch_size": [14, 14],
            "use_qk_norm": False,
            "norm_type": "layer_norm",
            "layer_scale_init_value": 0.1,
        },
        text_config={
            "model_type": "qwen2",
            "vocab_size": 151674,
            "hidden_size": 896,
            "intermediate_size": 4864,
            "num_hidden_layers": 24,
            "num_attention_heads": 14,
            "num_key_value_heads": 2,
            "max_position_embeddings": 32768,
            "rope_theta": 1000000.0,
            "rms_norm_eps": 1e-6,
            "tie_word_embeddings": True,
            "bos_token_id": None,
            "eos_token_id": 2,
            "pad_token_id": TINY_PAD_TOKEN_ID,
        },
        image_token_id=TINY_IMAGE_TOKEN_ID,
        image_seq_length=256,
        downsample_ratio=0.5,
        tie_word_embeddings=True,
    )


def build_bench_model(quick: bool, settings: BenchSettings):
    """`(model, tokenizer)`: the InternVL2.5-1B-shaped VLM + Hiera-L SAM2 (the tiny default in quick mode), random
    weights, eval mode, CMA γ = 0.5 so that the CMA really changes the embedding."""
    from transformers_maskcma.modeling import MaskCMAModel
    from transformers_maskcma.tiny import build_tiny_tokenizer, tiny_config

    from .sam2_sizes import official_hiera_sam2_config

    overrides = {} if quick else {"vlm_config": internvl_1b_vlm_config(), "sam2_config": official_hiera_sam2_config("hiera_large")}
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(settings.seed)
        model = MaskCMAModel(tiny_config(**overrides))
    with torch.no_grad():
        model.cma.gamma.fill_(0.5)
    tokenizer = build_tiny_tokenizer()
    model.vlm.generation_config.eos_token_id = tokenizer.eos_token_id
    model.vlm.generation_config.pad_token_id = tokenizer.pad_token_id
    return model.to(device=settings.device, dtype=settings.dtype).eval(), tokenizer


def bench_image(setting: str):
    """A deterministic RGB image of the setting's size (a gradient with a bright rectangle)."""
    from PIL import Image

    height, width = IMAGE_SIZES[setting]
    ys = torch.linspace(0, 1, height)[:, None].expand(height, width)
    xs = torch.linspace(0, 1, width)[None, :].expand(height, width)
    pixels = torch.stack([xs, ys, 1 - xs], dim=-1)
    pixels[height // 4 : height // 2, width // 8 : width // 3] = torch.tensor([0.9, 0.1, 0.1])
    return Image.fromarray((pixels * 255).round().to(torch.uint8).numpy())


# ------------------------------------------------------------------------------------------------------------
# the former two-pass path and the floor
# ------------------------------------------------------------------------------------------------------------


@torch.no_grad()
def two_pass_generate_answer(
    model, input_ids, attention_mask, max_new_tokens, pixel_values, text_token_mask, answer_ids=None, **generate_kwargs
):
    """The former `MaskCMAModel.generate_answer`: generate, then one more forward of the whole VLM (vision tower
    included, every layer's states returned) over prompt + answer to read the ``[SEG]`` and prompt-token states."""
    from transformers_maskcma.modeling.modeling_maskcma import forced_answer_generate_kwargs

    if answer_ids is not None:
        forced = forced_answer_generate_kwargs(answer_ids, input_ids.shape[1], model._eos_token_ids()[0])
        max_new_tokens = forced.pop("max_new_tokens")
        generate_kwargs = {**generate_kwargs, **forced}
    if answer_ids is not None:
        forced = forced_answer_generate_kwargs(answer_ids, input_ids.shape[1], model._eos_token_ids()[0])
        max_new_tokens = forced.pop("max_new_tokens")
        generate_kwargs = {**generate_kwargs, **forced}
    if attention_mask is None:
        attention_mask = torch.ones_like(input_ids)
    prompt_len = input_ids.shape[1]
    pad_id = model._pad_token_id()
    sequences = model.vlm.generate(
        input_ids=input_ids,
        attention_mask=attention_mask,
        pixel_values=pixel_values,
        max_new_tokens=max_new_tokens,
        do_sample=generate_kwargs.pop("do_sample", False),
        pad_token_id=pad_id,
        **generate_kwargs,
    )
    answer_ids = sequences[:, prompt_len:]
    answer_mask = model._answer_mask(answer_ids)
    full_mask = torch.cat([attention_mask, answer_mask.to(attention_mask.dtype)], dim=1)
    full_ids = torch.cat([input_ids, answer_ids.masked_fill(~answer_mask, pad_id)], dim=1)
    outputs = model.vlm(
        input_ids=full_ids, attention_mask=full_mask, pixel_values=pixel_values, output_hidden_states=True, return_dict=True
    )
    if text_token_mask is None:
        prompt_mask = model._prompt_text_mask(input_ids, attention_mask, None, None)
    else:
        prompt_mask = text_token_mask.bool()
    full_text_mask = torch.cat([prompt_mask, torch.zeros_like(answer_mask)], dim=1)
    seg_ids = full_ids.clone()
    seg_ids[:, :prompt_len] = pad_id  # only [SEG] tokens of the answer decode masks
    seg_ids = seg_ids.masked_fill(~full_mask.bool(), pad_id)
    seg_embeds, seg_sample_index, text_tokens, text_mask = model.project_text_and_seg(
        outputs.hidden_states[-1], seg_ids, full_text_mask
    )
    from transformers_maskcma.modeling import MaskCMAAnswer

    return MaskCMAAnswer(
        answer_ids=[row[mask] for row, mask in zip(answer_ids, answer_mask)],
        seg_embeds=seg_embeds,
        seg_sample_index=seg_sample_index,
        text_tokens=text_tokens,
        text_token_mask=text_mask,
    )


def _vlm_inputs(inputs) -> dict:
    return {key: inputs[key] for key in ("input_ids", "attention_mask", "pixel_values", "text_token_mask")}


def variant_calls(model, processor, image, settings: BenchSettings) -> dict[str, Any]:
    """variant → zero-argument call from the PIL image to the masks, and the facts of the inputs."""
    from transformers_maskcma.modeling.modeling_maskcma import forced_answer_generate_kwargs

    device, dtype = settings.device, settings.dtype
    answer_ids = processor.tokenizer(FORCED_ANSWER, add_special_tokens=False).input_ids
    eos = processor.tokenizer.eos_token_id

    def prepare():
        inputs = processor(images=image, text=PROMPT)
        moved = {}
        for key, value in inputs.items():
            if isinstance(value, torch.Tensor):
                value = value.to(device)
                if value.is_floating_point():
                    value = value.to(dtype)
            moved[key] = value
        forced = forced_answer_generate_kwargs([answer_ids], moved["input_ids"].shape[1], eos)
        return moved, forced

    def after():
        inputs, forced = prepare()
        return model.segment(**inputs, **forced)

    def before():
        inputs, forced = prepare()
        max_new_tokens = forced.pop("max_new_tokens")
        answer = two_pass_generate_answer(model, **_vlm_inputs(inputs), max_new_tokens=max_new_tokens, **forced)
        return model.decode_answer_masks(answer, inputs["sam_pixel_values"], inputs["original_sizes"])

    inputs, forced = prepare()
    # the floor decodes stand-in [SEG] and text-token embeddings of the real shapes (their values do not change the
    # cost), so that it needs no state of the VLM
    generator = torch.Generator().manual_seed(settings.seed)
    embed_dim = model.config.seg_embed_dim
    num_text = int(inputs["text_token_mask"].sum())
    from transformers_maskcma.modeling import MaskCMAAnswer

    floor_answer = MaskCMAAnswer(
        answer_ids=[torch.tensor(answer_ids + [eos])],
        seg_embeds=torch.randn(1, embed_dim, generator=generator).to(device, dtype),
        seg_sample_index=torch.zeros(1, dtype=torch.long, device=device),
        text_tokens=torch.randn(1, num_text, embed_dim, generator=generator).to(device, dtype),
        text_token_mask=torch.ones(1, num_text, dtype=torch.bool, device=device),
    )

    @torch.no_grad()
    def floor():
        inputs, forced = prepare()
        model.vlm.generate(
            input_ids=inputs["input_ids"],
            attention_mask=inputs["attention_mask"],
            pixel_values=inputs["pixel_values"],
            do_sample=False,
            pad_token_id=model._pad_token_id(),
            **forced,
        )
        return model.decode_answer_masks(floor_answer, inputs["sam_pixel_values"], inputs["original_sizes"])

    facts = {
        "num_tiles": int(inputs["pixel_values"].shape[0]),
        "prompt_tokens": int(inputs["input_ids"].shape[1]),
        "answer": FORCED_ANSWER,
        "new_tokens": len(answer_ids) + 1,
        "image_size_hw": [image.height, image.width],
    }
    calls = {"after": after, "floor": floor, "before": before}
    return {name: calls[name] for name in VARIANTS}, facts


# ------------------------------------------------------------------------------------------------------------
# measurement
# ------------------------------------------------------------------------------------------------------------


def _memory_before_call(device: str) -> int:
    if device == "cuda":
        synchronize(device)
        torch.cuda.reset_peak_memory_stats()
        return torch.cuda.memory_allocated()
    release_free_memory()
    baseline = current_rss_bytes()
    reset_peak_rss()
    return baseline


def _memory_after_call(device: str) -> int:
    if device == "cuda":
        synchronize(device)
        return torch.cuda.max_memory_allocated()
    return peak_rss_bytes()


def time_and_memory_interleaved(
    variants: dict[str, Any], repeats: int, warmup: int, device: str
) -> tuple[dict[str, list[float]], dict[str, dict[str, list[int]]], dict[str, Any]]:
    """Rounds of every variant (as `common.time_interleaved`), with the CPU time and peak memory of each recorded call.

    Returns:
        `(timings, cpu_timings, memory, outputs)`: variant → `repeats` wall-clock durations in seconds; variant →
        `repeats` CPU times of the process (all threads) in seconds; variant → `{"baseline_bytes", "peak_bytes"}`
        lists (memory before the call, highest point during it); variant → what its last call returned.
    """
    if device == "cpu":
        fix_malloc_thresholds()
    timings: dict[str, list[float]] = {name: [] for name in variants}
    cpu_timings: dict[str, list[float]] = {name: [] for name in variants}
    memory: dict[str, dict[str, list[int]]] = {name: {"baseline_bytes": [], "peak_bytes": []} for name in variants}
    outputs: dict[str, Any] = {}
    for round_index in range(warmup + repeats):
        for name, function in variants.items():
            outputs.pop(name, None)
            baseline = _memory_before_call(device)
            synchronize(device)
            start, start_cpu = time.perf_counter(), time.process_time()
            outputs[name] = function()
            synchronize(device)
            duration, cpu_duration = time.perf_counter() - start, time.process_time() - start_cpu
            peak = _memory_after_call(device)
            if round_index >= warmup:
                timings[name].append(duration)
                cpu_timings[name].append(cpu_duration)
                memory[name]["baseline_bytes"].append(baseline)
                memory[name]["peak_bytes"].append(peak)
            print(
                f"[bench] {NAME}: round {round_index + 1}/{warmup + repeats} {name}: {duration:.2f} s "
                f"({cpu_duration:.2f} s CPU)",
                flush=True,
            )
    return timings, cpu_timings, memory, outputs


def _memory_summary(samples: dict[str, list[int]]) -> dict[str, Any]:
    deltas = [peak - base for peak, base in zip(samples["peak_bytes"], samples["baseline_bytes"])]
    return {
        "baseline_bytes": int(statistics.median(samples["baseline_bytes"])),
        "peak_bytes": int(statistics.median(samples["peak_bytes"])),
        "delta_bytes": int(statistics.median(deltas)),
        "samples": {**samples, "delta_bytes": deltas},
    }


def measure_setting(setting: str, model, tokenizer, settings: BenchSettings) -> dict[str, Any]:
    from transformers_maskcma.processing import MaskCMAProcessor

    if settings.quick:
        repeats, warmup = QUICK_ROUNDS
    else:
        repeats, warmup = (GPU_ROUNDS if settings.device == "cuda" else CPU_ROUNDS)[setting]
    processor = MaskCMAProcessor.from_model_config(model.config, tokenizer, max_image_tiles=TILE_SETTINGS[setting])
    calls, facts = variant_calls(model, processor, bench_image(setting), settings)
    timings, cpu_timings, memory_samples, outputs = time_and_memory_interleaved(
        calls, repeats, warmup, settings.device
    )
    memory = {name: _memory_summary(samples) for name, samples in memory_samples.items()}
    # the two paths give the same masks (outputs of the last round), up to pixels whose logit lies within float
    # rounding of the threshold
    after, before = outputs["after"], outputs["before"]
    answers_equal = all(
        torch.equal(a, b) for a, b in zip(after.answer_ids, before.answer_ids)
    )
    differing_pixels = int(sum((a != b).sum() for a, b in zip(before.masks, after.masks)))
    mask_pixels = int(sum(mask.numel() for mask in after.masks))
    max_logit_difference = float(max((a - b).abs().max() for a, b in zip(before.mask_logits, after.mask_logits)))
    del after, before
    del outputs
    return {
        **facts,
        "repeats": repeats,
        "warmup": warmup,
        "same_answers_before_after": answers_equal,
        "mask_pixels_differing_before_after": differing_pixels,
        "mask_pixels": mask_pixels,
        "max_mask_logit_difference_before_after": max_logit_difference,
        "timings_s": timings,
        "summary_s": {name: summarize(samples) for name, samples in timings.items()},
        "latency_ratio_after_vs_floor": compare(timings["after"], timings["floor"]),
        "latency_ratio_before_vs_floor": compare(timings["before"], timings["floor"]),
        "latency_ratio_after_vs_before": compare(timings["after"], timings["before"]),
        "cpu_seconds": cpu_timings,
        "cpu_summary_s": {name: summarize(samples) for name, samples in cpu_timings.items()},
        "cpu_ratio_after_vs_floor": compare(cpu_timings["after"], cpu_timings["floor"]),
        "cpu_ratio_before_vs_floor": compare(cpu_timings["before"], cpu_timings["floor"]),
        "cpu_ratio_after_vs_before": compare(cpu_timings["after"], cpu_timings["before"]),
        "primary_time": "cpu" if settings.device == "cpu" else "wall",
        "memory": memory,
        "memory_ratio_after_vs_floor_peak": memory["after"]["peak_bytes"] / memory["floor"]["peak_bytes"],
        "memory_ratio_before_vs_floor_peak": memory["before"]["peak_bytes"] / memory["floor"]["peak_bytes"],
        "memory_ratio_after_vs_floor_increment": memory["after"]["delta_bytes"] / max(memory["floor"]["delta_bytes"], 1),
        "memory_ratio_before_vs_floor_increment": memory["before"]["delta_bytes"] / max(memory["floor"]["delta_bytes"], 1),
    }


def primary_ratio(result: dict[str, Any], pair: str) -> dict[str, float]:
    """The ratio the target reads: CPU time of the process on CPU (wall-clock time there measures the neighbours on
    a shared machine), wall-clock time on GPU."""
    return result[f"cpu_ratio_{pair}" if result["primary_time"] == "cpu" else f"latency_ratio_{pair}"]


def targets_from(results: dict[str, Any]) -> list[dict[str, Any]]:
    rows = []
    for result in results.values():
        kind = "CPU time" if result["primary_time"] == "cpu" else "latency"
        rows.append(
            target_row(
                f"{kind}, segment() / floor (one generate + one SAM2 encode + decoding), {result['num_tiles']} "
                f"tile(s)",
                f"≤ {TARGET_LIMIT}×",
                primary_ratio(result, "after_vs_floor")["ratio_of_medians"],
                TARGET_LIMIT,
            )
        )
    return rows


def plot(payload: dict[str, Any], path) -> None:
    results = payload["results"]
    settings = list(results)
    figure, (latency_axis, memory_axis) = new_figure(columns=2)
    width = 0.27
    labels = {"floor": "floor (generate + SAM2)", "after": "segment(), one pass", "before": "two passes (former)"}
    for offset, variant in enumerate(VARIANTS):
        positions = [index + (offset - 1) * width for index in range(len(settings))]
        summary_key = {"cpu": "cpu_summary_s", "wall": "summary_s"}
        latency_axis.bar(positions, [results[s][summary_key[results[s]["primary_time"]]][variant]["median"]
                                     for s in settings], width, label=labels[variant])
        memory_axis.bar(positions, [results[s]["memory"][variant]["delta_bytes"] / 2**20 for s in settings], width,
                        label=labels[variant])
    tick_labels = [f"{results[s]['num_tiles']} tile(s)" for s in settings]
    latency_axis.set_xticks(range(len(settings)), tick_labels)
    latency_axis.set_ylabel("median time, processor to masks [s] (CPU time on CPU)")
    latency_axis.legend(fontsize=7)
    memory_axis.set_xticks(range(len(settings)), tick_labels)
    memory_axis.set_ylabel("memory added by the call [MiB]")
    memory_axis.legend(fontsize=7)
    figure.suptitle(f"{TITLE} — {machine_caption(payload)}", fontsize=8)
    save_figure(figure, path)


def run(settings: BenchSettings) -> dict[str, Any]:
    """Run the benchmark, write `one_pass.json` and `.png` to `settings.output_dir`, return the payload."""
    started = time.perf_counter()
    settings.apply()
    model, tokenizer = build_bench_model(settings.quick, settings)
    results: dict[str, Any] = {}
    for setting in TILE_SETTINGS:
        results[setting] = measure_setting(setting, model, tokenizer, settings)
        payload = _payload(settings, results, started)
        write_result(payload, settings.output_dir)  # after every setting: a long run keeps what it measured
        plot(payload, plot_path(settings.output_dir, NAME))
    return payload


def _payload(settings: BenchSettings, results: dict[str, Any], started: float) -> dict[str, Any]:
    return result_payload(
        NAME,
        settings,
        {
            "vlm": "tiny" if settings.quick else "InternVL2.5-1B-shaped (InternViT-300M + Qwen2.5-0.5B), random weights",
            "sam2": "tiny" if settings.quick else "SAM2.1 Hiera-L, 1024 px, random weights",
            "forced_answer": FORCED_ANSWER,
            "settings": list(results),
        },
        results,
        targets_from(results),
        [
            "Each variant runs from the PIL image to the masks; the three are timed in the same rounds.",
            "floor: processor, one plain generate, SAM2 encode, mask decoding (with the CMA) of stand-in [SEG] and "
            "text embeddings of the real shapes, upsampling; after: segment(); before: the former two-pass "
            "generate_answer (benchmarks/bench_one_pass.py), then the same mask decoding.",
            "Peak memory is read around the timed calls themselves (CPU: VmHWM with glibc's page-size mmap threshold, "
            "GPU: max_memory_allocated); peak includes the weights, increment is what the call adds.",
        ],
        started,
    )
