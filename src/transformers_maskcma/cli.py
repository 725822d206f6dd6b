"""The ``maskcma`` command.

Each area of the package contributes its sub-commands through a ``register(subparsers)`` function in its
``commands.py`` module; this file only assembles them, so ``maskcma --help`` lists everything the package can do.

Shared behaviour of every command:

- an error exits with status 2 and one line on stderr, ``maskcma COMMAND: error: <problem and fix>``, without a
  traceback; ``maskcma --debug COMMAND ...`` shows the traceback instead;
- ``--threads N`` sets torch's CPU threads (`torch.set_num_threads`). Without it torch keeps its default (one
  thread per core), except ``maskcma demo`` which uses 1. On a machine whose cores are shared with other busy
  processes, torch's default can be many times slower than ``--threads 1`` (OpenMP threads wait for each other):
  ``predict`` on a 60-frame video took 81 s with the default and 6.6 s with one thread on two cores shared with
  one other process.
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
)

THREADS_HELP = (
    "torch CPU threads (default: torch's own, one per core; on cores shared with other busy processes --threads 1 "
    "can be many times faster)"
)


def _leaf_parsers(parser: argparse.ArgumentParser):
    """Every parser that runs a command (sub-commands of sub-commands included)."""
    actions = [action for action in parser._actions if isinstance(action, argparse._SubParsersAction)]
    if not actions:
        yield parser
        return
    for action in actions:
        for child in dict.fromkeys(action.choices.values()):
            yield from _leaf_parsers(child)


def _add_shared_options(parser: argparse.ArgumentParser) -> None:
    """``--threads`` (unless the command has its own: the demo, default 1) and ``--debug`` after the command."""
    if not any("--threads" in action.option_strings for action in parser._actions):
        parser.add_argument("--threads", type=int, default=None, metavar="N", help=THREADS_HELP)
    parser.add_argument(
        "--debug", action="store_true", default=argparse.SUPPRESS, help="show the full traceback of an error"
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="maskcma",
        description="Mask-guided Cross-Modal Attention referring segmentation: demo, train, evaluate, predict, "
        "export, push, convert.",
    )
    parser.add_argument("--debug", action="store_true", help="show the full traceback of an error")
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for module_name in COMMAND_MODULES:
        importlib.import_module(module_name).register(subparsers)
    for leaf in _leaf_parsers(parser):
        if leaf is not parser:
            _add_shared_options(leaf)
    return parser


def apply_threads(threads: int | None) -> None:
    """`torch.set_num_threads(threads)` when given (> 0); `None` or 0 keep torch's default."""
    if threads is None or threads == 0:
        return
    if threads < 0:
        raise ValueError(f"--threads must be >= 1 (or 0 for torch's default), got {threads}")
    import torch

    torch.set_num_threads(threads)


def _one_line(error: BaseException) -> str:
    text = " ".join(str(error).split())
    if isinstance(error, KeyError) or not text:
        text = f"{type(error).__name__}: {text or 'no message'}"
    return text


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    command = args.command
    try:
        if args.command != "demo":  # the demo applies its own default of one thread
            apply_threads(getattr(args, "threads", None))
        result = args.func(args)
    except KeyboardInterrupt:
        if args.debug:
            raise
        print(f"maskcma {command}: interrupted", file=sys.stderr)
        return 130
    except Exception as error:  # every error: one line and status 2, the traceback with --debug
        if args.debug:
            raise
        expected = isinstance(error, (ValueError, OSError))  # bad input: the message says what to change
        hint = "" if expected else " (an unexpected error: run with --debug for the traceback)"
        print(f"maskcma {command}: error: {_one_line(error)}{hint}", file=sys.stderr)
        return 2
    return int(result or 0)


if __name__ == "__main__":
    sys.exit(main())
