"""Helpers shared by the loaders: reading annotation files with named errors, converting COCO segmentations to
the record's RLE, and building a `datasets.Dataset` of records lazily from a generator.

Frames are always stored as absolute file paths in the ``frames`` column, so `datasets.Image` decodes them only
when a row is read; a loader never opens more than an image header (to check mask sizes).
"""

from __future__ import annotations

import json
import logging
import os
import pickle
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

import datasets
import numpy as np
from PIL import Image
from pycocotools import mask as coco_mask

from .errors import DataFormatError, EmptyDatasetError, EmptyMediaError, MalformedJSONError, MaskSizeError
from .schema import RECORD_FEATURES, check_rle, decode_rle, encode_rle

logger = logging.getLogger(__name__)

PathLike = str | os.PathLike

# Bump when the records a loader yields change for the same input files, so cached Arrow files are rebuilt.
LOADER_FORMAT_VERSION = "1"


# ----------------------------------------------------------------------------------------------------------------
# files


def require_file(path: PathLike, what: str, hint: str = "") -> Path:
    """Return ``path`` as a `Path` if it is an existing file, else raise `FileNotFoundError` naming ``what``."""
    path = Path(path)
    if not path.is_file():
        suffix = f" {hint}" if hint else ""
        raise FileNotFoundError(f"{what} not found: {path}{suffix}")
    return path


def require_dir(path: PathLike, what: str, hint: str = "") -> Path:
    """Return ``path`` as a `Path` if it is an existing folder, else raise `FileNotFoundError` naming ``what``."""
    path = Path(path)
    if not path.is_dir():
        suffix = f" {hint}" if hint else ""
        raise FileNotFoundError(f"{what} folder not found: {path}{suffix}")
    return path


def first_existing(candidates: Sequence[PathLike], what: str, hint: str = "", kind: str = "any") -> Path:
    """Return the first of ``candidates`` that exists (``kind`` is ``"file"``, ``"dir"`` or ``"any"``), else raise
    `FileNotFoundError` listing every path that was tried."""
    checks = {"file": os.path.isfile, "dir": os.path.isdir, "any": os.path.exists}
    for candidate in candidates:
        if checks[kind](candidate):
            return Path(candidate)
    tried = "\n  ".join(str(c) for c in candidates)
    suffix = f"\n{hint}" if hint else ""
    raise FileNotFoundError(f"{what} not found; looked for:\n  {tried}{suffix}")


def read_json(path: PathLike, what: str = "annotation file") -> Any:
    """Parse a JSON file. A missing file raises `FileNotFoundError`; a malformed one raises `MalformedJSONError`
    with the path, line, column and character offset of the parse error."""
    path = require_file(path, what)
    with open(path, encoding="utf-8") as handle:
        try:
            return json.load(handle)
        except json.JSONDecodeError as error:
            raise MalformedJSONError(
                f"{path}: malformed JSON at line {error.lineno} column {error.colno} (char {error.pos}): "
                f"{error.msg}. Fix or re-download the file."
            ) from None


def parse_json_line(line: str, path: PathLike, line_number: int) -> Any:
    """Parse one line of a JSONL file; errors name the file, the line and the column."""
    try:
        return json.loads(line)
    except json.JSONDecodeError as error:
        raise MalformedJSONError(
            f"{path}: malformed JSON on line {line_number} column {error.colno} (char {error.pos} of the line): "
            f"{error.msg}"
        ) from None


def read_pickle(path: PathLike, what: str) -> Any:
    """Unpickle a file (RefCOCO ``refs(*).p``, Sa2VA ``mask_dict.pkl``); Python 2 pickles load with latin-1 strings."""
    path = require_file(path, what)
    with open(path, "rb") as handle:
        try:
            return pickle.load(handle, encoding="latin1")
        except (pickle.UnpicklingError, EOFError, AttributeError, ImportError, IndexError) as error:
            raise DataFormatError(f"{path}: cannot unpickle {what} ({type(error).__name__}: {error})") from None


def file_signature(paths: Iterable[PathLike]) -> list[tuple[str, int, int]]:
    """``(absolute path, size, mtime_ns)`` of each existing file: part of a loader's cache key, so a changed
    annotation file invalidates the cached Arrow table."""
    signature = []
    for path in paths:
        if path is not None and os.path.exists(path):
            stat = os.stat(path)
            signature.append((os.path.abspath(path), stat.st_size, stat.st_mtime_ns))
    return signature


def image_size(path: PathLike) -> tuple[int, int]:
    """``(height, width)`` of an image file, read from its header only (no pixel decoding)."""
    try:
        with Image.open(path) as image:
            width, height = image.size
    except FileNotFoundError:
        raise FileNotFoundError(f"image or frame not found: {path}") from None
    except OSError as error:
        raise DataFormatError(f"{path}: not a readable image ({error})") from None
    return int(height), int(width)


