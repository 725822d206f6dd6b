"""A ``predict_fn`` for :func:`~transformers_maskcma.evaluation.runner.evaluate_dataset` that runs a saved model.

The model and processor are loaded with the Auto classes (``trust_remote_code=True``, so an exported Hub folder
works without this package's modeling code), and each record goes through ``processor(...)`` and
``model.segment(...)`` as in docs/architecture.md (image inference).
"""

from __future__ import annotations

import os

import numpy as np

__all__ = ["ModelPredictor", "model_predict_fn", "segment_output_masks"]


def segment_output_masks(output, num_samples: int | None = None):
    """The predicted masks of the single sample of a ``model.segment`` call (or of each of ``num_samples``).

    ``output.masks`` (a ``MaskCMASegmentationOutput``, or a dict with ``"masks"``) is a list with one entry per
    sample of the batch: a tensor of shape ``(num_objects, height, width)`` for an image or
    ``(num_objects, num_frames, height, width)`` for a video, ``num_objects`` being the answer's ``[SEG]`` count
    (``0`` when the answer has no mask).

    Returns:
        a list of ``num_objects`` boolean numpy arrays, one per object (``(H, W)`` or ``(T, H, W)``); with
        ``num_samples``, one such list per sample.
    """
    masks = output["masks"] if isinstance(output, dict) else getattr(output, "masks", None)
    if masks is None:
        raise ValueError("model.segment returned no `masks`; expected MaskCMASegmentationOutput.masks")
    expected = 1 if num_samples is None else num_samples
    if not isinstance(masks, (list, tuple)) or len(masks) != expected:
        raise ValueError(
            f"expected `masks` as a list with one entry per sample ({expected}), got {type(masks).__name__}"
            + (f" of length {len(masks)}" if isinstance(masks, (list, tuple)) else "")
        )
    per_sample = [list(_to_numpy(sample)) for sample in masks]
    return per_sample[0] if num_samples is None else per_sample


def _to_numpy(value) -> np.ndarray:
    if hasattr(value, "detach"):
        value = value.detach().float().cpu().numpy() if value.dtype.is_floating_point else value.detach().cpu().numpy()
    return np.asarray(value)


class ModelPredictor:
    """``predict(record)`` and ``predict.predict_batch(records)`` over a loaded model and processor (what
    :func:`model_predict_fn` returns).

    ``predict_batch`` puts several images through one ``processor(images=[...], text=[...])`` call (prompts
    left-padded to the longest, each image with its own tiles and original size) and one ``model.segment`` call.
    Its masks equal those of one image at a time up to the floating-point effect of padding (docs/evaluation.md
    states the tolerance and the test that holds it); answers are the same. Videos are predicted one at a time.
    """

    def __init__(self, model, processor, device: str, generate_kwargs: dict | None = None):
        self.model = model
        self.processor = processor
        self.device = device
        self.generate_kwargs = dict(generate_kwargs or {})

    def _segment(self, inputs):
        import torch

        inputs = inputs.to(device=self.device, dtype=self.model.dtype)  # floating tensors take the weights' dtype
        with torch.inference_mode():
            return self.model.segment(**inputs, **self.generate_kwargs)

    def __call__(self, record: dict) -> list[np.ndarray]:
        """The answer's masks of one decoded record, one array per object (``(H, W)`` or ``(T, H, W)``)."""
        frames = [frame.convert("RGB") for frame in record["frames"]]
        if record["media_type"] == "image":
            inputs = self.processor(images=frames[0], text=record["prompt"], return_tensors="pt")
        else:
            inputs = self.processor(videos=frames, text=record["prompt"], return_tensors="pt")
        return segment_output_masks(self._segment(inputs))

    def predict_batch(self, records: list[dict]) -> list[list[np.ndarray]]:
        """The masks of several image records (one ``segment`` call), in the order given: per record a list of
        ``(H, W)`` boolean arrays, one per object. A video record is predicted alone."""
        if any(record["media_type"] != "image" for record in records):
            return [self(record) for record in records]
        images = [record["frames"][0].convert("RGB") for record in records]
        prompts = [record["prompt"] for record in records]
        output = self._segment(self.processor(images=images, text=prompts, return_tensors="pt"))
        return segment_output_masks(output, num_samples=len(records))


def model_predict_fn(
    model_dir: str | os.PathLike,
    device: str | None = None,
    dtype: str | None = None,
    generate_kwargs: dict | None = None,
) -> ModelPredictor:
    """Load a MaskCMA model folder (or Hub repo id) and return ``predict_fn(record) -> list of object masks``.

    Args:
        model_dir: a folder written by ``save_pretrained`` / ``maskcma export``, or a Hub repo id.
        device: ``"cuda"``, ``"cuda:1"``, ``"cpu"``, …; default CUDA when available.
        dtype: torch dtype name for the weights (``"bfloat16"``, ``"float32"``); default the saved dtype.
        generate_kwargs: extra arguments for ``model.segment`` / generation (e.g. ``max_new_tokens``).

    Returns:
        A `ModelPredictor`: called on one decoded record (frames as PIL images) it returns the answer's masks, one
        array per ``[SEG]`` object (``(H, W)`` for an image, ``(T, H, W)`` for a video), at the original frame
        size; ``.predict_batch(records)`` does the same for several images in one batch.
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
    return ModelPredictor(model, processor, device, generate_kwargs)
