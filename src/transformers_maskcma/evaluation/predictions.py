"""Predicted masks on disk: a resumable store, and the submission zips of the MeViS and Ref-YouTube-VOS servers.

**Store.** ``<dir>/predictions.jsonl`` holds one JSON object per line and sample::

    {"sample_id": "mevis/valid_u/0ab4afe7fb46/0", "size": [720, 1280], "masks": [RLE of frame 0, RLE of frame 1, ...]}

where each RLE is COCO compressed RLE ``{"size": [h, w], "counts": str}`` of the union of the answer's masks in
that frame (one entry for an image). A line is appended, flushed and fsync-ed as soon as a sample is predicted, so
an interrupted evaluation loses at most the sample it was writing; opening the store again skips every sample
already in the file. A last line cut off by the interruption is reported and dropped (that sample is predicted
again); a malformed line elsewhere is an error naming the file and line.

**Submission zips.** One single-channel 8-bit PNG per frame, ``0`` background and ``255`` foreground, at the frame's
original size, named after the frame (``00000.png`` for frame ``00000.jpg``):

- MeViS (CodaLab / CodaBench ``valid`` and ``test``): ``<video>/<exp_id>/<frame>.png`` directly at the zip root
  (the layout of the official ``sample_submission_valid.zip``: the zip "directly packages" the video folders);
- Ref-YouTube-VOS (CodaLab): ``Annotations/<video>/<exp_id>/<frame>.png`` (the result of ``zip -r submission.zip
  Annotations``).
"""

from __future__ import annotations

import io
import json
import logging
import os
import zipfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import datasets
import numpy as np
from PIL import Image
from tqdm.auto import tqdm

from ..data.errors import DataFormatError, MalformedJSONError, MaskSizeError
from ..data.schema import decode_rle, encode_rle
from .records import frame_names, frame_size, iter_undecoded, parse_meta

logger = logging.getLogger(__name__)

__all__ = [
    "PREDICTIONS_FILENAME",
    "SHARD_PATTERN",
    "SUBMISSION_LAYOUTS",
    "PredictionStore",
    "SubmissionSummary",
    "merge_prediction_shards",
    "prediction_to_frames",
    "shard_filename",
    "submission_layout_for",
    "write_submission_zip",
]

PREDICTIONS_FILENAME = "predictions.jsonl"
#: The store of one process of a multi-process evaluation (``predictions.shard-<rank>-of-<world size>.jsonl``);
#: the main process merges the shards into ``predictions.jsonl`` and removes them.
SHARD_PATTERN = "predictions.shard-*.jsonl"


def shard_filename(rank: int, world_size: int) -> str:
    """The prediction store file of process ``rank`` of ``world_size``."""
    return f"predictions.shard-{rank:03d}-of-{world_size:03d}.jsonl"

#: Folder prefix inside the zip for each server.
SUBMISSION_LAYOUTS = {"mevis": "", "ref_ytvos": "Annotations/"}


def _as_binary_array(value, sample_id: str) -> np.ndarray:
    if hasattr(value, "detach"):  # a torch tensor
        value = value.detach().cpu().numpy()
    array = np.asarray(value)
    if array.dtype != bool:
        if not (np.issubdtype(array.dtype, np.number)):
            raise TypeError(f"sample {sample_id!r}: masks must be boolean or 0/1 arrays, got dtype {array.dtype}")
        if np.any((array != 0) & (array != 1)):
            raise ValueError(
                f"sample {sample_id!r}: masks must be binary (bool or 0/1) but hold other values (min "
                f"{array.min()}, max {array.max()}); threshold logits or probabilities before returning them"
            )
        array = array.astype(bool)
    return array


