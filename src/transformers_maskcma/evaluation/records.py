"""Reading what the evaluation needs from dataset records (the format of :mod:`transformers_maskcma.data.schema`)
without decoding any frame: the ground-truth union per frame, the frame size, the ReVOS foreground, frame names.

Every error names the sample id, so a bad record in a benchmark of thousands is found at once.
"""

from __future__ import annotations

import io
import json
from collections.abc import Iterator
from pathlib import Path

import datasets
import numpy as np
from PIL import Image

from ..data.errors import DataFormatError
from ..data.records import unpack_masks
from ..data.schema import decode_rle

__all__ = [
    "IMAGE_EXTENSIONS",
    "dataset_has_ground_truth",
    "foreground_areas",
    "foreground_frames",
    "frame_names",
    "frame_size",
    "ground_truth_counts",
    "ground_truth_frames",
    "has_ground_truth",
    "iter_undecoded",
    "parse_meta",
    ]

#: Extensions stripped from frame names when naming the PNG of a frame.
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp")


def iter_undecoded(dataset: datasets.Dataset, batch_size: int = 16) -> Iterator[dict]:
    """Iterate over the records with ``frames`` left as ``{"path", "bytes"}`` instead of decoded images (scoring
    never needs pixels, and decoding every frame of a video benchmark would dominate the time). Rows come in the
    dataset's order (``select``/``shuffle`` indices included)."""
    if "frames" not in dataset.column_names:
        raise ValueError(
            f"the dataset has no 'frames' column (columns: {dataset.column_names}); expected records in the format "
            "of transformers_maskcma.data.schema.RECORD_FEATURES"
        )
    for batch in dataset.with_format("arrow").iter(batch_size=batch_size):
        yield from batch.to_pylist()


def parse_meta(record: dict) -> dict:
    """The record's ``meta`` JSON as a dict (``{}`` when empty)."""
    raw = record.get("meta") or "{}"
    try:
        meta = json.loads(raw)
    except json.JSONDecodeError as error:
        raise DataFormatError(f"sample {record.get('sample_id')!r}: meta is not valid JSON ({error.msg})") from None
    if not isinstance(meta, dict):
        raise DataFormatError(f"sample {record.get('sample_id')!r}: meta must be a JSON object, got {type(meta).__name__}")
    return meta


def has_ground_truth(meta: dict) -> bool:
    """``False`` for records of splits whose masks are withheld (``meta["has_masks"] = false``)."""
    return bool(meta.get("has_masks", True))


def dataset_has_ground_truth(dataset: datasets.Dataset) -> bool:
    """Whether any record of ``dataset`` has ground-truth masks (``False`` for a split scored by a server)."""
    return any(
        has_ground_truth(parse_meta({"sample_id": sample_id, "meta": meta}))
        for sample_id, meta in zip(dataset["sample_id"], dataset["meta"])
    )


def _header_size(frame) -> tuple[int, int]:
    """``(height, width)`` of an undecoded (``{"path", "bytes"}``) or decoded (PIL) frame, reading the header only."""
    if isinstance(frame, Image.Image):
        return frame.height, frame.width
    if frame.get("bytes"):
        source = io.BytesIO(frame["bytes"])
    elif frame.get("path"):
        source = frame["path"]
    else:
        raise DataFormatError(f"a frame has neither bytes nor a path: {frame!r:.200}")
    try:
        with Image.open(source) as image:
            return image.height, image.width
    except FileNotFoundError:
        raise FileNotFoundError(f"frame not found: {source}") from None


def frame_size(record: dict) -> tuple[int, int]:
    """``(height, width)`` of the record's frames, from the header of its first frame."""
    if len(record["frames"]) == 0:
        raise DataFormatError(f"sample {record['sample_id']!r} has no frames; an expression with no frames cannot be scored")
    return _header_size(record["frames"][0])


def _decode_checked(rle: dict, size: tuple[int, int], where: str) -> np.ndarray:
    return decode_rle(rle, expected_size=size, where=where)


def ground_truth_frames(record: dict, size: tuple[int, int]) -> np.ndarray:
    """Union of the record's objects in every frame.

    Args:
        record: a record with ``masks[object][frame]`` RLEs.
        size: ``(height, width)`` of the frames.

    Returns:
        ``bool`` array of shape ``(num_frames, height, width)``; all false for a record without objects.
    """
    sample_id = record["sample_id"]
    num_frames = len(record["frames"])
    union = np.zeros((num_frames, *size), dtype=bool)
    for index, frames in enumerate(unpack_masks(record["masks"])):
        if len(frames) != num_frames:
            raise DataFormatError(
                f"sample {sample_id!r}: object {index} has {len(frames)} masks for {num_frames} frames"
            )
        for frame, rle in enumerate(frames):
            union[frame] |= _decode_checked(rle, size, f"sample {sample_id!r} object {index} frame {frame}")
    return union


