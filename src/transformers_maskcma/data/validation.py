"""One validation pass over records, run before any work is spent on them.

`maskcma evaluate` runs it over the whole evaluation split before the first prediction, and `maskcma train` over
the training data before step 0, so a bad record is reported in seconds instead of failing hours into a run (or,
worse, being scored). Each record is checked for:

- a ``media_type`` of ``"image"`` or ``"video"`` (and the one the command expects, when it expects one), at least
  one frame, exactly one for an image, and a unique ``sample_id`` when asked;
- its frames: the file exists and its header decodes (``check_files``); every frame of a record has one size;
- its masks (``check_masks``): one mask per frame for every object, each a valid COCO RLE (non-negative run
  lengths summing to height × width) of the frame's size; the same for a ReVOS ``meta["foreground"]``;
- the templated prompt's length in tokens when the caller gives ``prompt_length`` and ``max_prompt_tokens``
  (the caller owns the tokenizer and chat template; this module imports nothing from ``processing``).

Every problem names the record the way its source does: ``train.jsonl:12`` for a custom JSONL line, ``ref_ytvos
valid video 'abc' expression '3'`` for a benchmark expression, else the ``sample_id``. Frame headers are read once
per file, however many records share the frame (the expressions of one video do).

Example::

    report = validate_records(dataset, expected_media="image")
    report.raise_if_problems()          # DataValidationError listing the first 10 problems and the counts
    clean = drop_invalid(dataset, report)   # or keep going without the invalid records
"""

from __future__ import annotations

import io
import json
import logging
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field

from PIL import Image
from tqdm.auto import tqdm

from .errors import DataFormatError, DataValidationError
from .records import unpack_masks
from .schema import check_rle

logger = logging.getLogger(__name__)

__all__ = [
    "DataValidationError",
    "RecordProblem",
    "ValidationReport",
    "drop_invalid",
    "record_where",
    "validate_records",
]

MEDIA_TYPES = ("image", "video")


@dataclass
class RecordProblem:
    """One problem of one record.

    Attributes:
        record_id: the record's ``sample_id``.
        where: where to look: file and line (``"train.jsonl:12"``) or the record's place in its benchmark.
        message: what is wrong and, where it helps, how to fix it.
        index: the record's row in the validated dataset (used by `drop_invalid`).
    """

    record_id: str
    where: str
    message: str
    index: int | None = None

    def __str__(self) -> str:
        return f"{self.where}: {self.message}"


@dataclass
class ValidationReport:
    """The outcome of `validate_records`.

    Attributes:
        num_records: records checked.
        problems: every problem found, in dataset order (a record can have several).
        dropped: records removed by `drop_invalid` (0 until it runs).
        media_types: how many records of each ``media_type`` were seen.
    """

    num_records: int
    problems: list[RecordProblem]
    dropped: int = 0
    media_types: dict[str, int] = field(default_factory=dict)

    @property
    def invalid_records(self) -> int:
        """How many distinct records have at least one problem."""
        return len({problem.index if problem.index is not None else problem.record_id for problem in self.problems})

    @property
    def ok(self) -> bool:
        return not self.problems

    def summary(self, limit: int = 10) -> str:
        """The counts and the first ``limit`` problems, one per line."""
        if not self.problems:
            return f"all {self.num_records} records are valid"
        kinds = Counter(_problem_kind(problem.message) for problem in self.problems)
        lines = [
            f"{self.invalid_records} of {self.num_records} records have problems ({len(self.problems)} problems: "
            + ", ".join(f"{count} {kind}" for kind, count in kinds.most_common())
            + ")"
        ]
        lines += [f"  {problem}" for problem in self.problems[:limit]]
        if len(self.problems) > limit:
            lines.append(f"  ... and {len(self.problems) - limit} more")
        return "\n".join(lines)

    def raise_if_problems(self, limit: int = 10) -> None:
        """Raise `DataValidationError` listing up to ``limit`` problems with the counts; return when none."""
        if self.problems:
            raise DataValidationError(
                self.summary(limit) + "\nFix these records (or remove them from the data) and run again; nothing "
                "was computed on the data yet."
            )


def _problem_kind(message: str) -> str:
    for needle, kind in (
        ("not found", "missing files"),
        ("not a readable image", "unreadable frames"),
        ("media type", "wrong media types"),
        ("invalid RLE", "invalid RLEs"),
        ("has size", "mask size mismatches"),
        ("tokens", "prompts too long"),
        ("sample_id", "duplicate ids"),
    ):
        if needle in message:
            return kind
    return "other"