def prediction_to_frames(
    prediction, num_frames: int, size: tuple[int, int], media_type: str, sample_id: str = "?"
) -> np.ndarray:
    """Normalise what a ``predict_fn`` returns to the union of the answer's masks per frame.

    Accepted forms (``T`` frames of ``(H, W)``; ``N`` objects, possibly ``0``):

    - video: an array ``(T, H, W)`` or a list of ``T`` masks ``(H, W)`` (per frame, objects already OR-ed); an
      array ``(N, T, H, W)`` or a list of ``N`` arrays ``(T, H, W)`` (per object, OR-ed here);
    - image: one mask ``(H, W)``; an array ``(N, H, W)`` or a list of ``N`` masks ``(H, W)`` (OR-ed); an array
      ``(N, 1, H, W)``;
    - an empty list: the answer has no mask, scored as an empty mask in every frame.

    Masks may be numpy arrays or torch tensors, boolean or 0/1.

    Returns:
        ``bool`` array of shape ``(T, H, W)``.
    """
    height, width = size
    if isinstance(prediction, Sequence) and not isinstance(prediction, (str, bytes)) and len(prediction) == 0:
        return np.zeros((num_frames, height, width), dtype=bool)
    if prediction is None:
        raise TypeError(
            f"sample {sample_id!r}: predict_fn returned None; return an empty list when the answer has no mask"
        )
    if isinstance(prediction, Sequence) and not isinstance(prediction, np.ndarray):
        parts = [_as_binary_array(part, sample_id) for part in prediction]
        dims = {part.ndim for part in parts}
        if len(dims) != 1:
            raise ValueError(f"sample {sample_id!r}: predicted masks mix arrays of {sorted(dims)} dimensions")
        shapes = {part.shape for part in parts}
        if len(shapes) != 1:
            raise MaskSizeError(f"sample {sample_id!r}: predicted masks have different shapes {sorted(shapes)}")
        array = np.stack(parts)
    else:
        array = _as_binary_array(prediction, sample_id)

    if media_type == "image":
        if array.ndim == 2:
            array = array[None]
        elif array.ndim == 3:
            array = array.any(axis=0, keepdims=True)
        elif array.ndim == 4 and array.shape[1] == 1:
            array = array.any(axis=0)
        else:
            raise ValueError(
                f"sample {sample_id!r}: an image prediction must be (H, W), (N, H, W) or (N, 1, H, W); got "
                f"{tuple(array.shape)}"
            )
    else:
        if array.ndim == 4:
            array = array.any(axis=0)
        elif array.ndim != 3:
            raise ValueError(
                f"sample {sample_id!r}: a video prediction must be (T, H, W) per frame or (N, T, H, W) per object; "
                f"got {tuple(array.shape)}"
            )
    if array.shape[0] != num_frames:
        raise ValueError(
            f"sample {sample_id!r}: the prediction has {array.shape[0]} frames but the sample has {num_frames}; "
            "predict a mask for every frame"
        )
    if tuple(array.shape[1:]) != (height, width):
        raise MaskSizeError(
            f"sample {sample_id!r}: predicted masks are {tuple(array.shape[1:])} (height, width) but the frames are "
            f"{(height, width)}; resize the masks to the original frame size"
        )
    return array


