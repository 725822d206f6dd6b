"""The official referring segmentation metrics in numpy (docs/evaluation.md), and the same metrics as local
`evaluate` modules.

- images: :func:`image_referring_metrics` (gIoU, cIoU);
- videos: :func:`video_expression_scores` per expression (J, F, ReVOS A and R), :func:`aggregate_video`
  (J, F, J&F over expressions), :func:`revos_scores` (ReVOS referring / reasoning / overall);
- boundaries: :func:`seg2bmap`, :func:`boundary_f_measure`;
- :func:`load_metric` returns the ``evaluate`` module (``"referring_iou"`` or ``"video_jf"``) shipped in this
  folder; it works offline because the modules are local files that import the functions above.
"""

from __future__ import annotations

from pathlib import Path

from .boundary import (
    BOUNDARY_THRESHOLD,
    boundary_f_measure,
    boundary_precision_recall,
    boundary_radius,
    dilate_with_disk,
    disk,
    seg2bmap,
)
from .image import (
    CIOU_EPSILON,
    GIOU_EPSILON,
    ReferringImageMetrics,
    giou_ciou_from_counts,
    image_referring_metrics,
    intersection_and_union,
)
from .masks import as_frame_stack, union_of_masks
from .video import (
    REVOS_REASONING,
    REVOS_REFERRING,
    ROBUSTNESS_EPSILON,
    ExpressionScores,
    ReVOSMetrics,
    ReVOSSubsetMetrics,
    VideoMetrics,
    aggregate_video,
    jaccard_per_frame,
    official_accuracy_per_frame,
    official_robustness_per_frame,
    pixel_accuracy_per_frame,
    revos_scores,
    robustness_per_frame,
    video_expression_scores,
)

#: Names of the `evaluate` modules in this folder.
EVALUATE_MODULES = ("referring_iou", "video_jf")


def metric_module_path(name: str) -> Path:
    """Path of the `evaluate` module script ``<name>/<name>.py`` inside the installed package."""
    if name not in EVALUATE_MODULES:
        raise ValueError(f"unknown metric {name!r}; the package ships {', '.join(EVALUATE_MODULES)}")
    path = Path(__file__).resolve().parent / name / f"{name}.py"
    if not path.is_file():
        raise FileNotFoundError(f"the evaluate module script {path} is missing from the installed package")
    return path


def load_metric(name: str, **kwargs):
    """Load one of the package's metrics as an ``evaluate`` module, offline.

    Args:
        name: ``"referring_iou"`` (gIoU, cIoU) or ``"video_jf"`` (J, F, J&F).
        **kwargs: passed to ``evaluate.load`` (e.g. ``keep_in_memory=True``).

    Returns:
        ``evaluate.EvaluationModule``.
    """
    import evaluate

    return evaluate.load(str(metric_module_path(name)), **kwargs)


__all__ = [
    "BOUNDARY_THRESHOLD",
    "CIOU_EPSILON",
    "EVALUATE_MODULES",
    "GIOU_EPSILON",
    "REVOS_REASONING",
    "REVOS_REFERRING",
    "ROBUSTNESS_EPSILON",
    "ExpressionScores",
    "ReVOSMetrics",
    "ReVOSSubsetMetrics",
    "ReferringImageMetrics",
    "VideoMetrics",
    "aggregate_video",
    "as_frame_stack",
    "boundary_f_measure",
    "boundary_precision_recall",
    "boundary_radius",
    "dilate_with_disk",
    "disk",
    "giou_ciou_from_counts",
    "image_referring_metrics",
    "intersection_and_union",
    "jaccard_per_frame",
    "load_metric",
    "metric_module_path",
    "official_accuracy_per_frame",
    "official_robustness_per_frame",
    "pixel_accuracy_per_frame",
    "revos_scores",
    "robustness_per_frame",
    "seg2bmap",
    "union_of_masks",
    "video_expression_scores",
]
