"""Boundary F-measure (the contour accuracy ``F`` of DAVIS / MeViS / ReVOS), in numpy.

Definitions (docs/evaluation.md, as the official evaluators compute them):

**Boundary map (BSDS ``seg2bmap`` rule, mask and map of the same size).** For a binary mask ``m`` of shape
``(H, W)``, pixel ``(y, x)`` is a boundary pixel when its value differs from a neighbour *towards the bottom
right*:

- interior pixels (``y < H-1`` and ``x < W-1``): ``m[y, x]`` differs from its right ``m[y, x+1]``, bottom
  ``m[y+1, x]`` or bottom-right ``m[y+1, x+1]`` neighbour;
- last row (``y = H-1``, ``x < W-1``): it differs from its right neighbour only;
- last column (``x = W-1``, ``y < H-1``): it differs from its bottom neighbour only;
- the bottom-right corner pixel is never a boundary pixel.

Both foreground and background pixels can be boundary pixels (a background pixel just above or left of an
object is one), so the map is the object contour shifted by half a pixel towards the origin. The image border
is not a contour: an all-foreground mask has no boundary pixels.

**Matching.** Both boundary maps are dilated by a disk of radius ``r = ceil(0.008 · sqrt(H² + W²))`` pixels
(``bound_th = 0.008``; a ``bound_th >= 1`` is used as the radius itself), the disk being the offsets
``(dy, dx)`` with ``dy² + dx² <= r²``. Precision ``P`` is the fraction of predicted boundary pixels inside the
dilated ground-truth boundary, recall ``R`` the fraction of ground-truth boundary pixels inside the dilated
predicted boundary. When neither mask has a boundary ``P = R = 1``; when exactly one has none, ``F = 0``
(``P, R = 1, 0`` or ``0, 1``). ``F = 2PR / (P + R)``, and ``0`` when ``P + R = 0``.
"""

from __future__ import annotations

import math

import numpy as np

__all__ = [
    "BOUNDARY_THRESHOLD",
    "boundary_f_measure",
    "boundary_precision_recall",
    "boundary_radius",
    "dilate_with_disk",
    "disk",
    "seg2bmap",
]

#: Fraction of the image diagonal used as the boundary matching tolerance.
BOUNDARY_THRESHOLD = 0.008


def seg2bmap(masks: np.ndarray) -> np.ndarray:
    """Boundary maps of binary masks by the BSDS ``seg2bmap`` rule (see the module docstring).

    Args:
        masks: array of shape ``(..., height, width)``; non-zero is foreground.

    Returns:
        ``bool`` array of shape ``(..., height, width)``.
    """
    masks = np.asarray(masks).astype(bool, copy=False)
    if masks.ndim < 2:
        raise ValueError(f"seg2bmap expects masks of shape (..., height, width), got shape {masks.shape}")
    boundary = np.zeros(masks.shape, dtype=bool)
    inner = masks[..., :-1, :-1]
    boundary[..., :-1, :-1] = (inner != masks[..., :-1, 1:]) | (inner != masks[..., 1:, :-1]) | (
        inner != masks[..., 1:, 1:]
    )
    boundary[..., -1, :-1] = masks[..., -1, :-1] != masks[..., -1, 1:]
    boundary[..., :-1, -1] = masks[..., :-1, -1] != masks[..., 1:, -1]
    return boundary


def boundary_radius(height: int, width: int, bound_th: float = BOUNDARY_THRESHOLD) -> int:
    """Matching tolerance in pixels: ``ceil(bound_th · sqrt(height² + width²))``, or ``bound_th`` itself when it
    is ``>= 1`` (an absolute number of pixels)."""
    if bound_th >= 1:
        return int(bound_th)
    if bound_th <= 0:
        raise ValueError(f"bound_th must be positive, got {bound_th}")
    return int(np.ceil(bound_th * np.linalg.norm([height, width])))


def disk(radius: int) -> np.ndarray:
    """Disk structuring element: ``bool`` array of shape ``(2r+1, 2r+1)``, true where ``dy² + dx² <= r²``."""
    offsets = np.arange(-radius, radius + 1)
    return offsets[:, None] ** 2 + offsets[None, :] ** 2 <= radius**2


def _dilate_rows(maps: np.ndarray, half_width: int) -> np.ndarray:
    """Dilate along the last axis by the segment ``[-half_width, half_width]`` (pixels outside are background).

    Uses a running count: pixel ``x`` is set when the window ``[x - w, x + w]`` holds a set pixel.
    """
    if half_width == 0:
        return maps
    width = maps.shape[-1]
    counts = np.zeros(maps.shape[:-1] + (width + 1,), dtype=np.int32)
    np.cumsum(maps, axis=-1, dtype=np.int32, out=counts[..., 1:])
    columns = np.arange(width)
    upper = np.minimum(columns + half_width + 1, width)
    lower = np.maximum(columns - half_width, 0)
    return counts[..., upper] > counts[..., lower]