def record_where(record: dict, meta: dict | None = None) -> str:
    """How error messages name a record: ``"<file>:<line>"`` for a custom JSONL line, ``"<dataset> <split> video
    '<video>' expression '<exp_id>'"`` for a benchmark expression, ``"<dataset> <split> ref <ref_id>"`` for a
    RefCOCO sentence, else ``"sample '<sample_id>'"``."""
    if meta is None:
        meta = _meta(record)
    if "file" in meta and "line" in meta:
        return f"{meta['file']}:{meta['line']}"
    dataset, split = meta.get("dataset"), meta.get("split")
    if dataset is not None and "video" in meta and "exp_id" in meta:
        return f"{dataset} {split} video {meta['video']!r} expression {meta['exp_id']!r}"
    if dataset is not None and "ref_id" in meta:
        return f"{dataset} {split} ref {meta['ref_id']}" + (f" sentence {meta['sent_id']}" if "sent_id" in meta else "")
    return f"sample {record.get('sample_id')!r}"


def _meta(record: dict) -> dict:
    try:
        meta = json.loads(record.get("meta") or "{}")
    except (TypeError, json.JSONDecodeError):
        return {}
    return meta if isinstance(meta, dict) else {}


def _iter_rows(dataset) -> Iterator[dict]:
    """Rows with frames left undecoded (``{"path", "bytes"}``); a plain iterable of dicts is read as is."""
    if hasattr(dataset, "with_format") and hasattr(dataset, "column_names") and hasattr(dataset, "__len__"):
        for batch in dataset.with_format("arrow").iter(batch_size=64):
            yield from batch.to_pylist()
    else:
        yield from dataset


class _FrameSizes:
    """``(height, width)`` of frames from their headers, each file opened once."""

    def __init__(self) -> None:
        self._sizes: dict[str, tuple[int, int]] = {}

    def size(self, frame) -> tuple[int, int]:
        if isinstance(frame, Image.Image):
            return frame.height, frame.width
        if isinstance(frame, str):
            frame = {"path": frame, "bytes": None}
        if not isinstance(frame, dict):
            raise DataFormatError(f"a frame must be a path or {{'path', 'bytes'}}, got {type(frame).__name__}")
        if frame.get("bytes"):
            return self._open(io.BytesIO(frame["bytes"]), "frame bytes")
        path = frame.get("path")
        if not path:
            raise DataFormatError("a frame has neither a path nor bytes")
        if path not in self._sizes:
            self._sizes[path] = self._open(path, path)
        return self._sizes[path]

    @staticmethod
    def _open(source, name: str) -> tuple[int, int]:
        try:
            with Image.open(source) as image:
                return image.height, image.width
        except FileNotFoundError:
            raise FileNotFoundError(f"frame not found: {name}") from None
        except OSError as error:
            raise DataFormatError(f"{name} is not a readable image ({error})") from None


def _check_record(
    record: dict,
    *,
    sizes: _FrameSizes,
    expected_media: str | None,
    check_files: bool,
    check_masks: bool,
    prompt_length: Callable[[dict], int] | None,
    max_prompt_tokens: int | None,
) -> Iterable[str]:
    """The problems of one record, as messages."""
    media_type = record.get("media_type")
    frames = record.get("frames") or []
    if media_type not in MEDIA_TYPES:
        yield f"media type {media_type!r} is not one of {MEDIA_TYPES}"
    elif expected_media is not None and media_type != expected_media:
        yield (
            f"media type {media_type!r} but this data holds {expected_media} records; evaluate or train image and "
            "video records from separate files (or datasets)"
        )
    if not frames:
        yield "the record has no frames; give at least one image or frame"
        return
    if media_type == "image" and len(frames) != 1:
        yield f"an image record has exactly one frame, got {len(frames)}"

    frame_sizes: list[tuple[int, int] | None] = [None] * len(frames)
    if check_files or check_masks:
        for index, frame in enumerate(frames if check_files else frames[:1]):
            try:
                frame_sizes[index] = sizes.size(frame)
            except (FileNotFoundError, DataFormatError) as error:
                yield f"frame {index}: {error}"
        known = {size for size in frame_sizes if size is not None}
        if len(known) > 1:
            yield f"the frames have different sizes {sorted(known)}; every frame of a clip has one size"
    size = next((s for s in frame_sizes if s is not None), None)

    if check_masks:
        meta = _meta(record)
        try:
            objects = unpack_masks(record.get("masks") or [])
        except (KeyError, TypeError, ValueError) as error:
            yield f"masks are not masks[object][frame] RLE dicts ({type(error).__name__}: {error})"
            objects = []
        for obj, masks in enumerate(objects):
            if len(masks) != len(frames):
                yield f"object {obj} has {len(masks)} masks for {len(frames)} frames; give one mask per frame"
                continue
            yield from _rle_problems(masks, size, f"object {obj}")
        if meta.get("foreground") is not None:
            foreground = meta["foreground"]
            if not isinstance(foreground, list) or len(foreground) != len(frames):
                yield f"meta['foreground'] must hold one RLE per frame ({len(frames)} frames)"
            else:
                yield from _rle_problems(foreground, size, "meta['foreground']")

    if prompt_length is not None and max_prompt_tokens is not None:
        length = int(prompt_length(record))
        if length > max_prompt_tokens:
            yield (
                f"the templated prompt has {length} tokens, more than the limit of {max_prompt_tokens} tokens; "
                "shorten the prompt or raise the limit"
            )


