"""``maskcma evaluate``: score saved predictions on a benchmark split, or run a model over it first.

Examples::

    # run a model (resumable: a re-run of the same model and settings predicts only what is missing), then score;
    # the predictions go to maskcma-eval/<model name>-<dataset>-<split> unless --predictions is given
    maskcma evaluate --model runs/maskcma-1b --dataset refcoco --split val --data-root data/refcoco
    # score predictions that are already on disk (the folder's manifest says which model made them)
    maskcma evaluate --predictions maskcma-eval/maskcma-1b-mevis-valid_u --dataset mevis --split valid_u \\
        --data-root data/mevis
    # MeViS valid has no public ground truth: write the zip for the evaluation server
    maskcma evaluate --model runs/maskcma-1b --dataset mevis --split valid --data-root data/mevis \\
        --submission-zip mevis_valid.zip
    # one process per GPU (or several CPU processes, gloo): each predicts its share into its own shard, the main
    # process merges and scores; images 8 at a time
    accelerate launch --num_processes 8 -m transformers_maskcma.cli evaluate --model runs/maskcma-1b \\
        --dataset refcoco --split val --data-root data/refcoco --batch-size 8
    torchrun --nproc_per_node 8 -m transformers_maskcma.cli evaluate --model runs/maskcma-1b --dataset mevis \\
        --split valid_u --data-root data/mevis
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

__all__ = ["register", "run_evaluate"]

logger = logging.getLogger(__name__)


def register(subparsers) -> None:
    """Add the ``evaluate`` sub-command."""
    parser = subparsers.add_parser(
        "evaluate",
        help="score predictions (or run a model) on a benchmark split: gIoU/cIoU, J/F/J&F, ReVOS A/R",
        description="Score saved predictions on a benchmark split, or run a model over it first (resumable), "
        "print and save the metrics JSON, and optionally write the submission zip of the MeViS / "
        "Ref-YouTube-VOS evaluation servers.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--model", default=None, help="model folder or Hub repo id to run over the split")
    parser.add_argument(
        "--predictions",
        default=None,
        help="folder holding predictions.jsonl: scored as is (the model recorded in its manifest is reported), or "
        "with --model the run folder the predictions are written to (default with --model: "
        "maskcma-eval/<model name>-<dataset>-<split>). A folder holding another model's or another setting's "
        "predictions is refused",
    )
    parser.add_argument("--dataset", required=True, help="refcoco, refcoco+, refcocog, mevis, revos, ref_ytvos, ref_davis, ...")
    parser.add_argument("--split", required=True, help="e.g. val, testA, valid_u, valid")
    parser.add_argument(
        "--data-root", default=None, help="the dataset folder (or annotation file) on disk; not needed for synthetic"
    )
    parser.add_argument(
        "--missing",
        choices=("error", "zero", "empty", "drop"),
        default="error",
        help="how a sample without a prediction (or on which the model failed) counts: error = stop with an error; "
        "zero = 0 on every metric (VISA's scorer); empty = an empty mask; drop = left out of the means (Sa2VA's "
        "scorer). Missing samples are counted in the metrics JSON",
    )
    parser.add_argument(
        "--revos-ground-truth",
        choices=("official", "union"),
        default="official",
        help="ReVOS A and R: official = on the uint8 sum of the expression's objects as the official ReVOS scripts "
        "(a pixel of two objects is an A miss and 255 R false positives when predicted); union = each pixel once",
    )
    parser.add_argument(
        "--overwrite",
        action="store_true",
        help="replace the predictions another run (another model or settings) left in the --predictions folder",
    )
    parser.add_argument(
        "--max-new-tokens", type=int, default=32, help="answer length limit for --model (recorded in the fingerprint)"
    )
    parser.add_argument(
        "--mask-threshold",
        type=float,
        default=None,
        help="mask logit threshold for --model (default: the model config's; recorded in the fingerprint)",
    )
    parser.add_argument("--output", default=None, help="metrics JSON path (default <predictions>/metrics.json)")
    parser.add_argument(
        "--submission-zip", default=None, help="also write the evaluation server's zip (MeViS, Ref-YouTube-VOS) here"
    )
    parser.add_argument(
        "--submission-layout",
        choices=("mevis", "ref_ytvos"),
        default=None,
        help="zip layout (default: from the dataset): mevis = <video>/<exp_id>/<frame>.png at the root, "
        "ref_ytvos = Annotations/<video>/<exp_id>/<frame>.png",
    )
    parser.add_argument(
        "--batch-size",
        type=int,
        default=1,
        help="images per model.segment call for --model (videos go one at a time); predictions equal batch size 1 "
        "up to padding's floating-point effect (docs/evaluation.md). Not part of the fingerprint: a run may be "
        "resumed with another batch size",
    )
    parser.add_argument(
        "--device",
        default=None,
        help="device for --model (default cuda when available: cuda:<LOCAL_RANK> under torchrun / accelerate launch)",
    )
    parser.add_argument("--dtype", default=None, help="weights dtype for --model, e.g. bfloat16")
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bars")
    parser.set_defaults(func=run_evaluate)


def _format_metrics(result: dict) -> str:
    metrics = result.get("metrics")
    if metrics is None:
        return "no metrics (the split has no ground truth)"
    lines = []

    def fmt(values: dict) -> str:
        return "  ".join(
            f"{name} {100 * value:.2f}" for name, value in values.items() if name != "n_expressions" and value is not None
        )

    if result["kind"] == "revos":
        for subset in ("referring", "reasoning", "overall"):
            values = metrics.get(subset)
            lines.append(f"{subset:>10}: " + ("n/a (no expressions)" if values is None else fmt(values)))
    else:
        lines.append(fmt(metrics))
    counts = result.get("counts") or {}
    lines.append(
        f"samples {counts.get('samples', result.get('n_samples'))}, scored {counts.get('scored')}, excluded "
        f"{counts.get('excluded', 0)}, missing {counts.get('missing', result.get('n_missing'))}"
        + (f" (counted as {result['missing_policy']})" if counts.get("missing") else "")
    )
    model = ((result.get("fingerprint") or {}).get("model") or {}).get("name_or_path")
    lines.append(f"model: {model}" if model else "model: unknown (the predictions folder records no run)")
    return "\n".join(lines)


def _check_recorded_run(recorded: dict | None, args: argparse.Namespace, predictions_dir: Path) -> None:
    """Scoring saved predictions: the folder's recorded run must be of the same dataset split."""
    if recorded is None:
        logger.warning(
            "%s records no run (no maskcma_run.json): the model that made these predictions is unknown, and the "
            "metrics JSON will say so",
            predictions_dir,
        )
        return
    for key, given in (("dataset", args.dataset), ("split", args.split)):
        if recorded.get(key) is not None and recorded.get(key) != given:
            raise ValueError(
                f"the predictions in {predictions_dir} were made on {key} {recorded.get(key)!r}, not {given!r}; "
                "pass the matching --dataset/--split or another --predictions folder"
            )


