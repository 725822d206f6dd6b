"""The one record format every loader in `transformers_maskcma.data` produces.

A record is one referring sample: one image or one clip, one prompt, and the ground-truth masks of the
objects the answer refers to, in the order of the answer's ``[SEG]`` tokens.

=============  =====================================  ===============================================================
field          type                                   meaning
=============  =====================================  ===============================================================
sample_id      str                                    unique within the source, e.g. ``"refcoco/val/ref123/sent4"``
source         str                                    dataset name (``"refcoco"``, ``"mevis"``, ``"synthetic"``, …)
media_type     str                                    ``"image"`` or ``"video"``
media_id       str                                    the image file / video name, used for leakage checks
frames         list[Image]                            one frame for an image; every frame of the clip for a video.
                                                      Stored as paths (decoded lazily by ``datasets.Image``) or
                                                      PNG bytes for generated data.
prompt         str                                    the user's text: a referring expression or a question
answer         str                                    the target answer with one ``[SEG]`` per object; empty string
                                                      means "use the default answer template" at processing time
masks          list[list[{"size": [h, w],             ``masks[object][frame]``: COCO compressed RLE (``counts`` as
                          "counts": str}]]            str); an absent object in a frame is an empty mask
meta           str                                    JSON object with source-specific fields (``type_id`` for
                                                      ReVOS, ``exp_id``, ``split``, ``anno_ids``…)
=============  =====================================  ===============================================================
"""

from __future__ import annotations

import json

import datasets
import numpy as np
from pycocotools import mask as coco_mask

# `datasets.List` (not `Sequence`) so that a list of dicts stays a list of dicts (Sequence of a dict stores a
# dict of lists)
RLE_FEATURE = {"size": datasets.List(datasets.Value("int32")), "counts": datasets.Value("string")}

RECORD_FEATURES = datasets.Features(
    {
        "sample_id": datasets.Value("string"),
        "source": datasets.Value("string"),
        "media_type": datasets.Value("string"),
        "media_id": datasets.Value("string"),
        "frames": datasets.List(datasets.Image()),
        "prompt": datasets.Value("string"),
        "answer": datasets.Value("string"),
        "masks": datasets.List(datasets.List(RLE_FEATURE)),
        "meta": datasets.Value("string"),
    }
)


def encode_rle(mask: np.ndarray) -> dict:
    """Encode a binary mask of shape ``(height, width)`` as COCO compressed RLE with ``counts`` as ``str``."""
    if mask.ndim != 2:
        raise ValueError(f"encode_rle expects a 2-D mask of shape (height, width), got shape {tuple(mask.shape)}")
    rle = coco_mask.encode(np.asfortranarray(mask.astype(np.uint8)))
    return {"size": [int(rle["size"][0]), int(rle["size"][1])], "counts": rle["counts"].decode("ascii")}


def rle_run_lengths(counts: str | bytes | list) -> np.ndarray:
    """The run lengths of an RLE's ``counts`` as an ``int64`` array, without checking them.

    ``counts`` is either an uncompressed list of ints or COCO's compressed string: each run length is written in
    6-bit groups (character code minus 48), 5 value bits each with bit ``0x20`` meaning "another group follows"
    and bit ``0x10`` of the last group the sign; from the fourth run on, the value stored is the difference to the
    run two places before. Raises ``ValueError`` for characters outside the alphabet or a truncated last run.
    """
    if isinstance(counts, list | tuple):
        if not all(isinstance(value, int | np.integer) and not isinstance(value, bool) for value in counts):
            raise ValueError("uncompressed RLE counts must be integers")
        return np.asarray(counts, dtype=np.int64)
    if isinstance(counts, str):
        try:
            counts = counts.encode("ascii")
        except UnicodeEncodeError:
            raise ValueError("compressed RLE counts hold non-ASCII characters") from None
    codes = np.frombuffer(bytes(counts), dtype=np.uint8).astype(np.int64) - 48
    if codes.size == 0:
        return np.zeros(0, dtype=np.int64)
    if codes.min() < 0 or codes.max() > 63:
        raise ValueError("compressed RLE counts hold characters outside the COCO alphabet ('0' to 'o')")
    more = (codes & 0x20) != 0
    if more[-1]:
        raise ValueError("compressed RLE counts end in the middle of a run length (truncated string)")
    ends = np.flatnonzero(~more)
    starts = np.concatenate(([0], ends[:-1] + 1))
    group = np.repeat(np.arange(len(ends)), ends - starts + 1)
    position = np.arange(codes.size) - starts[group]
    if position.max() > 11:
        raise ValueError("compressed RLE counts hold a run length of more than 12 groups (not a COCO RLE)")
    values = np.add.reduceat((codes & 0x1F) << (5 * position), starts)
    negative = (codes[ends] & 0x10) != 0
    values = values - np.where(negative, np.left_shift(1, 5 * (ends - starts + 1)), 0)
    if values.size > 3:
        values[3::2] = values[1] + np.cumsum(values[3::2])
    if values.size > 4:
        values[4::2] = values[2] + np.cumsum(values[4::2])
    return values


