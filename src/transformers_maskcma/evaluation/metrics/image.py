"""Referring image segmentation metrics: gIoU and cIoU (RefCOCO / RefCOCO+ / RefCOCOg, LISA / Sa2VA protocol).

For sample ``i`` (one referring sentence) with intersection ``I_i`` and union ``U_i`` (in pixels) between the
union of the predicted masks and the union of the ground-truth masks:

- ``gIoU = mean_i g_i`` with ``g_i = I_i / (U_i + 1e-5)`` when ``U_i > 0`` and ``g_i = 1`` when ``U_i = 0``
  (both masks empty: a correct "no object" answer);
- ``cIoU = sum_i I_i / (sum_i U_i + 1e-10)`` (cumulative IoU; ``0`` when every union is empty).

A missing prediction is an empty mask; several masks of one answer are OR-ed (docs/evaluation.md). Values are
fractions in ``[0, 1]``; the published tables show them ×100.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from .masks import union_of_masks

__all__ = [
    "CIOU_EPSILON",
    "GIOU_EPSILON",
    "ReferringImageMetrics",
    "giou_ciou_from_counts",
    "image_referring_metrics",
    "intersection_and_union",
]

#: Added to each sample's union in gIoU (the LISA evaluator's constant).
GIOU_EPSILON = 1e-5
#: Added to the summed union in cIoU.
CIOU_EPSILON = 1e-10


@dataclass(frozen=True)
class ReferringImageMetrics:
    """gIoU and cIoU over a set of referring samples.

    Attributes:
        giou: mean per-sample IoU (see the module docstring for the constants).
        ciou: cumulative IoU.
        n_samples: number of samples scored.
        intersections: ``int64`` array of shape ``(n_samples,)``, pixels in prediction ∩ ground truth.
        unions: ``int64`` array of shape ``(n_samples,)``, pixels in prediction ∪ ground truth.
        per_sample_iou: ``float64`` array of shape ``(n_samples,)``, the ``g_i`` averaged by gIoU.
    """

    giou: float
    ciou: float
    n_samples: int
    intersections: np.ndarray
    unions: np.ndarray
    per_sample_iou: np.ndarray

    def to_dict(self) -> dict[str, float | int]:
        """The summary numbers as plain Python values (for JSON)."""
        return {"gIoU": self.giou, "cIoU": self.ciou, "n_samples": self.n_samples}


def intersection_and_union(prediction, ground_truth) -> tuple[int, int]:
    """Pixel counts of ``prediction ∩ ground_truth`` and ``prediction ∪ ground_truth`` for one sample.

    Args:
        prediction: ``None`` (missing: an empty mask), a ``(height, width)`` mask, or several masks
            (``(num_masks, height, width)`` array or a list of ``(height, width)`` arrays) that are OR-ed.
        ground_truth: same forms as ``prediction`` (several ground-truth objects are OR-ed as well); it must
            carry the image size, so an empty ground truth is a ``(height, width)`` array of zeros or a
            ``(0, height, width)`` array.

    Returns:
        ``(intersection, union)`` as Python ``int``.
    """
    truth = union_of_masks(ground_truth)
    predicted = union_of_masks(prediction, shape=truth.shape)
    intersection = int(np.count_nonzero(predicted & truth))
    union = int(np.count_nonzero(predicted | truth))
    return intersection, union


def giou_ciou_from_counts(intersections, unions) -> tuple[float, float, np.ndarray]:
    """gIoU and cIoU from per-sample pixel counts.

    Args:
        intersections: array-like of shape ``(n_samples,)``.
        unions: array-like of shape ``(n_samples,)``; ``unions >= intersections`` element-wise.

    Returns:
        ``(giou, ciou, per_sample_iou)`` with ``per_sample_iou`` of shape ``(n_samples,)``.
    """
    intersections = np.asarray(intersections, dtype=np.float64)
    unions = np.asarray(unions, dtype=np.float64)
    if intersections.shape != unions.shape or intersections.ndim != 1:
        raise ValueError(
            f"intersections and unions must be 1-D arrays of the same length, got shapes "
            f"{intersections.shape} and {unions.shape}"
        )
    if intersections.size == 0:
        raise ValueError("gIoU/cIoU of zero samples is undefined: the evaluation set is empty")
    if np.any(intersections > unions) or np.any(intersections < 0):
        raise ValueError("every intersection must lie in [0, union]; the counts are not from the same masks")
    per_sample = intersections / (unions + GIOU_EPSILON)
    per_sample = np.where(unions == 0, per_sample + 1.0, per_sample)
    giou = float(per_sample.mean())
    ciou = float(intersections.sum() / (unions.sum() + CIOU_EPSILON))
    return giou, ciou, per_sample


def image_referring_metrics(predictions: Sequence, ground_truths: Sequence) -> ReferringImageMetrics:
    """gIoU and cIoU of a list of referring image predictions.

    Args:
        predictions: one entry per sample, each ``None`` (missing prediction, scored as an empty mask), a
            ``(height, width)`` mask or several masks (``(num_masks, height, width)`` / list) that are OR-ed.
        ground_truths: one entry per sample in the same order, each a ``(height, width)`` mask or several
            ``(num_objects, height, width)`` masks (OR-ed); sizes may differ between samples.

    Returns:
        :class:`ReferringImageMetrics`.
    """
    if len(predictions) != len(ground_truths):
        raise ValueError(
            f"got {len(predictions)} predictions for {len(ground_truths)} ground truths; they must be paired"
        )
    counts = np.zeros((len(predictions), 2), dtype=np.int64)
    for index, (prediction, truth) in enumerate(zip(predictions, ground_truths)):
        try:
            counts[index] = intersection_and_union(prediction, truth)
        except ValueError as error:
            raise ValueError(f"sample {index}: {error}") from error
    giou, ciou, per_sample = giou_ciou_from_counts(counts[:, 0], counts[:, 1])
    return ReferringImageMetrics(
        giou=giou,
        ciou=ciou,
        n_samples=len(predictions),
        intersections=counts[:, 0],
        unions=counts[:, 1],
        per_sample_iou=per_sample,
    )
