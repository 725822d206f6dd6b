"""``maskcma data ...`` sub-commands.

``maskcma data check MIX.yaml --eval NAME:SPLIT:ROOT [--eval ...]``
    Loads every source of the mix and every evaluation split, prints a table of the images/videos they share
    (by content hash, or by name when the decoded pictures agree) and exits with 1 when there is any, 0
    otherwise. Equal names on different pictures are listed apart as name collisions (not leakage).
``maskcma data summary MIX.yaml``
    Loads the mix and prints the records per source, the repeat factors and the mixed size.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import asdict

from .leakage import VIDEO_FRAME_MODES, check_leakage, format_overlaps, summarize_overlaps
from .mix import DATASET_NAMES, load_dataset_by_name, load_mix_sources, read_mix, repeated_length


def parse_eval_spec(spec: str) -> tuple[str, str, str]:
    """Split ``NAME:SPLIT:ROOT`` (ROOT may itself contain ``:``) and check NAME."""
    parts = spec.split(":", 2)
    if len(parts) != 3 or not all(parts):
        raise argparse.ArgumentTypeError(
            f"--eval expects NAME:SPLIT:ROOT, e.g. ref_davis:valid:/data/davis17, got {spec!r}"
        )
    name, split, root = parts
    if name not in DATASET_NAMES:
        raise argparse.ArgumentTypeError(
            f"--eval {spec!r}: unknown dataset {name!r}; known: {', '.join(DATASET_NAMES)}"
        )
    return name, split, root


def _check(args: argparse.Namespace) -> int:
    config = read_mix(args.mix)
    train = [(source.label, dataset) for source, dataset in load_mix_sources(config, args.data_root, args.cache_dir)]
    options = {} if args.cache_dir is None else {"cache_dir": args.cache_dir}
    evaluation = []
    for name, split, root in args.eval:
        dataset = load_dataset_by_name(name, root, split, **({} if name == "synthetic" else options))
        evaluation.append((f"{name}:{split}", dataset))
    overlaps = check_leakage(train, evaluation, content_hash=not args.no_content_hash, video_frames=args.video_frames)
    leaks = [overlap for overlap in overlaps if overlap.is_leak]
    collisions = [overlap for overlap in overlaps if not overlap.is_leak]
    print(format_overlaps(leaks))
    if collisions:
        print(
            f"\n{len(collisions)} name collision(s): the same name on different pictures in training and evaluation "
            "data (not leakage; rename one side if the names matter to you):"
        )
        print(format_overlaps(collisions))
    if args.json:
        with open(args.json, "w", encoding="utf-8") as handle:
            json.dump([{**asdict(o), "is_leak": o.is_leak} for o in overlaps], handle, indent=2)
    if leaks:
        print(f"\nLEAKAGE: {summarize_overlaps(leaks)}", file=sys.stderr)
        return 1
    print(f"\nchecked {len(train)} training source(s) against {len(evaluation)} evaluation split(s): no leakage")
    return 0


def _summary(args: argparse.Namespace) -> int:
    config = read_mix(args.mix)
    rows, total = [], 0
    for source, dataset in load_mix_sources(config, args.data_root, args.cache_dir):
        effective = repeated_length(len(dataset), source.repeat)
        total += effective
        rows.append((source.label, str(len(dataset)), f"x{source.repeat:g}", str(effective)))
    header = ("source", "records", "repeat", "in mix")
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    for row in [header, tuple("-" * w for w in widths), *rows]:
        print("  ".join(value.ljust(width) for value, width in zip(row, widths, strict=True)).rstrip())
    print(f"total records in the mix: {total} (seed {config.seed})")
    return 0


def register(subparsers) -> None:
    """Add ``maskcma data check`` and ``maskcma data summary``."""
    data_parser = subparsers.add_parser("data", help="inspect training mixes and check them for leakage")
    data_commands = data_parser.add_subparsers(dest="data_command", required=True, metavar="DATA_COMMAND")

    check = data_commands.add_parser(
        "check",
        help="report images/videos that appear in both a training mix and evaluation splits (exit code 1 if any); "
        "equal names on different pictures are listed as name collisions, not leakage",
    )
    check.add_argument("mix", help="the mix YAML file")
    check.add_argument(
        "--eval",
        action="append",
        required=True,
        type=parse_eval_spec,
        metavar="NAME:SPLIT:ROOT",
        help="an evaluation split, e.g. ref_davis:valid:/data/davis17 (repeatable)",
    )
    check.add_argument("--data-root", default=None, help="base of the mix's relative paths (default: from the YAML)")
    check.add_argument(
        "--no-content-hash",
        action="store_true",
        help="compare ids only, do not read frame files (an equal name then counts as a match, match 'id')",
    )
    check.add_argument(
        "--video-frames", choices=VIDEO_FRAME_MODES, default="all", help="hash all frames of a video or only the first"
    )
    check.add_argument("--cache-dir", default=None, help="datasets cache folder for the loaded sources")
    check.add_argument("--json", default=None, help="also write the overlaps to this JSON file")
    check.set_defaults(func=_check)

    summary = data_commands.add_parser("summary", help="print the records per source of a training mix")
    summary.add_argument("mix", help="the mix YAML file")
    summary.add_argument("--data-root", default=None, help="base of the mix's relative paths (default: from the YAML)")
    summary.add_argument("--cache-dir", default=None, help="datasets cache folder for the loaded sources")
    summary.set_defaults(func=_summary)
