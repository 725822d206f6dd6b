"""Train/evaluation leakage check: which images or videos of the evaluation splits also occur in training data.

Two records are compared

- **by content**: the bytes of their frame files hash alike (BLAKE2b of the raw file bytes; an image hashes its
  one file, a video all its frames in order, or only the first with ``video_frames="first"``). This finds
  renamed copies, e.g. Ref-DAVIS17 videos inside another training set;
- **by id**: they have the same ``media_type`` and ``media_id`` (COCO file name, video name, ...). An equal name
  alone proves nothing (two datasets may each have a ``00001.jpg`` or a video ``vidA``), so the decoded pixels
  decide: each frame is reduced to an 8x8 grayscale thumbnail (box filter) and the two media are the same picture
  when the thumbnails differ by at most `PIXEL_TOLERANCE` grey levels on average, which a re-encoded or resized
  copy does (JPEG re-compression moves an 8x8 thumbnail by a few levels) and a different picture does not.

Each shared medium is reported once per (training source, evaluation split) as an `Overlap` whose ``match`` is
``"id+content"`` (same name, same bytes), ``"id+pixels"`` (same name, same picture re-encoded), ``"content"`` (a
renamed byte copy), ``"id"`` (same name, content not compared: ``content_hash=False``) or ``"name-collision"``
(same name, different picture: **not** leakage; ``Overlap.is_leak`` is false and `maskcma data check` lists these
apart without failing).
"""

from __future__ import annotations

import hashlib
import io
import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import datasets
import numpy as np
from PIL import Image
from tqdm.auto import tqdm

logger = logging.getLogger(__name__)

VIDEO_FRAME_MODES = ("all", "first")
_CHUNK = 1 << 20
#: Mean absolute difference (grey levels, 0-255) between two 8x8 thumbnails up to which frames show one picture.
PIXEL_TOLERANCE = 8.0
_THUMBNAIL = 8


@dataclass(frozen=True)
class MediaEntry:
    """One distinct image or video of a dataset: its id, type, frame files and content digest (or None)."""

    media_id: str
    media_type: str
    frames: tuple[str, ...]
    digest: str | None
    raw_frames: tuple = ()


@dataclass(frozen=True)
class Overlap:
    """A medium found in both a training source and an evaluation split."""

    train_source: str
    eval_source: str
    media_type: str
    train_media_id: str
    eval_media_id: str
    match: str

    @property
    def is_leak(self) -> bool:
        """False for a ``"name-collision"``: the same name on different pictures is not leakage."""
        return self.match != "name-collision"


def _hash_frames(frames: Sequence[dict], video_frames: str, cache: dict) -> str:
    """BLAKE2b (128-bit) of the raw bytes of ``frames`` (``{"path", "bytes"}`` dicts of undecoded images).
    Results for frames stored as paths are cached in ``cache`` by path tuple."""
    selected = frames[:1] if video_frames == "first" else frames
    by_path = all(frame.get("bytes") is None and frame.get("path") for frame in selected)
    key = tuple(frame["path"] for frame in selected) if by_path else None
    if key is not None and key in cache:
        return cache[key]
    digest = hashlib.blake2b(digest_size=16)
    for frame in selected:
        frame_digest = hashlib.blake2b(digest_size=16)
        data = frame.get("bytes")
        if data is not None:
            frame_digest.update(data)
        else:
            path = frame.get("path")
            if not path:
                raise ValueError("a frame has neither bytes nor a path; cannot hash its content")
            try:
                with open(path, "rb") as handle:
                    while chunk := handle.read(_CHUNK):
                        frame_digest.update(chunk)
            except FileNotFoundError:
                raise FileNotFoundError(f"frame file not found while hashing for the leakage check: {path}") from None
        digest.update(frame_digest.digest())
    result = digest.hexdigest()
    if key is not None:
        cache[key] = result
    return result


