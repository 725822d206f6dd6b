"""A ``predict_fn`` for :func:`~transformers_maskcma.evaluation.runner.evaluate_dataset` that runs a saved model.

The model and processor are loaded with the Auto classes (``trust_remote_code=True``, so an exported Hub folder
works without this package's modeling code), and each record goes through ``processor(...)`` and
``model.segment(...)`` as in docs/architecture.md (image inference).
"""

from __future__ import annotations

import os
from collections.abc import Callable

import numpy as np

__all__ = ["model_predict_fn", "segment_output_masks"]


def segment_output_masks(output) -> list[np.ndarray]:
    """The predicted masks of the single sample of a ``model.segment`` call.

    ``output.masks`` (a ``MaskCMASegmentationOutput``, or a dict with ``"masks"``) is a list with one entry per
    sample of the batch: a tensor of shape ``(num_objects, height, width)`` for an image or
    ``(num_objects, num_frames, height, width)`` for a video, ``num_objects`` being the answer's ``[SEG]`` count
    (``0`` when the answer has no mask).

    Returns:
        a list of ``num_objects`` boolean numpy arrays, one per object (``(H, W)`` or ``(T, H, W)``).
    """
    masks = output["masks"] if isinstance(output, dict) else getattr(output, "masks", None)
    if masks is None:
        raise ValueError("model.segment returned no `masks`; expected MaskCMASegmentationOutput.masks")
    if not isinstance(masks, (list, tuple)) or len(masks) != 1:
        raise ValueError(
            f"expected `masks` as a list with one entry for the one sample given, got {type(masks).__name__}"
            + (f" of length {len(masks)}" if isinstance(masks, (list, tuple)) else "")
        )
    return list(_to_numpy(masks[0]))


def _to_numpy(value) -> np.ndarray:
    if hasattr(value, "detach"):
        value = value.detach().float().cpu().numpy() if value.dtype.is_floating_point else value.detach().cpu().numpy()
    return np.asarray(value)


def model_predict_fn(
    model_dir: str | os.PathLike,
    device: str | None = None,
    dtype: str | None = None,
    generate_kwargs: dict | None = None,
) -> Callable[[dict], list[np.ndarray]]:
    """Load a MaskCMA model folder (or Hub repo id) and return ``predict_fn(record) -> list of object masks``.

    Args:
        model_dir: a folder written by ``save_pretrained`` / ``maskcma export``, or a Hub repo id.
        device: ``"cuda"``, ``"cpu"``, …; default CUDA when available.
        dtype: torch dtype name for the weights (``"bfloat16"``, ``"float32"``); default the saved dtype.
        generate_kwargs: extra arguments for ``model.segment`` / generation (e.g. ``max_new_tokens``).

    Returns:
        A function of one decoded record (frames as PIL images) returning the answer's masks, one array per
        ``[SEG]`` object (``(H, W)`` for an image, ``(T, H, W)`` for a video), at the original frame size.
    """
    import torch
    from transformers import AutoModel, AutoProcessor

    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    load_kwargs = {"trust_remote_code": True}
    if dtype is not None:
        load_kwargs["dtype"] = getattr(torch, dtype)
    model = AutoModel.from_pretrained(model_dir, **load_kwargs).to(device).eval()
    processor = AutoProcessor.from_pretrained(model_dir, trust_remote_code=True)

    def predict(record: dict) -> list[np.ndarray]:
        frames = [frame.convert("RGB") for frame in record["frames"]]
        if record["media_type"] == "image":
            inputs = processor(images=frames[0], text=record["prompt"], return_tensors="pt")
        else:
            inputs = processor(videos=frames, text=record["prompt"], return_tensors="pt")
        inputs = inputs.to(device=device, dtype=model.dtype)  # floating tensors take the weights' dtype
        with torch.inference_mode():
            output = model.segment(**inputs, **(generate_kwargs or {}))
        return segment_output_masks(output)

    return predict