def _rle_problems(masks: list[dict], size: tuple[int, int] | None, what: str) -> Iterator[str]:
    for frame, rle in enumerate(masks):
        try:
            check_rle(rle, size, f"{what} frame {frame}")
        except DataFormatError as error:
            yield str(error)
            return  # one bad mask per object is enough to name it


def validate_records(
    dataset,
    *,
    prompt_length: Callable[[dict], int] | None = None,
    max_prompt_tokens: int | None = None,
    expected_media: str | None = None,
    check_files: bool = True,
    check_masks: bool = True,
    progress: bool = True,
    description: str = "validating records",
    require_unique_ids: bool = False,
) -> ValidationReport:
    """Check every record of ``dataset`` and report all problems at once (nothing is raised for a bad record).

    Args:
        dataset: a `datasets.Dataset` with the columns of ``RECORD_FEATURES`` (or an iterable of such dicts).
            Frames are not decoded: only their headers are read.
        prompt_length: ``prompt_length(record) -> int``, the number of tokens of the record's templated prompt
            (record with frames undecoded). Checked only together with ``max_prompt_tokens``.
        max_prompt_tokens: the limit for ``prompt_length``.
        expected_media: ``"image"`` or ``"video"``: records of the other type are problems; ``None`` allows both.
        check_files: every frame exists and its header decodes (else only the first frame's header is read, for
            the mask size check).
        check_masks: every mask (and ReVOS foreground) is a valid RLE of the frame size, one per frame.
        progress: show a tqdm bar.
        description: the bar's label.
        require_unique_ids: a ``sample_id`` seen twice is a problem (evaluation stores predictions by id).

    Returns:
        The `ValidationReport`; call its ``raise_if_problems()`` to stop on problems.
    """
    if expected_media not in (None, *MEDIA_TYPES):
        raise ValueError(f"expected_media must be one of {MEDIA_TYPES} or None, got {expected_media!r}")
    if (prompt_length is None) != (max_prompt_tokens is None):
        raise ValueError("give prompt_length and max_prompt_tokens together (or neither)")
    sizes = _FrameSizes()
    problems: list[RecordProblem] = []
    media_types: Counter = Counter()
    seen_ids: dict[str, str] = {}
    total = len(dataset) if hasattr(dataset, "__len__") else None
    num_records = 0
    rows = tqdm(_iter_rows(dataset), total=total, desc=description, disable=not progress, unit="record")
    for index, record in enumerate(rows):
        num_records += 1
        sample_id = str(record.get("sample_id"))
        where = record_where(record)
        media_types[str(record.get("media_type"))] += 1
        messages = list(
            _check_record(
                record,
                sizes=sizes,
                expected_media=expected_media,
                check_files=check_files,
                check_masks=check_masks,
                prompt_length=prompt_length,
                max_prompt_tokens=max_prompt_tokens,
            )
        )
        if require_unique_ids:
            if sample_id in seen_ids:
                messages.append(
                    f"sample_id {sample_id!r} was already used by {seen_ids[sample_id]}; sample ids must be unique"
                )
            else:
                seen_ids[sample_id] = where
        problems.extend(RecordProblem(sample_id, where, message, index) for message in messages)
        if problems and progress and hasattr(rows, "set_postfix"):
            rows.set_postfix(problems=len(problems), refresh=False)
    report = ValidationReport(num_records=num_records, problems=problems, media_types=dict(media_types))
    if problems:
        logger.warning(
            "%s: %d problems in %d of %d records", description, len(problems), report.invalid_records, num_records
        )
    return report


def drop_invalid(dataset, report: ValidationReport):
    """``dataset`` without the records ``report`` found problems in; sets ``report.dropped`` and logs the count.
    The report must come from `validate_records` on this same dataset (rows are matched by position)."""
    bad = {problem.index for problem in report.problems}
    if None in bad:
        raise ValueError("the report's problems carry no row index; it does not come from validate_records")
    if report.num_records != len(dataset):
        raise ValueError(
            f"the report covers {report.num_records} records but the dataset has {len(dataset)}; validate this "
            "dataset first"
        )
    keep = [index for index in range(len(dataset)) if index not in bad]
    report.dropped = len(dataset) - len(keep)
    if report.dropped:
        logger.warning("dropped %d invalid records of %d", report.dropped, len(dataset))
    return dataset.select(keep) if report.dropped else dataset
