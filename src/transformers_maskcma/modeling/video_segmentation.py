"""Video segmentation: SAM2 decodes the key frames from the ``[SEG]`` prompts (with the CMA, as for an image) and
carries the objects through every other frame with its memory. [`MaskCMAModel.segment`] runs the VLM once and
builds one [`VideoSegmentationStream`] per video from here; this module never imports the model.

- Key frames become SAM2 *conditioning frames*: `model.decode_masks` (pass 1, CMA, pass 2) gives their masks and
  `sam2.store_conditioning_frame` stores them (object pointer, object score) and encodes their memory.
- Every other frame comes from `sam2.track_frame` (memory attention, mask decoder without prompt, memory encoder).
  With `config.cma_on_propagation` the memory-conditioned embedding ``F_mem`` of each object is refined first,
  ``F' = cma(F_mem, T ∪ {s}, G)``; the prior ``G`` is the object's mask logits on the previous frame in propagation
  order (already in SAM2's state), or the conv prior head on ``F_mem`` with `mask_source="conv"`. With γ = 0 the CMA
  adds exactly zero, so the masks equal SAM2's propagation without CMA bit for bit.
- Object presence (`config.object_presence`) follows the image rule: `"keep"` keeps every decoded mask, `"blank"`
  empties it where SAM2's object score is <= 0. Either way the score selects SAM2's no-object pointer and memory.
- Bounded memory: frames are read one at a time when SAM2 first needs them; after each step the state no later step
  reads is dropped (high-resolution masks once encoded, memory features outside `num_maskmem`, object pointers outside
  `max_object_pointers_in_encoder`, previous masks once used as prior). Conditioning frames stay; results are equal.
- Order: frames before the first key frame are tracked backwards from it, then the rest forwards; frames are yielded in
  increasing order. Each frame's masks are upsampled on SAM2's device, thresholded, then moved to the CPU.

Copied flat into Hub repositories as remote code: it imports only torch, transformers and the modules beside it.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from transformers.models.sam2_video.modeling_sam2_video import Sam2VideoInferenceSession
from transformers.utils.logging import tqdm

from .mask_decoding import upsample_mask_logits
from .mask_prior import PreviousFrameMaskPrior

_HEAVY_MEMORY_KEYS = ("maskmem_features", "maskmem_pos_enc")
#: Where video results are collected: each frame moves there after upsampling on SAM2's device.
RESULT_DEVICE = torch.device("cpu")


class _Sam2Frames:
    """The session's frame store over any frame sequence (`len()` and `[i]` → `(3, S, S)`): checks each frame's
    shape when SAM2 reads it and casts it to SAM2's dtype."""

    def __init__(self, frames: Any, image_size: int, dtype: torch.dtype):
        if not (hasattr(frames, "__len__") and hasattr(frames, "__getitem__")):
            raise TypeError(f"video frames must be a sequence (len() and [i]), got {type(frames).__name__}")
        if len(frames) == 0:
            raise ValueError("the video has no frames: video_frames / sam_pixel_values is empty")
        self.frames, self.shape, self.dtype = frames, (3, int(image_size), int(image_size)), dtype

    def __len__(self) -> int:
        return len(self.frames)

    def __getitem__(self, frame_index: int) -> torch.Tensor:
        frame = torch.as_tensor(self.frames[frame_index])
        if tuple(frame.shape) != self.shape:
            raise ValueError(
                f"video frame {frame_index} has shape {tuple(frame.shape)}, expected {self.shape}: resize the frames "
                "to SAM2's input size and normalise them (the processor's SAM2 transform does this)"
            )
        return frame.to(self.dtype)