def _record_in_folder(predictions_dir: Path, fingerprint: dict, metrics_file: Path) -> None:
    """Add the metrics and scores written into a recorded run folder to its manifest (so --overwrite removes them)."""
    import json

    from ..run_folder import MANIFEST_NAME, RunFolder
    from .runner import _record_outputs

    if json.loads((predictions_dir / MANIFEST_NAME).read_text(encoding="utf-8")).get("command") != "evaluate":
        return  # another command's folder (e.g. `maskcma predict`): leave its manifest alone
    folder = RunFolder.claim(predictions_dir, command="evaluate", fingerprint=fingerprint, resume=True)
    _record_outputs(folder, metrics_file)


def run_evaluate(args: argparse.Namespace) -> int:
    """Handler of ``maskcma evaluate``; returns the exit code. Under ``torchrun`` / ``accelerate launch`` every
    process runs it (`EvaluationProcesses`); the main process prints the metrics."""
    from .distributed import EvaluationProcesses

    if args.model is None and args.predictions is None:
        print("maskcma evaluate: error: give --predictions DIR (to score) or --model FOLDER (to run)", file=sys.stderr)
        return 2
    if args.batch_size < 1:
        print(f"maskcma evaluate: error: --batch-size must be >= 1, got {args.batch_size}", file=sys.stderr)
        return 2
    show_progress = not args.no_progress
    processes = EvaluationProcesses.from_environment()
    try:
        return _run_evaluate(args, processes, show_progress)
    except (FileNotFoundError, KeyError, ValueError) as error:
        # status 2 like every maskcma error; the message keeps its lines (a validation report lists one problem
        # per line)
        message = error.args[0] if isinstance(error, KeyError) and error.args else str(error)
        prefix = "maskcma evaluate" + (f" (process {processes.rank})" if processes.distributed else "")
        print(f"{prefix}: error: {message}", file=sys.stderr)
        return 2
    finally:
        processes.close()


