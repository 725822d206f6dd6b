"""Benchmark 4 — training step: tokens/s and peak memory of one optimiser step of the tiny model.

Variants (same weights, same batch, timed in interleaved rounds):

- `full`: the default trainable set (everything except SAM2's image encoder/memory and the vision tower, which
  `MaskCMAModel` freezes), the LLM trained in full;
- `lora`: `trainer.lora.apply_lora` with the recipe's target modules (LoRA on the LLM's attention and MLP
  projections; CMA, `seg_proj`, `text_proj`, SAM2's mask decoder trained in full; the ``[SEG]`` token rows);
- `lora_gc`: the same plus gradient checkpointing (non-reentrant) on the VLM's layers.

A step is what `MaskCMATrainer` does per batch: forward with ground-truth masks, loss = LM + mask BCE/Dice +
`tmc_weight` · TMC, backward, gradient clipping at 1.0, AdamW (lr 4e-5, weight decay 0.05), zero_grad.
The recipe's LoRA rank 128 exceeds the tiny LLM's width (64), so the tiny benchmark uses r = 16, alpha = 32 (the
recipe's alpha / r = 2). Tokens/s counts the attended tokens of the batch (prompt, image tokens and answer).
No target is set by the issue; the table reports the ratios to `full`.
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
    time_interleaved,
    write_result,
)
from .memory import MemoryWorkload, measure_workload_memory

NAME = "training_step"
TITLE = "Training step (tiny model)"
VARIANTS = ("full", "lora", "lora_gc")
TINY_LORA = {"r": 16, "lora_alpha": 32, "lora_dropout": 0.05}
LEARNING_RATE, WEIGHT_DECAY, GRAD_CLIP = 4e-5, 0.05, 1.0
BATCH_PROMPTS = (
    "Please segment the red circle on the left.",
    "Can you segment the dog that runs?",
    "What is the blue square at the top in this image? Please respond with a segmentation mask.",
    "Segment the green triangle.",
)
ANSWER = "Sure, it is [SEG]."
CPU_REPEATS, GPU_REPEATS, QUICK_REPEATS = 20, 50, 2


def chat_text(prompt: str, answer: str | None) -> str:
    """The prompt layout of the model contract (one 64×64 tile → 16 image tokens)."""
    image_block = "<img>" + "<IMG_CONTEXT>" * TINY_IMAGE_SEQ_LENGTH + "</img>"
    text = f"<|im_start|>user\n{image_block}\n{prompt}<|im_end|>\n<|im_start|>assistant\n"
    return text if answer is None else text + f"{answer}<|im_end|>"


def make_batch(tokenizer, seed: int, device: str, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """A training batch of `len(BATCH_PROMPTS)` image samples, one ``[SEG]`` each, random images and GT masks.

    Returns the keyword arguments of `MaskCMAModel.forward` (`input_ids (B, L)`, `attention_mask`, `labels` on the
    answer tokens, `pixel_values (B, 3, 64, 64)`, `sam_pixel_values (B, 3, 128, 128)`, `gt_masks (B, 64, 64)`,
    `seg_object_ids (B,)`).
    """
    generator = torch.Generator().manual_seed(seed)
    texts = [chat_text(prompt, ANSWER) for prompt in BATCH_PROMPTS]
    encoded = tokenizer(texts, padding=True, return_tensors="pt")
    labels = torch.full_like(encoded.input_ids, -100)
    for row, prompt in enumerate(BATCH_PROMPTS):
        prompt_length = len(tokenizer(chat_text(prompt, None)).input_ids)
        length = int(encoded.attention_mask[row].sum())
        labels[row, prompt_length:length] = encoded.input_ids[row, prompt_length:length]
    batch_size = len(BATCH_PROMPTS)

    def image(*shape):
        return torch.randn(*shape, generator=generator).to(device=device, dtype=dtype)

    return {
        "input_ids": encoded.input_ids.to(device),
        "attention_mask": encoded.attention_mask.to(device),
        "labels": labels.to(device),
        "pixel_values": image(batch_size, 3, TINY_VLM_IMAGE_SIZE, TINY_VLM_IMAGE_SIZE),
        "sam_pixel_values": image(batch_size, 3, TINY_SAM2_IMAGE_SIZE, TINY_SAM2_IMAGE_SIZE),
        "gt_masks": (torch.rand(batch_size, 64, 64, generator=generator) > 0.6).to(device=device, dtype=dtype),
        "seg_object_ids": torch.zeros(batch_size, dtype=torch.long, device=device),
    }


def build_variant(variant: str, settings: BenchSettings) -> torch.nn.Module:
    """The tiny model prepared for one variant, in training mode."""
    from transformers_maskcma.trainer.lora import apply_lora, default_lora_config

    if variant not in VARIANTS:
        raise ValueError(f"unknown training variant {variant!r}; choose one of {list(VARIANTS)}")
    model, _ = build_tiny_model(seed=settings.seed)
    if variant == "lora_gc":
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    if variant in ("lora", "lora_gc"):
        model = apply_lora(model, default_lora_config(model, **TINY_LORA))
    model.to(device=settings.device, dtype=settings.weight_dtype)
    model.train()
    return model


def maskcma_config(model: torch.nn.Module):
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return base.config


def make_step(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> Callable[[], float]:
    """One optimiser step as `MaskCMATrainer` runs it; returns the loss."""
    trainable = [parameter for parameter in model.parameters() if parameter.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=LEARNING_RATE, weight_decay=WEIGHT_DECAY)

    def step() -> float:
        loss = model(**batch).loss  # every term, TMC included
        loss.backward()
        torch.nn.utils.clip_grad_norm_(trainable, GRAD_CLIP)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return float(loss.detach())

    return step


def build_step_workload(params: dict[str, Any], settings: BenchSettings) -> Callable[[], float]:
    """Memory-probe builder: `params = {"variant"}`. The warm-up step of the probe allocates the AdamW state, so
    the baseline holds weights + optimiser state and the increment is the step's activations and gradients."""
    model = build_variant(params["variant"], settings)
    tokenizer = build_tiny_model(seed=settings.seed)[1]
    batch = make_batch(tokenizer, settings.seed, settings.device, settings.weight_dtype)
    return make_step(model, batch)


