"""The ``maskcma`` command.

Each area of the package contributes its sub-commands through a ``register(subparsers)`` function in its
``commands.py`` module; this file only assembles them, so ``maskcma --help`` lists everything the package can do.
"""

from __future__ import annotations

import argparse
import importlib
import sys

# (module holding ``register(subparsers)``), in the order they appear in ``maskcma --help``
COMMAND_MODULES = (
    "transformers_maskcma.demo",
    "transformers_maskcma.processing.commands",
    "transformers_maskcma.trainer.commands",
    "transformers_maskcma.data.commands",
    "transformers_maskcma.evaluation.commands",
    "transformers_maskcma.hub_cards.commands",
    "transformers_maskcma.app.commands",
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="maskcma",
        description="Mask-guided Cross-Modal Attention referring segmentation: demo, train, evaluate, predict, "
        "export, push, convert.",
    )
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for module_name in COMMAND_MODULES:
        importlib.import_module(module_name).register(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    result = args.func(args)
    return int(result or 0)


if __name__ == "__main__":
    sys.exit(main())
