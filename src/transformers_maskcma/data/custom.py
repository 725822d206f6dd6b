"""Our own simple format for users' data: a JSONL file, one sample per line.

Each line is a JSON object:

==============  ==========  =========================================================================================
field           required    meaning
==============  ==========  =========================================================================================
``image``       one of      path of an image file                                    → an image sample
``frames``      these       list of frame image paths, in temporal order             → a video sample
``video_dir``   three       folder of frame images (sorted by file name; .jpg .jpeg .png .bmp .webp)  → a video
``prompt``      yes         the user's text (a referring expression or a question)
``answer``      no          the target answer with one ``[SEG]`` per object; "" or absent = the default template
``masks``       no          one entry per object, in the order of the answer's ``[SEG]`` tokens (absent = no GT)
``id``          no          sample id (default ``<file stem>/<line number>``)
``media_id``    no          image / video identity for the leakage check (default: the ``image`` path as written,
                            the ``video_dir`` folder name, or the folder name of the first of ``frames``)
``meta``        no          a JSON object of your own fields, kept in the record's ``meta``
==============  ==========  =========================================================================================

A mask is one of: a COCO RLE dict ``{"size": [height, width], "counts": "..."}`` (compressed string or
uncompressed list ``counts``); a PNG path (foreground = non-zero pixels); ``{"png": path, "value": k}``
(foreground = pixels equal to ``k``, for palette / instance-id PNGs like DAVIS annotations); or ``null``
(the object is absent: an empty mask). For an image each object's entry is one mask (or a one-element list); for
a video it is a list with one mask per frame. Every mask must have the size of its image/frames.

All paths are relative to the JSONL file's folder (absolute paths work too). Example ``data/train.jsonl``::

    {"image": "images/cat.jpg", "prompt": "the cat on the sofa", "masks": ["masks/cat.png"]}
    {"image": "images/cats.jpg", "prompt": "Both cats.", "answer": "The left cat [SEG] and the right cat [SEG].",
     "masks": [{"size": [480, 640], "counts": "Xk`05l>..."}, "masks/right_cat.png"]}
    {"video_dir": "videos/dog_run", "prompt": "the dog running to the left",
     "masks": [["masks/dog_run/00000.png", "masks/dog_run/00001.png", null]]}
    {"frames": ["clips/c1/a.jpg", "clips/c1/b.jpg"], "prompt": "the red car",
     "masks": [[{"png": "clips/c1/ann_a.png", "value": 2}, {"png": "clips/c1/ann_b.png", "value": 2}]]}

(one JSON object per line in the real file). ``load_custom("data/train.jsonl")`` returns a `datasets.Dataset` of
records; in a training mix use ``{dataset: custom, path: data/train.jsonl}``.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import datasets

from .errors import DataFormatError, EmptyMediaError
from .records import (
    PathLike,
    build_dataset,
    check_rle_size,
    file_signature,
    image_size,
    make_record,
    mask_to_rle,
    parse_json_line,
    read_png_mask,
    require_dir,
    require_file,
    segmentation_to_rle,
)
from .schema import empty_rle

logger = logging.getLogger(__name__)

FRAME_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp")
SEG_TOKEN = "[SEG]"
_KNOWN_FIELDS = {"image", "frames", "video_dir", "prompt", "answer", "masks", "id", "media_id", "meta"}


def _resolve(base: Path, path, where: str, field: str) -> Path:
    if not isinstance(path, str) or not path:
        raise DataFormatError(f"{where}: {field} must be a non-empty path string, got {path!r:.80}")
    resolved = Path(path)
    return resolved if resolved.is_absolute() else base / resolved


def _media(sample: dict, base: Path, where: str) -> tuple[str, list[Path], str]:
    given = [key for key in ("image", "frames", "video_dir") if key in sample]
    if len(given) != 1:
        raise DataFormatError(f"{where}: give exactly one of 'image', 'frames', 'video_dir' (got {given or 'none'})")
    key = given[0]
    if key == "image":
        path = _resolve(base, sample["image"], where, "image")
        require_file(path, f"{where}: image")
        return "image", [path], sample["image"]
    if key == "frames":
        if not isinstance(sample["frames"], list):
            raise DataFormatError(f"{where}: 'frames' must be a list of frame paths")
        if not sample["frames"]:
            raise EmptyMediaError(f"{where}: 'frames' is empty; a video sample needs at least one frame")
        paths = [_resolve(base, frame, where, "frames[]") for frame in sample["frames"]]
        for path in paths:
            require_file(path, f"{where}: frame")
        return "video", paths, Path(sample["frames"][0]).parent.name or Path(sample["frames"][0]).stem
    folder = require_dir(_resolve(base, sample["video_dir"], where, "video_dir"), f"{where}: video_dir")
    paths = sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in FRAME_EXTENSIONS)
    if not paths:
        raise EmptyMediaError(f"{where}: video_dir {folder} holds no frame images ({', '.join(FRAME_EXTENSIONS)})")
    return "video", paths, folder.name


def _one_mask(entry, base: Path, size: tuple[int, int], where: str) -> dict:
    if entry is None:
        return empty_rle(*size)
    if isinstance(entry, str) or (isinstance(entry, dict) and "png" in entry):
        path_value = entry if isinstance(entry, str) else entry["png"]
        path = _resolve(base, path_value, where, "mask PNG")
        value = None if isinstance(entry, str) else int(entry["value"]) if "value" in entry else None
        mask = read_png_mask(path, value)
        rle = mask_to_rle(mask)
        check_rle_size(rle, size, f"{where} (mask PNG {path})")
        return rle
    if isinstance(entry, dict):
        return segmentation_to_rle(entry, size[0], size[1], where)
    raise DataFormatError(f"{where}: a mask is an RLE dict, a PNG path, {{'png', 'value'}} or null, got {entry!r:.80}")


def _masks(sample: dict, media_type: str, num_frames: int, base: Path, size: tuple[int, int], where: str) -> list:
    objects = sample.get("masks", [])
    if not isinstance(objects, list):
        raise DataFormatError(f"{where}: 'masks' must be a list with one entry per object")
    result = []
    for index, entry in enumerate(objects):
        object_where = f"{where} masks[{index}]"
        if media_type == "image":
            if isinstance(entry, list):
                if len(entry) != 1:
                    raise DataFormatError(f"{object_where}: an image object has one mask, got a list of {len(entry)}")
                entry = entry[0]
            result.append([_one_mask(entry, base, size, object_where)])
        else:
            if not isinstance(entry, list) or len(entry) != num_frames:
                got = f"a list of {len(entry)}" if isinstance(entry, list) else type(entry).__name__
                raise DataFormatError(
                    f"{object_where}: a video object needs a list with one mask (or null) per frame "
                    f"({num_frames} frames), got {got}"
                )
            result.append([_one_mask(m, base, size, f"{object_where}[{t}]") for t, m in enumerate(entry)])
    return result


def _generate_custom(jsonl_file: str, source: str, signature: list, **cache_key):
    path = Path(jsonl_file)
    base = path.parent
    with open(path, encoding="utf-8") as handle:
        for line_number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            where = f"{path} line {line_number}"
            sample = parse_json_line(line, path, line_number)
            if not isinstance(sample, dict):
                raise DataFormatError(f"{where}: each line must be a JSON object, got {type(sample).__name__}")
            unknown = sorted(set(sample) - _KNOWN_FIELDS)
            if unknown:
                raise DataFormatError(f"{where}: unknown field(s) {unknown}; allowed: {sorted(_KNOWN_FIELDS)}")
            if not isinstance(sample.get("prompt"), str) or not sample["prompt"].strip():
                raise DataFormatError(f"{where}: 'prompt' (a non-empty string) is required")
            media_type, frames, default_media_id = _media(sample, base, where)
            size = image_size(frames[0])
            masks = _masks(sample, media_type, len(frames), base, size, where)
            answer = sample.get("answer") or ""
            if answer and answer.count(SEG_TOKEN) != len(masks):
                raise DataFormatError(
                    f"{where}: the answer has {answer.count(SEG_TOKEN)} {SEG_TOKEN} token(s) but 'masks' has "
                    f"{len(masks)} object(s); give one mask per {SEG_TOKEN}, in order"
                )
            user_meta = sample.get("meta", {})
            if not isinstance(user_meta, dict):
                raise DataFormatError(f"{where}: 'meta' must be a JSON object")
            yield make_record(
                sample_id=str(sample.get("id", f"{path.stem}/{line_number}")),
                source=source,
                media_type=media_type,
                media_id=str(sample.get("media_id", default_media_id)),
                frames=frames,
                prompt=sample["prompt"],
                answer=answer,
                masks=masks,
                meta={**user_meta, "dataset": source, "file": path.name, "line": line_number},
                where=where,
            )


def _custom_signature(path: Path) -> list:
    """Cache key of a JSONL file: the file itself, its mask PNGs and its ``video_dir`` folders (a folder's mtime
    changes when frames are added or removed), so editing any of them rebuilds the cached table. Lines that do
    not parse are skipped here; the generator reports them."""
    referenced: list[Path] = [path]
    with open(path, encoding="utf-8") as handle:
        for line in handle:
            try:
                sample = json.loads(line)
            except json.JSONDecodeError:
                continue
            if not isinstance(sample, dict):
                continue
            if isinstance(sample.get("video_dir"), str):
                referenced.append(path.parent / sample["video_dir"])
            pending = list(sample.get("masks") or []) if isinstance(sample.get("masks"), list) else []
            while pending:
                entry = pending.pop()
                if isinstance(entry, list):
                    pending.extend(entry)
                elif isinstance(entry, str):
                    referenced.append(path.parent / entry)
                elif isinstance(entry, dict) and isinstance(entry.get("png"), str):
                    referenced.append(path.parent / entry["png"])
    return file_signature(referenced)


def load_custom(jsonl_file: PathLike, *, source: str = "custom", cache_dir: PathLike | None = None) -> datasets.Dataset:
    """Load a JSONL file in the format of the module docstring as records of `RECORD_FEATURES`.

    Args:
        jsonl_file: the JSONL file; relative paths inside it are relative to its folder.
        source: the ``source`` column value (e.g. ``"ref_sav"`` for converted SAM2 pseudo-video data).
    """
    path = require_file(jsonl_file, "custom JSONL file")
    if path.suffix not in (".jsonl", ".json"):
        logger.warning("%s: expected a .jsonl file (one JSON object per line)", path)
    return build_dataset(
        _generate_custom,
        {"jsonl_file": str(path.resolve()), "source": source, "signature": _custom_signature(path)},
        description=f"custom file {path}",
        cache_dir=cache_dir,
    )
