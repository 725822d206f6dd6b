"""Sa2VA's input and output conventions computed independently with PIL and numpy (written from Sa2VA's documented
behaviour, not from this package's code): the references of tests/test_processor.py and tests/test_convert_sa2va.py."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def bfloat16_round(values) -> np.ndarray:
    """float32 → nearest bfloat16 (ties to even), computed on the bits: keep the upper 16 bits after rounding."""
    bits = np.asarray(values, dtype=np.float32).view(np.uint32).astype(np.uint64)
    rounded = ((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16) << 16
    return rounded.astype(np.uint32).view(np.float32)


def internvl_grid(width: int, height: int, tile: int, max_tiles: int) -> tuple[int, int]:
    """InternVL's dynamic tiling (Sa2VA's `dynamic_preprocess`): the (columns, rows) grid of 1..max_tiles tiles whose
    aspect ratio is nearest the image's, grids visited by tile count; on an equal distance a later grid wins when
    the image covers more than half of its area."""
    grids = sorted(
        {(c, r) for c in range(1, max_tiles + 1) for r in range(1, max_tiles + 1) if c * r <= max_tiles},
        key=lambda grid: (grid[0] * grid[1], grid),
    )
    best, best_distance = (1, 1), float("inf")
    for columns, rows in grids:
        distance = abs(width / height - columns / rows)
        if distance < best_distance:
            best, best_distance = (columns, rows), distance
        elif distance == best_distance and width * height > 0.5 * tile * tile * columns * rows:
            best = (columns, rows)
    return best


def internvl_tiles(image: Image.Image, tile: int, max_tiles: int) -> np.ndarray:
    """Sa2VA's VLM input of an image: resize (PIL's default filter) to the grid, crop the tiles row by row, add a
    thumbnail when there is more than one tile, scale to [0, 1] and normalise with ImageNet's mean/std."""
    columns, rows = internvl_grid(image.width, image.height, tile, max_tiles)
    resized = image.resize((columns * tile, rows * tile))
    tiles = [
        resized.crop((i % columns * tile, i // columns * tile, (i % columns + 1) * tile, (i // columns + 1) * tile))
        for i in range(columns * rows)
    ]
    if len(tiles) > 1:
        tiles.append(image.resize((tile, tile)))
    arrays = [(np.asarray(t, dtype=np.float32) / 255.0 - IMAGENET_MEAN) / IMAGENET_STD for t in tiles]
    return np.stack(arrays).transpose(0, 3, 1, 2)


def gradient_image(width: int, height: int, seed: int = 0) -> Image.Image:
    """A smooth image with noise (bicubic and bilinear resizes of it differ everywhere)."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width]
    base = np.stack([x * 255 / width, y * 255 / height, (x + y) * 127 / (width + height)], axis=-1)
    return Image.fromarray(np.clip(base + rng.normal(0, 20, base.shape), 0, 255).astype(np.uint8))


def sam2_reference(image: Image.Image, size: int, video: bool = False) -> np.ndarray:
    """Sa2VA's SAM2 input, `(3, size, size)` float32 holding bfloat16 values: the 8-bit image resized to `size`² with
    PIL's default filter (bicubic), then normalised with the ImageNet mean/std. An image is cast to bfloat16 before
    the normalisation, so every step is a bfloat16 operation (emulated here: float32, then rounded to bfloat16); a
    video frame is normalised in float32 and the result cast to bfloat16."""
    pixels = np.asarray(image.convert("RGB").resize((size, size)), dtype=np.float32)
    mean, std = np.asarray(IMAGENET_MEAN, dtype=np.float32), np.asarray(IMAGENET_STD, dtype=np.float32)
    if video:
        normalized = bfloat16_round((pixels / np.float32(255.0) - mean) / std)
    else:
        scaled = bfloat16_round(pixels / np.float32(255.0))
        normalized = bfloat16_round(bfloat16_round(scaled - bfloat16_round(mean)) / bfloat16_round(std))
    return normalized.transpose(2, 0, 1)


def sa2va_masks(low_res_logits: torch.Tensor, sam_size: int, height: int, width: int) -> torch.Tensor:
    """Sa2VA's masks: SAM2's low-resolution logits `(..., h, w)` bilinearly to `sam_size`² (as SAM2's video
    predictor returns them), bilinearly to the image size, then `sigmoid > 0.5`."""
    flat = low_res_logits.reshape(-1, 1, *low_res_logits.shape[-2:]).float()
    square = F.interpolate(flat, size=(sam_size, sam_size), mode="bilinear", align_corners=False)
    full = F.interpolate(square, size=(height, width), mode="bilinear", align_corners=False)
    return (full.sigmoid() > 0.5).reshape(*low_res_logits.shape[:-2], height, width)


def sa2va_prompt(content: str) -> str:
    """Sa2VA's chat turn for the user content (its `qwen_chat` instruction; no system turn)."""
    return f"<|im_start|>user\n{content}<|im_end|>\n<|im_start|>assistant\n"


def image_blocks(tiles_per_frame: list[int], tokens_per_tile: int) -> str:
    """Sa2VA's image text: per frame `<img>` + `<IMG_CONTEXT>`×(tokens per tile · tiles) + `</img>`, joined by new
    lines."""
    return "\n".join("<img>" + "<IMG_CONTEXT>" * (tokens_per_tile * tiles) + "</img>" for tiles in tiles_per_frame)
