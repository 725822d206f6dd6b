"""`maskcma app [--model DIR_OR_REPO] [--host 127.0.0.1] [--port N]`: the web demo on this machine.

Without `--model` the app serves the model `make demo` saved (`demo_output/model`), or says how to get one.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

__all__ = ["DEFAULT_MODEL_DIR", "register", "resolve_model", "run_app"]

#: Where `make demo` (`maskcma demo --output demo_output`) saves its trained model.
DEFAULT_MODEL_DIR = Path("demo_output") / "model"


class AppSetupError(ValueError):
    """The app cannot start as asked; the message names the fix."""


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "app",
        help="web demo (Gradio) on this machine: image/video + prompt → answer, overlay, masks; CMA on/off view",
        description=(
            "Serve the MaskCMA web demo: upload an image or a video, type a prompt, get the answer, the overlay, one "
            "PNG mask per object, the scores and the time taken; a second tab compares the CMA on and off (γ = 0). "
            "Runs offline (no analytics, system fonts). Needs the [app] extra: pip install 'transformers-maskcma[app]'."
        ),
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument(
        "--model",
        default=None,
        help=f"MaskCMA model folder or Hub repository (default: {DEFAULT_MODEL_DIR}, written by `make demo`)",
    )
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (0.0.0.0 to serve the network)")
    parser.add_argument("--port", type=int, default=7860, help="port to listen on")
    parser.add_argument("--max-pixels", type=int, default=4096 * 4096, help="largest image or video frame (pixels)")
    parser.add_argument("--max-frames", type=int, default=300, help="longest video (frames)")
    parser.add_argument("--max-prompt-chars", type=int, default=500, help="longest prompt (characters)")
    parser.add_argument(
        "--threads",
        type=int,
        default=None,
        help="torch CPU threads (default: torch's). On cores shared with other processes, 1 is often much faster",
    )
    parser.set_defaults(func=run_app)


def resolve_model(model: str | None) -> str:
    """`model` as given, else `demo_output/model` when `make demo` saved one, else an `AppSetupError` saying how to
    get a model."""
    if model:
        return model
    if (DEFAULT_MODEL_DIR / "config.json").is_file():
        return str(DEFAULT_MODEL_DIR)
    raise AppSetupError(
        f"no model given and none at {DEFAULT_MODEL_DIR}: run `make demo` (about 7 minutes on 2 CPU cores) to train "
        "the tiny demo model there, or pass --model with a MaskCMA folder or Hub repository"
    )


def run_app(args: argparse.Namespace) -> int:
    """Handler of `maskcma app`; blocks while the server runs."""
    try:
        from . import ui
    except ImportError as error:
        print(
            f"maskcma app: error: the web demo needs the [app] extra ({error}); install it with "
            "pip install 'transformers-maskcma[app]'",
            file=sys.stderr,
        )
        return 2
    import torch

    from .examples import write_examples

    try:
        model_id = resolve_model(args.model)
        limits = ui.AppLimits(
            max_pixels=args.max_pixels, max_frames=args.max_frames, max_prompt_chars=args.max_prompt_chars
        )
        if args.threads is not None:
            if args.threads < 1:
                raise AppSetupError(f"--threads must be >= 1, got {args.threads}")
            torch.set_num_threads(args.threads)
        demo = ui.MaskCMADemo.from_pretrained(model_id, limits=limits)
    except (AppSetupError, ValueError, OSError) as error:
        print(f"maskcma app: error: {error}", file=sys.stderr)
        return 2
    examples_dir = write_examples(Path(tempfile.mkdtemp(prefix="maskcma-app-examples-")))
    blocks = ui.build_blocks(demo, ui.read_examples(examples_dir))
    print(f"maskcma app: serving {model_id} on http://{args.host}:{args.port} (Ctrl-C stops)", flush=True)
    ui.launch(blocks, host=args.host, port=args.port)
    return 0