def read_png_mask(path: PathLike, value: int | None = None) -> np.ndarray:
    """Read a PNG mask as a ``bool`` array of shape ``(height, width)``: foreground where the pixel is non-zero,
    or where it equals ``value`` (palette / instance-id PNGs such as DAVIS annotations). RGB(A) PNGs count a
    pixel as foreground when any channel is non-zero."""
    try:
        with Image.open(path) as image:
            array = np.asarray(image)
    except FileNotFoundError:
        raise FileNotFoundError(f"mask PNG not found: {path}") from None
    except OSError as error:
        raise DataFormatError(f"{path}: not a readable mask image ({error})") from None
    if array.ndim == 3:
        if value is not None:
            raise DataFormatError(f"{path}: a mask 'value' needs a single-channel (L or P mode) PNG, got {array.shape}")
        return array.any(axis=2)
    return array == value if value is not None else array != 0


# ----------------------------------------------------------------------------------------------------------------
# masks


def _rle_with_bytes(rle: dict) -> dict:
    counts = rle["counts"]
    if isinstance(counts, str):
        counts = counts.encode("ascii")
    return {"size": [int(rle["size"][0]), int(rle["size"][1])], "counts": counts}


def _rle_with_str(rle: dict) -> dict:
    counts = rle["counts"]
    if isinstance(counts, bytes):
        counts = counts.decode("ascii")
    return {"size": [int(rle["size"][0]), int(rle["size"][1])], "counts": counts}


def check_rle_size(rle: dict, size: tuple[int, int], where: str) -> None:
    """Raise `MaskSizeError` when ``rle["size"]`` differs from ``size`` = ``(height, width)``."""
    try:
        rle_size = (int(rle["size"][0]), int(rle["size"][1]))
    except (KeyError, TypeError, IndexError, ValueError):
        raise DataFormatError(
            f"{where}: an RLE needs 'size' = [height, width] and 'counts', got {rle!r:.200}"
        ) from None
    if rle_size != tuple(size):
        raise MaskSizeError(
            f"{where}: mask RLE has size {rle_size} (height, width) but its image/frame is {tuple(size)}; the "
            "annotation belongs to another image or the frames were resized. Re-encode the mask at the frame size."
        )


def segmentation_to_rle(segmentation: Any, height: int, width: int, where: str) -> dict:
    """Convert any COCO segmentation to compressed RLE (``counts`` as ``str``) of size ``(height, width)``.

    Accepted: a list of polygons ``[[x1, y1, x2, y2, ...], ...]`` (merged into one mask), an uncompressed RLE
    ``{"size": [h, w], "counts": [int, ...]}``, a compressed RLE (``counts`` as ``str``/``bytes``), or a list of
    RLE dicts (merged). RLEs are checked with `check_rle` (run lengths non-negative and summing to ``h * w``).
    ``where`` names the annotation (file and line or record) in error messages.
    """
    if isinstance(segmentation, dict):
        if "counts" not in segmentation or "size" not in segmentation:
            raise DataFormatError(
                f"{where}: an RLE segmentation needs 'size' and 'counts', got keys {sorted(segmentation)}"
            )
        check_rle(segmentation, (height, width), where)  # size, non-negative run lengths summing to h * w
        if isinstance(segmentation["counts"], list):
            rle = coco_mask.frPyObjects({"size": [height, width], "counts": segmentation["counts"]}, height, width)
            return _rle_with_str(rle)
        return _rle_with_str(segmentation)
    if isinstance(segmentation, list):
        if len(segmentation) == 0:
            return encode_rle(np.zeros((height, width), dtype=np.uint8))
        if all(isinstance(part, dict) for part in segmentation):
            parts = [segmentation_to_rle(part, height, width, where) for part in segmentation]
            return union_rles(parts, height, width)
        if all(isinstance(part, list) for part in segmentation):
            for polygon in segmentation:
                if len(polygon) < 6 or len(polygon) % 2 or not all(isinstance(v, (int, float)) for v in polygon):
                    raise DataFormatError(
                        f"{where}: a polygon must be a flat list of at least 3 (x, y) pairs, got {polygon!r:.120}"
                    )
            rles = coco_mask.frPyObjects([[float(v) for v in polygon] for polygon in segmentation], height, width)
            return _rle_with_str(coco_mask.merge(rles, intersect=0))
    raise DataFormatError(
        f"{where}: unsupported segmentation {segmentation!r:.120}; expected polygons, an RLE dict or a list of RLEs"
    )


def union_rles(rles: Sequence[dict], height: int, width: int) -> dict:
    """Pixel-wise OR of RLEs of size ``(height, width)`` (an empty list gives an empty mask), computed on the
    run-lengths by pycocotools without decoding."""
    if len(rles) == 0:
        return encode_rle(np.zeros((height, width), dtype=np.uint8))
    if len(rles) == 1:
        return _rle_with_str(rles[0])
    return _rle_with_str(coco_mask.merge([_rle_with_bytes(r) for r in rles], intersect=0))


