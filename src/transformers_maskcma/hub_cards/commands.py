"""`maskcma export`, `maskcma push` and `maskcma convert {sam2,sa2va}`.

Examples::

    maskcma export --model runs/maskcma-4b --output export/maskcma-4b --max-shard-size 2GB \\
        --metrics runs/eval/refcoco-val/metrics.json --metrics revos:valid=runs/eval/revos/metrics.json \\
        --base-model ByteDance/Sa2VA-4B --dataset lmms-lab/RefCOCO --repo-id me/maskcma-4b
    maskcma push export/maskcma-4b --repo-id me/maskcma-4b --private --commit-message "first release"
    maskcma convert sa2va checkpoints/Sa2VA-4B --output checkpoints/maskcma-from-sa2va-4b
"""

from __future__ import annotations

import argparse
import sys

import torch

from . import convert_commands

__all__ = ["register", "run_export", "run_push"]


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add `export`, `push` and `convert` (with `sam2` and `sa2va`) to the `maskcma` command."""
    _register_export(subparsers)
    _register_push(subparsers)
    convert_commands.register(subparsers)


def _register_export(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "export",
        help="write a Hub-ready folder: merged weights (sharded safetensors), remote code, processor, model card",
        description=(
            "Export a trained MaskCMA model (a saved folder, or LoRA adapters on one, which are merged) to a folder "
            "that AutoModel/AutoProcessor/pipeline('referring-segmentation') load with trust_remote_code=True "
            "without this package, with a README model card whose model-index comes from --metrics."
        ),
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--model", required=True, help="trained model folder (MaskCMA save or LoRA adapter folder)")
    parser.add_argument("--output", required=True, help="folder to write (must be empty or absent)")
    parser.add_argument("--max-shard-size", default="2GB", help="largest safetensors shard, e.g. 2GB or 500MB")
    parser.add_argument(
        "--metrics",
        action="append",
        default=[],
        metavar="[DATASET:SPLIT=]PATH",
        help="metrics JSON of `maskcma evaluate` (repeatable); prefix DATASET:SPLIT= when the JSON does not say",
    )
    parser.add_argument("--model-name", default=None, help="name in the card (default: the output folder's name)")
    parser.add_argument(
        "--repo-id", default=None, help="Hub id shown in the card's usage code (default your-username/NAME)"
    )
    parser.add_argument("--license", default="apache-2.0", help="Hub license identifier")
    parser.add_argument("--base-model", action="append", default=[], help="Hub id of a base model (repeatable)")
    parser.add_argument("--dataset", action="append", default=[], help="Hub id of a training dataset (repeatable)")
    parser.add_argument("--tag", action="append", default=[], help="extra card tag (repeatable)")
    parser.add_argument("--training-config", default=None, help="YAML/JSON of the training run, shown in the card")
    parser.add_argument("--base-model-path", default=None, help="base MaskCMA folder of a LoRA adapter folder")
    parser.add_argument("--dtype", default=None, help="cast the weights, e.g. bfloat16 (default: as trained)")
    parser.add_argument("--overwrite", action="store_true", help="replace the contents of an existing --output")
    parser.add_argument(
        "--no-verify", action="store_true", help="skip the strict reload that compares every exported tensor"
    )
    parser.set_defaults(func=run_export)


def _register_push(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "push",
        help="upload an exported folder to the Hugging Face Hub",
        description="Create the model repository if needed and upload the folder of `maskcma export` in one commit.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("folder", metavar="DIR", help="the folder written by `maskcma export`")
    parser.add_argument("--repo-id", required=True, help="namespace/name of the model repository")
    parser.add_argument("--private", action="store_true", help="create the repository as private")
    parser.add_argument("--revision", default=None, help="branch to commit to (created when missing; default main)")
    parser.add_argument("--commit-message", default=None, help="commit message (default 'Upload MaskCMA model')")
    parser.add_argument("--token", default=None, help="Hub token (default: HF_TOKEN or the `hf auth login` token)")
    parser.add_argument("--endpoint", default=None, help="Hub URL (default: HF_ENDPOINT or https://huggingface.co)")
    parser.set_defaults(func=run_push)


def _dtype(name: str | None) -> torch.dtype | None:
    if name is None:
        return None
    dtype = getattr(torch, name, None)
    if not isinstance(dtype, torch.dtype):
        raise ValueError(f"--dtype {name!r} is not a torch dtype; use e.g. bfloat16, float16 or float32")
    return dtype


def run_export(args: argparse.Namespace) -> int:
    """Handler of `maskcma export`; returns the exit code."""
    from .export import export_model

    try:
        result = export_model(
            args.model,
            args.output,
            max_shard_size=args.max_shard_size,
            metrics=args.metrics,
            model_name=args.model_name,
            repo_id=args.repo_id,
            license=args.license,
            base_models=args.base_model,
            datasets=args.dataset,
            tags=args.tag,
            training_config=args.training_config,
            base_model_path=args.base_model_path,
            dtype=_dtype(args.dtype),
            overwrite=args.overwrite,
            verify=not args.no_verify,
        )
    except (FileNotFoundError, FileExistsError, ValueError) as error:
        print(f"maskcma export: error: {error}", file=sys.stderr)
        return 2
    merged = " (LoRA merged)" if result.merged_lora else ""
    verified = "; every tensor re-loaded strictly and compared" if result.verified else ""
    print(
        f"Exported {result.num_parameters:,} parameters{merged} to {result.output_dir}: "
        f"{len(result.weight_files)} weight shard(s), {len(result.files)} files{verified}."
    )
    return 0


def run_push(args: argparse.Namespace) -> int:
    """Handler of `maskcma push`; returns the exit code."""
    from .push import HubPushError, push_to_hub

    try:
        result = push_to_hub(
            args.folder,
            args.repo_id,
            private=True if args.private else None,
            revision=args.revision,
            commit_message=args.commit_message,
            token=args.token,
            endpoint=args.endpoint,
        )
    except (FileNotFoundError, NotADirectoryError, ValueError, HubPushError) as error:
        print(f"maskcma push: error: {error}", file=sys.stderr)
        return 2
    print(f"Pushed {result.num_files} files to {result.repo_url} (branch {result.revision}): {result.commit_url}")
    return 0