def normalize_key_frame_indices(key_frame_indices: Any, num_frames: int, sample: int = 0) -> list[int]:
    """The key frames of one video as a sorted list of distinct frame numbers (duplicates merged: SAM2 conditions on
    each frame once). Raises `ValueError` when the list is empty or an index lies outside `[0, num_frames)`."""
    if isinstance(key_frame_indices, torch.Tensor):
        key_frame_indices = key_frame_indices.reshape(-1).tolist()
    not_integral = [index for index in key_frame_indices if isinstance(index, bool) or int(index) != index]
    if not_integral:
        raise ValueError(f"sample {sample}: key_frame_indices must be frame numbers (integers), got {not_integral}")
    indices = sorted({int(index) for index in key_frame_indices})
    if not indices:
        raise ValueError(f"sample {sample}: key_frame_indices is empty; the VLM must see at least one key frame")
    outside = [index for index in indices if not 0 <= index < num_frames]
    if outside:
        raise ValueError(
            f"sample {sample}: key_frame_indices {outside} lie outside the video, which has {num_frames} frames "
            f"(valid indices are 0..{num_frames - 1})"
        )
    return indices


@dataclass
class VideoSample:
    """One video of a batch: its frames, key frames and `(height, width)`."""

    frames: Any
    key_frame_indices: list[int]
    original_size: tuple[int, int]


def video_samples(
    batch_size: int, sam_pixel_values: Any, video_frames: Any, key_frame_indices: Any, original_sizes: Any, image_size: int
) -> list[VideoSample]:
    """Check the video inputs of `segment` and split them per video.

    Args:
        sam_pixel_values (`torch.FloatTensor` of shape `(batch_size, num_frames, 3, S, S)`), or video_frames (one
            frame sequence such as a `(T, 3, S, S)` tensor, or a list of `batch_size` of them): exactly one of the two.
        key_frame_indices: a list of ints (one video), a list of lists or a `(batch_size, K)` tensor.
        original_sizes: `(batch_size, 2)` `(height, width)`, or `None` for `S×S`.
    """
    if (sam_pixel_values is None) == (video_frames is None):
        raise ValueError(
            "pass the video either as sam_pixel_values (batch, num_frames, 3, S, S) or as video_frames (a lazy frame "
            "source per video), exactly one of them"
        )
    if isinstance(video_frames, torch.Tensor) and video_frames.ndim == 5:  # (batch, T, 3, S, S) given as frames
        sam_pixel_values, video_frames = video_frames, None
    if sam_pixel_values is not None:
        if sam_pixel_values.ndim != 5 or sam_pixel_values.shape[0] != batch_size:
            raise ValueError(
                f"sam_pixel_values for videos must have shape (batch_size={batch_size}, num_frames, 3, S, S), got "
                f"{tuple(sam_pixel_values.shape)}"
            )
        if tuple(sam_pixel_values.shape[2:]) != (3, image_size, image_size):
            raise ValueError(
                f"video frames must have shape (num_frames, 3, {image_size}, {image_size}) (SAM2's input size), got "
                f"{tuple(sam_pixel_values.shape[1:])}: resize the frames with the processor's SAM2 transform"
            )
        sources = list(sam_pixel_values)
    elif batch_size == 1:
        sources = [video_frames]
    elif isinstance(video_frames, (list, tuple)) and len(video_frames) == batch_size:
        sources = list(video_frames)
    else:
        raise ValueError(
            f"with a batch of {batch_size} prompts, video_frames must be a list of {batch_size} frame sources (one "
            f"per video), got {type(video_frames).__name__}"
        )
    if key_frame_indices is None:
        raise ValueError(
            "key_frame_indices is required for videos: the frame number of each key frame the prompt shows the VLM "
            "(the processor returns it with the video inputs)"
        )
    if isinstance(key_frame_indices, torch.Tensor):
        per_sample = [key_frame_indices.reshape(-1)] if key_frame_indices.ndim == 1 else list(key_frame_indices)
    elif len(key_frame_indices) > 0 and not isinstance(key_frame_indices[0], (Sequence, torch.Tensor)):
        per_sample = [key_frame_indices]
    else:
        per_sample = list(key_frame_indices)
    if len(per_sample) != batch_size:
        raise ValueError(
            f"key_frame_indices gives key frames for {len(per_sample)} videos but the batch has {batch_size} prompts; "
            "pass one list of frame numbers per video"
        )
    sizes = [(image_size, image_size)] * batch_size
    if original_sizes is not None:
        sizes = [(int(h), int(w)) for h, w in torch.as_tensor(original_sizes).reshape(-1, 2).tolist()]
        if len(sizes) != batch_size:
            raise ValueError(f"original_sizes has {len(sizes)} rows, expected one (height, width) per video ({batch_size})")
    if any(len(source) == 0 for source in sources):
        raise ValueError("the video has no frames: video_frames / sam_pixel_values is empty")
    return [
        VideoSample(source, normalize_key_frame_indices(keys, len(source), sample), size)
        for sample, (source, keys, size) in enumerate(zip(sources, per_sample, sizes))
    ]


