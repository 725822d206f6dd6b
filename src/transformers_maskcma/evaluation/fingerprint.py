"""What identifies an evaluation run, recorded in its predictions folder (``maskcma_run.json``) and metrics JSON.

Two runs may share a predictions folder (and so resume each other's predictions) only when their fingerprints
are equal. The fingerprint is cheap to compute (nothing is loaded, no weight is read)::

    {"model": {"name_or_path": "runs/maskcma-1b", "config_sha256": ..., "weights": {name: {"size", "header_sha256"}}},
     "processor": {"files": {"processor_config.json": sha256, ...}, "remote_code": {"modeling_maskcma.py": sha256,
                   ...}, "num_key_frames": 5, "key_frame_sampling": "first", "max_image_tiles": 12, ...},
     "generation": {"max_new_tokens": 32, "mask_threshold": null},
     "dataset": "revos", "split": "valid", "data_root": "/abs/data/revos", "package_version": "0.1.0"}

``mask_threshold`` ``null`` means the model config's own threshold (recorded through ``config_sha256``).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from pathlib import Path
from typing import Any

from ..run_folder import model_fingerprint

__all__ = ["PROCESSOR_FILES", "default_predictions_dir", "evaluation_fingerprint", "model_display_name"]

#: Files of a model folder that decide how inputs are processed and prompts are templated.
PROCESSOR_FILES = (
    "processor_config.json",
    "preprocessor_config.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "tokenizer.json",
    "chat_template.jinja",
    "chat_template.json",
)


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _read_json(path: Path) -> dict:
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return {}
    return value if isinstance(value, dict) else {}


def processor_fingerprint(path_or_repo: str | os.PathLike) -> dict[str, Any]:
    """The processor settings of a model folder: the hashes of its processor and tokenizer files and of its
    remote code (``*.py``), and the values that change predictions (key frames and their sampling, the image tile
    limit). A Hub repo id (not a local
    folder) is identified by the model part of the fingerprint only."""
    path = Path(path_or_repo).expanduser()
    if not path.is_dir():
        return {}
    files = {name: _sha256(path / name) for name in PROCESSOR_FILES if (path / name).is_file()}
    code = {file.name: _sha256(file) for file in sorted(path.glob("*.py"))}
    processor = _read_json(path / "processor_config.json")
    image = processor.get("image_processor") if isinstance(processor.get("image_processor"), dict) else None
    if image is None:
        image = _read_json(path / "preprocessor_config.json")
    settings: dict[str, Any] = {"files": files, "remote_code": code}
    for key in ("num_key_frames", "key_frame_sampling", "image_seq_length", "sam_image_size"):
        if key in processor:
            settings[key] = processor[key]
    if "max_patches" in image:
        settings["max_image_tiles"] = image["max_patches"] if image.get("crop_to_patches") else 1
    return settings


def evaluation_fingerprint(
    model: str | os.PathLike,
    *,
    dataset: str,
    split: str,
    data_root: str | os.PathLike | None,
    generation: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """The fingerprint of ``maskcma evaluate --model MODEL`` on one split (module docstring).

    Args:
        model: the model folder or Hub repo id.
        dataset, split: the benchmark split.
        data_root: the dataset folder (stored as an absolute path).
        generation: the generation settings passed to ``model.segment`` (``max_new_tokens``, ``mask_threshold``).
    """
    from .. import __version__

    return {
        "model": {"name_or_path": str(model), **model_fingerprint(model)},
        "processor": processor_fingerprint(model),
        "generation": dict(sorted((generation or {}).items())),
        "dataset": dataset,
        "split": split,
        "data_root": None if data_root is None else str(Path(data_root).expanduser().resolve()),
        "package_version": __version__,
    }


def model_display_name(model: str | os.PathLike) -> str:
    """A folder-name-safe name of a model: the folder's name, or ``owner--name`` for a Hub repo id."""
    path = Path(model).expanduser()
    name = path.resolve().name if path.is_dir() else str(model).strip("/").replace("/", "--")
    return re.sub(r"[^A-Za-z0-9._+-]+", "_", name) or "model"


def default_predictions_dir(model: str | os.PathLike, dataset: str, split: str) -> Path:
    """``maskcma-eval/<model name>-<dataset>-<split>``: the predictions folder of ``maskcma evaluate`` when
    ``--predictions`` is not given; it names the model, so two models never share it by default."""
    return Path("maskcma-eval") / f"{model_display_name(model)}-{dataset}-{split}"