def ground_truth_counts(record: dict, meta: dict, size: tuple[int, int]) -> np.ndarray:
    """How many of the record's objects cover each pixel of each frame: the ground truth of the official ReVOS
    scorers (the sum of the objects' masks).

    Records loaded with ``multi_object="separate"`` hold every object: their masks are summed. Records with one
    union target (the default) carry the pixels shared by several objects in ``meta["overlap"]`` (``{frame:
    [RLE of >= 2 objects, >= 3, ...]}``): the count is the union plus one per level.

    Returns:
        ``uint8`` array of shape ``(num_frames, height, width)``.
    """
    sample_id = record["sample_id"]
    num_frames = len(record["frames"])
    objects = unpack_masks(record["masks"])
    counts = np.zeros((num_frames, *size), dtype=np.uint8)
    for index, frames in enumerate(objects):
        if len(frames) != num_frames:
            raise DataFormatError(f"sample {sample_id!r}: object {index} has {len(frames)} masks for {num_frames} frames")
        for frame, rle in enumerate(frames):
            counts[frame] += _decode_checked(rle, size, f"sample {sample_id!r} object {index} frame {frame}")
    overlap = meta.get("overlap") or {}
    if overlap and len(objects) != 1:
        raise DataFormatError(
            f"sample {sample_id!r}: meta['overlap'] belongs to a single union target but the record has "
            f"{len(objects)} objects"
        )
    for frame_key, levels in overlap.items():
        frame = int(frame_key)
        if not 0 <= frame < num_frames:
            raise DataFormatError(f"sample {sample_id!r}: meta['overlap'] names frame {frame} of {num_frames}")
        for level, rle in enumerate(levels, start=2):
            counts[frame] += _decode_checked(rle, size, f"sample {sample_id!r} overlap level {level} frame {frame}")
    return counts


def foreground_areas(meta: dict, foreground: np.ndarray) -> np.ndarray:
    """The official ReVOS foreground sum of each frame: ``meta["foreground_area"]`` when the foreground file listed
    the objects separately (overlaps counted once per object), else the pixel count of ``foreground``.

    Returns:
        ``int64`` array of shape ``(num_frames,)``.
    """
    areas = meta.get("foreground_area")
    if areas is None:
        return np.count_nonzero(foreground, axis=(-2, -1)).astype(np.int64)
    if len(areas) != foreground.shape[0]:
        raise DataFormatError(f"meta['foreground_area'] has {len(areas)} values for {foreground.shape[0]} frames")
    return np.asarray(areas, dtype=np.int64)


def foreground_frames(record: dict, meta: dict, size: tuple[int, int]) -> np.ndarray:
    """The union of all annotated objects of each frame (ReVOS ``R``), from ``meta["foreground"]``.

    Returns:
        ``bool`` array of shape ``(num_frames, height, width)``.
    """
    sample_id = record["sample_id"]
    rles = meta.get("foreground")
    if rles is None:
        raise DataFormatError(
            f"sample {sample_id!r}: ReVOS R needs meta['foreground'] (the per-frame union of all objects of the "
            "video); load the split with transformers_maskcma.data.load_revos(..., include_foreground=True)"
        )
    num_frames = len(record["frames"])
    if len(rles) != num_frames:
        raise DataFormatError(f"sample {sample_id!r}: meta['foreground'] has {len(rles)} masks for {num_frames} frames")
    return np.stack(
        [_decode_checked(rle, size, f"sample {sample_id!r} foreground frame {frame}") for frame, rle in enumerate(rles)]
    )


def frame_names(record: dict, meta: dict) -> list[str]:
    """Names of the record's frames without extension (``"00000"``): ``meta["frame_names"]``, else the stems of the
    frame file paths."""
    names = meta.get("frame_names")
    if names is None:
        paths = [frame.get("path") if isinstance(frame, dict) else getattr(frame, "filename", None) for frame in record["frames"]]
        if not all(paths):
            raise DataFormatError(
                f"sample {record['sample_id']!r}: frame names are unknown (no meta['frame_names'] and the frames "
                "are stored as bytes); add meta['frame_names']"
            )
        names = [Path(path).name for path in paths]
    if len(names) != len(record["frames"]):
        raise DataFormatError(
            f"sample {record['sample_id']!r}: {len(names)} frame names for {len(record['frames'])} frames"
        )
    stripped = []
    for name in names:
        name = str(name)
        suffix = Path(name).suffix
        stripped.append(name[: -len(suffix)] if suffix.lower() in IMAGE_EXTENSIONS else name)
    return stripped
