"""The Hugging Face Space folder of an exported model (`maskcma export --space DIR`).

The Space runs the same app as `maskcma app` (`ui.py`) against the exported model repository through remote code; its
environment has transformers, torch, gradio and PyAV, not this package. Layout::

    DIR/app.py                                   entry point (Spaces run `python app.py`)
    DIR/requirements.txt                         transformers, torch, av, numpy, pillow (gradio: README's sdk_version)
    DIR/README.md                                Space metadata (sdk gradio, app_file, models) and a description
    DIR/maskcma_demo/app/ui.py                   copied from this package, unchanged
    DIR/maskcma_demo/processing/visualize.py     copied from this package, unchanged (ui.py imports it relatively)
    DIR/examples/                                example inputs and examples.json

`MASKCMA_MODEL` (environment) or `--model` point the Space's app at another folder or repository, e.g. the local
export when testing the Space before pushing.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path

import yaml

from .examples import IMAGE_EXAMPLES, write_examples

__all__ = [
    "SPACE_PACKAGE",
    "SpaceFiles",
    "check_space_dir",
    "default_space_id",
    "render_example_overlays",
    "write_space",
]

SPACE_PACKAGE = "maskcma_demo"
_APP_DIR = Path(__file__).resolve().parent
_VISUALIZE = _APP_DIR.parent / "processing" / "visualize.py"

_APP_PY = '''"""Web demo of {repo_id}: referring image and video segmentation with MaskCMA (written by `maskcma export
--space`). Set MASKCMA_MODEL (or pass --model) to serve another folder or repository."""

from pathlib import Path

from {package}.app.ui import main

if __name__ == "__main__":
    main(default_model="{repo_id}", examples_dir=Path(__file__).resolve().parent / "examples")
'''


@dataclass
class SpaceFiles:
    """What `write_space` wrote: the folder and its files (relative)."""

    space_dir: Path
    files: list[str]


def _requirements() -> str:
    import av
    import numpy
    import PIL
    import torch
    import transformers

    torch_version = torch.__version__.split("+")[0]
    return (
        f"transformers=={transformers.__version__}\n"
        f"torch=={torch_version}\n"
        f"av=={av.__version__}\n"
        f"numpy=={numpy.__version__}\n"
        f"pillow=={PIL.__version__}\n"
    )


def _gradio_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("gradio")
    except PackageNotFoundError as error:
        raise ValueError(
            "writing a Space needs gradio installed (its version goes into the Space's sdk_version): "
            "pip install 'transformers-maskcma[app]'"
        ) from error


def write_space(
    space_dir: str | Path, repo_id: str, title: str | None = None, license: str = "apache-2.0"
) -> SpaceFiles:
    """Write the Space folder for the model repository `repo_id` (module docstring).

    Args:
        space_dir: folder to write; must be empty or absent.
        repo_id: the model's Hub repository, the app's default model.
        title: the Space's title (default: the repository's name + " demo").
        license: the Space's license identifier.

    Raises:
        FileExistsError: `space_dir` is not empty.
        ValueError: gradio is not installed (its version is the Space's `sdk_version`).
    """
    space_dir = Path(space_dir)
    check_space_dir(space_dir)
    gradio_version = _gradio_version()
    package = space_dir / SPACE_PACKAGE
    (package / "app").mkdir(parents=True)
    (package / "processing").mkdir(parents=True)
    (package / "__init__.py").write_text('"""The MaskCMA web demo, copied from transformers-maskcma."""\n')
    (package / "app" / "__init__.py").write_text("")
    (package / "processing" / "__init__.py").write_text("")
    shutil.copyfile(_APP_DIR / "ui.py", package / "app" / "ui.py")
    shutil.copyfile(_VISUALIZE, package / "processing" / "visualize.py")
    write_examples(space_dir / "examples")
    (space_dir / "app.py").write_text(_APP_PY.format(repo_id=repo_id, package=SPACE_PACKAGE), encoding="utf-8")
    (space_dir / "requirements.txt").write_text(_requirements(), encoding="utf-8")
    name = repo_id.split("/")[-1]
    metadata = {
        "title": title or f"{name} demo",
        "emoji": "🎯",
        "colorFrom": "red",
        "colorTo": "blue",
        "sdk": "gradio",
        "sdk_version": gradio_version,
        "app_file": "app.py",
        "pinned": False,
        "license": license,
        "models": [repo_id],
        "short_description": "Referring image and video segmentation with MaskCMA",
    }
    readme = (
        f"---\n{yaml.safe_dump(metadata, sort_keys=False, allow_unicode=True)}---\n\n"
        f"# {metadata['title']}\n\n"
        f"Referring image and video segmentation with [{repo_id}](https://huggingface.co/{repo_id}): upload an "
        "image or "
        "a video, type what to segment, and get the model's answer, the overlay, one PNG mask per object, the scores "
        "and the time taken. The **CMA comparison** tab segments the same image with the Mask-guided Cross-Modal "
        "Attention on and off (γ = 0), highlights the pixels where the masks differ and lists the prompt tokens the "
        "CMA's router chose.\n\n"
        "The model is loaded with `AutoModel.from_pretrained(..., trust_remote_code=True)`; the app needs only "
        "`transformers`, `torch`, `gradio` and `av`. Run it locally with `pip install -r requirements.txt "
        f"gradio=={gradio_version}` and `python app.py` (set `MASKCMA_MODEL` to use another folder or repository).\n"
    )
    (space_dir / "README.md").write_text(readme, encoding="utf-8")
    files = sorted(str(path.relative_to(space_dir)) for path in space_dir.rglob("*") if path.is_file())
    return SpaceFiles(space_dir=space_dir, files=files)


def default_space_id(repo_id: str) -> str:
    """`namespace/name-demo` for the model repository `namespace/name`."""
    return f"{repo_id}-demo"


def check_space_dir(space_dir: str | Path) -> None:
    """Raise `FileExistsError` when `space_dir` exists and is not empty, `ValueError` when gradio is missing (checked
    before an export writes anything)."""
    space_dir = Path(space_dir)
    if space_dir.exists() and any(space_dir.iterdir()):
        raise FileExistsError(f"{space_dir} is not empty; give --space an empty or new folder")
    _gradio_version()


def render_example_overlays(model, processor, output_dir: str | Path, max_new_tokens: int = 32) -> list:
    """Run `model.segment` on the image examples and save their overlays as `output_dir/examples/overlay_<k>.png`.

    Returns:
        `list[ExampleOverlay]` (paths relative to `output_dir`) for the model card.
    """
    import torch
    from PIL import Image

    from ..hub_cards.model_card import ExampleOverlay
    from ..processing.samples import ASSETS_DIR
    from ..processing.visualize import overlay_masks

    output_dir = Path(output_dir)
    (output_dir / "examples").mkdir(parents=True, exist_ok=True)
    overlays = []
    for index, (name, prompt) in enumerate(IMAGE_EXAMPLES):
        image = Image.open(ASSETS_DIR / name).convert("RGB")
        inputs = processor(images=image, text=prompt, return_tensors="pt")
        with torch.no_grad():
            output = model.segment(**inputs, max_new_tokens=max_new_tokens)
        masks = output.masks[0].cpu().numpy().astype(bool)
        relative = f"examples/overlay_{index + 1}.png"
        overlay_masks(image, list(masks)).save(output_dir / relative)
        answer = processor.decode_answers(output.answer_ids)[0]
        overlays.append(ExampleOverlay(path=relative, prompt=prompt, answer=answer))
    return overlays
