"""`maskcma convert ...`: import checkpoints of other projects.

`register(subparsers)` creates the `convert` command with its own sub-commands (one per source format);
`register_convert(convert_subparsers)` adds `convert sam2` to an existing `convert` parser.
"""

from __future__ import annotations

import argparse
import json
import sys

from .convert_sam2 import CONVERSION_REPORT_NAME, SAM2_SIZES, Sam2ConversionError, convert_sam2_checkpoint


def register(subparsers: argparse._SubParsersAction) -> argparse._SubParsersAction:
    """Add `maskcma convert` with its sub-commands; returns the sub-parsers of `convert` for further formats."""
    convert = subparsers.add_parser(
        "convert",
        help="import an existing checkpoint (official SAM2 .pt, Sa2VA) into this package's format",
        description="Import an existing checkpoint into the transformers format used by this package.",
    )
    convert_subparsers = convert.add_subparsers(dest="convert_format", required=True, metavar="FORMAT")
    register_convert(convert_subparsers)
    # `maskcma convert sa2va SRC_DIR --output DIR`, next to `sam2`
    from .convert_sa2va import add_sa2va_parser

    add_sa2va_parser(convert_subparsers)
    return convert_subparsers


def register_convert(convert_subparsers: argparse._SubParsersAction) -> None:
    """Add `sam2` to the sub-parsers of `maskcma convert`."""
    parser = convert_subparsers.add_parser(
        "sam2",
        help="official SAM2 / SAM2.1 .pt checkpoint → transformers Sam2Model folder",
        description=(
            "Convert an official SAM2 / SAM2.1 checkpoint ({'model': state_dict} of the sam2 package; Hiera tiny, "
            "small, base+ or large) into a folder that transformers' Sam2Model.from_pretrained loads strictly "
            "(config.json + model.safetensors + sam2_conversion.json listing every dropped key and why). The size "
            "is inferred from the weights unless --size or --config is given."
        ),
    )
    parser.add_argument("checkpoint", help="official .pt file, e.g. sam2.1_hiera_tiny.pt")
    parser.add_argument("--output", required=True, help="folder to write (must be empty or absent)")
    architecture = parser.add_mutually_exclusive_group()
    architecture.add_argument("--size", choices=SAM2_SIZES, help="official model size (default: inferred)")
    architecture.add_argument(
        "--config", help="official hydra YAML the model was built from (for architectures other than the 4 sizes)"
    )
    parser.add_argument(
        "--video",
        action="store_true",
        help="write Sam2VideoModel weights (memory attention, memory encoder, object pointers) instead of the "
        "image-only Sam2Model",
    )
    parser.add_argument("--overwrite", action="store_true", help="replace the contents of an existing --output")
    parser.set_defaults(func=run_convert_sam2)


def run_convert_sam2(args: argparse.Namespace) -> int:
    """Handler of `maskcma convert sam2`; returns the exit code."""
    try:
        output = convert_sam2_checkpoint(
            args.checkpoint,
            args.output,
            size=args.size,
            config=args.config,
            video=args.video,
            overwrite=args.overwrite,
        )
    except (Sam2ConversionError, FileNotFoundError, FileExistsError) as error:
        print(f"maskcma convert sam2: error: {error}", file=sys.stderr)
        return 2
    report_path = output / CONVERSION_REPORT_NAME
    report = json.loads(report_path.read_text())
    print(
        f"Wrote {report['target']} ({report['generation']}, {report['architecture_source']}) to {output}: "
        f"{report['num_mapped_keys']} of {report['num_source_keys']} checkpoint keys mapped, "
        f"{len(report['dropped_keys'])} video-only keys dropped (listed with reasons in {report_path.name})."
    )
    return 0
