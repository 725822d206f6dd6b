"""Example inputs of the web demo, made from the package's bundled sample scenes (no download): two images and a
short clip of the sample shapes in which the red circle moves right."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
from PIL import Image

from ..processing.samples import ASSETS_DIR, draw_sample_shapes
from ..processing.visualize import write_video

#: (file in the package's assets, prompt)
IMAGE_EXAMPLES = (
    ("shapes.png", "Please segment the red circle."),
    ("shapes_two_circles.png", "Please segment the yellow circle."),
)
VIDEO_PROMPT = "Please segment the circle that moves right."
VIDEO_FRAMES = 12
VIDEO_FPS = 6.0
EXAMPLES_INDEX = "examples.json"


def moving_circle_frames(num_frames: int = VIDEO_FRAMES, step: int = 6) -> list[np.ndarray]:
    """The sample shapes with the red circle moving right by `step` px a frame, `(128, 192, 3)` uint8 frames."""
    base, masks = draw_sample_shapes("shapes")
    frames = []
    for t in range(num_frames):
        frame = np.asarray(base).copy()
        frame[masks["red circle"]] = 128
        frame[np.roll(masks["red circle"], step * t, axis=1)] = (220, 40, 40)
        frames.append(frame)
    return frames


def write_examples(folder: str | Path) -> Path:
    """Write the example files and `examples.json` (`[{"file", "prompt"}]`, read by `ui.read_examples`) into
    `folder`; returns `folder`."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    entries = []
    for name, prompt in IMAGE_EXAMPLES:
        shutil.copyfile(ASSETS_DIR / name, folder / name)
        entries.append({"file": name, "prompt": prompt})
    video = write_video((Image.fromarray(f) for f in moving_circle_frames()), folder / "moving_circle", VIDEO_FPS)
    entries.append({"file": video.name, "prompt": VIDEO_PROMPT})
    (folder / EXAMPLES_INDEX).write_text(json.dumps(entries, indent=2) + "\n", encoding="utf-8")
    return folder
