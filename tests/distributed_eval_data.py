"""Benchmark folders of `maskcma evaluate` for the multi-process tests and the throughput benchmark: the answering
tiny model of tests/test_pipeline.py (trained to answer "Sure, [SEG]." and to segment the red circle) and two
splits in the custom JSONL format (docs/custom_data.md): images of the bundled sample scenes with one prompt per
shape, and clips of the moving circle."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from PIL import Image

from transformers_maskcma.processing.samples import SAMPLE_SCENES, draw_sample_shapes

IMAGE_SPLIT = "images"
VIDEO_SPLIT = "videos"


def _save_mask(mask: np.ndarray, path: Path) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(mask.astype(np.uint8) * 255).save(path)
    return str(path)


def write_image_split(root: Path, num_records: int) -> Path:
    """``num_records`` image records: each sample scene shifted by a few pixels, one prompt per shape (prompts of
    different lengths). Returns the JSONL file."""
    lines = []
    scenes = sorted(SAMPLE_SCENES)
    k = 0
    while len(lines) < num_records:
        scene = scenes[k % len(scenes)]
        image, masks = draw_sample_shapes(scene)
        shift = 3 * (k // len(scenes))
        pixels = np.roll(np.asarray(image), shift, axis=1)
        image_path = root / "images" / f"{k:03d}.png"
        image_path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(pixels).save(image_path)
        for name, mask in sorted(masks.items()):
            if len(lines) == num_records:
                break
            prompt = f"Please segment the {name}." if len(lines) % 2 == 0 else f"the {name}"
            mask_path = _save_mask(np.roll(mask, shift, axis=1), root / "masks" / f"{k:03d}_{name.replace(' ', '_')}.png")
            lines.append({"image": str(image_path), "prompt": prompt, "masks": [mask_path], "id": f"img{len(lines):03d}"})
        k += 1
    path = root / f"{IMAGE_SPLIT}.jsonl"
    path.write_text("".join(json.dumps(line) + "\n" for line in lines))
    return path


def write_video_split(root: Path, num_records: int, num_frames: int = 5) -> Path:
    """``num_records`` clips of the sample scene with the red circle moving right (each clip starting further
    right) and its masks per frame. Returns the JSONL file."""
    base, masks = draw_sample_shapes("shapes")
    lines = []
    for k in range(num_records):
        clip = root / "clips" / f"{k:03d}"
        clip.mkdir(parents=True, exist_ok=True)
        mask_paths = []
        for t in range(num_frames):
            frame = np.asarray(base).copy()
            frame[masks["red circle"]] = 128
            moved = np.roll(masks["red circle"], 4 * (t + k), axis=1)
            frame[moved] = (220, 40, 40)
            Image.fromarray(frame).save(clip / f"{t:03d}.png")
            mask_paths.append(_save_mask(moved, root / "clip_masks" / f"{k:03d}" / f"{t:03d}.png"))
        prompt = "Please segment the circle that moves right." if k % 2 == 0 else "the moving red circle"
        lines.append({"video_dir": str(clip), "prompt": prompt, "masks": [mask_paths], "id": f"clip{k:03d}"})
    path = root / f"{VIDEO_SPLIT}.jsonl"
    path.write_text("".join(json.dumps(line) + "\n" for line in lines))
    return path
