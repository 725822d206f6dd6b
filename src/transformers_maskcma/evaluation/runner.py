"""Run a model over a benchmark split, store the predictions as it goes, and score them.

:func:`evaluate_dataset` predicts every record not yet in the prediction store (so a re-run after an interruption
only predicts the rest), then :func:`score_predictions` computes the metrics of the dataset kind:

=========  ===================================  ==========================================================
kind       records                              metrics (docs/evaluation.md)
=========  ===================================  ==========================================================
``image``  ``media_type == "image"``            gIoU, cIoU
``video``  ``media_type == "video"``            J, F, J&F (MeViS / Ref-DAVIS17 / Ref-YouTube-VOS)
``revos``  videos with ``source == "revos"``    J, F, J&F, A, R for referring, reasoning and overall
=========  ===================================  ==========================================================

The metrics JSON (``metrics.json`` by default) holds the numbers (fractions in ``[0, 1]``) and the counts:
``n_samples``, ``n_missing`` with the ``missing_sample_ids`` (scored as empty masks, only with
``skip_missing=True``), ``n_unused_predictions`` (stored predictions of samples not in the dataset). Per-sample
scores go to ``scores.jsonl`` next to it.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import datasets
import numpy as np
from tqdm.auto import tqdm

from ..data.errors import DataFormatError
from .metrics import (
    BOUNDARY_THRESHOLD,
    aggregate_video,
    giou_ciou_from_counts,
    revos_scores,
    video_expression_scores,
)
from .predictions import PredictionStore, prediction_to_frames
from .records import (
    dataset_has_ground_truth,
    foreground_frames,
    frame_size,
    ground_truth_frames,
    has_ground_truth,
    iter_undecoded,
    parse_meta,
)

logger = logging.getLogger(__name__)

__all__ = ["DATASET_KINDS", "detect_kind", "evaluate_dataset", "score_predictions"]

DATASET_KINDS = ("image", "video", "revos")
METRICS_FILENAME = "metrics.json"
SCORES_FILENAME = "scores.jsonl"

PredictFn = Callable[[dict], Any]


def detect_kind(dataset: datasets.Dataset) -> str:
    """``"image"``, ``"video"`` or ``"revos"`` from the records' ``media_type`` and ``source``."""
    media_types = sorted(set(dataset["media_type"]))
    if media_types == ["image"]:
        return "image"
    if media_types == ["video"]:
        return "revos" if set(dataset["source"]) == {"revos"} else "video"
    raise ValueError(
        f"the dataset mixes media types {media_types}; evaluate image and video benchmarks separately"
    )


def _sample_ids(dataset: datasets.Dataset) -> list[str]:
    ids = list(dataset["sample_id"])
    if len(ids) == 0:
        raise ValueError("the dataset has no records to evaluate")
    if len(set(ids)) != len(ids):
        seen: set[str] = set()
        duplicate = next(sample_id for sample_id in ids if sample_id in seen or seen.add(sample_id))
        raise DataFormatError(
            f"sample_id {duplicate!r} occurs more than once; predictions are stored by sample_id, so ids must be unique"
        )
    return ids


def _decoded_frame_size(record: dict) -> tuple[int, int]:
    frames = record["frames"]
    if len(frames) == 0:
        raise DataFormatError(f"sample {record['sample_id']!r} has no frames; an expression with no frames cannot be predicted")
    return frame_size(record)


