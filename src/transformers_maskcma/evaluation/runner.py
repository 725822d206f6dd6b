"""Run a model over a benchmark split, store the predictions as it goes, and score them.

:func:`evaluate_dataset` claims the output folder for this run (one folder = one run: its manifest records the
run's fingerprint, and a folder holding another model's predictions is refused), checks the whole split before
the first prediction (:func:`transformers_maskcma.data.validation.validate_records`), predicts every record not
yet in the prediction store (so a re-run after an interruption only predicts the rest), then
:func:`score_predictions` computes the metrics of the dataset kind:

=========  ===================================  ==========================================================
kind       records                              metrics (docs/evaluation.md)
=========  ===================================  ==========================================================
``image``  ``media_type == "image"``            gIoU, cIoU
``video``  ``media_type == "video"``            J, F, J&F (MeViS / Ref-DAVIS17 / Ref-YouTube-VOS)
``revos``  videos with ``source == "revos"``    J, F, J&F, A, R for referring, reasoning and overall
=========  ===================================  ==========================================================

Rules (docs/evaluation.md says which published numbers each setting reproduces):

- ``missing``: what a sample without a prediction (or on which the model failed) counts as: ``"error"`` (stop,
  the default), ``"zero"`` (0 on every metric, as VISA's scorer), ``"empty"`` (an empty mask) or ``"drop"``
  (left out of the means, as Sa2VA's scorer);
- ``revos_ground_truth``: ``"official"`` (default: A and R on the uint8 sum of the expression's objects, as the
  official ReVOS scripts) or ``"union"`` (each pixel counted once); ReVOS ``type_id`` 2 expressions are excluded
  and counted, as the official scripts do.

The metrics JSON (``metrics.json`` by default) holds the numbers (fractions in ``[0, 1]``), ``dataset``,
``split``, the run's ``fingerprint`` (model, processor and generation settings, data), the rules used and
``counts`` = ``{"samples", "scored", "excluded", "missing"}`` (also ``n_samples`` and ``n_missing``), with
``missing_sample_ids`` and ``n_unused_predictions`` (stored predictions of samples not in the dataset), and, when
:func:`evaluate_dataset` wrote it, ``run`` = ``{"already_predicted", "predicted_now", "processes", "batch_size"}``
(what this call predicted and what it resumed from). Per-sample scores go to ``scores.jsonl`` next to it.

Several processes (``torchrun`` / ``accelerate launch``, :mod:`.distributed`): the main process claims the folder
and checks the split, every process predicts its share of the missing records into its own shard, the main
process merges the shards into ``predictions.jsonl`` in the dataset's order and scores, so the folder ends as a
one-process run leaves it. Images may go through the model in batches (``batch_size``).
"""

from __future__ import annotations

import json
import logging
import os
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import datasets
import numpy as np
from tqdm.auto import tqdm

from ..data.errors import DataFormatError
from ..data.validation import validate_records
from ..run_folder import RunFolder, RunFolderError
from .metrics import (
    BOUNDARY_THRESHOLD,
    REVOS_REASONING,
    REVOS_REFERRING,
    ExpressionScores,
    aggregate_video,
    giou_ciou_from_counts,
    revos_scores,
    video_expression_scores,
)
from .distributed import EvaluationProcesses
from .predictions import (
    PREDICTIONS_FILENAME,
    PredictionStore,
    merge_prediction_shards,
    prediction_to_frames,
    shard_filename,
)
from .records import (
    dataset_has_ground_truth,
    foreground_areas,
    foreground_frames,
    frame_size,
    ground_truth_counts,
    ground_truth_frames,
    has_ground_truth,
    iter_undecoded,
    parse_meta,
)

logger = logging.getLogger(__name__)

__all__ = [
    "DATASET_KINDS",
    "MISSING_POLICIES",
    "REVOS_GROUND_TRUTHS",
    "check_evaluation_set",
    "claim_predictions_folder",
    "detect_kind",
    "evaluate_dataset",
    "score_predictions",
]

