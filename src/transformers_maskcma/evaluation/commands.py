"""``maskcma evaluate``: score saved predictions on a benchmark split, or run a model over it first.

Examples::

    # run a model (resumable: a re-run predicts only what is not in --predictions yet), then score
    maskcma evaluate --model runs/maskcma-1b --dataset refcoco --split val --data-root data/refcoco \\
        --predictions runs/eval/refcoco-val
    # score predictions that are already on disk
    maskcma evaluate --predictions runs/eval/mevis-valid_u --dataset mevis --split valid_u --data-root data/mevis
    # MeViS valid has no public ground truth: write the zip for the evaluation server
    maskcma evaluate --model runs/maskcma-1b --dataset mevis --split valid --data-root data/mevis \\
        --predictions runs/eval/mevis-valid --submission-zip mevis_valid.zip
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

__all__ = ["register", "run_evaluate"]


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
        help="folder holding predictions.jsonl: scored as is, or with --model the folder the predictions are "
        "written to (default with --model: maskcma-eval/<dataset>-<split>)",
    )
    parser.add_argument("--dataset", required=True, help="refcoco, refcoco+, refcocog, mevis, revos, ref_ytvos, ref_davis, ...")
    parser.add_argument("--split", required=True, help="e.g. val, testA, valid_u, valid")
    parser.add_argument(
        "--data-root", default=None, help="the dataset folder (or annotation file) on disk; not needed for synthetic"
    )
    parser.add_argument(
        "--skip-missing",
        action="store_true",
        help="score samples without a prediction (or on which the model failed) as empty masks, with a warning "
        "and a count in the metrics JSON, instead of stopping with an error",
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
    parser.add_argument("--device", default=None, help="device for --model (default cuda when available)")
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
    lines.append(f"samples {result['n_samples']}, missing {result['n_missing']}")
    return "\n".join(lines)


def run_evaluate(args: argparse.Namespace) -> int:
    """Handler of ``maskcma evaluate``; returns the exit code."""
    from ..data.errors import DataFormatError
    from .predictions import write_submission_zip
    from .records import dataset_has_ground_truth
    from .runner import evaluate_dataset, score_predictions

    if args.model is None and args.predictions is None:
        print("maskcma evaluate: error: give --predictions DIR (to score) or --model FOLDER (to run)", file=sys.stderr)
        return 2
    show_progress = not args.no_progress
    try:
        from ..data import load_dataset_by_name

        dataset = load_dataset_by_name(args.dataset, args.data_root, args.split)
        predictions_dir = Path(args.predictions or Path("maskcma-eval") / f"{args.dataset}-{args.split}")
        if args.model is not None:
            from .model_predict import model_predict_fn

            predict_fn = model_predict_fn(args.model, device=args.device, dtype=args.dtype)
            result = evaluate_dataset(
                dataset,
                predict_fn,
                predictions_dir,
                skip_missing=args.skip_missing,
                metrics_path=args.output,
                show_progress=show_progress,
            )
        elif dataset_has_ground_truth(dataset):
            result = score_predictions(
                dataset,
                predictions_dir,
                skip_missing=args.skip_missing,
                metrics_path=args.output,
                show_progress=show_progress,
            )
        else:
            if args.submission_zip is None:
                raise DataFormatError(
                    f"{args.dataset} split {args.split!r} has no ground-truth masks, so it cannot be scored "
                    "locally; pass --submission-zip OUT.zip to write the file for the evaluation server"
                )
            result = None
        if result is not None:
            print(_format_metrics(result))
            print(f"metrics written to {result.get('metrics_file', args.output or predictions_dir / 'metrics.json')}")
        if args.submission_zip is not None:
            summary = write_submission_zip(
                dataset,
                predictions_dir,
                args.submission_zip,
                layout=args.submission_layout,
                skip_missing=args.skip_missing,
                show_progress=show_progress,
            )
            print(
                f"submission ({summary.layout}) written to {summary.path}: {summary.n_expressions} expressions, "
                f"{summary.n_frames} frames, {summary.n_missing} missing"
            )
    except (FileNotFoundError, KeyError, ValueError) as error:
        message = error.args[0] if isinstance(error, KeyError) and error.args else str(error)
        print(f"maskcma evaluate: error: {message}", file=sys.stderr)
        return 1
    return 0