class PredictionStore:
    """Append-only store of predicted masks, one JSON line per sample (format in the module docstring).

    Args:
        directory: folder holding ``predictions.jsonl``.
        writable: create the folder and allow :meth:`add`. A read-only store requires the file to exist.
        filename: the file inside ``directory`` (default ``predictions.jsonl``; a process of a multi-process
            evaluation writes its own :func:`shard_filename`).

    Example::

        with PredictionStore("runs/eval", writable=True) as store:
            if sample_id not in store:
                store.add(sample_id, masks)  # masks: bool (num_frames, height, width)
    """

    def __init__(self, directory: str | os.PathLike, writable: bool = False, filename: str = PREDICTIONS_FILENAME):
        self.directory = Path(directory)
        self.path = self.directory / filename
        self.writable = writable
        self.num_duplicates = 0
        self._entries: dict[str, dict] = {}
        self._handle = None
        self._needs_newline = False
        if writable:
            self.directory.mkdir(parents=True, exist_ok=True)
        elif not self.directory.is_dir():
            raise FileNotFoundError(f"predictions folder not found: {self.directory}")
        elif not self.path.is_file():
            raise FileNotFoundError(
                f"no {filename} in the predictions folder {self.directory}; pass the folder that "
                "`maskcma evaluate --model ...` (or evaluate_dataset) wrote its predictions to"
            )
        if self.path.is_file():
            self._load()

    # reading -------------------------------------------------------------------------------------------------

    def _load(self) -> None:
        data = self.path.read_bytes()
        lines = data.split(b"\n")
        trailing = lines.pop()  # b"" when the file ends with a newline
        for number, line in enumerate(lines, start=1):
            if line.strip():
                self._add_entry(self._parse(line, number), number)
        if trailing.strip():
            try:
                entry = self._parse(trailing, len(lines) + 1)
            except MalformedJSONError:
                logger.warning(
                    "%s: the last line is incomplete (the run was interrupted while writing it); it is dropped and "
                    "that sample will be predicted again",
                    self.path,
                )
                if self.writable:
                    with open(self.path, "r+b") as handle:
                        handle.truncate(len(data) - len(trailing))
            else:
                self._add_entry(entry, len(lines) + 1)
                self._needs_newline = True

    def _parse(self, line: bytes, number: int) -> dict:
        where = f"{self.path} line {number}"
        try:
            entry = json.loads(line)
        except (json.JSONDecodeError, UnicodeDecodeError) as error:
            raise MalformedJSONError(f"{where}: malformed JSON ({error}); delete the line to predict it again") from None
        if not isinstance(entry, dict) or not isinstance(entry.get("sample_id"), str) or not isinstance(entry.get("masks"), list):
            raise DataFormatError(f"{where}: expected {{'sample_id': str, 'size': [h, w], 'masks': [RLE per frame]}}")
        for rle in entry["masks"]:
            if not isinstance(rle, dict) or "size" not in rle or "counts" not in rle:
                raise DataFormatError(f"{where}: every mask must be an RLE {{'size': [h, w], 'counts': str}}")
        return entry

    def _add_entry(self, entry: dict, number: int) -> None:
        if entry["sample_id"] in self._entries:
            self.num_duplicates += 1
            logger.warning(
                "%s line %d: sample %r appears again; the later line is used", self.path, number, entry["sample_id"]
            )
        self._entries[entry["sample_id"]] = entry

    def __contains__(self, sample_id: str) -> bool:
        return sample_id in self._entries

    def __len__(self) -> int:
        return len(self._entries)

    def sample_ids(self) -> list[str]:
        """Ids of the stored samples, in file order."""
        return list(self._entries)

    def rles(self, sample_id: str) -> list[dict]:
        """The stored RLE of each frame of ``sample_id``."""
        if sample_id not in self._entries:
            raise KeyError(f"no prediction for sample {sample_id!r} in {self.path}")
        return self._entries[sample_id]["masks"]

    def masks(self, sample_id: str, size: tuple[int, int] | None = None) -> np.ndarray:
        """Decode the prediction of ``sample_id``.

        Args:
            size: expected ``(height, width)``; a stored mask of another size raises ``MaskSizeError``.

        Returns:
            ``bool`` array of shape ``(num_frames, height, width)``.
        """
        frames = []
        for index, rle in enumerate(self.rles(sample_id)):
            rle_size = (int(rle["size"][0]), int(rle["size"][1]))
            if size is not None and rle_size != tuple(size):
                raise MaskSizeError(
                    f"{self.path}: the prediction for sample {sample_id!r} frame {index} has size {rle_size} "
                    f"(height, width) but the frame is {tuple(size)}; predictions must be at the original frame size"
                )
            frames.append(decode_rle(rle))
        if not frames:
            raise DataFormatError(f"{self.path}: the prediction for sample {sample_id!r} has no frames")
        return np.stack(frames)

    def entry(self, sample_id: str) -> dict:
        """The stored line of ``sample_id`` as a dict (``sample_id``, ``size``, ``masks``: RLE per frame)."""
        if sample_id not in self._entries:
            raise KeyError(f"no prediction for sample {sample_id!r} in {self.path}")
        return self._entries[sample_id]

    # writing -------------------------------------------------------------------------------------------------

    def add(self, sample_id: str, masks: np.ndarray) -> None:
        """Append the prediction of one sample and flush it to disk.

        Args:
            sample_id: the record's ``sample_id``; it must not be stored yet.
            masks: ``bool`` array of shape ``(num_frames, height, width)``, the union of the answer's masks.
        """
        if not self.writable:
            raise PermissionError(f"{self.path} was opened read-only; open it with writable=True to add predictions")
        if sample_id in self._entries:
            raise ValueError(f"sample {sample_id!r} is already stored in {self.path}")
        masks = np.asarray(masks)
        if masks.ndim != 3 or masks.shape[0] == 0:
            raise ValueError(f"sample {sample_id!r}: expected masks of shape (num_frames, height, width), got {masks.shape}")
        entry = {
            "sample_id": sample_id,
            "size": [int(masks.shape[1]), int(masks.shape[2])],
            "masks": [encode_rle(frame) for frame in masks],
        }
        self.add_entry(entry)

    def add_entry(self, entry: dict) -> None:
        """Append a line as another store holds it (:meth:`entry`), without decoding its masks; flushed to disk."""
        if not self.writable:
            raise PermissionError(f"{self.path} was opened read-only; open it with writable=True to add predictions")
        sample_id = entry["sample_id"]
        if sample_id in self._entries:
            raise ValueError(f"sample {sample_id!r} is already stored in {self.path}")
        if self._handle is None:
            self._handle = open(self.path, "a", encoding="utf-8")
        line = json.dumps(entry, separators=(",", ":")) + "\n"
        if self._needs_newline:
            line = "\n" + line
            self._needs_newline = False
        self._handle.write(line)
        self._handle.flush()
        os.fsync(self._handle.fileno())
        self._entries[sample_id] = entry

    def close(self) -> None:
        if self._handle is not None:
            self._handle.close()
            self._handle = None

    def __enter__(self) -> PredictionStore:
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()


