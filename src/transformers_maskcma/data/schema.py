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


def decode_rle(rle: dict, expected_size: tuple[int, int] | None = None) -> np.ndarray:
    """Decode a COCO RLE (compressed ``str``/``bytes`` counts or uncompressed ``list`` counts) to a ``bool``
    array of shape ``(height, width)``. Raises ``ValueError`` when ``expected_size`` is given and differs."""
    height, width = (int(v) for v in rle["size"])
    if expected_size is not None and (height, width) != tuple(expected_size):
        raise ValueError(
            f"RLE has size {(height, width)} but the image/frame is {tuple(expected_size)}; "
            "the mask annotation does not belong to this image or was resized"
        )
    counts = rle["counts"]
    if isinstance(counts, list):
        rle = coco_mask.frPyObjects({"size": [height, width], "counts": counts}, height, width)
    elif isinstance(counts, str):
        rle = {"size": [height, width], "counts": counts.encode("ascii")}
    return coco_mask.decode(rle).astype(bool)


def empty_rle(height: int, width: int) -> dict:
    """The RLE of an all-background mask of shape ``(height, width)``."""
    return encode_rle(np.zeros((height, width), dtype=np.uint8))


def make_meta(**fields) -> str:
    """Serialise source-specific fields for the ``meta`` column (sorted keys, so records hash stably)."""
    return json.dumps(fields, sort_keys=True)
