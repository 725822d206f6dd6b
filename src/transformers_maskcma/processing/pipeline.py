"""The `referring-segmentation` pipeline: an image or a video and a referring prompt in; the answer, one mask per
``[SEG]`` of the answer (every frame for a video) and the masks' scores out.

This file is copied flat into Hub repositories as remote code (declared in the config's `custom_pipelines`, see
`transformers_maskcma.processing.registration`): it imports only transformers, torch, numpy, PIL and the modules
beside it.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from transformers import Pipeline
from transformers.utils import logging

from .image_io import IMAGE_FILE_EXTENSIONS, describe_input
from .video_io import FrameSource, is_video_file

logger = logging.get_logger(__name__)

PIPELINE_TASK = "referring-segmentation"
MEDIA_TYPES = ("image", "video")


def infer_media_type(media) -> str:
    """`"image"` or `"video"` for one input: a folder, a video file (by extension), a `(T, H, W, C)` array, a list
    of frames or a frame source (anything with `__len__`, `__getitem__` and `original_size`) is a video; a PIL
    image, an `(H, W[, C])` array or an image file is an image."""
    if isinstance(media, FrameSource) or all(hasattr(media, a) for a in ("__len__", "__getitem__", "original_size")):
        return "video"
    if isinstance(media, Image.Image):
        return "image"
    if isinstance(media, torch.Tensor):
        media = media.detach().cpu().numpy()
    if isinstance(media, np.ndarray):
        return "video" if media.ndim == 4 else "image"
    if isinstance(media, (str, os.PathLike)):
        path = Path(media)
        if path.is_dir() or is_video_file(path):
            return "video"
        if path.suffix.lower() in IMAGE_FILE_EXTENSIONS or path.is_file():
            return "image"
        raise FileNotFoundError(f"input {str(path)!r} does not exist (pass an image, a video file or a frame folder)")
    if isinstance(media, (list, tuple)):
        return "video"
    raise TypeError(f"unsupported input {describe_input(media)}; pass an image, a video file or a folder of frames")


class ReferringSegmentationPipeline(Pipeline):
    """Referring segmentation of images and videos with a MaskCMA model.

    Example:

    ```python
    >>> from transformers import pipeline
    >>> segmenter = pipeline("referring-segmentation", model="path/to/maskcma", trust_remote_code=True)
    >>> result = segmenter("image.png", text="Please segment the red circle.")
    >>> result["answer"], [mask.shape for mask in result["masks"]], result["scores"]
    >>> results = segmenter(["a.png", "clip.mp4"], text=["the dog", "the car that moves left"])
    >>> segmenter({"video": list_of_frames, "text": "the ball"})
    ```

    Inputs: an image (PIL image, array `(H, W, 3)`, image path), a video (video file, folder of frames, array
    `(T, H, W, 3)`), or a dict `{"image"|"video": ..., "text": ...}` (a list of frames must be given this way, as
    `{"video": frames}`); a list of inputs is a batch, with a list of as many prompts.

    Output per input: `{"answer": str, "masks": [bool array (H, W) for an image, (T, H, W) for a video, one per
    [SEG]], "scores": [float, one per mask]}`. An answer without ``[SEG]`` gives no mask (and a warning).

    Parameters (at construction or call): `max_new_tokens` (default 32), `mask_threshold` (logit threshold,
    default the model's), `num_key_frames`, `key_frame_sampling` (`"first"`/`"uniform"`), `media_type` (force
    `"image"`/`"video"`), `generate_kwargs` (dict passed to generation), `batch_size` (default 1).

    Batches: with `batch_size=N` > 1, the images of a list input go through the processor and `model.segment` N at
    a time (prompts left-padded to the longest of the batch, each image with its own tiles and original size);
    videos still go one at a time. Results come back in input order; answers equal those of `batch_size=1` and
    masks equal them up to the floating-point effect of padding (docs/evaluation.md: IoU >= 0.999 per mask).
    """

    _load_processor = True
    _load_tokenizer = False
    _load_image_processor = False
    _load_video_processor = False
    _load_feature_extractor = False

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        if self.processor is None:
            raise ValueError(
                "the referring-segmentation pipeline needs the model's processor (MaskCMAProcessor); pass "
                "processor=... or save the processor beside the model"
            )

    def __call__(self, inputs, text: str | list[str] | None = None, batch_size: int | None = None, **kwargs):
        """Segment what the prompt refers to. See the class docstring for inputs, outputs and batches."""
        items = self._pair_inputs(inputs, text)
        if batch_size is None:
            batch_size = 1 if self._batch_size is None else self._batch_size
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size={batch_size!r} must be a positive integer")
        if batch_size == 1 or not isinstance(items, list):
            # transformers' own batching would pad the processor's outputs with its generic collate function
            return super().__call__(items, batch_size=1, **kwargs)
        return self._call_batched(items, batch_size, kwargs)

    def _call_batched(self, items: list[dict], batch_size: int, kwargs: dict) -> list[dict]:
        """Images `batch_size` at a time through one processor call and one `segment` call; videos alone."""
        preprocess, forward, postprocess = self._sanitize_parameters(**kwargs)
        preprocess = {**self._preprocess_params, **preprocess}
        forward = {**self._forward_params, **forward}
        postprocess = {**self._postprocess_params, **postprocess}
        results: list[dict | None] = [None] * len(items)
        images = []
        for position, item in enumerate(items):
            kind = item["media_type"] or preprocess.get("media_type") or infer_media_type(item["media"])
            if kind == "video":
                results[position] = self.run_single(item, preprocess, forward, postprocess)
            else:
                images.append(position)
        for start in range(0, len(images), batch_size):
            chunk = images[start : start + batch_size]
            for position in chunk:
                if items[position]["text"] is None:
                    raise ValueError(f"input {items[position]['index']}: no prompt; pass text=... (one prompt per input)")
            inputs = self.processor(
                images=[items[position]["media"] for position in chunk],
                text=[items[position]["text"] for position in chunk],
                return_tensors="pt",
            )
            outputs = self.forward({"model_inputs": dict(inputs), "media_type": "image"}, **forward)
            for row, position in enumerate(chunk):
                one = {key: [values[row]] for key, values in outputs.items()}
                results[position] = self.postprocess(one, **postprocess)
        return results

    @staticmethod
    def _pair_inputs(inputs, text):
        def as_item(media, prompt, index):
            if isinstance(media, dict):
                keys = [k for k in MEDIA_TYPES if k in media]
                if len(keys) != 1:
                    raise ValueError(f"input {index}: a dict input needs exactly one of the keys 'image' or 'video'")
                prompt = media.get("text", prompt)
                return {"media": media[keys[0]], "media_type": keys[0], "text": prompt, "index": index}
            return {"media": media, "media_type": None, "text": prompt, "index": index}

        if isinstance(inputs, list):
            if len(inputs) == 0:
                raise ValueError("the input list is empty; pass at least one image or video")
            if text is None:
                prompts = [None] * len(inputs)
            elif isinstance(text, str) or len(text) != len(inputs):
                count = 1 if isinstance(text, str) else len(text)
                raise ValueError(
                    f"got {len(inputs)} inputs but {count} prompt(s); pass a list of exactly one prompt per input"
                )
            else:
                prompts = list(text)
            return [as_item(media, prompt, index) for index, (media, prompt) in enumerate(zip(inputs, prompts))]
        if isinstance(text, (list, tuple)):
            if len(text) != 1:
                raise ValueError(f"got 1 input but {len(text)} prompts; pass exactly one prompt per input")
            text = text[0]
        return as_item(inputs, text, 0)

    def _sanitize_parameters(
        self,
        max_new_tokens: int | None = None,
        mask_threshold: float | None = None,
        num_key_frames: int | None = None,
        key_frame_sampling: str | None = None,
        media_type: str | None = None,
        generate_kwargs: dict | None = None,
        **kwargs,
    ):
        if kwargs:
            raise TypeError(f"the referring-segmentation pipeline got unexpected parameters {sorted(kwargs)}")
        preprocess, forward = {}, {}
        if num_key_frames is not None:
            preprocess["num_key_frames"] = num_key_frames
        if key_frame_sampling is not None:
            preprocess["key_frame_sampling"] = key_frame_sampling
        if media_type is not None:
            if media_type not in MEDIA_TYPES:
                raise ValueError(f"media_type={media_type!r} is not valid; use 'image' or 'video'")
            preprocess["media_type"] = media_type
        if max_new_tokens is not None:
            forward["max_new_tokens"] = max_new_tokens
        if mask_threshold is not None:
            forward["mask_threshold"] = mask_threshold
        if generate_kwargs is not None:
            forward["generate_kwargs"] = generate_kwargs
        return preprocess, forward, {}

    def preprocess(self, item, num_key_frames=None, key_frame_sampling=None, media_type=None):
        index = item["index"]
        prompt = item["text"]
        if prompt is None:
            raise ValueError(f"input {index}: no prompt; pass text=... (one prompt per input)")
        kind = item["media_type"] or media_type or infer_media_type(item["media"])
        if kind == "video":
            inputs = self.processor(
                videos=item["media"],
                text=prompt,
                num_key_frames=num_key_frames,
                key_frame_sampling=key_frame_sampling,
                return_tensors="pt",
            )
        else:
            inputs = self.processor(images=item["media"], text=prompt, return_tensors="pt")
        return {"model_inputs": dict(inputs), "media_type": kind}

    def _forward(self, model_inputs, max_new_tokens: int = 32, mask_threshold=None, generate_kwargs=None):
        inputs = dict(model_inputs["model_inputs"])
        dtype = self.model.dtype
        for key, value in inputs.items():
            if isinstance(value, torch.Tensor) and value.is_floating_point():
                inputs[key] = value.to(device=self.device, dtype=dtype)
        if "video_frames" in inputs:
            inputs["video_frames"] = inputs["video_frames"].to(device=self.device, dtype=dtype)
        output = self.model.segment(
            **inputs, max_new_tokens=max_new_tokens, mask_threshold=mask_threshold, **(generate_kwargs or {})
        )
        # one entry per sample of the batch (one sample unless `_call_batched` made the batch)
        return {
            "answer_ids": list(output.answer_ids),
            "masks": list(output.masks),
            "scores": list(output.scores),
        }

    def postprocess(self, model_outputs):
        """The result of the one sample in `model_outputs` (lists of one entry)."""
        return {
            "answer": self.processor.decode_answers(model_outputs["answer_ids"])[0],
            "masks": [mask.cpu().numpy().astype(bool) for mask in model_outputs["masks"][0]],
            "scores": [float(score) for score in model_outputs["scores"][0].float().cpu()],
        }


__all__ = ["PIPELINE_TASK", "ReferringSegmentationPipeline", "infer_media_type"]
