"""Bundled sample images (in `transformers_maskcma/assets/`) for demos and smoke tests: flat coloured shapes on a
grey background, drawn with PIL by `draw_sample_shapes` (the PNGs are its output)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

ASSETS_DIR = Path(__file__).resolve().parent.parent / "assets"

#: name → (size (width, height), background, shapes as (kind, colour name, RGB, bounding box))
SAMPLE_SCENES: dict[str, tuple[tuple[int, int], tuple[int, int, int], tuple]] = {
    "shapes": (
        (192, 128),
        (128, 128, 128),
        (
            ("circle", "red", (220, 40, 40), (14, 34, 74, 94)),
            ("square", "blue", (40, 80, 230), (84, 16, 132, 64)),
            ("triangle", "green", (40, 180, 60), (120, 60, 184, 120)),
        ),
    ),
    "shapes_two_circles": (
        (160, 120),
        (112, 112, 112),
        (
            ("circle", "yellow", (235, 210, 40), (10, 20, 60, 70)),
            ("circle", "purple", (150, 50, 210), (96, 50, 150, 104)),
            ("square", "orange", (245, 140, 25), (70, 8, 100, 38)),
        ),
    ),
}


def draw_sample_shapes(name: str = "shapes") -> tuple[Image.Image, dict[str, np.ndarray]]:
    """Draw a sample scene.

    Returns:
        `(image, masks)`: the RGB image and, per shape (keyed `"<colour> <kind>"`), its `(H, W)` bool mask.
    """
    if name not in SAMPLE_SCENES:
        raise ValueError(f"unknown sample {name!r}; available: {sorted(SAMPLE_SCENES)}")
    size, background, shapes = SAMPLE_SCENES[name]
    image = Image.new("RGB", size, background)
    draw = ImageDraw.Draw(image)
    masks = {}
    for kind, colour_name, rgb, box in shapes:
        mask_image = Image.new("L", size, 0)
        mask_draw = ImageDraw.Draw(mask_image)
        for target, fill in ((draw, rgb), (mask_draw, 255)):
            if kind == "circle":
                target.ellipse(box, fill=fill)
            elif kind == "square":
                target.rectangle(box, fill=fill)
            else:
                left, top, right, bottom = box
                target.polygon([((left + right) // 2, top), (right, bottom), (left, bottom)], fill=fill)
        masks[f"{colour_name} {kind}"] = np.asarray(mask_image) > 0
    return image, masks


def sample_image_path(name: str = "shapes") -> Path:
    """Path of a bundled sample PNG (`"shapes"` or `"shapes_two_circles"`)."""
    path = ASSETS_DIR / f"{name}.png"
    if not path.is_file():
        raise FileNotFoundError(f"sample image {str(path)!r} is missing; available: {sorted(SAMPLE_SCENES)}")
    return path


__all__ = ["ASSETS_DIR", "SAMPLE_SCENES", "draw_sample_shapes", "sample_image_path"]