def collect_media(
    dataset: datasets.Dataset,
    *,
    content_hash: bool = True,
    video_frames: str = "all",
    hash_cache: dict | None = None,
    description: str = "media",
) -> list[MediaEntry]:
    """The distinct media of a dataset of records (repeated rows and several expressions of one video count
    once). Frames are read as raw bytes only when ``content_hash``; nothing is decoded."""
    if video_frames not in VIDEO_FRAME_MODES:
        raise ValueError(f"video_frames must be one of {VIDEO_FRAME_MODES}, got {video_frames!r}")
    hash_cache = {} if hash_cache is None else hash_cache
    # Arrow batches: frames come back as raw {"bytes", "path"} structs, undecoded, without rewriting the table
    view = dataset.select_columns(["media_type", "media_id", "frames"]).with_format("arrow")
    seen: dict[tuple, MediaEntry] = {}
    progress = tqdm(total=len(view), desc=f"leakage check: {description}", unit="rec", leave=False)
    for table in view.iter(batch_size=512):
        batch = table.to_pydict()
        for media_type, media_id, frames in zip(batch["media_type"], batch["media_id"], batch["frames"], strict=True):
            paths = tuple(frame.get("path") or "" for frame in frames)
            stored_as_paths = all(paths) and all(frame.get("bytes") is None for frame in frames)
            key = (media_type, media_id, paths) if stored_as_paths else None
            if key is not None and key in seen:
                continue
            digest = None
            if content_hash:
                digest = _hash_frames(frames, "first" if media_type == "image" else video_frames, hash_cache)
            if key is None:
                key = (media_type, media_id, digest)
                if key in seen:
                    continue
            seen[key] = MediaEntry(
                media_id=media_id,
                media_type=media_type,
                frames=paths,
                digest=digest,
                raw_frames=tuple((frame.get("path"), frame.get("bytes")) for frame in frames),
            )
        progress.update(len(batch["media_id"]))
    progress.close()
    return list(seen.values())


def _thumbnail(frame: tuple, cache: dict) -> np.ndarray:
    """8x8 grayscale box-filtered thumbnail (``float64``) of one undecoded frame ``(path, bytes)``."""
    path, data = frame
    key = ("thumbnail", path) if data is None and path else None
    if key is not None and key in cache:
        return cache[key]
    try:
        with Image.open(io.BytesIO(data) if data is not None else path) as image:
            image.draft("L", (4 * _THUMBNAIL, 4 * _THUMBNAIL))  # JPEG: decode at a reduced size
            thumbnail = np.asarray(
                image.convert("L").resize((_THUMBNAIL, _THUMBNAIL), Image.Resampling.BOX), dtype=np.float64
            )
    except FileNotFoundError:
        raise FileNotFoundError(f"frame file not found while comparing pixels for the leakage check: {path}") from None
    except OSError as error:
        raise ValueError(f"{path or 'a frame stored as bytes'}: not a readable image ({error})") from None
    if key is not None:
        cache[key] = thumbnail
    return thumbnail


def same_picture(first: MediaEntry, second: MediaEntry, video_frames: str = "all", cache: dict | None = None) -> bool:
    """Whether two media show the same picture(s) after decoding (a re-encoded or resized copy): every compared
    frame's 8x8 thumbnail is within `PIXEL_TOLERANCE` grey levels on average. Videos with different frame counts,
    or ``video_frames="first"``, compare their first frames."""
    cache = {} if cache is None else cache
    a, b = first.raw_frames, second.raw_frames
    if not a or not b:
        return False
    if video_frames == "first" or len(a) != len(b):
        a, b = a[:1], b[:1]
    return all(
        float(np.abs(_thumbnail(x, cache) - _thumbnail(y, cache)).mean()) <= PIXEL_TOLERANCE
        for x, y in zip(a, b, strict=True)
    )


def _labelled(collection) -> list[tuple[str, datasets.Dataset]]:
    if isinstance(collection, datasets.Dataset):
        collection = [collection]
    if isinstance(collection, Mapping):
        return [(str(label), dataset) for label, dataset in collection.items()]
    labelled = []
    for index, item in enumerate(collection):
        if isinstance(item, tuple):
            labelled.append((str(item[0]), item[1]))
        else:
            source = item.select_columns(["source"])[0]["source"] if len(item) else "empty"
            labelled.append((f"{source}#{index}", item))
    return labelled


