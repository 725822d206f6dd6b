"""Drawing predicted masks: coloured, half-transparent overlays with outlines, and mask PNGs."""

from __future__ import annotations

import numpy as np
from PIL import Image

#: Overlay colours (RGB), one per object, repeating.
PALETTE: tuple[tuple[int, int, int], ...] = (
    (255, 56, 56),
    (56, 140, 255),
    (60, 220, 90),
    (255, 200, 40),
    (200, 70, 255),
    (40, 220, 230),
    (255, 130, 30),
    (255, 90, 200),
)


def mask_outline(mask: np.ndarray) -> np.ndarray:
    """Foreground pixels with a background 4-neighbour (or on the image border): the mask's boundary, `(H, W)` bool."""
    mask = mask.astype(bool)
    padded = np.pad(mask, 1, mode="constant", constant_values=False)
    interior = padded[:-2, 1:-1] & padded[2:, 1:-1] & padded[1:-1, :-2] & padded[1:-1, 2:]
    return mask & ~interior


def overlay_masks(image: Image.Image, masks: list[np.ndarray], alpha: float = 0.5) -> Image.Image:
    """Blend each mask's colour into the image (`alpha` over the mask) and draw its outline in full colour.

    Args:
        image: RGB image `(W, H)`.
        masks: `(H, W)` bool arrays, one per object (colour `PALETTE[k % len(PALETTE)]`).

    Returns:
        A new RGB image.
    """
    canvas = np.asarray(image.convert("RGB"), dtype=np.float32).copy()
    for index, mask in enumerate(masks):
        mask = np.asarray(mask, dtype=bool)
        if mask.shape != canvas.shape[:2]:
            raise ValueError(f"mask {index} has shape {mask.shape} but the image is {canvas.shape[:2]} (height, width)")
        colour = np.array(PALETTE[index % len(PALETTE)], dtype=np.float32)
        canvas[mask] = (1.0 - alpha) * canvas[mask] + alpha * colour
        canvas[mask_outline(mask)] = colour
    return Image.fromarray(np.clip(np.round(canvas), 0, 255).astype(np.uint8))


def mask_to_image(mask: np.ndarray) -> Image.Image:
    """A bool mask `(H, W)` as a black-and-white (`L` mode, 0/255) PNG-ready image."""
    return Image.fromarray(np.asarray(mask, dtype=bool).astype(np.uint8) * 255)


__all__ = ["PALETTE", "mask_outline", "mask_to_image", "overlay_masks"]