@dataclass
class VideoFrameMasks:
    """The objects' masks on one frame, on SAM2's device.

    Args:
        frame_index (`int`): the frame number.
        mask_logits (`torch.FloatTensor` of shape `(num_objects, h, w)`): low-resolution logits after the
            object-presence rule.
        iou_scores (`torch.FloatTensor` of shape `(num_objects,)`): SAM2's predicted IoU of each chosen mask.
        object_score_logits (`torch.FloatTensor` of shape `(num_objects,)`): SAM2's object-presence logit.
        is_key_frame (`bool`): whether the frame was decoded from the ``[SEG]`` prompts (else propagated).
    """

    frame_index: int
    mask_logits: torch.Tensor
    iou_scores: torch.Tensor
    object_score_logits: torch.Tensor
    is_key_frame: bool


class VideoMaskPropagation:
    """Segments the objects of one video frame by frame (module docstring); iterating yields one [`VideoFrameMasks`]
    per frame in increasing order, and the work happens during iteration.

    Args:
        model (`MaskCMAModel`): in eval mode; its `sam2`, `cma`, `decode_masks`, `propagation_mask_prior` and `config`
            are used.
        frames: the video, a sequence of `(3, S, S)` frames (`len()` and `[i]`).
        key_frame_indices (sequence of `int`): frames the VLM saw; SAM2's conditioning frames.
        seg_embeds (`torch.FloatTensor` of shape `(num_objects, 256)`): one projected ``[SEG]`` per object.
        text_tokens (`torch.FloatTensor` of shape `(num_text_tokens, 256)`): the prompt's projected text tokens.
        text_token_mask (`torch.BoolTensor` of shape `(num_text_tokens,)`): which of them are real tokens.
        offload_state_to_cpu (`bool`): keep SAM2's per-frame state (masks, memory features) on the CPU.
        bounded_memory (`bool`): drop per-frame state that no later frame reads; `False` keeps SAM2's full history.
            The results are the same.
        show_progress (`bool`): a progress bar over the frames.

    Attributes:
        inference_session (`Sam2VideoInferenceSession`): SAM2's state (objects 0..num_objects-1 in ``[SEG]`` order).
    """

    def __init__(
        self,
        model: nn.Module,
        frames: Any,
        key_frame_indices: Sequence[int],
        seg_embeds: torch.Tensor,
        text_tokens: torch.Tensor,
        text_token_mask: torch.Tensor,
        offload_state_to_cpu: bool = False,
        bounded_memory: bool = True,
        show_progress: bool = False,
    ):
        sam2, config = model.sam2, model.config
        if sam2.training:
            raise ValueError(
                "video segmentation needs SAM2 in eval mode (its video state is defined for inference only): call "
                "model.eval() first"
            )
        if seg_embeds.ndim != 2:
            raise ValueError(f"seg_embeds must have shape (num_objects, embed_dim), got {tuple(seg_embeds.shape)}")
        parameter = next(sam2.parameters())
        self.device, self.dtype = parameter.device, parameter.dtype
        self.model = model
        self.num_frames = len(frames)
        self.key_frame_indices = normalize_key_frame_indices(key_frame_indices, self.num_frames)
        self.num_objects = seg_embeds.shape[0]
        self.seg_embeds = seg_embeds.to(self.device, self.dtype)
        self.text_tokens = text_tokens.to(self.device, self.dtype)
        self.text_token_mask = text_token_mask.to(self.device).bool()
        self.bounded_memory, self.show_progress = bounded_memory, show_progress
        self.state_device = torch.device("cpu") if offload_state_to_cpu else self.device
        self.object_presence = config.object_presence
        self.cma_on_propagation = bool(config.use_cma and config.cma_on_propagation)
        self.prior_from_previous_frame = self.cma_on_propagation and isinstance(
            model.propagation_mask_prior, PreviousFrameMaskPrior
        )
        self.low_res_size = tuple(int(size * 4) for size in sam2.backbone_feature_sizes[-1])
        self.inference_session = Sam2VideoInferenceSession(
            inference_device=self.device,
            inference_state_device=self.state_device,
            video_storage_device="cpu",
            dtype=self.dtype,
            max_vision_features_cache_size=1,
        )
        # lazy frame store: SAM2 reads a frame only when it computes the frame's features
        self.inference_session.processed_frames = _Sam2Frames(frames, sam2.config.image_size, self.dtype)
        for object_index in range(self.num_objects):
            self.inference_session.obj_id_to_idx(object_index)
        self._started = False

    def __iter__(self) -> Iterator[VideoFrameMasks]:
        if self._started:
            raise RuntimeError("a VideoMaskPropagation runs once (its SAM2 state is consumed); create a new one")
        self._started = True
        progress = tqdm(total=self.num_frames, desc="segmenting video frames", disable=not self.show_progress)
        try:
            for frame in self._frames_in_order():
                progress.update(1)
                yield frame
        finally:
            progress.close()

    def _frames_in_order(self) -> Iterator[VideoFrameMasks]:
        if self.num_objects == 0:
            for frame_index in range(self.num_frames):
                empty = torch.zeros(0, *self.low_res_size, device=self.device)
                yield VideoFrameMasks(frame_index, empty, empty[:, 0, 0], empty[:, 0, 0], frame_index in self.key_frame_indices)
            return
        key_results = {index: self._condition_on_key_frame(index) for index in self.key_frame_indices}
        first_key = self.key_frame_indices[0]
        forward_range = (first_key + 1, self.num_frames - 1, False)
        before_first_key = {}  # tracked backwards from the first key frame, yielded afterwards in increasing order
        for frame_index in range(first_key - 1, -1, -1):
            before_first_key[frame_index] = self._propagate(frame_index, reverse=True)
            self._release_state([(0, frame_index - 1, True), forward_range])
        for frame_index in range(first_key):
            yield before_first_key.pop(frame_index)
        for frame_index in range(first_key, self.num_frames):
            if frame_index in key_results:
                yield key_results.pop(frame_index)
                continue
            result = self._propagate(frame_index, reverse=False)
            self._release_state([(frame_index + 1, self.num_frames - 1, False)])
            yield result

    @torch.no_grad()
    def _condition_on_key_frame(self, frame_index: int) -> VideoFrameMasks:
        """Decode a key frame from the ``[SEG]`` prompts with the CMA (as an image), then make it a conditioning frame
        of every object in SAM2's state."""
        sam2, num_objects = self.model.sam2, self.num_objects
        features = sam2.frame_features(self.inference_session, frame_index)  # equal to `model.encode_frames`
        decoded = self.model.decode_masks(
            features.select(torch.zeros(num_objects, dtype=torch.long, device=self.device)),
            self.seg_embeds,
            self.text_tokens.expand(num_objects, -1, -1),
            self.text_token_mask.expand(num_objects, -1),
        )
        stored = sam2.store_conditioning_frame(self.inference_session, frame_index, decoded, self.object_presence)
        self._release_state(remaining=None)
        return VideoFrameMasks(frame_index, stored.mask_logits, stored.iou_scores, stored.object_score_logits, True)

    @torch.no_grad()
    def _propagate(self, frame_index: int, reverse: bool) -> VideoFrameMasks:
        """One step of SAM2's propagation (all objects), with the CMA on the memory-conditioned embedding."""
        tracked = self.model.sam2.track_frame(
            self.inference_session,
            frame_index,
            reverse,
            self.object_presence,
            refine_memory_features=self._refine_with_cma if self.cma_on_propagation else None,
        )
        return VideoFrameMasks(frame_index, tracked.mask_logits, tracked.iou_scores, tracked.object_score_logits, False)

    def _refine_with_cma(self, conditioned: torch.Tensor, object_index: int, frame_index: int, reverse: bool):
        """`F' = cma(F_mem, T ∪ {s}, G)` for one object on a propagated frame; `conditioned` `(1, 256, h, w)`."""
        seg_embed = self.seg_embeds[object_index : object_index + 1]
        previous_logits = None
        if self.prior_from_previous_frame:
            previous_logits = self._stored_mask_logits(object_index, frame_index + 1 if reverse else frame_index - 1)
        refined, _ = self.model.refine_propagated_frame(
            conditioned, seg_embed, self.text_tokens, self.text_token_mask, previous_logits
        )
        return refined

    def _stored_mask_logits(self, object_index: int, frame_index: int) -> torch.Tensor:
        outputs = self.inference_session.output_dict_per_obj[object_index]
        entry = outputs["non_cond_frame_outputs"].get(frame_index, outputs["cond_frame_outputs"].get(frame_index))
        if entry is None or "pred_masks" not in entry:
            raise RuntimeError(
                f"the mask of object {object_index} on frame {frame_index} (the CMA prior of the next frame) is not in "
                "SAM2's state; propagation must continue from an already segmented frame"
            )
        logits = entry["pred_masks"].to(self.device)
        return logits.reshape(1, 1, *logits.shape[-2:])

    def _release_state(self, remaining: list[tuple[int, int, bool]] | None) -> None:
        """Drop the per-frame state no later step reads, and offload memory features to the state device.

        Args:
            remaining: the frames still to propagate, as inclusive ranges `(first, last, reverse)`; `None` right after
                a key frame, when only the high-resolution masks (read by the memory encoder only) are dropped.
        """
        sam2 = self.model.sam2
        memory_window = max(sam2.num_maskmem - 1, 0)
        pointer_window = max(sam2.config.max_object_pointers_in_encoder - 1, 0)
        session = self.inference_session

        def read_later(frame_index: int, window: int) -> bool:
            """Whether a remaining frame reads `frame_index` among the `window` frames before it (in its direction)."""
            for first, last, reverse in remaining:
                if first > last or window == 0:
                    continue
                low, high = (first + 1, last + window) if reverse else (first - window, last - 1)
                if low <= frame_index <= high:
                    return True
            return False

        for object_index in range(self.num_objects):
            outputs = session.output_dict_per_obj[object_index]
            for storage in ("cond_frame_outputs", "non_cond_frame_outputs"):
                for frame_index in list(outputs[storage]):
                    entry = outputs[storage][frame_index]
                    for key in _HEAVY_MEMORY_KEYS:
                        if key in entry and entry[key].device != self.state_device:
                            entry[key] = entry[key].to(self.state_device)
                    if not self.bounded_memory:
                        continue
                    entry.pop("high_res_masks", None)
                    if storage == "cond_frame_outputs" or remaining is None:
                        continue  # conditioning frames stay: every frame reads them
                    needs_memory = read_later(frame_index, memory_window)
                    needs_pointer = read_later(frame_index, pointer_window)
                    needs_prior = self.prior_from_previous_frame and read_later(frame_index, 1)
                    if not (needs_memory or needs_pointer or needs_prior):
                        del outputs[storage][frame_index]
                        session.frames_tracked_per_obj[object_index].pop(frame_index, None)
                        continue
                    if not needs_memory:
                        for key in _HEAVY_MEMORY_KEYS:
                            entry.pop(key, None)
                    if not needs_prior:
                        entry.pop("pred_masks", None)


