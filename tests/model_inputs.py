"""Hand-built model inputs for the tiny default (no processor), used by the model tests."""

from __future__ import annotations

import torch

from transformers_maskcma.tiny import (
    TINY_IMAGE_SEQ_LENGTH,
    TINY_SAM2_IMAGE_SIZE,
    TINY_VLM_IMAGE_SIZE,
)


def chat_text(prompt: str, answer: str | None) -> str:
    image_block = "<img>" + "<IMG_CONTEXT>" * TINY_IMAGE_SEQ_LENGTH + "</img>"
    text = f"<|im_start|>user\n{image_block}\n{prompt}<|im_end|>\n<|im_start|>assistant\n"
    if answer is not None:
        text += f"{answer}<|im_end|>"
    return text


def make_batch(tokenizer, prompts, answers, num_masks=None, seed: int = 0, with_labels: bool = True) -> dict:
    """A training batch: one image per sample, labels on the answer, random images and GT masks.

    Returns the keyword arguments of `MaskCMAModel.forward`.
    """
    generator = torch.Generator().manual_seed(seed)
    texts = [chat_text(p, a) for p, a in zip(prompts, answers)]
    encoded = tokenizer(texts, padding=True, return_tensors="pt")
    input_ids, attention_mask = encoded.input_ids, encoded.attention_mask
    labels = torch.full_like(input_ids, -100)
    if with_labels:
        for row, (prompt, answer) in enumerate(zip(prompts, answers)):
            prompt_len = len(tokenizer(chat_text(prompt, None)).input_ids)
            length = int(attention_mask[row].sum())
            labels[row, prompt_len:length] = input_ids[row, prompt_len:length]
    seg_count = int((input_ids == tokenizer.convert_tokens_to_ids("[SEG]")).sum())
    num_masks = seg_count if num_masks is None else num_masks
    batch = len(prompts)
    return {
        "input_ids": input_ids,
        "attention_mask": attention_mask,
        "labels": labels,
        "pixel_values": torch.randn(batch, 3, TINY_VLM_IMAGE_SIZE, TINY_VLM_IMAGE_SIZE, generator=generator),
        "sam_pixel_values": torch.randn(batch, 3, TINY_SAM2_IMAGE_SIZE, TINY_SAM2_IMAGE_SIZE, generator=generator),
        "gt_masks": (torch.rand(num_masks, 48, 48, generator=generator) > 0.6).float(),
    }
