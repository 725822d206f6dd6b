"""Evaluation: the official referring segmentation metrics (gIoU, cIoU; J, F, J&F; ReVOS A, R) in numpy and as
local `evaluate` modules, a resumable prediction store, the evaluation server zips, and `maskcma evaluate`."""

from .metrics import (
    ExpressionScores,
    ReferringImageMetrics,
    ReVOSMetrics,
    ReVOSSubsetMetrics,
    VideoMetrics,
    aggregate_video,
    boundary_f_measure,
    image_referring_metrics,
    load_metric,
    revos_scores,
    seg2bmap,
    video_expression_scores,
)
from .predictions import PredictionStore, SubmissionSummary, prediction_to_frames, write_submission_zip
from .fingerprint import default_predictions_dir, evaluation_fingerprint
from .runner import (
    MISSING_POLICIES,
    REVOS_GROUND_TRUTHS,
    check_evaluation_set,
    claim_predictions_folder,
    detect_kind,
    evaluate_dataset,
    score_predictions,
)

__all__ = [
    "MISSING_POLICIES",
    "REVOS_GROUND_TRUTHS",
    "ExpressionScores",
    "PredictionStore",
    "ReVOSMetrics",
    "ReVOSSubsetMetrics",
    "ReferringImageMetrics",
    "SubmissionSummary",
    "VideoMetrics",
    "aggregate_video",
    "boundary_f_measure",
    "check_evaluation_set",
    "claim_predictions_folder",
    "default_predictions_dir",
    "detect_kind",
    "evaluate_dataset",
    "evaluation_fingerprint",
    "image_referring_metrics",
    "load_metric",
    "prediction_to_frames",
    "revos_scores",
    "score_predictions",
    "seg2bmap",
    "video_expression_scores",
    "write_submission_zip",
]