def _run_evaluate(args: argparse.Namespace, processes, show_progress: bool) -> int:
    from ..data import load_dataset_by_name
    from ..data.errors import DataFormatError
    from ..run_folder import RunFolder
    from .fingerprint import default_predictions_dir, evaluation_fingerprint
    from .predictions import write_submission_zip
    from .records import dataset_has_ground_truth
    from .runner import claim_predictions_folder, evaluate_dataset, score_predictions

    if args.model is not None:
        predictions_dir = Path(args.predictions or default_predictions_dir(args.model, args.dataset, args.split))
        generation = {"max_new_tokens": args.max_new_tokens, "mask_threshold": args.mask_threshold}
        fingerprint = evaluation_fingerprint(
            args.model, dataset=args.dataset, split=args.split, data_root=args.data_root, generation=generation
        )
        # refuse a folder of another run before loading data or model (the main process claims it)
        processes.run_on_main(
            "claiming the output folder",
            lambda: claim_predictions_folder(predictions_dir, fingerprint, overwrite=args.overwrite),
        )
    else:
        predictions_dir = Path(args.predictions)
        fingerprint = RunFolder.read_fingerprint(predictions_dir) if predictions_dir.is_dir() else None
        _check_recorded_run(fingerprint, args, predictions_dir)
    dataset = load_dataset_by_name(args.dataset, args.data_root, args.split)
    if args.model is not None:
        from .model_predict import model_predict_fn

        generate_kwargs = {"max_new_tokens": args.max_new_tokens}
        if args.mask_threshold is not None:
            generate_kwargs["mask_threshold"] = args.mask_threshold
        predict_fn = model_predict_fn(
            args.model, device=args.device or processes.default_device(), dtype=args.dtype,
            generate_kwargs=generate_kwargs,
        )
        result = evaluate_dataset(
            dataset,
            predict_fn,
            predictions_dir,
            missing=args.missing,
            metrics_path=args.output,
            show_progress=show_progress,
            fingerprint=fingerprint,
            overwrite=False,  # the folder was claimed (and cleared with --overwrite) above
            revos_ground_truth=args.revos_ground_truth,
            dataset_name=args.dataset,
            split=args.split,
            batch_size=args.batch_size,
            processes=processes,
        )
        if not processes.is_main:
            return 0  # the main process prints the metrics and writes the submission zip
    elif not processes.is_main:
        return 0  # scoring saved predictions is the main process's job
    elif dataset_has_ground_truth(dataset):
        result = score_predictions(
            dataset,
            predictions_dir,
            missing=args.missing,
            metrics_path=args.output,
            show_progress=show_progress,
            revos_ground_truth=args.revos_ground_truth,
            fingerprint=fingerprint,
            dataset_name=args.dataset,
            split=args.split,
        )
    else:
        if args.submission_zip is None:
            raise DataFormatError(
                f"{args.dataset} split {args.split!r} has no ground-truth masks, so it cannot be scored "
                "locally; pass --submission-zip OUT.zip to write the file for the evaluation server"
            )
        result = None
    if result is not None and args.model is None and fingerprint is not None:
        _record_in_folder(predictions_dir, fingerprint, Path(result["metrics_file"]))
    if result is not None:
        print(_format_metrics(result))
        print(f"metrics written to {result.get('metrics_file', args.output or predictions_dir / 'metrics.json')}")
    if args.submission_zip is not None:
        summary = write_submission_zip(
            dataset,
            predictions_dir,
            args.submission_zip,
            layout=args.submission_layout,
            skip_missing=args.missing != "error",
            show_progress=show_progress,
        )
        print(
            f"submission ({summary.layout}) written to {summary.path}: {summary.n_expressions} expressions, "
            f"{summary.n_frames} frames, {summary.n_missing} missing"
        )
    return 0