def merge_prediction_shards(directory: str | os.PathLike, sample_order: Sequence[str] = ()) -> int:
    """Move the predictions of the per-process shards (:data:`SHARD_PATTERN`) into ``predictions.jsonl``, then
    delete the shards.

    Samples already in ``predictions.jsonl`` are kept as they are; the others are appended in ``sample_order``
    (the dataset's order, so that a merged store lists its samples as a one-process run writes them), then any
    remaining ones in shard order. A shard's cut-off last line (a process killed while writing) is dropped, so
    that sample is predicted again. Interrupted half-way, a merge is simply run again: every line is fsync-ed
    before any shard is deleted.

    Returns:
        The number of predictions added to ``predictions.jsonl``.
    """
    directory = Path(directory)
    shards = sorted(directory.glob(SHARD_PATTERN))
    if not shards:
        return 0
    entries: dict[str, dict] = {}
    for shard in shards:
        store = PredictionStore(directory, filename=shard.name)
        for sample_id in store.sample_ids():
            entries[sample_id] = store.entry(sample_id)
    ordered = [sample_id for sample_id in dict.fromkeys(sample_order) if sample_id in entries]
    in_order = set(ordered)
    ordered += [sample_id for sample_id in entries if sample_id not in in_order]
    added = 0
    with PredictionStore(directory, writable=True) as merged:
        for sample_id in ordered:
            if sample_id not in merged:
                merged.add_entry(entries[sample_id])
                added += 1
    for shard in shards:
        shard.unlink()
    logger.info("%s: merged %d predictions from %d process shards", directory, added, len(shards))
    return added


@dataclass(frozen=True)
class SubmissionSummary:
    """What :func:`write_submission_zip` wrote."""

    path: Path
    layout: str
    n_expressions: int
    n_frames: int
    n_missing: int
    missing_sample_ids: list[str]


def submission_layout_for(source: str) -> str:
    """The submission layout of a dataset ``source`` (``"mevis"`` or ``"ref_ytvos"``)."""
    if source not in SUBMISSION_LAYOUTS:
        raise ValueError(
            f"no evaluation server submission format for dataset {source!r}; servers exist for "
            f"{', '.join(SUBMISSION_LAYOUTS)} (the other benchmarks are scored locally with `maskcma evaluate`)"
        )
    return source


