"""Training targets of one sample: the default answer, the ground-truth masks and the [SEG] ↔ frame mapping.

A *target* is one (``[SEG]`` token, SAM2 frame) pair, as in the model's forward. For one sample with `n` objects
and `F` SAM2 frames the targets are ordered object-major: target `o·F + f` is object `o` on frame `f`.

This file is copied flat into Hub repositories beside the processor (remote code): it imports only numpy, PIL,
torch and the standard library.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image


def default_answer(num_objects: int, seg_token: str = "[SEG]", media: str = "image") -> str:
    """The answer used when a training sample gives none: ``"Sure, [SEG]."``, ``"Sure, [SEG] and [SEG]."``,
    ``"Sure, [SEG], [SEG] and [SEG]."``…, and ``"There is no such object in the image."`` (or ``video``) for zero
    objects."""
    if num_objects < 0:
        raise ValueError(f"the number of objects must be >= 0, got {num_objects}")
    if num_objects == 0:
        return f"There is no such object in the {media}."
    if num_objects == 1:
        return f"Sure, {seg_token}."
    return "Sure, " + ", ".join([seg_token] * (num_objects - 1)) + f" and {seg_token}."


def mask_to_bool_array(mask, name: str) -> np.ndarray:
    """One mask as a `(height, width)` bool array.

    Args:
        mask: a numpy array or tensor `(H, W)` (nonzero = foreground; floating-point values ≥ 0.5 = foreground),
            or a PIL image (nonzero = foreground).
        name: how the mask is named in error messages.
    """
    if isinstance(mask, Image.Image):
        mask = np.asarray(mask.convert("L"))
    elif isinstance(mask, torch.Tensor):
        mask = mask.detach().cpu().numpy()
    mask = np.asarray(mask)
    if mask.ndim == 3 and mask.shape[-1] == 1:
        mask = mask[..., 0]
    if mask.ndim != 2:
        raise ValueError(f"{name}: a mask must be a 2-D array (height, width), got shape {tuple(mask.shape)}")
    if np.issubdtype(mask.dtype, np.floating):
        return mask >= 0.5
    return mask != 0


def normalize_object_masks(masks, frame_size: tuple[int, int], num_frames: int | None) -> list[list[np.ndarray]]:
    """Check and convert the ground truth of one sample to `masks[object][frame]`, `(H, W)` bool arrays.

    Args:
        masks: for an image (`num_frames=None`): one mask per object (a list, or an array `(N, H, W)`); for a video:
            per object a list of one mask per frame (`None` = object absent) or an array `(T, H, W)`, or an array
            `(N, T, H, W)`.
        frame_size: `(height, width)` of the image / video frames; every mask must have this size.
        num_frames: frames of the video, or `None` for an image.

    Raises:
        ValueError: a mask of the wrong size (naming the expected size) or a wrong number of frames.
    """
    if masks is None:
        return []
    if isinstance(masks, torch.Tensor):
        masks = masks.detach().cpu().numpy()
    if isinstance(masks, np.ndarray):
        expected_ndim = 3 if num_frames is None else 4
        if masks.ndim != expected_ndim:
            layout = (
                "(num_objects, height, width)" if num_frames is None else "(num_objects, num_frames, height, width)"
            )
            raise ValueError(f"masks: expected an array of shape {layout}, got shape {tuple(masks.shape)}")
        masks = list(masks)
    if not isinstance(masks, (list, tuple)):
        raise TypeError(f"masks: expected a list with one entry per object, got {type(masks).__name__}")

    height, width = frame_size
    result = []
    for obj, object_masks in enumerate(masks):
        if num_frames is None:
            per_frame = [object_masks]
        else:
            if isinstance(object_masks, torch.Tensor):
                object_masks = object_masks.detach().cpu().numpy()
            if isinstance(object_masks, np.ndarray) and object_masks.ndim == 3:
                object_masks = list(object_masks)
            if not isinstance(object_masks, (list, tuple)):
                raise ValueError(
                    f"masks[{obj}]: for a video, give one mask per frame (a list of {num_frames} masks or an array "
                    f"(num_frames, height, width)), got {type(object_masks).__name__}"
                )
            if len(object_masks) != num_frames:
                raise ValueError(
                    f"masks[{obj}] has {len(object_masks)} frame masks but the video has {num_frames} frames; give one "
                    "mask per frame (None or an empty mask where the object is absent)"
                )
            per_frame = list(object_masks)
        converted = []
        for frame, mask in enumerate(per_frame):
            where = f"masks[{obj}]" if num_frames is None else f"masks[{obj}][{frame}]"
            if mask is None:
                converted.append(np.zeros((height, width), dtype=bool))
                continue
            array = mask_to_bool_array(mask, where)
            if array.shape != (height, width):
                media = "image" if num_frames is None else "video frame"
                raise ValueError(
                    f"{where} has size {tuple(array.shape)} (height, width) but the {media} is {(height, width)}; "
                    f"masks must be given at the original size {(height, width)}"
                )
            converted.append(array)
        result.append(converted)
    return result


#: How training masks are brought to the loss resolution (`MaskCMAProcessor(gt_mask_resize=...)`).
GT_MASK_RESIZES = ("nearest", "area")


def check_gt_mask_resize(mode: str) -> str:
    """`mode` if it is one of `GT_MASK_RESIZES`, else a `ValueError` that lists them."""
    if mode not in GT_MASK_RESIZES:
        raise ValueError(f"gt_mask_resize={mode!r} is not valid; use one of {list(GT_MASK_RESIZES)}")
    return mode


def resize_masks(masks: list[np.ndarray], size: int, mode: str = "nearest") -> torch.Tensor:
    """Resize `(H, W)` bool masks to `(size, size)`, the SAM2 frame geometry (a plain resize, like the image).

    Args:
        masks: the masks, each `(H, W)` bool.
        size: output side `g`.
        mode: `"nearest"` (the research code): every output cell copies one input pixel, `{0, 1}` targets. PyTorch's
            nearest takes the first pixel of each cell's footprint, so the targets lie `(H / g − 1) / 2` input
            pixels up and left of the cells' centres, and a mask learnt from them comes out shifted by that much.
            `"area"`: every cell holds the fraction of its footprint the object covers, soft targets in `[0, 1]`
            centred on the cells; a mask learnt from them is unbiased (thresholding the logits at 0 keeps the cells
            covered more than half).

    Returns:
        A float tensor `(len(masks), size, size)`.
    """
    check_gt_mask_resize(mode)
    if not masks:
        return torch.zeros(0, size, size)
    stacked = torch.from_numpy(np.stack(masks).astype(np.float32))[:, None]
    return F.interpolate(stacked, size=(size, size), mode=mode)[:, 0]


def object_ids_from_masks(masks: list[list[np.ndarray]]) -> list[int]:
    """Object identity of each ``[SEG]``: objects with identical masks on every frame are the same object (e.g. an
    object repeated in the answer) and share an id; ids count from 0 in order of first appearance."""
    ids: list[int] = []
    seen: list[list[np.ndarray]] = []
    for object_masks in masks:
        match = next(
            (
                index
                for index, other in enumerate(seen)
                if all(np.array_equal(a, b) for a, b in zip(object_masks, other))
            ),
            None,
        )
        if match is None:
            seen.append(object_masks)
            ids.append(len(seen) - 1)
        else:
            ids.append(match)
    return ids


def target_mapping(num_objects: int, num_frames: int) -> tuple[torch.Tensor, torch.Tensor]:
    """`(target_seg_index, target_frame_index)` of one sample, object-major, each `(num_objects · num_frames,)`."""
    seg_index = torch.arange(num_objects).repeat_interleave(num_frames)
    frame_index = torch.arange(num_frames).repeat(num_objects)
    return seg_index, frame_index


__all__ = [
    "GT_MASK_RESIZES",
    "check_gt_mask_resize",
    "default_answer",
    "mask_to_bool_array",
    "normalize_object_masks",
    "object_ids_from_masks",
    "resize_masks",
    "target_mapping",
]
