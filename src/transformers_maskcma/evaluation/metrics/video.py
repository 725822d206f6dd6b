"""Referring video segmentation metrics: J, F and J&F (MeViS / Ref-DAVIS17 / ReVOS, VISA protocol) and ReVOS A, R.

Per expression (one referring sentence over a clip of ``T`` frames), with the prediction and the ground truth
being the union of their objects' masks in each frame:

- ``J_t`` = IoU of frame ``t``, and ``1`` when both masks are empty; ``J = mean_t J_t`` over **all** frames;
- ``F_t`` = boundary F-measure of frame ``t`` (:mod:`.boundary`); ``F = mean_t F_t``;
- ReVOS ``A_t`` = pixel accuracy ``mean(prediction == ground truth)`` of frame ``t``; ``A = mean_t A_t``;
- ReVOS ``R_t = max(1 - FP_t / (|fg_t| + 1e-6), 0)`` with ``FP_t`` the predicted pixels outside the ground truth
  and ``fg_t`` the union of *all* annotated objects of the frame (not only the referred ones); ``R = mean_t R_t``.

Over a dataset: ``J`` and ``F`` are the means over expressions and ``J&F = (J + F) / 2``. ReVOS reports every
number for the referring (``type_id`` 0) and the reasoning (``type_id`` 1) subsets, and ``overall`` as the mean of
the two subset means (not the mean over all expressions).

**The official ReVOS scorers' ground truth.** VISA's and Sa2VA's ReVOS scripts build the ground truth of an
expression as the *uint8 sum* of its objects' masks, so a pixel two objects share is ``2``, then per frame
``A_t = mean(gt == pred)`` and ``R_t = max(1 - sum((1 - gt) * pred) / (sum(fg) + 1e-6), 0)`` in uint8 arithmetic
(``1 - 2`` wraps to ``255``, ``1 - 3`` to ``254``). With a 0/1 prediction an overlap pixel is therefore always an
``A`` miss and, when predicted, ``255`` false positives. :func:`official_accuracy_per_frame` and
:func:`official_robustness_per_frame` reproduce this from the per-pixel object count; ``J`` and ``F`` binarise
the ground truth and are the same under both rules. :func:`pixel_accuracy_per_frame` and
:func:`robustness_per_frame` are the union rule (a pixel is foreground once).

``type_id`` 2 expressions belong to neither subset: the official scripts average only ``type_id`` 0 and 1, and
:func:`revos_scores` leaves the others out and counts them (``n_excluded``).

Values are fractions in ``[0, 1]`` (the published tables show them ×100). The official ReVOS script rounds each
expression's scores to 0.01 % before averaging; these functions do not round (the difference is below 0.005 points).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from .boundary import BOUNDARY_THRESHOLD, boundary_f_measure
from .masks import as_frame_stack

logger = logging.getLogger(__name__)

__all__ = [
    "ExpressionScores",
    "REVOS_REASONING",
    "REVOS_REFERRING",
    "ROBUSTNESS_EPSILON",
    "ReVOSMetrics",
    "ReVOSSubsetMetrics",
    "VideoMetrics",
    "aggregate_video",
    "jaccard_per_frame",
    "official_accuracy_per_frame",
    "official_robustness_per_frame",
    "pixel_accuracy_per_frame",
    "revos_scores",
    "robustness_per_frame",
    "video_expression_scores",
]

#: ReVOS ``type_id`` of referring and of reasoning expressions.
REVOS_REFERRING = 0
REVOS_REASONING = 1
#: Added to the foreground area in the ReVOS robustness score.
ROBUSTNESS_EPSILON = 1e-6


def _check_pair(predictions: np.ndarray, ground_truths: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    predictions = as_frame_stack(predictions, "predictions")
    ground_truths = as_frame_stack(ground_truths, "ground truth")
    if predictions.shape != ground_truths.shape:
        raise ValueError(
            f"predictions have shape {predictions.shape} but the ground truth has {ground_truths.shape} "
            "(num_frames, height, width); predict one mask per frame at the frame's size"
        )
    return predictions, ground_truths


def jaccard_per_frame(predictions: np.ndarray, ground_truths: np.ndarray) -> np.ndarray:
    """Region similarity ``J`` of each frame.

    Args:
        predictions: ``(num_frames, height, width)`` masks.
        ground_truths: ``(num_frames, height, width)`` masks.

    Returns:
        ``float64`` array of shape ``(num_frames,)``: IoU, ``1`` where both masks are empty.
    """
    predictions, ground_truths = _check_pair(predictions, ground_truths)
    intersection = np.count_nonzero(predictions & ground_truths, axis=(-2, -1))
    union = np.count_nonzero(predictions | ground_truths, axis=(-2, -1))
    return np.where(union == 0, 1.0, intersection / np.maximum(union, 1))


def pixel_accuracy_per_frame(predictions: np.ndarray, ground_truths: np.ndarray) -> np.ndarray:
    """ReVOS ``A`` of each frame: the fraction of pixels where prediction and ground truth agree.

    Returns:
        ``float64`` array of shape ``(num_frames,)``.
    """
    predictions, ground_truths = _check_pair(predictions, ground_truths)
    return (predictions == ground_truths).mean(axis=(-2, -1), dtype=np.float64)


def robustness_per_frame(predictions: np.ndarray, ground_truths: np.ndarray, foregrounds: np.ndarray) -> np.ndarray:
    """ReVOS robustness ``R_t = max(1 - FP_t / (|fg_t| + 1e-6), 0)``.

    Args:
        predictions: ``(num_frames, height, width)`` masks.
        ground_truths: ``(num_frames, height, width)`` masks of the referred objects.
        foregrounds: ``(num_frames, height, width)`` union of all annotated objects of each frame.

    Returns:
        ``float64`` array of shape ``(num_frames,)``.
    """
    predictions, ground_truths = _check_pair(predictions, ground_truths)
    foregrounds = as_frame_stack(foregrounds, "foreground")
    if foregrounds.shape != predictions.shape:
        raise ValueError(f"foreground masks have shape {foregrounds.shape}, expected {predictions.shape}")
    false_positives = np.count_nonzero(predictions & ~ground_truths, axis=(-2, -1))
    foreground_area = np.count_nonzero(foregrounds, axis=(-2, -1))
    return np.maximum(1.0 - false_positives / (foreground_area + ROBUSTNESS_EPSILON), 0.0)


def _check_counts(predictions: np.ndarray, counts) -> np.ndarray:
    counts = np.asarray(counts)
    if counts.shape != predictions.shape:
        raise ValueError(f"ground-truth counts have shape {counts.shape}, expected {predictions.shape}")
    if counts.dtype == bool or not np.issubdtype(counts.dtype, np.integer) or counts.min(initial=0) < 0:
        raise ValueError("ground-truth counts must be non-negative integers (objects covering each pixel)")
    return counts.astype(np.uint8)  # the official scorers accumulate the objects in uint8


def official_accuracy_per_frame(predictions: np.ndarray, ground_truth_counts: np.ndarray) -> np.ndarray:
    """ReVOS ``A`` of each frame as the official scorers compute it: ``mean(gt == pred)`` with ``gt`` the uint8
    sum of the expression's object masks and ``pred`` 0/1, so a pixel covered by two objects never agrees.

    Args:
        predictions: ``(num_frames, height, width)`` binary masks.
        ground_truth_counts: ``(num_frames, height, width)`` integers: how many of the expression's objects cover
            each pixel.

    Returns:
        ``float64`` array of shape ``(num_frames,)``.
    """
    predictions = as_frame_stack(predictions, "predictions")
    counts = _check_counts(predictions, ground_truth_counts)
    return (counts == predictions.astype(np.uint8)).mean(axis=(-2, -1), dtype=np.float64)


def official_robustness_per_frame(
    predictions: np.ndarray, ground_truth_counts: np.ndarray, foreground_areas
) -> np.ndarray:
    """ReVOS ``R`` of each frame as the official scorers compute it:
    ``max(1 - sum((1 - gt) * pred) / (area_t + 1e-6), 0)`` with ``gt`` the uint8 object count, where ``1 - gt``
    wraps modulo 256 (``1 - 2 = 255``): a predicted pixel of two overlapping objects counts 255 false positives.

    Args:
        predictions: ``(num_frames, height, width)`` binary masks.
        ground_truth_counts: ``(num_frames, height, width)`` object counts of the referred objects.
        foreground_areas: ``(num_frames,)`` the official foreground sum of each frame (the foreground pixels, or
            the sum of the objects' areas when the foreground file lists the objects separately).

    Returns:
        ``float64`` array of shape ``(num_frames,)``.
    """
    predictions = as_frame_stack(predictions, "predictions")
    counts = _check_counts(predictions, ground_truth_counts)
    areas = np.asarray(foreground_areas, dtype=np.float64)
    if areas.shape != (predictions.shape[0],):
        raise ValueError(f"foreground_areas must have shape ({predictions.shape[0]},), got {areas.shape}")
    wrapped = np.uint8(1) - counts  # uint8 wrap-around, as in the official scripts
    false_positives = (wrapped.astype(np.int64) * predictions.astype(np.int64)).sum(axis=(-2, -1))
    return np.maximum(1.0 - false_positives / (areas + ROBUSTNESS_EPSILON), 0.0)


@dataclass(frozen=True)
class ExpressionScores:
    """Scores of one referring expression over its clip.

    Attributes:
        j: mean ``J_t`` over all frames.
        f: mean ``F_t`` over all frames.
        j_per_frame: ``(num_frames,)``.
        f_per_frame: ``(num_frames,)``.
        accuracy: ReVOS ``A`` (mean pixel accuracy), or ``None`` when not computed.
        robustness: ReVOS ``R``, or ``None`` when no foreground masks were given.
    """

    j: float
    f: float
    j_per_frame: np.ndarray
    f_per_frame: np.ndarray
    accuracy: float | None = None
    robustness: float | None = None

    @property
    def jf(self) -> float:
        """``(J + F) / 2`` of this expression."""
        return (self.j + self.f) / 2.0

    def to_dict(self) -> dict[str, float | None]:
        """The per-expression numbers as plain Python values (for JSON)."""
        return {"J": self.j, "F": self.f, "J&F": self.jf, "A": self.accuracy, "R": self.robustness}


def video_expression_scores(
    pred_frames,
    gt_frames,
    foreground_frames=None,
    bound_th: float = BOUNDARY_THRESHOLD,
    ground_truth_counts=None,
    foreground_areas=None,
) -> ExpressionScores:
    """J and F (and ReVOS A, R) of one expression.

    Args:
        pred_frames: predicted masks, ``(num_frames, height, width)`` array or list of ``(height, width)``
            masks (the union of the answer's objects in each frame).
        gt_frames: ground-truth masks of the same shape (the union of the referred objects).
        foreground_frames: optional ``(num_frames, height, width)`` union of all annotated objects of each frame;
            when given, ReVOS ``R`` is computed. ``A`` is always computed.
        bound_th: boundary tolerance for ``F`` (see :func:`.boundary.boundary_radius`).
        ground_truth_counts: optional ``(num_frames, height, width)`` count of the referred objects covering each
            pixel; when given, ``A`` and ``R`` follow the official ReVOS scorers (module docstring) instead of the
            union rule. ``gt_frames`` must then be ``ground_truth_counts > 0``.
        foreground_areas: optional ``(num_frames,)`` official foreground sums for ``R`` with
            ``ground_truth_counts`` (default: the pixel count of ``foreground_frames``).

    Returns:
        :class:`ExpressionScores`.
    """
    predictions, ground_truths = _check_pair(pred_frames, gt_frames)
    j_per_frame = jaccard_per_frame(predictions, ground_truths)
    f_per_frame = boundary_f_measure(predictions, ground_truths, bound_th=bound_th)
    robustness = None
    if ground_truth_counts is not None:
        if not np.array_equal(np.asarray(ground_truth_counts) > 0, ground_truths):
            raise ValueError("ground_truth_counts > 0 must equal the ground-truth masks gt_frames")
        accuracy = float(official_accuracy_per_frame(predictions, ground_truth_counts).mean())
        if foreground_frames is not None or foreground_areas is not None:
            if foreground_areas is None:
                foreground_areas = np.count_nonzero(as_frame_stack(foreground_frames, "foreground"), axis=(-2, -1))
            robustness = float(
                official_robustness_per_frame(predictions, ground_truth_counts, foreground_areas).mean()
            )
    else:
        accuracy = float(pixel_accuracy_per_frame(predictions, ground_truths).mean())
        if foreground_frames is not None:
            robustness = float(robustness_per_frame(predictions, ground_truths, foreground_frames).mean())
    return ExpressionScores(
        j=float(j_per_frame.mean()),
        f=float(f_per_frame.mean()),
        j_per_frame=j_per_frame,
        f_per_frame=f_per_frame,
        accuracy=accuracy,
        robustness=robustness,
    )


@dataclass(frozen=True)
class VideoMetrics:
    """Dataset-level video metrics (MeViS / Ref-DAVIS17 / Ref-YouTube-VOS protocol).

    Attributes:
        j: mean over expressions of the per-expression ``J``.
        f: mean over expressions of the per-expression ``F``.
        jf: ``(j + f) / 2``.
        n_expressions: number of expressions averaged.
    """

    j: float
    f: float
    jf: float
    n_expressions: int

    def to_dict(self) -> dict[str, float | int]:
        return {"J": self.j, "F": self.f, "J&F": self.jf, "n_expressions": self.n_expressions}


def aggregate_video(scores: Sequence[ExpressionScores]) -> VideoMetrics:
    """Average per-expression scores into J, F and J&F = (mean J + mean F) / 2."""
    if len(scores) == 0:
        raise ValueError("cannot aggregate video metrics over zero expressions: the evaluation set is empty")
    j = float(np.mean([score.j for score in scores]))
    f = float(np.mean([score.f for score in scores]))
    return VideoMetrics(j=j, f=f, jf=(j + f) / 2.0, n_expressions=len(scores))


@dataclass(frozen=True)
class ReVOSSubsetMetrics:
    """ReVOS numbers of one subset (referring, reasoning) or of their average (overall)."""

    j: float
    f: float
    jf: float
    accuracy: float
    robustness: float
    n_expressions: int

    def to_dict(self) -> dict[str, float | int]:
        return {
            "J": self.j,
            "F": self.f,
            "J&F": self.jf,
            "A": self.accuracy,
            "R": self.robustness,
            "n_expressions": self.n_expressions,
        }


@dataclass(frozen=True)
class ReVOSMetrics:
    """ReVOS results: per subset, and ``overall`` = the mean of the two subset means.

    A subset without expressions is ``None``, and then ``overall`` is ``None`` too (it is only defined with both).
    """

    referring: ReVOSSubsetMetrics | None
    reasoning: ReVOSSubsetMetrics | None
    overall: ReVOSSubsetMetrics | None
    n_excluded: int = 0

    def to_dict(self) -> dict[str, dict | int | None]:
        result: dict[str, dict | int | None] = {
            name: (None if subset is None else subset.to_dict())
            for name, subset in (("referring", self.referring), ("reasoning", self.reasoning), ("overall", self.overall))
        }
        result["n_excluded"] = self.n_excluded
        return result


def _subset_means(scores: Sequence[ExpressionScores]) -> ReVOSSubsetMetrics | None:
    if len(scores) == 0:
        return None
    missing = [index for index, score in enumerate(scores) if score.accuracy is None or score.robustness is None]
    if missing:
        raise ValueError(
            f"ReVOS needs A and R for every expression, but {len(missing)} expression scores lack them; "
            "compute them with video_expression_scores(..., foreground_frames=...)"
        )
    j = float(np.mean([score.j for score in scores]))
    f = float(np.mean([score.f for score in scores]))
    return ReVOSSubsetMetrics(
        j=j,
        f=f,
        jf=(j + f) / 2.0,
        accuracy=float(np.mean([score.accuracy for score in scores])),
        robustness=float(np.mean([score.robustness for score in scores])),
        n_expressions=len(scores),
    )


def revos_scores(scores: Sequence[ExpressionScores], type_ids: Sequence[int]) -> ReVOSMetrics:
    """ReVOS referring / reasoning / overall metrics.

    Args:
        scores: per-expression scores, each with ``accuracy`` and ``robustness``.
        type_ids: ``0`` (referring) or ``1`` (reasoning) for each expression, same order. Other values (``2`` in
            the ReVOS files) belong to neither subset: they are left out, as the official scripts do, and counted
            in ``n_excluded``.

    Returns:
        :class:`ReVOSMetrics`; ``overall`` averages the two subset means field by field.
    """
    if len(scores) != len(type_ids):
        raise ValueError(f"got {len(scores)} expression scores but {len(type_ids)} type_ids; they must be paired")
    if len(scores) == 0:
        raise ValueError("cannot compute ReVOS metrics over zero expressions: the evaluation set is empty")
    n_excluded = sum(int(type_id) not in (REVOS_REFERRING, REVOS_REASONING) for type_id in type_ids)
    if n_excluded == len(scores):
        raise ValueError(
            f"all {n_excluded} ReVOS expressions have a type_id other than 0 (referring) or 1 (reasoning); "
            "nothing to score"
        )
    referring = _subset_means([s for s, t in zip(scores, type_ids) if int(t) == REVOS_REFERRING])
    reasoning = _subset_means([s for s, t in zip(scores, type_ids) if int(t) == REVOS_REASONING])
    overall = None
    if referring is None or reasoning is None:
        logger.warning(
            "ReVOS: the %s subset has no expressions, so `overall` (the mean of the two subset means) is undefined",
            "referring" if referring is None else "reasoning",
        )
    else:
        overall = ReVOSSubsetMetrics(
            j=(referring.j + reasoning.j) / 2.0,
            f=(referring.f + reasoning.f) / 2.0,
            jf=(referring.jf + reasoning.jf) / 2.0,
            accuracy=(referring.accuracy + reasoning.accuracy) / 2.0,
            robustness=(referring.robustness + reasoning.robustness) / 2.0,
            n_expressions=referring.n_expressions + reasoning.n_expressions,
        )
    return ReVOSMetrics(referring=referring, reasoning=reasoning, overall=overall, n_excluded=n_excluded)