def count_parameters(model: torch.nn.Module) -> dict[str, int]:
    """Total and trainable parameters, and how many modules run with activation checkpointing."""
    total = sum(parameter.numel() for parameter in model.parameters())
    trainable = sum(parameter.numel() for parameter in model.parameters() if parameter.requires_grad)
    checkpointed = sum(bool(getattr(module, "gradient_checkpointing", False)) for module in model.modules())
    return {"total": total, "trainable": trainable, "checkpointed_modules": checkpointed}


def run(settings: BenchSettings) -> dict[str, Any]:
    """Run the benchmark, write `training_step.json` and `.png` to `settings.output_dir`, return the payload."""
    started = time.perf_counter()
    settings.apply()
    if settings.quick:
        repeats = QUICK_REPEATS
    else:
        repeats = GPU_REPEATS if settings.device == "cuda" else CPU_REPEATS
    tokenizer = build_tiny_model(seed=settings.seed)[1]
    batch = make_batch(tokenizer, settings.seed, settings.device, settings.weight_dtype)
    tokens_per_step = int(batch["attention_mask"].sum())
    models = {variant: build_variant(variant, settings) for variant in VARIANTS}
    parameters = {variant: count_parameters(model) for variant, model in models.items()}
    steps = {variant: make_step(model, batch) for variant, model in models.items()}
    losses = {variant: step() for variant, step in steps.items()}  # first step of each: same weights, same loss
    timings = time_interleaved(steps, repeats=repeats, warmup=2, device=settings.device, autocast_dtype=settings.autocast_dtype, progress=NAME)
    del models, steps
    memory = {}
    for variant in VARIANTS:
        workload = MemoryWorkload(module="benchmarks.bench_training_step", builder="build_step_workload",
                                  params={"variant": variant})
        memory[variant] = measure_workload_memory(workload, settings, repeats=1, warmup=1)
    summaries = {variant: summarize(samples) for variant, samples in timings.items()}
    results = {
        "tokens_per_step": tokens_per_step,
        "batch_size": len(BATCH_PROMPTS),
        "sequence_length": int(batch["input_ids"].shape[1]),
        "parameters": parameters,
        "first_step_loss": losses,
        "timings_s": timings,
        "summary_s": summaries,
        "tokens_per_second": {variant: tokens_per_step / summaries[variant]["median"] for variant in VARIANTS},
        "time_ratio_vs_full": {variant: compare(timings[variant], timings["full"]) for variant in VARIANTS},
        "memory": memory,
        "memory_ratio_vs_full_peak": {
            variant: memory[variant]["peak_bytes"] / memory["full"]["peak_bytes"] for variant in VARIANTS
        },
        "memory_ratio_vs_full_increment": {
            variant: memory[variant]["delta_bytes"] / max(memory["full"]["delta_bytes"], 1) for variant in VARIANTS
        },
    }
    payload = result_payload(
        NAME,
        settings,
        {"variants": list(VARIANTS), "lora": TINY_LORA, "optimizer": {"name": "AdamW", "lr": LEARNING_RATE,
         "weight_decay": WEIGHT_DECAY, "grad_clip": GRAD_CLIP}, "repeats": repeats},
        results,
        [],
        [
            "Steps of the three variants are timed in the same rounds (2 warm-up rounds not recorded).",
            "Memory: peak of one step after one warm-up step (which creates the AdamW state), each variant in a "
            "fresh interpreter on CPU; peak_bytes includes weights and optimiser state, delta_bytes is the step's "
            "activations and gradients.",
            "No target: the issue asks for the numbers; the tiny LLM has 2 layers, so gradient checkpointing has "
            "little to save at this size.",
        ],
        started,
    )
    write_result(payload, settings.output_dir)
    plot(payload, plot_path(settings.output_dir, NAME))
    return payload


def plot(payload: dict[str, Any], path) -> None:
    results = payload["results"]
    figure, (speed_axis, memory_axis) = new_figure(columns=2)
    speeds = [results["tokens_per_second"][variant] for variant in VARIANTS]
    speed_axis.bar(VARIANTS, speeds, color=["tab:blue", "tab:orange", "tab:green"])
    speed_axis.set_ylabel("tokens / s (median step)")
    speed_axis.set_title(f"{results['tokens_per_step']} tokens per step")
    peaks = [results["memory"][variant]["peak_bytes"] / 2**20 for variant in VARIANTS]
    deltas = [results["memory"][variant]["delta_bytes"] / 2**20 for variant in VARIANTS]
    bars = memory_axis.bar(VARIANTS, deltas, color="tab:red")
    for bar, peak in zip(bars, peaks):
        memory_axis.annotate(f"peak {peak:.0f} MiB", (bar.get_x() + bar.get_width() / 2, bar.get_height()),
                             ha="center", va="bottom", fontsize=7)
    memory_axis.set_ylabel("memory added by the step [MiB]")
    memory_axis.set_ylim(top=max(deltas) * 1.2)
    memory_axis.set_title("step increment (label: peak incl. weights + AdamW state)", fontsize=9)
    figure.suptitle(f"{TITLE} — {machine_caption(payload)}", fontsize=8)
    save_figure(figure, path)
