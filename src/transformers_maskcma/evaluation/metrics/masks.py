"""Turning the many shapes a prediction or a ground truth can take into one boolean mask per frame.

An answer can hold several masks (one per ``[SEG]``); every metric (docs/evaluation.md) scores their union, and a
missing prediction counts as an empty mask. The helpers here apply those two rules in one place.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

__all__ = ["as_frame_stack", "union_of_masks"]


def union_of_masks(masks, shape: tuple[int, int] | None = None) -> np.ndarray:
    """The union of the masks of one answer on one image (or one frame).

    Args:
        masks: ``None`` (no prediction), an array of shape ``(height, width)`` (one mask), an array of shape
            ``(num_masks, height, width)`` or a sequence of ``(height, width)`` arrays (several masks, OR-ed).
            ``num_masks`` may be ``0``.
        shape: ``(height, width)`` of the image. Required when ``masks`` is ``None`` or an empty sequence, and
            checked against the masks otherwise.

    Returns:
        ``bool`` array of shape ``(height, width)``.
    """
    if masks is None:
        if shape is None:
            raise ValueError("union_of_masks got no masks (None) and no `shape`; pass shape=(height, width)")
        return np.zeros(tuple(shape), dtype=bool)
    if isinstance(masks, np.ndarray):
        array = masks
    elif isinstance(masks, Sequence) and len(masks) == 0:
        if shape is None:
            raise ValueError("union_of_masks got an empty list of masks and no `shape`; pass shape=(height, width)")
        return np.zeros(tuple(shape), dtype=bool)
    else:
        array = np.stack([np.asarray(mask) for mask in masks])
    if array.ndim == 2:
        union = array.astype(bool)
    elif array.ndim == 3:
        if array.shape[0] == 0 and shape is None:
            shape = array.shape[1:]
        union = array.astype(bool).any(axis=0) if array.shape[0] else np.zeros(array.shape[1:], dtype=bool)
    else:
        raise ValueError(
            f"expected a mask of shape (height, width) or masks of shape (num_masks, height, width), "
            f"got shape {tuple(array.shape)}"
        )
    if shape is not None and tuple(union.shape) != tuple(shape):
        raise ValueError(f"mask has shape {tuple(union.shape)} but the image is {tuple(shape)} (height, width)")
    return union


def as_frame_stack(frames, name: str = "masks") -> np.ndarray:
    """Stack per-frame masks into a ``bool`` array of shape ``(num_frames, height, width)``.

    Args:
        frames: an array of shape ``(num_frames, height, width)`` or a sequence of ``(height, width)`` arrays.
        name: what the masks are, for error messages (``"predictions"``, ``"ground truth"``).
    """
    if not isinstance(frames, np.ndarray) and len(frames) == 0:
        raise ValueError(f"{name}: an expression with no frames cannot be scored (got an empty list)")
    array = frames if isinstance(frames, np.ndarray) else np.stack([np.asarray(frame) for frame in frames])
    if array.ndim != 3:
        raise ValueError(f"{name}: expected shape (num_frames, height, width), got {tuple(array.shape)}")
    if array.shape[0] == 0:
        raise ValueError(f"{name}: an expression with no frames cannot be scored (shape {tuple(array.shape)})")
    return array.astype(bool, copy=False)
