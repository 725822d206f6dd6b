"""Video segmentation with SAM2 memory propagation (being written; see issue 3)."""

from __future__ import annotations


def segment_video(model, **inputs):
    raise NotImplementedError("video segmentation is not implemented yet")