def dilate_with_disk(maps: np.ndarray, radius: int) -> np.ndarray:
    """Binary dilation of ``maps`` by :func:`disk` ``(radius)``; pixels outside the image count as background.

    The disk is decomposed into its rows: for each vertical offset ``dy`` the map is dilated horizontally by
    the half-width ``floor(sqrt(r² - dy²))`` of that row and shifted by ``dy``.

    Args:
        maps: array of shape ``(..., height, width)``.
        radius: non-negative integer radius.

    Returns:
        ``bool`` array of shape ``(..., height, width)``.
    """
    maps = np.asarray(maps).astype(bool, copy=False)
    if radius < 0:
        raise ValueError(f"dilation radius must be >= 0, got {radius}")
    height = maps.shape[-2]
    dilated = np.zeros(maps.shape, dtype=bool)
    by_half_width: dict[int, np.ndarray] = {}
    for dy in range(-radius, radius + 1):
        if abs(dy) >= height:
            continue
        half_width = math.isqrt(radius * radius - dy * dy)
        if half_width not in by_half_width:
            by_half_width[half_width] = _dilate_rows(maps, half_width)
        rows = by_half_width[half_width]
        # output row y receives input row y + dy
        if dy >= 0:
            dilated[..., : height - dy, :] |= rows[..., dy:, :]
        else:
            dilated[..., -dy:, :] |= rows[..., : height + dy, :]
    return dilated


def _matched_fraction(source: np.ndarray, target: np.ndarray, radius: int) -> float:
    """Fraction of the ``source`` boundary pixels that lie inside ``target`` dilated by :func:`disk` ``(radius)``.

    Equal to ``count(source & dilate_with_disk(target, radius)) / count(source)``, but the dilation is only
    evaluated at the source pixels: for each row offset ``dy`` of the disk, a running count along the rows of
    ``target`` says whether the segment ``[x - w, x + w]`` of row ``y + dy`` holds a target pixel.

    Args:
        source: non-empty ``(height, width)`` boundary map.
        target: ``(height, width)`` boundary map.
    """
    height, width = target.shape
    counts = np.zeros((height, width + 1), dtype=np.int32)
    np.cumsum(target, axis=1, dtype=np.int32, out=counts[:, 1:])
    ys, xs = np.nonzero(source)
    matched = np.zeros(ys.shape, dtype=bool)
    for dy in range(-radius, radius + 1):
        rows = ys + dy
        inside = (rows >= 0) & (rows < height)
        if not inside.any():
            continue
        half_width = math.isqrt(radius * radius - dy * dy)
        rows, columns = rows[inside], xs[inside]
        upper = np.minimum(columns + half_width + 1, width)
        lower = np.maximum(columns - half_width, 0)
        matched[inside] |= counts[rows, upper] > counts[rows, lower]
    return float(matched.mean())


def boundary_precision_recall(
    predictions: np.ndarray, ground_truths: np.ndarray, bound_th: float = BOUNDARY_THRESHOLD
) -> tuple[np.ndarray, np.ndarray]:
    """Boundary precision and recall per frame.

    Args:
        predictions: masks of shape ``(num_frames, height, width)`` (or one ``(height, width)`` mask).
        ground_truths: masks of the same shape.
        bound_th: matching tolerance as a fraction of the image diagonal (``>= 1``: in pixels).

    Returns:
        ``(precision, recall)``, each ``float64`` of shape ``(num_frames,)`` (``(1,)`` for one mask), with the
        empty-boundary conventions of the module docstring.
    """
    predictions = np.asarray(predictions).astype(bool, copy=False)
    ground_truths = np.asarray(ground_truths).astype(bool, copy=False)
    if predictions.shape != ground_truths.shape:
        raise ValueError(
            f"predictions {predictions.shape} and ground truth {ground_truths.shape} must have the same shape"
        )
    if predictions.ndim == 2:
        predictions, ground_truths = predictions[None], ground_truths[None]
    if predictions.ndim != 3:
        raise ValueError(f"expected masks of shape (num_frames, height, width), got {predictions.shape}")
    radius = boundary_radius(predictions.shape[-2], predictions.shape[-1], bound_th)
    predicted_boundaries = seg2bmap(predictions)
    true_boundaries = seg2bmap(ground_truths)
    has_predicted = predicted_boundaries.any(axis=(-2, -1))
    has_true = true_boundaries.any(axis=(-2, -1))

    num_frames = predictions.shape[0]
    precision = np.ones(num_frames, dtype=np.float64)
    recall = np.ones(num_frames, dtype=np.float64)
    recall[~has_predicted & has_true] = 0.0  # nothing predicted: P = 1, R = 0
    precision[has_predicted & ~has_true] = 0.0  # nothing to find: P = 0, R = 1
    for frame in np.flatnonzero(has_predicted & has_true):
        # every pixel that is counted or can be matched lies in the bounding box of both boundaries
        predicted, true = predicted_boundaries[frame], true_boundaries[frame]
        rows = np.flatnonzero(predicted.any(axis=1) | true.any(axis=1))
        columns = np.flatnonzero(predicted.any(axis=0) | true.any(axis=0))
        crop = (slice(rows[0], rows[-1] + 1), slice(columns[0], columns[-1] + 1))
        precision[frame] = _matched_fraction(predicted[crop], true[crop], radius)
        recall[frame] = _matched_fraction(true[crop], predicted[crop], radius)
    return precision, recall


def boundary_f_measure(
    predictions: np.ndarray, ground_truths: np.ndarray, bound_th: float = BOUNDARY_THRESHOLD
) -> np.ndarray:
    """Boundary F-measure per frame.

    Args:
        predictions: masks of shape ``(num_frames, height, width)`` (or one ``(height, width)`` mask).
        ground_truths: masks of the same shape.
        bound_th: matching tolerance as a fraction of the image diagonal (``>= 1``: in pixels).

    Returns:
        ``float64`` array of shape ``(num_frames,)``: ``2PR / (P + R)``, ``0`` where ``P + R = 0``.
    """
    precision, recall = boundary_precision_recall(predictions, ground_truths, bound_th)
    total = precision + recall
    safe_total = np.where(total > 0, total, 1.0)
    return np.where(total > 0, 2.0 * precision * recall / safe_total, 0.0)