def mask_to_rle(mask: np.ndarray) -> dict:
    """Compressed RLE of a binary mask of shape ``(height, width)``."""
    return encode_rle(np.asarray(mask, dtype=bool))


def pack_masks(masks: Sequence[Sequence[dict]]) -> list[list[dict]]:
    """``masks[object][frame]`` as the ``masks`` column stores them: RLE dicts with ``counts`` as ``str``."""
    return [[_rle_with_str(rle) for rle in frames] for frames in masks]


def unpack_masks(value: Sequence) -> list[list[dict]]:
    """``masks[object][frame]`` of a row read back from a dataset, as plain RLE dicts. Also accepts the
    dict-of-lists layout (``{"size": [per frame], "counts": [per frame]}`` per object) that a
    ``Sequence(Sequence({...}))`` feature would produce, so rows of older cached tables still read correctly."""
    objects = []
    for item in value:
        if isinstance(item, dict):
            objects.append(
                [
                    {"size": list(size), "counts": counts}
                    for size, counts in zip(item["size"], item["counts"], strict=True)
                ]
            )
        else:
            objects.append([{"size": list(rle["size"]), "counts": rle["counts"]} for rle in item])
    return objects


def decode_record_masks(record: dict) -> list[np.ndarray]:
    """Decode a record's masks to one ``bool`` array of shape ``(num_frames, height, width)`` per object."""
    return [np.stack([decode_rle(rle) for rle in frames]) for frames in unpack_masks(record["masks"])]


# ----------------------------------------------------------------------------------------------------------------
# records and datasets


def make_record(
    *,
    sample_id: str,
    source: str,
    media_type: str,
    media_id: str,
    frames: Sequence[PathLike],
    prompt: str,
    answer: str,
    masks: Sequence[Sequence[dict]],
    meta: dict,
    where: str,
) -> dict:
    """One record of `RECORD_FEATURES`. ``frames`` are file paths (stored as absolute paths, decoded lazily),
    ``masks[object][frame]`` are RLE dicts with one entry per frame. ``where`` names the sample in errors."""
    if media_type not in ("image", "video"):
        raise DataFormatError(f"{where}: media_type must be 'image' or 'video', got {media_type!r}")
    if len(frames) == 0:
        raise EmptyMediaError(f"{where}: the sample has no frames; give at least one image or frame")
    if media_type == "image" and len(frames) != 1:
        raise DataFormatError(f"{where}: an image sample has exactly one frame, got {len(frames)}")
    for index, frames_of_object in enumerate(masks):
        if len(frames_of_object) != len(frames):
            raise DataFormatError(
                f"{where}: object {index} has {len(frames_of_object)} masks but the sample has {len(frames)} frames; "
                "give one mask (or null for an absent object) per frame"
            )
    return {
        "sample_id": sample_id,
        "source": source,
        "media_type": media_type,
        "media_id": media_id,
        "frames": [os.path.abspath(frame) for frame in frames],
        "prompt": prompt,
        "answer": answer,
        "masks": pack_masks(masks),
        "meta": json.dumps(meta, sort_keys=True),
    }


def build_dataset(
    generator: Callable[..., Iterator[dict]],
    gen_kwargs: dict,
    description: str,
    cache_dir: PathLike | None = None,
) -> datasets.Dataset:
    """Run ``generator(**gen_kwargs)`` through `datasets.Dataset.from_generator` with `RECORD_FEATURES` (an
    Arrow table on disk, memory-mapped; frames stay paths). ``gen_kwargs`` must hold only small values (paths,
    options, a `file_signature`): they form the cache key. Errors raised inside the generator are re-raised as
    themselves instead of `datasets`' generic ``DatasetGenerationError``; a source without records raises
    `EmptyDatasetError` naming ``description``."""
    # `datasets` treats every list in gen_kwargs as shards and calls the generator once per element: pass tuples
    gen_kwargs = {key: tuple(v) if isinstance(v, list) else v for key, v in gen_kwargs.items()}
    gen_kwargs["loader_format_version"] = LOADER_FORMAT_VERSION
    try:
        return datasets.Dataset.from_generator(
            generator,
            features=RECORD_FEATURES,
            gen_kwargs=gen_kwargs,
            cache_dir=None if cache_dir is None else str(cache_dir),
        )
    except datasets.exceptions.DatasetGenerationError as error:
        cause = error.__cause__
        if cause is None:
            raise
        raise cause from None
    except ValueError as error:
        if "corresponds to no data" in str(error):
            raise EmptyDatasetError(
                f"{description} produced no records: check the split name and that the annotation file lists samples"
            ) from None
        raise


def relative_or_absolute(path: PathLike, base: PathLike) -> Path:
    """``path`` if absolute, else ``base / path``."""
    path = Path(path)
    return path if path.is_absolute() else Path(base) / path