def check_rle(rle: dict, expected_size: tuple[int, int] | None = None, where: str = "mask") -> tuple[int, int]:
    """Check that ``rle`` is a valid COCO RLE and return its ``(height, width)``.

    Valid means: ``size`` is two non-negative integers (equal to ``expected_size`` when given), ``counts`` is a
    compressed string or a list of integers, every run length is non-negative, and the run lengths sum to exactly
    ``height * width`` (fewer would leave pixels undefined, more would write past the mask). ``where`` names the
    file and line or record the RLE comes from; it starts every error message.

    Raises:
        MaskSizeError: the size differs from ``expected_size``.
        DataFormatError: any other problem.
    """
    from .errors import DataFormatError, MaskSizeError

    if not isinstance(rle, dict) or "size" not in rle or "counts" not in rle:
        raise DataFormatError(f"{where}: an RLE needs 'size' = [height, width] and 'counts', got {rle!r:.200}")
    size = rle["size"]
    if (
        not isinstance(size, list | tuple)
        or len(size) != 2
        or not all(isinstance(v, int | np.integer) and not isinstance(v, bool) and v >= 0 for v in size)
    ):
        raise DataFormatError(f"{where}: RLE 'size' must be [height, width] (two non-negative ints), got {size!r:.80}")
    height, width = int(size[0]), int(size[1])
    if expected_size is not None and (height, width) != tuple(expected_size):
        raise MaskSizeError(
            f"{where}: mask RLE has size {(height, width)} (height, width) but its image/frame is "
            f"{tuple(expected_size)}; the annotation belongs to another image or the frames were resized. "
            "Re-encode the mask at the frame size."
        )
    counts = rle["counts"]
    if not isinstance(counts, str | bytes | list | tuple):
        raise DataFormatError(
            f"{where}: RLE 'counts' must be a compressed string or a list of ints, got {type(counts).__name__}"
        )
    try:
        runs = rle_run_lengths(counts)
    except ValueError as error:
        raise DataFormatError(f"{where}: invalid RLE counts: {error}") from None
    if runs.size and runs.min() < 0:
        index = int(np.flatnonzero(runs < 0)[0])
        raise DataFormatError(
            f"{where}: invalid RLE counts: run {index} has the negative length {int(runs[index])}; run lengths are "
            "non-negative (the file is corrupted or was not written by a COCO RLE encoder)"
        )
    total = int(runs.sum())
    if total != height * width:
        raise DataFormatError(
            f"{where}: invalid RLE counts: the run lengths sum to {total} but a {height}x{width} mask has "
            f"{height * width} pixels; the counts belong to a mask of another size or are truncated"
        )
    return height, width


def decode_rle(rle: dict, expected_size: tuple[int, int] | None = None, where: str = "mask") -> np.ndarray:
    """Decode a COCO RLE (compressed ``str``/``bytes`` counts or uncompressed ``list`` counts) to a ``bool``
    array of shape ``(height, width)``, after `check_rle`: raises `MaskSizeError` when ``expected_size`` is given
    and differs, `DataFormatError` for invalid run lengths; ``where`` (file and line, or record id) starts the
    message."""
    height, width = check_rle(rle, expected_size, where)
    counts = rle["counts"]
    if isinstance(counts, list | tuple):
        rle = coco_mask.frPyObjects({"size": [height, width], "counts": [int(v) for v in counts]}, height, width)
    elif isinstance(counts, str):
        rle = {"size": [height, width], "counts": counts.encode("ascii")}
    else:
        rle = {"size": [height, width], "counts": counts}
    return coco_mask.decode(rle).astype(bool)


def empty_rle(height: int, width: int) -> dict:
    """The RLE of an all-background mask of shape ``(height, width)``."""
    return encode_rle(np.zeros((height, width), dtype=np.uint8))


def make_meta(**fields) -> str:
    """Serialise source-specific fields for the ``meta`` column (sorted keys, so records hash stably)."""
    return json.dumps(fields, sort_keys=True)