class VideoSegmentationStream:
    """One video's results frame by frame: iterating yields `(frame_index, masks, scores)` in increasing frame order,
    `masks` `(num_objects, height, width)` bool at the original size and `scores` `(num_objects,)` SAM2's predicted
    IoU, both on the CPU (upsampled and thresholded on SAM2's device first). Nothing is kept once a frame is yielded.

    Attributes:
        answer_ids (`torch.LongTensor`): the VLM's answer (decode it with the processor).
        num_objects (`int`), num_frames (`int`), key_frame_indices (`list[int]`).
        propagation ([`VideoMaskPropagation`]): the underlying propagation.
    """

    def __init__(self, propagation: VideoMaskPropagation, original_size, threshold: float, intermediate_size, answer_ids):
        self.propagation, self.answer_ids = propagation, answer_ids
        self.num_objects, self.num_frames = propagation.num_objects, propagation.num_frames
        self.key_frame_indices = propagation.key_frame_indices
        self.original_size, self.threshold, self.intermediate_size = original_size, threshold, intermediate_size
        self._frames = iter(propagation)

    def _next_on_host(self) -> tuple[VideoFrameMasks, torch.BoolTensor]:
        """The next frame, and its masks upsampled and thresholded where SAM2 runs, then moved to `RESULT_DEVICE`."""
        frame = next(self._frames)
        with torch.no_grad():
            upsampled = upsample_mask_logits(frame.mask_logits, self.original_size, self.intermediate_size)
            masks = (upsampled > self.threshold).to(RESULT_DEVICE)
        return frame, masks

    def __iter__(self) -> VideoSegmentationStream:
        return self

    def __next__(self) -> tuple[int, torch.BoolTensor, torch.FloatTensor]:
        frame, masks = self._next_on_host()
        return frame.frame_index, masks, frame.iou_scores.to(RESULT_DEVICE)

    def collect(self) -> tuple[torch.BoolTensor, torch.FloatTensor, torch.FloatTensor]:
        """Run the remaining frames: `masks` `(num_objects, num_frames, height, width)` bool, `scores`
        `(num_objects,)` (mean predicted IoU over the key frames) and `mask_logits` `(num_objects, num_frames, h, w)`,
        all on `RESULT_DEVICE`."""
        size = self.propagation.low_res_size
        masks = torch.zeros(self.num_objects, self.num_frames, *self.original_size, dtype=torch.bool, device=RESULT_DEVICE)
        logits = torch.zeros(self.num_objects, self.num_frames, *size, device=RESULT_DEVICE)
        key_iou = torch.zeros(self.num_objects, device=RESULT_DEVICE)
        for _ in range(self.num_frames):
            frame, frame_masks = self._next_on_host()
            masks[:, frame.frame_index] = frame_masks
            logits[:, frame.frame_index] = frame.mask_logits.to(RESULT_DEVICE)
            if frame.is_key_frame:
                key_iou += frame.iou_scores.float().to(RESULT_DEVICE)
        return masks, key_iou / len(self.key_frame_indices), logits


__all__ = [
    "RESULT_DEVICE",
    "VideoFrameMasks",
    "VideoMaskPropagation",
    "VideoSample",
    "VideoSegmentationStream",
    "normalize_key_frame_indices",
    "video_samples",
]