def check_leakage(
    train_datasets: Mapping[str, datasets.Dataset] | Sequence,
    eval_datasets: Mapping[str, datasets.Dataset] | Sequence,
    *,
    content_hash: bool = True,
    video_frames: str = "all",
) -> list[Overlap]:
    """Every medium shared by a training source and an evaluation split (see the module docstring).

    Both arguments are a mapping ``{label: dataset}``, a list of ``(label, dataset)`` pairs or a list of datasets
    (labelled by their ``source`` column). Returns the overlaps sorted by evaluation split, training source and id.
    """
    cache: dict = {}
    by_id: dict[tuple[str, str], list[tuple[str, MediaEntry]]] = {}
    by_digest: dict[str, list[tuple[str, MediaEntry]]] = {}
    for label, dataset in _labelled(train_datasets):
        for entry in collect_media(
            dataset, content_hash=content_hash, video_frames=video_frames, hash_cache=cache, description=label
        ):
            by_id.setdefault((entry.media_type, entry.media_id), []).append((label, entry))
            if entry.digest is not None:
                by_digest.setdefault(entry.digest, []).append((label, entry))
    found: dict[tuple, Overlap] = {}
    for eval_label, dataset in _labelled(eval_datasets):
        for entry in collect_media(
            dataset, content_hash=content_hash, video_frames=video_frames, hash_cache=cache, description=eval_label
        ):
            candidates = by_id.get((entry.media_type, entry.media_id), [])
            if entry.digest is not None:
                candidates = candidates + by_digest.get(entry.digest, [])
            for train_label, train_entry in candidates:
                key = (eval_label, train_label, entry.media_id, train_entry.media_id)
                if key in found:
                    continue
                same_id = (train_entry.media_type, train_entry.media_id) == (entry.media_type, entry.media_id)
                same_content = entry.digest is not None and entry.digest == train_entry.digest
                if same_id and same_content:
                    match = "id+content"
                elif not same_id:
                    match = "content"
                elif not content_hash:
                    match = "id"
                elif same_picture(entry, train_entry, video_frames, cache):
                    match = "id+pixels"
                else:
                    match = "name-collision"
                found[key] = Overlap(
                    train_source=train_label,
                    eval_source=eval_label,
                    media_type=entry.media_type,
                    train_media_id=train_entry.media_id,
                    eval_media_id=entry.media_id,
                    match=match,
                )
    return sorted(found.values(), key=lambda o: (o.eval_source, o.train_source, o.eval_media_id, o.train_media_id))


def format_overlaps(overlaps: Sequence[Overlap], limit: int | None = None) -> str:
    """A plain-text table of ``overlaps`` (at most ``limit`` rows, then a count of the rest)."""
    if not overlaps:
        return "no overlap between the training data and the evaluation splits"
    header = ("eval split", "train source", "type", "match", "eval media id", "train media id")
    shown = list(overlaps if limit is None else overlaps[:limit])
    rows = [(o.eval_source, o.train_source, o.media_type, o.match, o.eval_media_id, o.train_media_id) for o in shown]
    widths = [max(len(str(row[i])) for row in [header, *rows]) for i in range(len(header))]
    lines = [
        "  ".join(str(value).ljust(width) for value, width in zip(row, widths, strict=True)).rstrip()
        for row in [header, *rows]
    ]
    lines.insert(1, "  ".join("-" * width for width in widths))
    if limit is not None and len(overlaps) > limit:
        lines.append(f"... and {len(overlaps) - limit} more")
    return "\n".join(lines)


def summarize_overlaps(overlaps: Sequence[Overlap]) -> str:
    """One line: how many media are shared (leaks only; name collisions are not counted), and per evaluation
    split."""
    per_eval: dict[str, set] = {}
    for overlap in overlaps:
        if not overlap.is_leak:
            continue
        per_eval.setdefault(overlap.eval_source, set()).add(overlap.eval_media_id)
    parts = ", ".join(f"{label}: {len(ids)}" for label, ids in sorted(per_eval.items()))
    total = sum(len(ids) for ids in per_eval.values())
    return f"{total} evaluation image(s)/video(s) also appear in the training data ({parts})"


def warn_if_leaking(
    train_datasets: Mapping[str, datasets.Dataset] | Sequence,
    eval_datasets: Mapping[str, datasets.Dataset] | Sequence,
    *,
    content_hash: bool = True,
    video_frames: str = "all",
    log: logging.Logger | None = None,
) -> list[Overlap]:
    """Run `check_leakage` and log a loud WARNING with the table when any medium leaks (name collisions are only
    logged at INFO); returns every overlap.
    Meant for the trainer, which knows its training mix and the evaluation sets it reports on."""
    overlaps = check_leakage(train_datasets, eval_datasets, content_hash=content_hash, video_frames=video_frames)
    leaks = [overlap for overlap in overlaps if overlap.is_leak]
    collisions = len(overlaps) - len(leaks)
    if collisions:
        (log or logger).info(
            "%d evaluation media share a name with training media but show other pictures (name collisions, not "
            "leakage)", collisions,
        )
    if leaks:
        banner = "!" * 100
        (log or logger).warning(
            "\n%s\nDATA LEAKAGE: %s.\nScores on these evaluation splits are not comparable to published numbers. "
            "Remove the shared media from the training mix.\n%s\n%s",
            banner,
            summarize_overlaps(leaks),
            format_overlaps(leaks, limit=30),
            banner,
        )
    return overlaps