DATASET_KINDS = ("image", "video", "revos")
#: What a sample without a prediction counts as (see the module docstring).
MISSING_POLICIES = ("error", "zero", "empty", "drop")
#: How the ReVOS A and R see pixels covered by several of an expression's objects.
REVOS_GROUND_TRUTHS = ("official", "union")
METRICS_FILENAME = "metrics.json"
SCORES_FILENAME = "scores.jsonl"
RUN_COMMAND = "evaluate"

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


def _check_choice(name: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ValueError(f"{name}={value!r} is not valid; use one of {list(choices)}")


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


def _expected_media(dataset: datasets.Dataset, kind: str | None) -> str:
    """The media type the evaluation takes: from ``kind``, else the type most records have (the others are
    reported by the validation pass)."""
    if kind is not None:
        return "image" if kind == "image" else "video"
    counts = Counter(dataset["media_type"])
    return max(("image", "video"), key=lambda media: counts.get(media, 0))


def check_evaluation_set(
    dataset: datasets.Dataset, kind: str | None = None, show_progress: bool = True
) -> None:
    """The validation pass over the whole split, before any prediction or score: every frame exists and decodes,
    one media type (the one of ``kind``), masks are valid RLEs of the frame size, sample ids are unique. Raises
    `DataValidationError` with the count of problems and the first ones (file and line or record id)."""
    report = validate_records(
        dataset,
        expected_media=_expected_media(dataset, kind),
        check_files=True,
        check_masks=True,
        progress=show_progress,
        description="Checking the evaluation set",
        require_unique_ids=True,
    )
    report.raise_if_problems()


def claim_predictions_folder(
    output_dir: str | os.PathLike, fingerprint: dict | None, overwrite: bool = False
) -> RunFolder:
    """Claim ``output_dir`` for an evaluation run with ``fingerprint``: a folder of the same run is resumed; a
    folder of another run (another model, processor or generation settings, data) is refused with a
    `RunFolderError` naming every setting that differs and the ways out (``--overwrite`` or another folder); a
    folder holding predictions no recorded run wrote is refused too."""
    output_dir = Path(output_dir)
    fingerprint = {} if fingerprint is None else fingerprint
    try:
        folder = RunFolder.claim(output_dir, command=RUN_COMMAND, fingerprint=fingerprint, resume=not overwrite,
                                 overwrite=overwrite)
    except RunFolderError as error:
        recorded = RunFolder.read_fingerprint(output_dir) if output_dir.is_dir() else None
        models = ""
        old_model = ((recorded or {}).get("model") or {}).get("name_or_path")
        new_model = (fingerprint.get("model") or {}).get("name_or_path")
        if recorded is not None and old_model != new_model:
            models = f" Its predictions were made by model {old_model}; this run evaluates {new_model}."
        raise RunFolderError(
            f"{error}.{models} Resuming would score the predictions in it as this run's."
        ) from None
    if PREDICTIONS_FILENAME not in folder.files and (output_dir / PREDICTIONS_FILENAME).exists():
        raise RunFolderError(
            f"output folder {output_dir} holds a {PREDICTIONS_FILENAME} that no recorded run wrote, so it cannot be "
            "told which model made it; move it away or choose another output folder"
        )
    return folder


def evaluate_dataset(
    dataset: datasets.Dataset,
    predict_fn: PredictFn,
    output_dir: str | os.PathLike,
    missing: str = "error",
    kind: str | None = None,
    metrics_path: str | os.PathLike | None = None,
    bound_th: float = BOUNDARY_THRESHOLD,
    show_progress: bool = True,
    *,
    fingerprint: dict | None = None,
    overwrite: bool = False,
    revos_ground_truth: str = "official",
    dataset_name: str | None = None,
    split: str | None = None,
    batch_size: int = 1,
    processes: EvaluationProcesses | None = None,
) -> dict:
    """Check the split, predict every record of ``dataset`` (resuming from ``output_dir``) and score.

    Args:
        dataset: records in the format of ``transformers_maskcma.data.schema.RECORD_FEATURES``.
        predict_fn: ``predict_fn(record) -> masks`` for one decoded record (frames as PIL images). It returns the
            union of the answer's masks per frame (``(T, H, W)`` array or list of ``T`` ``(H, W)`` masks), or the
            masks per object (``(N, T, H, W)`` / list of ``(T, H, W)``; for an image ``(H, W)``, ``(N, H, W)`` or a
            list of ``(H, W)``), or ``[]`` when the answer has no mask. See :func:`prediction_to_frames`. With
            ``batch_size`` > 1 it also needs ``predict_fn.predict_batch(records) -> [masks per record]`` (as
            :func:`~transformers_maskcma.evaluation.model_predict.model_predict_fn` returns).
        output_dir: the run folder: ``predictions.jsonl``, ``metrics.json``, ``scores.jsonl`` and the manifest
            ``maskcma_run.json``. A folder of the same run (same ``fingerprint``) is resumed: samples already in
            ``predictions.jsonl`` (or in a shard of an interrupted multi-process run) are not predicted again. A
            folder of another run is refused (`RunFolderError` naming what differs) unless ``overwrite=True``,
            which removes the files that run recorded.
        missing: ``"error"`` (default): a failing ``predict_fn`` stops the run, naming the sample (the
            predictions so far are kept); ``"zero"``, ``"empty"``, ``"drop"``: the failure is logged and the sample
            is scored by that rule (see :func:`score_predictions`); it is not stored, so a re-run tries it again.
        kind: ``"image"``, ``"video"`` or ``"revos"``; default :func:`detect_kind`.
        metrics_path: the metrics JSON (default ``output_dir/metrics.json``).
        bound_th: boundary tolerance of ``F``.
        show_progress: show tqdm bars (the check of the split, the predictions, the scoring).
        fingerprint: what identifies the run (model, processor and generation settings, dataset, split, data
            root, package version); ``maskcma evaluate`` builds it with
            :func:`transformers_maskcma.evaluation.fingerprint.evaluation_fingerprint`. ``None`` records ``{}``:
            such folders are then only safe for one model.
        overwrite: replace the files another run recorded in ``output_dir``.
        revos_ground_truth: ``"official"`` or ``"union"`` (ReVOS A and R, see :func:`score_predictions`).
        dataset_name, split: written to the metrics JSON (default: from ``fingerprint``).
        batch_size: images predicted per ``predict_fn.predict_batch`` call (videos always one at a time). A batch
            that fails is predicted again one record at a time, so a failure is attributed to its sample.
        processes: the processes of a multi-process run (default
            :meth:`EvaluationProcesses.from_environment`: one process unless launched by ``torchrun`` or
            ``accelerate launch``). The main process claims the folder and checks the split; each process then
            predicts every ``world_size``-th record still missing into its own shard
            (``predictions.shard-<rank>-of-<world>.jsonl``, resumable like ``predictions.jsonl``); the main
            process merges the shards into ``predictions.jsonl`` (in the dataset's order) and scores. Every
            process returns the same metrics dict.

    Returns:
        The metrics dict that is written to the metrics JSON. For splits without ground truth
        (``meta["has_masks"] = false``) only the predictions are written and ``"metrics"`` is ``None``.
    """
    _check_choice("missing", missing, MISSING_POLICIES)
    _check_choice("revos_ground_truth", revos_ground_truth, REVOS_GROUND_TRUTHS)
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size={batch_size!r} must be a positive integer")
    if batch_size > 1 and not callable(getattr(predict_fn, "predict_batch", None)):
        raise ValueError(
            f"batch_size={batch_size} needs predict_fn.predict_batch(records) (model_predict_fn provides it); "
            "pass batch_size=1 for a plain predict_fn(record)"
        )
    processes = EvaluationProcesses.from_environment() if processes is None else processes
    output_dir = Path(output_dir)
    sample_ids = _sample_ids(dataset)
    shard = PREDICTIONS_FILENAME if not processes.distributed else shard_filename(processes.rank, processes.world_size)

    def prepare() -> RunFolder:
        folder = claim_predictions_folder(output_dir, fingerprint, overwrite)
        check_evaluation_set(dataset, kind, show_progress)
        new_files = [PREDICTIONS_FILENAME] + [
            shard_filename(rank, processes.world_size) for rank in range(processes.world_size) if processes.distributed
        ]
        new_files = [name for name in new_files if name not in folder.files]
        if new_files:  # from here on the folder holds this run's predictions (and shards, removed by --overwrite)
            folder.record(*new_files)
        # the shards of an interrupted multi-process run (of any number of processes) count as predicted
        merge_prediction_shards(output_dir, sample_ids)
        return folder

    folder = processes.run_on_main("claiming the output folder and checking the split", prepare)
    # a process of several reads what is merged so far; one process resumes from its own store
    merged = output_dir / PREDICTIONS_FILENAME
    failures: dict[str, str] = {}
    error = None
    todo: list[int] = []
    stored_before = stored_after = 0
    try:  # any error, reading included, is shared with the other processes before it is raised
        done = PredictionStore(output_dir) if processes.distributed and merged.is_file() else None
        with PredictionStore(output_dir, writable=True, filename=shard) as store:
            known = store if done is None else done
            todo = [index for index, sample_id in enumerate(sample_ids) if sample_id not in known]
            stored_before = len(store)
            if processes.is_main and len(todo) < len(sample_ids):
                logger.info(
                    "%s: %d of %d samples already predicted by this run, predicting the other %d",
                    merged, len(sample_ids) - len(todo), len(sample_ids), len(todo),
                )
            _predict_records(
                dataset, processes.share(todo), sample_ids, predict_fn, store, missing, batch_size, failures,
                progress=show_progress and processes.is_main, known=done,
            )
            stored_after = len(store)
    except Exception as caught:  # every process learns of it (agree) before it is raised
        error = caught
    predicted_now = 0
    reports = processes.agree("predicting", error, (failures, stored_after - stored_before))
    for process_failures, process_predicted in reports:
        failures.update(process_failures)
        predicted_now += process_predicted
    run_info = {
        "already_predicted": len(sample_ids) - len(todo),
        "predicted_now": predicted_now,
        "processes": processes.world_size,
        "batch_size": batch_size,
    }
    if processes.distributed:
        processes.run_on_main(
            "merging the process shards", lambda: merge_prediction_shards(output_dir, sample_ids)
        )
    return processes.run_on_main(
        "scoring",
        lambda: _finish(
            dataset, folder, output_dir, failures, missing=missing, kind=kind, metrics_path=metrics_path,
            bound_th=bound_th, show_progress=show_progress, fingerprint=fingerprint,
            revos_ground_truth=revos_ground_truth, dataset_name=dataset_name, split=split, run_info=run_info,
        ),
        share=True,
    )


def _predict_records(
    dataset: datasets.Dataset,
    indices: list[int],
    sample_ids: list[str],
    predict_fn: PredictFn,
    store: PredictionStore,
    missing: str,
    batch_size: int,
    failures: dict[str, str],
    progress: bool,
    known: PredictionStore | None,
) -> None:
    """Predict the records at ``indices`` (skipping those ``store`` holds) into ``store``; images go in batches
    of ``batch_size`` through ``predict_fn.predict_batch``, videos one at a time. Failures go to ``failures``
    (``missing`` != ``"error"``) or raise."""
    indices = [index for index in indices if sample_ids[index] not in store]
    media_types = dataset["media_type"] if batch_size > 1 else None
    bar = tqdm(total=len(indices), desc="Predicting", disable=not progress)

    def one(index: int, record: dict | None = None) -> None:
        sample_id = sample_ids[index]
        try:
            record = dataset[index] if record is None else record  # decodes the frames
            raw = predict_fn(record)
        except Exception as error:
            _failed(sample_id, error, missing, store, known, failures)
            return
        _store(store, record, raw, sample_id)

    position = 0
    while position < len(indices):
        index = indices[position]
        if batch_size == 1 or media_types[index] != "image":
            one(index)
            position += 1
            bar.update(1)
            continue
        chunk = []  # the next run of up to batch_size images
        for candidate in indices[position : position + batch_size]:
            if media_types[candidate] != "image":
                break
            chunk.append(candidate)
        records = [dataset[i] for i in chunk]
        try:
            raws = list(predict_fn.predict_batch(records))
            if len(raws) != len(records):
                raise ValueError(f"predict_batch returned {len(raws)} predictions for {len(records)} records")
        except Exception as error:
            logger.warning(
                "predicting a batch of %d images failed (%s: %s); predicting them one at a time",
                len(records), type(error).__name__, error,
            )
            for index, record in zip(chunk, records):
                one(index, record)
        else:
            for index, record, raw in zip(chunk, records, raws):
                _store(store, record, raw, sample_ids[index])
        position += len(chunk)
        bar.update(len(chunk))
    bar.close()


def _store(store: PredictionStore, record: dict, raw, sample_id: str) -> None:
    masks = prediction_to_frames(raw, len(record["frames"]), frame_size(record), record["media_type"], sample_id)
    store.add(sample_id, masks)


def _failed(sample_id: str, error: Exception, missing: str, store: PredictionStore, known, failures: dict) -> None:
    if missing == "error":
        done = len(store) + (0 if known is None else len(known))
        raise RuntimeError(
            f"predicting sample {sample_id!r} failed ({type(error).__name__}: {error}); the "
            f"{done} predictions done so far are saved in {store.directory} and a re-run resumes from "
            "there (or pass missing='zero'|'empty'|'drop' / --missing to score failed samples by that "
            "rule)"
        ) from error
    logger.warning(
        "predicting sample %r failed (%s: %s); it is scored as missing (%s)",
        sample_id, type(error).__name__, error, missing,
    )
    failures[sample_id] = f"{type(error).__name__}: {error}"


def _finish(
    dataset: datasets.Dataset,
    folder: RunFolder,
    output_dir: Path,
    failures: dict[str, str],
    *,
    missing: str,
    kind: str | None,
    metrics_path,
    bound_th: float,
    show_progress: bool,
    fingerprint: dict | None,
    revos_ground_truth: str,
    dataset_name: str | None,
    split: str | None,
    run_info: dict,
) -> dict:
    """Score the merged predictions (main process) and write the metrics JSON (with ``run_info``: how many samples
    this call predicted and found already predicted, in how many processes, at which batch size)."""
    sample_ids = list(dataset["sample_id"])
    fingerprint = {} if fingerprint is None else fingerprint
    dataset_name = dataset_name or fingerprint.get("dataset")
    split = split or fingerprint.get("split")
    metrics_file = Path(metrics_path) if metrics_path else output_dir / METRICS_FILENAME
    if not dataset_has_ground_truth(dataset):
        result = {
            "kind": kind or detect_kind(dataset),
            "dataset": dataset_name,
            "split": split,
            "fingerprint": fingerprint,
            "counts": {"samples": len(sample_ids), "scored": 0, "excluded": 0, "missing": len(failures)},
            "n_samples": len(sample_ids),
            "n_missing": len(failures),
            "missing_sample_ids": sorted(failures),
            "failures": failures,
            "metrics": None,
            "note": "this split has no ground-truth masks (meta has_masks=false): submit the predictions to the "
            "evaluation server (maskcma evaluate --submission-zip)",
            "predictions": str(output_dir / PREDICTIONS_FILENAME),
            "metrics_file": str(metrics_file),
            "run": run_info,
        }
        _write_json(metrics_file, result)
        _record_outputs(folder, metrics_file)
        return result
    result = score_predictions(
        dataset,
        output_dir,
        missing=missing,
        kind=kind,
        metrics_path=metrics_path,
        bound_th=bound_th,
        show_progress=show_progress,
        revos_ground_truth=revos_ground_truth,
        fingerprint=fingerprint,
        dataset_name=dataset_name,
        split=split,
        validate=False,  # checked before the first prediction
        treat_as_missing=set(failures),
    )
    if failures:
        result["failures"] = failures
    result["run"] = run_info
    _write_json(Path(result["metrics_file"]), result)
    _record_outputs(folder, Path(result["metrics_file"]))
    return result


def _record_outputs(folder: RunFolder, metrics_file: Path) -> None:
    """Record the metrics and scores files in the run's manifest when they are inside its folder."""
    root = folder.path.resolve()
    inside = [
        path for path in (metrics_file, metrics_file.parent / SCORES_FILENAME)
        if path.exists() and root in path.resolve().parents
    ]
    if inside:
        folder.record(*inside)


def _zero_scores(num_frames: int, with_robustness: bool) -> ExpressionScores:
    zeros = np.zeros(num_frames)
    return ExpressionScores(
        j=0.0, f=0.0, j_per_frame=zeros, f_per_frame=zeros, accuracy=0.0, robustness=0.0 if with_robustness else None
    )


def score_predictions(
    dataset: datasets.Dataset,
    predictions_dir: str | os.PathLike,
    missing: str = "error",
    kind: str | None = None,
    metrics_path: str | os.PathLike | None = None,
    bound_th: float = BOUNDARY_THRESHOLD,
    show_progress: bool = True,
    *,
    revos_ground_truth: str = "official",
    fingerprint: dict | None = None,
    dataset_name: str | None = None,
    split: str | None = None,
    validate: bool = True,
    treat_as_missing: set[str] | None = None,
) -> dict:
    """Score stored predictions against the dataset's ground truth, without a model.

    Args:
        dataset: the records that were predicted.
        predictions_dir: folder with ``predictions.jsonl``.
        missing: what a sample without a prediction counts as: ``"error"`` (default: raise ``KeyError`` naming the
            sample and the folder), ``"zero"`` (0 on every metric: IoU 0, J = F = A = R = 0, as VISA's scorer),
            ``"empty"`` (an empty mask) or ``"drop"`` (left out of the means, as Sa2VA's scorer). Every missing
            sample is counted (``counts.missing``) and logged.
        kind: ``"image"``, ``"video"`` or ``"revos"``; default :func:`detect_kind`.
        metrics_path: where to write the metrics JSON (default ``predictions_dir/metrics.json``); per-sample
            scores go to ``scores.jsonl`` in the same folder.
        bound_th: boundary tolerance of ``F``.
        show_progress: show tqdm bars.
        revos_ground_truth: ``"official"`` (default): ReVOS A and R on the uint8 sum of the expression's objects,
            as the official ReVOS scripts; ``"union"``: each pixel once. J and F are the same under both.
        fingerprint: the run that made the predictions (default: the one recorded in the folder's manifest).
        dataset_name, split: written to the metrics JSON (default: from the fingerprint).
        validate: run the validation pass over the dataset first (frames, media types, masks).
        treat_as_missing: sample ids scored as missing even if stored (used by :func:`evaluate_dataset`).

    Returns:
        The metrics dict (also written as JSON).
    """
    _check_choice("missing", missing, MISSING_POLICIES)
    _check_choice("revos_ground_truth", revos_ground_truth, REVOS_GROUND_TRUTHS)
    predictions_dir = Path(predictions_dir)
    store = PredictionStore(predictions_dir)
    kind = kind or detect_kind(dataset)
    if kind not in DATASET_KINDS:
        raise ValueError(f"unknown dataset kind {kind!r}; use one of {DATASET_KINDS}")
    sample_ids = _sample_ids(dataset)
    if validate:
        check_evaluation_set(dataset, kind, show_progress)
    if fingerprint is None:
        fingerprint = RunFolder.read_fingerprint(predictions_dir)
    dataset_name = dataset_name or (fingerprint or {}).get("dataset")
    split = split or (fingerprint or {}).get("split")
    treat_as_missing = treat_as_missing or set()
    missing_ids = [s for s in sample_ids if s not in store or s in treat_as_missing]
    if missing_ids and missing == "error":
        raise KeyError(
            f"no prediction for sample {missing_ids[0]!r} (and {len(missing_ids) - 1} more) in {store.path}; run the "
            "model on them (`maskcma evaluate --model ...` resumes where it stopped) or choose how to count them "
            "with --missing zero|empty|drop (missing='zero'|'empty'|'drop')"
        )
    for sample_id in missing_ids:
        logger.warning("no prediction for sample %r in %s; scored as %s", sample_id, store.path, missing)
    missing_set = set(missing_ids)
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
    excluded: list[str] = []
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
        is_missing = sample_id in missing_set
        entry: dict[str, Any] = {"sample_id": sample_id, "missing": is_missing}
        if kind == "revos":
            if "type_id" not in meta:
                raise DataFormatError(f"sample {sample_id!r}: ReVOS records need meta['type_id'] (0, 1 or 2)")
            entry["type_id"] = int(meta["type_id"])
            if entry["type_id"] not in (REVOS_REFERRING, REVOS_REASONING):
                excluded.append(sample_id)
                entry["excluded"] = True
                per_sample.append(entry)
                continue
        if is_missing and missing == "drop":
            entry["dropped"] = True
            per_sample.append(entry)
            continue
        size = frame_size(record)
        truth = ground_truth_frames(record, size)
        if is_missing:
            prediction = np.zeros_like(truth)
        else:
            prediction = store.masks(sample_id, size=size)
            if prediction.shape[0] != truth.shape[0]:
                raise DataFormatError(
                    f"{store.path}: sample {sample_id!r} has {prediction.shape[0]} predicted frames but "
                    f"{truth.shape[0]} frames in the dataset"
                )
        if kind == "image":
            intersection = int(np.count_nonzero(prediction & truth))
            union = int(np.count_nonzero(prediction | truth))
            if is_missing and missing == "zero":
                union = max(union, 1)  # IoU 0 even when the ground truth is empty too
            counts.append((intersection, union))
            entry.update(intersection=intersection, union=union)
        else:
            if is_missing and missing == "zero":
                scores = _zero_scores(truth.shape[0], with_robustness=kind == "revos")
            else:
                scores = _video_scores(record, meta, kind, prediction, truth, size, bound_th, revos_ground_truth)
            expression_scores.append(scores)
            entry.update(scores.to_dict())
            if kind == "revos":
                type_ids.append(entry["type_id"])
        per_sample.append(entry)

    n_dropped = sum(1 for entry in per_sample if entry.get("dropped"))
    n_scored = len(per_sample) - n_dropped - len(excluded)
    if n_scored == 0:
        raise ValueError(
            f"no sample is left to score ({len(excluded)} excluded, {n_dropped} dropped as missing); check the "
            "predictions folder and the --missing rule"
        )
    if kind == "image":
        intersections, unions = zip(*counts)
        giou, ciou, per_sample_iou = giou_ciou_from_counts(intersections, unions)
        scored_entries = [entry for entry in per_sample if not entry.get("dropped")]
        for entry, value in zip(scored_entries, per_sample_iou):
            entry["iou"] = float(value)
        metrics: dict = {"gIoU": giou, "cIoU": ciou}
    elif kind == "video":
        metrics = aggregate_video(expression_scores).to_dict()
    else:
        metrics = revos_scores(expression_scores, type_ids).to_dict()
        metrics["n_excluded"] = len(excluded)

    metrics_file = Path(metrics_path) if metrics_path else predictions_dir / METRICS_FILENAME
    result = {
        "kind": kind,
        "dataset": dataset_name,
        "split": split,
        "sources": sorted(set(dataset["source"])),
        "fingerprint": fingerprint,
        "counts": {
            "samples": len(sample_ids), "scored": n_scored, "excluded": len(excluded), "missing": len(missing_ids)
        },
        "n_samples": len(sample_ids),
        "n_missing": len(missing_ids),
        "missing_sample_ids": missing_ids,
        "missing_policy": missing,
        "excluded_sample_ids": excluded,
        "n_unused_predictions": len(unused),
        "metrics": metrics,
        "bound_th": bound_th if kind != "image" else None,
        "revos_ground_truth": revos_ground_truth if kind == "revos" else None,
        "predictions": str(store.path),
        "metrics_file": str(metrics_file),
    }
    _write_json(metrics_file, result)
    with open(metrics_file.parent / SCORES_FILENAME, "w", encoding="utf-8") as handle:
        for entry in per_sample:
            handle.write(json.dumps(entry) + "\n")
    return result


def _video_scores(record, meta, kind, prediction, truth, size, bound_th, revos_ground_truth) -> ExpressionScores:
    if kind != "revos":
        return video_expression_scores(prediction, truth, bound_th=bound_th)
    foreground = foreground_frames(record, meta, size)
    if revos_ground_truth == "union":
        return video_expression_scores(prediction, truth, foreground_frames=foreground, bound_th=bound_th)
    return video_expression_scores(
        prediction,
        truth,
        foreground_frames=foreground,
        bound_th=bound_th,
        ground_truth_counts=ground_truth_counts(record, meta, size),
        foreground_areas=foreground_areas(meta, foreground),
    )


def _write_json(path: Path, payload: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(path.name + ".partial")
    partial.write_text(json.dumps(payload, indent=2) + "\n", encoding="utf-8")
    os.replace(partial, path)