def evaluate_dataset(
    dataset: datasets.Dataset,
    predict_fn: PredictFn,
    output_dir: str | os.PathLike,
    skip_missing: bool = False,
    kind: str | None = None,
    metrics_path: str | os.PathLike | None = None,
    bound_th: float = BOUNDARY_THRESHOLD,
    show_progress: bool = True,
) -> dict:
    """Predict every record of ``dataset`` (resuming from ``output_dir``) and score the predictions.

    Args:
        dataset: records in the format of ``transformers_maskcma.data.schema.RECORD_FEATURES``.
        predict_fn: ``predict_fn(record) -> masks`` for one decoded record (frames as PIL images). It returns the
            union of the answer's masks per frame (``(T, H, W)`` array or list of ``T`` ``(H, W)`` masks), or the
            masks per object (``(N, T, H, W)`` / list of ``(T, H, W)``; for an image ``(H, W)``, ``(N, H, W)`` or a
            list of ``(H, W)``), or ``[]`` when the answer has no mask. See :func:`prediction_to_frames`.
        output_dir: where ``predictions.jsonl``, ``metrics.json`` and ``scores.jsonl`` are written. Samples
            already in ``predictions.jsonl`` are not predicted again.
        skip_missing: when ``predict_fn`` raises on a sample, log a warning and score that sample as an empty mask
            (counted in ``n_missing``; it is not stored, so a re-run tries it again). Without it the error is
            raised, naming the sample; the predictions done so far are kept.
        kind: ``"image"``, ``"video"`` or ``"revos"``; default :func:`detect_kind`.
        metrics_path: the metrics JSON (default ``output_dir/metrics.json``).
        bound_th: boundary tolerance of ``F``.
        show_progress: show tqdm bars.

    Returns:
        The metrics dict that is written to the metrics JSON. For splits without ground truth
        (``meta["has_masks"] = false``) only the predictions are written and ``"metrics"`` is ``None``.
    """
    output_dir = Path(output_dir)
    sample_ids = _sample_ids(dataset)
    failures: dict[str, str] = {}
    with PredictionStore(output_dir, writable=True) as store:
        todo = [index for index, sample_id in enumerate(sample_ids) if sample_id not in store]
        if len(todo) < len(sample_ids):
            logger.info(
                "%s: %d of %d samples already predicted, predicting the other %d",
                store.path, len(sample_ids) - len(todo), len(sample_ids), len(todo),
            )
        for index in tqdm(todo, desc="Predicting", disable=not show_progress):
            sample_id = sample_ids[index]
            try:
                record = dataset[index]  # decodes the frames: a corrupted image fails here
                raw = predict_fn(record)
            except Exception as error:
                if not skip_missing:
                    raise RuntimeError(
                        f"predicting sample {sample_id!r} failed ({type(error).__name__}: {error}); the "
                        f"{len(store)} predictions done so far are saved in {store.path} and a re-run resumes from "
                        "there (or pass skip_missing=True to score failed samples as empty masks)"
                    ) from error
                logger.warning(
                    "predicting sample %r failed (%s: %s); it is scored as an empty mask",
                    sample_id, type(error).__name__, error,
                )
                failures[sample_id] = f"{type(error).__name__}: {error}"
                continue
            masks = prediction_to_frames(
                raw, len(record["frames"]), _decoded_frame_size(record), record["media_type"], sample_id
            )
            store.add(sample_id, masks)

    if not dataset_has_ground_truth(dataset):
        result = {
            "kind": kind or detect_kind(dataset),
            "n_samples": len(sample_ids),
            "n_missing": len(failures),
            "missing_sample_ids": sorted(failures),
            "failures": failures,
            "metrics": None,
            "note": "this split has no ground-truth masks (meta has_masks=false): submit the predictions to the "
            "evaluation server (maskcma evaluate --submission-zip)",
            "predictions": str(output_dir / "predictions.jsonl"),
            "metrics_file": str(Path(metrics_path) if metrics_path else output_dir / METRICS_FILENAME),
        }
        _write_json(Path(result["metrics_file"]), result)
        return result
    result = score_predictions(
        dataset,
        output_dir,
        skip_missing=skip_missing,
        kind=kind,
        metrics_path=metrics_path,
        bound_th=bound_th,
        show_progress=show_progress,
    )
    if failures:
        result["failures"] = failures
        _write_json(Path(result["metrics_file"]), result)
    return result