def _png_bytes(mask: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    # a uint8 (height, width) array becomes a single-channel "L" image
    Image.fromarray(mask.astype(np.uint8) * 255).save(buffer, format="PNG")
    return buffer.getvalue()


def write_submission_zip(
    dataset: datasets.Dataset,
    predictions_dir: str | os.PathLike,
    zip_path: str | os.PathLike,
    layout: str | None = None,
    skip_missing: bool = False,
    show_progress: bool = True,
) -> SubmissionSummary:
    """Write the zip an evaluation server expects from stored predictions (layouts in the module docstring).

    Args:
        dataset: the video records that were predicted (``meta`` with ``video``, ``exp_id`` and ``frame_names``).
        predictions_dir: folder with ``predictions.jsonl``.
        zip_path: the zip to write (replaced atomically).
        layout: ``"mevis"`` or ``"ref_ytvos"``; default: from the records' ``source``.
        skip_missing: write empty masks for samples without a prediction (counted, with a warning) instead of
            raising ``KeyError``.
        show_progress: show a tqdm bar.
    """
    if layout is None:
        sources = sorted(set(dataset["source"]))
        if len(sources) != 1:
            raise ValueError(f"the records come from several datasets {sources}; pass layout= explicitly")
        layout = submission_layout_for(sources[0])
    if layout not in SUBMISSION_LAYOUTS:
        raise ValueError(f"unknown submission layout {layout!r}; use one of {list(SUBMISSION_LAYOUTS)}")
    prefix = SUBMISSION_LAYOUTS[layout]
    store = PredictionStore(predictions_dir)
    missing_ids = [sample_id for sample_id in dataset["sample_id"] if sample_id not in store]
    if missing_ids and not skip_missing:
        raise KeyError(
            f"no prediction for sample {missing_ids[0]!r} (and {len(missing_ids) - 1} more) in {store.path}; "
            "finish the predictions (re-run `maskcma evaluate --model ...`, it resumes) or pass --missing "
            "zero|empty|drop (skip_missing=True) to write empty masks for them"
        )
    for sample_id in missing_ids:
        logger.warning("submission: no prediction for sample %r; writing empty masks", sample_id)

    zip_path = Path(zip_path)
    zip_path.parent.mkdir(parents=True, exist_ok=True)
    partial = zip_path.with_name(zip_path.name + ".partial")
    try:
        n_frames = _write_zip_entries(partial, dataset, store, prefix, layout, show_progress)
    except BaseException:
        partial.unlink(missing_ok=True)
        raise
    os.replace(partial, zip_path)
    return SubmissionSummary(
        path=zip_path,
        layout=layout,
        n_expressions=len(dataset),
        n_frames=n_frames,
        n_missing=len(missing_ids),
        missing_sample_ids=missing_ids,
    )


def _write_zip_entries(
    partial: Path, dataset: datasets.Dataset, store: PredictionStore, prefix: str, layout: str, show_progress: bool
) -> int:
    written: set[str] = set()
    n_frames = 0
    with zipfile.ZipFile(partial, "w", compression=zipfile.ZIP_STORED) as archive:
        records = iter_undecoded(dataset)
        for record in tqdm(records, total=len(dataset), desc=f"Writing {layout} submission", disable=not show_progress):
            sample_id = record["sample_id"]
            if record["media_type"] != "video":
                raise ValueError(f"sample {sample_id!r} is an image; submission zips are for video benchmarks")
            meta = parse_meta(record)
            if "exp_id" not in meta:
                raise DataFormatError(f"sample {sample_id!r}: meta has no 'exp_id', needed to name its folder")
            video = str(meta.get("video", record["media_id"]))
            names = frame_names(record, meta)
            size = frame_size(record)
            if sample_id in store:
                masks = store.masks(sample_id, size=size)
                if masks.shape[0] != len(names):
                    raise ValueError(
                        f"{store.path}: sample {sample_id!r} has {masks.shape[0]} predicted frames, the video "
                        f"{len(names)}"
                    )
            else:
                masks = np.zeros((len(names), *size), dtype=bool)
            folder = f"{prefix}{video}/{meta['exp_id']}/"
            if folder in written:
                raise ValueError(f"two samples map to the same submission folder {folder!r} (sample {sample_id!r})")
            written.add(folder)
            for name, mask in zip(names, masks):
                archive.writestr(folder + f"{name}.png", _png_bytes(mask))
            n_frames += len(names)
    return n_frames