def score_predictions(
    dataset: datasets.Dataset,
    predictions_dir: str | os.PathLike,
    skip_missing: bool = False,
    kind: str | None = None,
    metrics_path: str | os.PathLike | None = None,
    bound_th: float = BOUNDARY_THRESHOLD,
    show_progress: bool = True,
) -> dict:
    """Score stored predictions against the dataset's ground truth, without a model.

    Args:
        dataset: the records that were predicted.
        predictions_dir: folder with ``predictions.jsonl``.
        skip_missing: score samples without a prediction as empty masks (docs/evaluation.md), with a warning and
            counted in ``n_missing``. Without it a missing prediction raises ``KeyError`` naming the sample and
            the folder.
        kind: ``"image"``, ``"video"`` or ``"revos"``; default :func:`detect_kind`.
        metrics_path: where to write the metrics JSON (default ``predictions_dir/metrics.json``); per-sample
            scores go to ``scores.jsonl`` in the same folder.
        bound_th: boundary tolerance of ``F``.
        show_progress: show a tqdm bar.

    Returns:
        The metrics dict (also written as JSON).
    """
    predictions_dir = Path(predictions_dir)
    store = PredictionStore(predictions_dir)
    kind = kind or detect_kind(dataset)
    if kind not in DATASET_KINDS:
        raise ValueError(f"unknown dataset kind {kind!r}; use one of {DATASET_KINDS}")
    sample_ids = _sample_ids(dataset)
    missing = [sample_id for sample_id in sample_ids if sample_id not in store]
    if missing and not skip_missing:
        raise KeyError(
            f"no prediction for sample {missing[0]!r} (and {len(missing) - 1} more) in {store.path}; run the model "
            "on them (`maskcma evaluate --model ...` resumes where it stopped) or pass --skip-missing / "
            "skip_missing=True to score them as empty masks"
        )
    for sample_id in missing:
        logger.warning("no prediction for sample %r in %s; scored as an empty mask", sample_id, store.path)
    known = set(sample_ids)
    unused = [sample_id for sample_id in store.sample_ids() if sample_id not in known]
    if unused:
        logger.warning(
            "%s holds %d predictions of samples that are not in this dataset (e.g. %r); they are not scored",
            store.path, len(unused), unused[0],
        )

    per_sample: list[dict] = []
    counts: list[tuple[int, int]] = []
    expression_scores = []
    type_ids: list[int] = []
    records = iter_undecoded(dataset)
    for record in tqdm(records, total=len(dataset), desc=f"Scoring ({kind})", disable=not show_progress):
        sample_id = record["sample_id"]
        meta = parse_meta(record)
        if not has_ground_truth(meta):
            raise DataFormatError(
                f"sample {sample_id!r} has no ground-truth masks (meta has_masks=false: the split is scored by an "
                "evaluation server); write a submission zip instead of scoring it"
            )
        if kind == "image" and len(record["frames"]) != 1:
            raise DataFormatError(f"sample {sample_id!r}: an image sample has one frame, got {len(record['frames'])}")
        size = frame_size(record)
        truth = ground_truth_frames(record, size)
        if sample_id in store:
            prediction = store.masks(sample_id, size=size)
            if prediction.shape[0] != truth.shape[0]:
                raise DataFormatError(
                    f"{store.path}: sample {sample_id!r} has {prediction.shape[0]} predicted frames but "
                    f"{truth.shape[0]} frames in the dataset"
                )
        else:
            prediction = np.zeros_like(truth)
        entry: dict[str, Any] = {"sample_id": sample_id, "missing": sample_id not in store}
        if kind == "image":
            intersection = int(np.count_nonzero(prediction & truth))
            union = int(np.count_nonzero(prediction | truth))
            counts.append((intersection, union))
            entry.update(intersection=intersection, union=union)
        else:
            foreground = None
            if kind == "revos":
                if "type_id" not in meta:
                    raise DataFormatError(f"sample {sample_id!r}: ReVOS records need meta['type_id'] (0 or 1)")
                type_ids.append(int(meta["type_id"]))
                foreground = foreground_frames(record, meta, size)
            scores = video_expression_scores(prediction, truth, foreground_frames=foreground, bound_th=bound_th)
            expression_scores.append(scores)
            entry.update(scores.to_dict())
            if kind == "revos":
                entry["type_id"] = type_ids[-1]
        per_sample.append(entry)

    if kind == "image":
        intersections, unions = zip(*counts)
        giou, ciou, per_sample_iou = giou_ciou_from_counts(intersections, unions)
        for entry, value in zip(per_sample, per_sample_iou):
            entry["iou"] = float(value)
        metrics: dict = {"gIoU": giou, "cIoU": ciou}
    elif kind == "video":
        metrics = aggregate_video(expression_scores).to_dict()
    else:
        metrics = revos_scores(expression_scores, type_ids).to_dict()

    metrics_file = Path(metrics_path) if metrics_path else predictions_dir / METRICS_FILENAME
    result = {
        "kind": kind,
        "sources": sorted(set(dataset["source"])),
        "n_samples": len(sample_ids),
        "n_missing": len(missing),
        "missing_sample_ids": missing,
        "n_unused_predictions": len(unused),
        "metrics": metrics,
        "bound_th": bound_th if kind != "image" else None,
        "predictions": str(store.path),
        "metrics_file": str(metrics_file),
    }
    _write_json(metrics_file, result)
    with open(metrics_file.parent / SCORES_FILENAME, "w", encoding="utf-8") as handle:
        for entry in per_sample:
            handle.write(json.dumps(entry) + "\n")
    return result


def _write_json(path: Path, payload: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(path.name + ".partial")
    partial.write_text(json.dumps(payload, indent=2) + "\n", encoding="utf-8")
    os.replace(partial, path)
