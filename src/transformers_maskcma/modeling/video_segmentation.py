"""Video segmentation: the VLM reads a few key frames and answers with one ``[SEG]`` per object; SAM2 decodes the key
frames from the ``[SEG]`` prompts (with the CMA, as for an image) and carries the objects through every other frame
with its memory.

How the pieces meet transformers' SAM2 video model (`model.sam2` is a [`MaskCMASam2VideoModel`], transformers'
`Sam2VideoModel` with the steps below; no SAM2 code is copied here):

- Key frames become SAM2 *conditioning frames*. Their masks come from [`MaskCMAModel.decode_masks`] (pass 1, CMA,
  pass 2), exactly as in the image path; `sam2.store_conditioning_frame` stores them (with the object pointer from
  the final pass's output token and its object score) in the `Sam2VideoInferenceSession` and encodes their memory.
- Every other frame comes from `sam2.track_frame`, SAM2's propagation step (memory attention, mask decoder without
  prompt, memory encoder).
- CMA on propagated frames (`config.cma_on_propagation`): `track_frame` hands the memory-conditioned embedding
  ``F_mem`` of each object to this module, which refines it with the CMA, ``F' = cma(F_mem, T ∪ {s}, G)``, before
  SAM2's mask decoder sees it. The prior ``G`` is the object's mask logits on the previous frame in propagation order
  (already in SAM2's state, no extra decoder pass); with `mask_source="conv"` it is the conv prior head applied to
  ``F_mem``. With γ = 0 the CMA adds exactly zero, so the masks equal SAM2's propagation without CMA bit for bit.
- Object presence (`config.object_presence`), the same rule as for images: `"keep"` (default, Sa2VA) keeps every
  decoded mask whatever SAM2's object score; `"blank"` gives an empty mask (logits -1024) where the score is <= 0,
  as SAM2 does. Either way the score selects the no-object pointer and the memory's no-object embedding.
- Bounded memory: the frames are read lazily from a sequence-like source, one at a time, when SAM2 first needs
  their features (the session caches one frame's features). The session keeps every frame's outputs by default; here,
  after each step, whatever no later step can read is dropped: the high-resolution masks once encoded, the memory
  features of frames outside the `num_maskmem` window, the object pointers of frames outside the
  `max_object_pointers_in_encoder` window, and the previous-frame masks once used as prior. Conditioning frames are
  kept. The results are the same as with the full history.
- Order: frames before the first key frame are tracked backwards from it first, then the rest forwards. Frames are
  yielded in increasing order, so the (low-resolution) results of the frames before the first key frame are held
  until the forward pass starts.

This file is copied flat into Hub repositories as remote code: it imports only torch, transformers and the modules
beside it.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, fields
from typing import TYPE_CHECKING, Any

import torch
from transformers.models.sam2_video.modeling_sam2_video import Sam2VideoInferenceSession
from transformers.utils import logging
from transformers.utils.logging import tqdm

from .mask_decoding import SamDecoderOutput, upsample_mask_logits
from .mask_prior import PreviousFrameMaskPrior
from .modeling_maskcma import MaskCMASegmentationOutput
from .sam2_tracking import Sam2TrackedFrame

if TYPE_CHECKING:
    from .modeling_maskcma import MaskCMAModel

logger = logging.get_logger(__name__)

_HEAVY_MEMORY_KEYS = ("maskmem_features", "maskmem_pos_enc")
_DECODER_OUTPUT_FIELDS = tuple(field.name for field in fields(SamDecoderOutput))


# -- inputs ----------------------------------------------------------------------------------------------------------


class VideoFrameSource(Mapping):
    """A lazy, read-only view of one video's SAM2 frames, indexed by frame number.

    It serves as the frame store of a `Sam2VideoInferenceSession` (`processed_frames`), so SAM2 reads a frame only
    when it computes that frame's features, and no frame is kept after that.

    Args:
        frames: anything with `__len__` and `__getitem__(i)` returning one frame `(3, S, S)` (already resized to
            SAM2's input size and normalised), e.g. a list of tensors, a tensor `(T, 3, S, S)` or `(1, T, 3, S, S)`,
            or the processor's lazy video reader.
        image_size (`int`): SAM2's input size S; every frame is checked against it.
        dtype (`torch.dtype`): dtype the frames are converted to (SAM2's dtype).
    """

    def __init__(self, frames: Any, image_size: int, dtype: torch.dtype = torch.float32):
        if isinstance(frames, torch.Tensor):
            if frames.ndim == 5:
                if frames.shape[0] != 1:
                    raise ValueError(
                        f"sam_pixel_values of shape {tuple(frames.shape)} hold {frames.shape[0]} videos; a frame "
                        "source holds one video: pass sam_pixel_values[i] for video i"
                    )
                frames = frames[0]
            if frames.ndim != 4 or tuple(frames.shape[1:]) != (3, image_size, image_size):
                raise ValueError(
                    f"video frames as a tensor must have shape (num_frames, 3, {image_size}, {image_size}) (SAM2's "
                    f"input size), got {tuple(frames.shape)}: resize the frames with the processor's SAM2 transform"
                )
        if not (hasattr(frames, "__len__") and hasattr(frames, "__getitem__")):
            raise TypeError(
                f"video_frames must be a sequence of frames (with __len__ and __getitem__), got {type(frames).__name__}"
            )
        self.frames = frames
        self.image_size = int(image_size)
        self.dtype = dtype
        self._length = len(frames)
        if self._length == 0:
            raise ValueError("the video has no frames: video_frames / sam_pixel_values is empty")

    def __len__(self) -> int:
        return self._length

    def __iter__(self) -> Iterator[int]:
        return iter(range(self._length))

    def __contains__(self, frame_index: object) -> bool:
        return isinstance(frame_index, int) and 0 <= frame_index < self._length

    def __getitem__(self, frame_index: int) -> torch.Tensor:
        """Frame `frame_index` as a `(3, S, S)` tensor of `self.dtype` (on the source's device)."""
        if frame_index not in self:
            raise KeyError(f"frame {frame_index!r} is outside the video (it has {self._length} frames)")
        frame = self.frames[frame_index]
        if not isinstance(frame, torch.Tensor):
            frame = torch.as_tensor(frame)
        expected = (3, self.image_size, self.image_size)
        if tuple(frame.shape) != expected:
            raise ValueError(
                f"video frame {frame_index} has shape {tuple(frame.shape)}, expected {expected}: frames must be "
                f"resized to SAM2's input size {self.image_size} and normalised (the processor's SAM2 transform does "
                "this)"
            )
        return frame.to(self.dtype)


def normalize_key_frame_indices(key_frame_indices: Any, num_frames: int, sample: int = 0) -> list[int]:
    """The key frames of one video as a sorted list of distinct frame numbers.

    Duplicates are merged (a short video sampled for more key frames than it has repeats frames; SAM2 conditions on
    each frame once). Raises `ValueError` when the list is empty or an index lies outside `[0, num_frames)`.
    """
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


def forced_answer_generate_kwargs(
    answer_token_ids: Sequence[Sequence[int]], prompt_length: int, eos_token_id: int
) -> dict[str, Any]:
    """Generation arguments that make the VLM produce given answers (e.g. to evaluate the masks of a known answer,
    or to test the mask path of a random model): a `prefix_allowed_tokens_fn` that allows only the next token of
    each row's answer, then the end-of-sequence token.

    Args:
        answer_token_ids: per batch row, the answer's token ids (without end-of-sequence).
        prompt_length (`int`): length of the (left-padded) prompt, `input_ids.shape[1]`.
        eos_token_id (`int`): the token that ends the answer.

    Returns:
        `{"prefix_allowed_tokens_fn": ..., "max_new_tokens": longest answer + 1}`.
    """
    sequences = [[int(token) for token in ids] + [int(eos_token_id)] for ids in answer_token_ids]

    def allowed_tokens(batch_id: int, generated: torch.Tensor) -> list[int]:
        forced = sequences[batch_id]
        step = generated.shape[-1] - prompt_length
        return [forced[min(step, len(forced) - 1)]]

    return {"prefix_allowed_tokens_fn": allowed_tokens, "max_new_tokens": max(len(seq) for seq in sequences)}


# -- SAM2 propagation with the CMA -------------------------------------------------------------------------------------


@dataclass
class VideoFrameMasks:
    """The objects' masks on one frame.

    Args:
        frame_index (`int`): the frame number.
        mask_logits (`torch.FloatTensor` of shape `(num_objects, h, w)`): low-resolution logits (256×256 for released
            SAM2), after the object-presence rule (with `object_presence="blank"`, SAM2's no-object score -1024
            where SAM2 judges the object absent).
        iou_scores (`torch.FloatTensor` of shape `(num_objects,)`): SAM2's predicted IoU of each chosen mask.
        object_score_logits (`torch.FloatTensor` of shape `(num_objects,)`): SAM2's object-presence logit.
        is_key_frame (`bool`): whether the frame was decoded from the ``[SEG]`` prompts (else propagated).
    """

    frame_index: int
    mask_logits: torch.Tensor
    iou_scores: torch.Tensor
    object_score_logits: torch.Tensor
    is_key_frame: bool


def _check_eval_mode(model: MaskCMAModel) -> None:
    if model.sam2.training:
        raise ValueError(
            "video segmentation needs SAM2 in eval mode (its video state is defined for inference only): call "
            "model.eval() first"
        )


class VideoMaskPropagation:
    """Segments the objects of one video frame by frame: key frames from the ``[SEG]`` prompts with the CMA, the
    other frames by SAM2 memory propagation with the CMA on the memory-conditioned embedding.

    Iterating yields one [`VideoFrameMasks`] per frame, in increasing frame order; the work happens during iteration.

    Args:
        model ([`MaskCMAModel`]): in eval mode.
        frames ([`VideoFrameSource`] or a sequence of `(3, S, S)` frames): the video.
        key_frame_indices (sequence of `int`): frames the VLM saw; SAM2's conditioning frames.
        seg_embeds (`torch.FloatTensor` of shape `(num_objects, 256)`): one projected ``[SEG]`` per object.
        text_tokens (`torch.FloatTensor` of shape `(num_text_tokens, 256)`): the prompt's projected text tokens.
        text_token_mask (`torch.BoolTensor` of shape `(num_text_tokens,)`): which of them are real tokens.
        offload_state_to_cpu (`bool`): keep SAM2's per-frame state (masks, memory features) on the CPU.
        bounded_memory (`bool`): drop per-frame state that no later frame reads (see the module docstring); `False`
            keeps SAM2's full history, as `propagate_in_video_iterator` does. The results are the same.
        show_progress (`bool`): a progress bar over the frames.

    Attributes:
        inference_session (`Sam2VideoInferenceSession`): SAM2's state for this video (objects 0..num_objects-1 in
            ``[SEG]`` order).
    """

    def __init__(
        self,
        model: MaskCMAModel,
        frames: VideoFrameSource | Any,
        key_frame_indices: Sequence[int],
        seg_embeds: torch.Tensor,
        text_tokens: torch.Tensor,
        text_token_mask: torch.Tensor,
        offload_state_to_cpu: bool = False,
        bounded_memory: bool = True,
        show_progress: bool = False,
    ):
        sam2 = model.sam2
        _check_eval_mode(model)
        parameter = next(sam2.parameters())
        self.device, self.dtype = parameter.device, parameter.dtype
        if not isinstance(frames, VideoFrameSource):
            frames = VideoFrameSource(frames, sam2.config.image_size, self.dtype)
        self.model = model
        self.frames = frames
        self.num_frames = len(frames)
        self.key_frame_indices = normalize_key_frame_indices(key_frame_indices, self.num_frames)
        if seg_embeds.ndim != 2:
            raise ValueError(f"seg_embeds must have shape (num_objects, embed_dim), got {tuple(seg_embeds.shape)}")
        self.num_objects = seg_embeds.shape[0]
        self.seg_embeds = seg_embeds.to(self.device, self.dtype)
        self.text_tokens = text_tokens.to(self.device, self.dtype)
        self.text_token_mask = text_token_mask.to(self.device).bool()
        self.bounded_memory = bounded_memory
        self.show_progress = show_progress
        self.state_device = torch.device("cpu") if offload_state_to_cpu else self.device
        self.output_device = self.state_device
        config = model.config
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
        # lazy frame store: SAM2 reads a frame through `get_frame` only when it computes the frame's features
        self.inference_session.processed_frames = frames
        for object_index in range(self.num_objects):
            self.inference_session.obj_id_to_idx(object_index)
        self._started = False

    # -- iteration ---------------------------------------------------------------------------------------------------

    def __iter__(self) -> Iterator[VideoFrameMasks]:
        if self._started:
            raise RuntimeError("a VideoMaskPropagation runs once (its SAM2 state is consumed); create a new one")
        self._started = True
        progress = tqdm(total=self.num_frames, desc="segmenting video frames", disable=not self.show_progress)
        try:
            yield from self._frames_in_order(progress)
        finally:
            progress.close()

    def _frames_in_order(self, progress) -> Iterator[VideoFrameMasks]:
        if self.num_objects == 0:
            for frame_index in range(self.num_frames):
                progress.update(1)
                yield self._empty_frame(frame_index)
            return
        key_results = {index: self._condition_on_key_frame(index) for index in self.key_frame_indices}
        first_key = self.key_frame_indices[0]
        forward_range = (first_key + 1, self.num_frames - 1, False)
        # frames before the first key frame: tracked backwards from it, yielded afterwards in increasing order
        before_first_key = {}
        for frame_index in range(first_key - 1, -1, -1):
            before_first_key[frame_index] = self._propagate(frame_index, reverse=True)
            self._release_state([(0, frame_index - 1, True), forward_range])
        for frame_index in range(first_key):
            progress.update(1)
            yield before_first_key.pop(frame_index)
        for frame_index in range(first_key, self.num_frames):
            if frame_index in key_results:
                result = key_results.pop(frame_index)
            else:
                result = self._propagate(frame_index, reverse=False)
                self._release_state([(frame_index + 1, self.num_frames - 1, False)])
            progress.update(1)
            yield result

    def _empty_frame(self, frame_index: int) -> VideoFrameMasks:
        empty = torch.zeros(0, device=self.output_device)
        return VideoFrameMasks(
            frame_index=frame_index,
            mask_logits=torch.zeros(0, *self.low_res_size, device=self.output_device),
            iou_scores=empty,
            object_score_logits=empty.clone(),
            is_key_frame=frame_index in self.key_frame_indices,
        )

    # -- key frames --------------------------------------------------------------------------------------------------

    @torch.no_grad()
    def _condition_on_key_frame(self, frame_index: int) -> VideoFrameMasks:
        """Decode a key frame from the ``[SEG]`` prompts with the CMA (as an image), then make it a conditioning frame
        of every object in SAM2's state (masks after the presence rule, object pointers, memory)."""
        sam2, num_objects = self.model.sam2, self.num_objects
        # SAM2 computes (and caches for the memory encoder) the frame's features; they match `model.encode_frames`
        features = sam2.frame_features(self.inference_session, frame_index)
        rows = torch.zeros(num_objects, dtype=torch.long, device=self.device)
        decoded = self.model.decode_masks(
            features.select(rows),
            self.seg_embeds,
            self.text_tokens.expand(num_objects, -1, -1),
            self.text_token_mask.expand(num_objects, -1),
        )
        final_pass = SamDecoderOutput(**{name: decoded[name] for name in _DECODER_OUTPUT_FIELDS})
        stored = sam2.store_conditioning_frame(self.inference_session, frame_index, final_pass, self.object_presence)
        self._release_state(remaining=None)
        return self._frame_masks(frame_index, stored, is_key_frame=True)

    # -- propagated frames -------------------------------------------------------------------------------------------

    def _propagate(self, frame_index: int, reverse: bool) -> VideoFrameMasks:
        """One step of SAM2's propagation (all objects), with the CMA on the memory-conditioned embedding when
        enabled."""
        tracked = self.model.sam2.track_frame(
            self.inference_session,
            frame_index,
            reverse,
            self.object_presence,
            refine_memory_features=self._refine_with_cma if self.cma_on_propagation else None,
        )
        return self._frame_masks(frame_index, tracked, is_key_frame=False)

    def _frame_masks(self, frame_index: int, frame: Sam2TrackedFrame, is_key_frame: bool) -> VideoFrameMasks:
        return VideoFrameMasks(
            frame_index=frame_index,
            mask_logits=frame.mask_logits.to(self.output_device),
            iou_scores=frame.iou_scores.to(self.output_device),
            object_score_logits=frame.object_score_logits.to(self.output_device),
            is_key_frame=is_key_frame,
        )

    def _refine_with_cma(
        self, conditioned: torch.Tensor, object_index: int, frame_index: int, reverse: bool
    ) -> torch.Tensor:
        """`F' = cma(F_mem, T ∪ {s}, G)` for one object on a propagated frame.

        Args:
            conditioned (`torch.FloatTensor` of shape `(1, 256, h, w)`): SAM2's memory-conditioned embedding.

        Returns:
            The refined embedding, same shape.
        """
        seg_embed = self.seg_embeds[object_index : object_index + 1]
        previous_logits = None
        if self.prior_from_previous_frame:
            previous = frame_index + 1 if reverse else frame_index - 1
            previous_logits = self._stored_mask_logits(object_index, previous)
        prior = self.model.propagation_mask_prior(
            conditioned, seg_embed, previous_mask_logits=previous_logits
        ).embedding_logits
        refined = self.model.cma(
            conditioned, self.text_tokens[None], self.text_token_mask[None], seg_embed, prior.to(conditioned.dtype)
        )
        return refined.image_embeddings

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

    # -- bounded state -----------------------------------------------------------------------------------------------

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


# -- user-facing entry points -------------------------------------------------------------------------------------


@dataclass
class _VideoSample:
    frames: VideoFrameSource
    key_frame_indices: list[int]
    original_size: tuple[int, int]


def _video_samples(
    model: MaskCMAModel,
    batch_size: int,
    sam_pixel_values: torch.Tensor | None,
    video_frames: Any,
    key_frame_indices: Any,
    original_sizes: torch.Tensor | None,
) -> list[_VideoSample]:
    _check_eval_mode(model)
    image_size = model.sam2.config.image_size
    dtype = next(model.sam2.parameters()).dtype
    if (sam_pixel_values is None) == (video_frames is None):
        raise ValueError(
            "pass the video either as sam_pixel_values (batch, num_frames, 3, S, S) or as video_frames (a lazy frame "
            "source per video), exactly one of them"
        )
    if sam_pixel_values is not None:
        if sam_pixel_values.ndim != 5 or sam_pixel_values.shape[0] != batch_size:
            raise ValueError(
                f"sam_pixel_values for videos must have shape (batch_size={batch_size}, num_frames, 3, S, S), got "
                f"{tuple(sam_pixel_values.shape)}"
            )
        sources = [VideoFrameSource(sam_pixel_values[b], image_size, dtype) for b in range(batch_size)]
    elif batch_size == 1:
        single = video_frames
        sources = [single if isinstance(single, VideoFrameSource) else VideoFrameSource(single, image_size, dtype)]
    else:
        if not isinstance(video_frames, (list, tuple)) or len(video_frames) != batch_size:
            raise ValueError(
                f"with a batch of {batch_size} prompts, video_frames must be a list of {batch_size} frame sources "
                f"(one per video), got {type(video_frames).__name__}"
                + (f" of length {len(video_frames)}" if isinstance(video_frames, (list, tuple)) else "")
            )
        sources = [
            source if isinstance(source, VideoFrameSource) else VideoFrameSource(source, image_size, dtype)
            for source in video_frames
        ]

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

    if original_sizes is None:
        sizes = [(image_size, image_size)] * batch_size
    else:
        sizes = [(int(h), int(w)) for h, w in torch.as_tensor(original_sizes).reshape(-1, 2).tolist()]
        if len(sizes) != batch_size:
            raise ValueError(
                f"original_sizes has {len(sizes)} rows, expected one (height, width) per video ({batch_size})"
            )
    return [
        _VideoSample(source, normalize_key_frame_indices(keys, len(source), sample), size)
        for sample, (source, keys, size) in enumerate(zip(sources, per_sample, sizes))
    ]


def _generate_answers(
    model: MaskCMAModel,
    input_ids: torch.LongTensor,
    attention_mask: torch.Tensor | None,
    pixel_values: torch.FloatTensor | None,
    text_token_mask: torch.Tensor | None,
    max_new_tokens: int,
    answer_ids: Sequence[Sequence[int]] | None,
    generate_kwargs: dict,
) -> dict:
    """The VLM's answer over the key frames, with the ``[SEG]`` embeddings and projected text tokens read from the
    generation itself (one VLM pass: the key frames' tiles go through the vision tower once; see
    [`MaskCMAModel.generate_answer`]). `answer_ids` forces the answers (see [`forced_answer_generate_kwargs`]); a
    forced answer ends with the end-of-sequence token, so its last ``[SEG]`` is always consumed by a decoding step."""
    if answer_ids is not None:
        if "prefix_allowed_tokens_fn" in generate_kwargs:
            raise ValueError("pass either answer_ids or prefix_allowed_tokens_fn, not both")
        if len(answer_ids) != input_ids.shape[0]:
            raise ValueError(f"answer_ids has {len(answer_ids)} answers for a batch of {input_ids.shape[0]} prompts")
        eos = model._eos_token_ids()
        if not eos:
            raise ValueError("answer_ids needs the VLM's end-of-sequence token id (generation_config.eos_token_id)")
        forced = forced_answer_generate_kwargs(answer_ids, input_ids.shape[1], eos[0])
        max_new_tokens = forced.pop("max_new_tokens")
        generate_kwargs = {**generate_kwargs, **forced}
    with torch.no_grad():
        return model.generate_answer(
            input_ids, attention_mask, pixel_values, text_token_mask, max_new_tokens, **generate_kwargs
        )


class VideoSegmentationStream:
    """Frame-by-frame results of [`iter_segment_video`]: an iterator of `(frame_index, masks, scores)` with
    `masks` `(num_objects, height, width)` bool at the original size and `scores` `(num_objects,)` SAM2's predicted
    IoU, in increasing frame order. Nothing is kept once a frame is yielded.

    Attributes:
        answer (`str` or `None`), answer_ids (`torch.LongTensor`): the VLM's answer.
        num_objects (`int`), num_frames (`int`), key_frame_indices (`list[int]`).
        propagation ([`VideoMaskPropagation`]): the underlying propagation (its `inference_session` is SAM2's state).
    """

    def __init__(
        self,
        propagation: VideoMaskPropagation,
        original_size: tuple[int, int],
        threshold: float,
        answer: str | None,
        answer_ids: torch.Tensor,
    ):
        self.propagation = propagation
        self.answer = answer
        self.answer_ids = answer_ids
        self.num_objects = propagation.num_objects
        self.num_frames = propagation.num_frames
        self.key_frame_indices = propagation.key_frame_indices
        self.original_size = original_size
        self.threshold = threshold
        self._frames = iter(propagation)

    def __iter__(self) -> VideoSegmentationStream:
        return self

    def __next__(self) -> tuple[int, torch.BoolTensor, torch.FloatTensor]:
        frame = next(self._frames)
        with torch.no_grad():
            intermediate = self.propagation.model.config.mask_intermediate_size
            masks = upsample_mask_logits(frame.mask_logits, self.original_size, intermediate) > self.threshold
        return frame.frame_index, masks, frame.iou_scores


def iter_segment_video(
    model: MaskCMAModel,
    input_ids: torch.LongTensor,
    attention_mask: torch.Tensor | None = None,
    pixel_values: torch.FloatTensor | None = None,
    sam_pixel_values: torch.FloatTensor | None = None,
    video_frames: Any = None,
    key_frame_indices: Any = None,
    original_sizes: torch.LongTensor | None = None,
    text_token_mask: torch.Tensor | None = None,
    max_new_tokens: int = 32,
    mask_threshold: float | None = None,
    offload_state_to_cpu: bool = False,
    answer_ids: Sequence[Sequence[int]] | None = None,
    show_progress: bool = False,
    bounded_memory: bool = True,
    **generate_kwargs,
) -> VideoSegmentationStream:
    r"""Segment one video as a stream: the VLM answers at once (`stream.answer`), the frames are segmented while the
    caller iterates, so masks can be written out without holding the whole video.

    Same arguments as [`segment_video`] with a batch of one video. Returns a [`VideoSegmentationStream`] yielding
    `(frame_index, masks (num_objects, height, width) bool, scores (num_objects,))`.
    """
    if input_ids.shape[0] != 1:
        raise ValueError(
            f"iter_segment_video streams one video, got a batch of {input_ids.shape[0]} prompts; use segment_video for "
            "batches"
        )
    sample = _video_samples(model, 1, sam_pixel_values, video_frames, key_frame_indices, original_sizes)[0]
    answer = _generate_answers(
        model, input_ids, attention_mask, pixel_values, text_token_mask, max_new_tokens, answer_ids, generate_kwargs
    )
    propagation = VideoMaskPropagation(
        model,
        sample.frames,
        sample.key_frame_indices,
        answer["seg_embeds"],
        answer["text_tokens"][0],
        answer["text_token_mask"][0],
        offload_state_to_cpu=offload_state_to_cpu,
        bounded_memory=bounded_memory,
        show_progress=show_progress,
    )
    threshold = model.config.mask_threshold if mask_threshold is None else mask_threshold
    answers = answer["answers"]
    return VideoSegmentationStream(
        propagation, sample.original_size, threshold, None if answers is None else answers[0], answer["answer_ids"][0]
    )


@torch.no_grad()
def segment_video(
    model: MaskCMAModel,
    input_ids: torch.LongTensor,
    attention_mask: torch.Tensor | None = None,
    pixel_values: torch.FloatTensor | None = None,
    sam_pixel_values: torch.FloatTensor | None = None,
    video_frames: Any = None,
    key_frame_indices: Any = None,
    original_sizes: torch.LongTensor | None = None,
    text_token_mask: torch.Tensor | None = None,
    max_new_tokens: int = 32,
    mask_threshold: float | None = None,
    offload_state_to_cpu: bool = False,
    answer_ids: Sequence[Sequence[int]] | None = None,
    show_progress: bool = False,
    bounded_memory: bool = True,
    **generate_kwargs,
) -> MaskCMASegmentationOutput:
    r"""Referring segmentation of videos (what `MaskCMAModel.segment` calls for video inputs).

    The VLM sees the key frames (one image block per key frame in the prompt, their tiles in `pixel_values`) and
    answers with one ``[SEG]`` per object for the whole clip. The key frames are decoded from the ``[SEG]`` prompts with
    the CMA and become SAM2's conditioning frames; the other frames come from SAM2's memory propagation, with the CMA
    on the memory-conditioned embedding when `config.cma_on_propagation` (see the module docstring).

    Args:
        model ([`MaskCMAModel`]): in eval mode.
        input_ids (`torch.LongTensor` of shape `(batch_size, prompt_len)`): left-padded prompts.
        attention_mask (`torch.Tensor` of shape `(batch_size, prompt_len)`, *optional*).
        pixel_values (`torch.FloatTensor` of shape `(num_tiles, 3, tile, tile)`): the VLM tiles of all key frames.
        sam_pixel_values (`torch.FloatTensor` of shape `(batch_size, num_frames, 3, S, S)`, *optional*): every frame
            for SAM2. Or:
        video_frames (*optional*): a lazy frame source (for a batch of one) or a list of them (one per video): anything
            with `__len__` and `__getitem__(i)` → `(3, S, S)` tensor. Frames are read one at a time.
        key_frame_indices: frame numbers of the key frames, a list of ints (one video), a list of lists or a
            `(batch_size, num_key_frames)` tensor. Duplicates are merged.
        original_sizes (`torch.LongTensor` of shape `(batch_size, 2)`, *optional*): `(height, width)` of each video;
            masks are returned at this size (default: SAM2's input size).
        text_token_mask (`torch.BoolTensor` of shape `(batch_size, prompt_len)`, *optional*): the prompt's text tokens.
        max_new_tokens (`int`): answer length limit.
        mask_threshold (`float`, *optional*): logit threshold (default `config.mask_threshold`).
        offload_state_to_cpu (`bool`): keep SAM2's per-frame state and the accumulated outputs on the CPU.
        answer_ids (list of token-id lists, *optional*): use these answers instead of generating (see
            [`forced_answer_generate_kwargs`]).
        show_progress (`bool`): a progress bar over the frames.
        bounded_memory (`bool`): drop SAM2 state no later frame reads (default); `False` keeps the full history.
        generate_kwargs: further arguments of `generate`.

    Returns:
        [`MaskCMASegmentationOutput`]: per video, `masks` `(num_objects, num_frames, height, width)` bool, `scores`
        `(num_objects,)` the mean predicted IoU over the key frames, `mask_logits` `(num_objects, num_frames, h, w)`.
        An answer without ``[SEG]`` gives `(0, num_frames, height, width)` masks.
    """
    batch_size = input_ids.shape[0]
    samples = _video_samples(model, batch_size, sam_pixel_values, video_frames, key_frame_indices, original_sizes)
    answer = _generate_answers(
        model, input_ids, attention_mask, pixel_values, text_token_mask, max_new_tokens, answer_ids, generate_kwargs
    )
    threshold = model.config.mask_threshold if mask_threshold is None else mask_threshold
    seg_sample_index = answer["seg_sample_index"]
    masks, scores, logits = [], [], []
    for sample_index, sample in enumerate(samples):
        rows = (seg_sample_index == sample_index).nonzero(as_tuple=True)[0]
        propagation = VideoMaskPropagation(
            model,
            sample.frames,
            sample.key_frame_indices,
            answer["seg_embeds"][rows],
            answer["text_tokens"][sample_index],
            answer["text_token_mask"][sample_index],
            offload_state_to_cpu=offload_state_to_cpu,
            bounded_memory=bounded_memory,
            show_progress=show_progress,
        )
        device = propagation.output_device
        num_objects, num_frames = propagation.num_objects, propagation.num_frames
        height, width = sample.original_size
        sample_masks = torch.zeros(num_objects, num_frames, height, width, dtype=torch.bool, device=device)
        sample_logits = torch.zeros(num_objects, num_frames, *propagation.low_res_size, device=device)
        key_iou = torch.zeros(num_objects, device=device)
        for frame in propagation:
            sample_logits[:, frame.frame_index] = frame.mask_logits
            upsampled = upsample_mask_logits(frame.mask_logits, (height, width), model.config.mask_intermediate_size)
            sample_masks[:, frame.frame_index] = upsampled > threshold
            if frame.is_key_frame:
                key_iou += frame.iou_scores.float()
        masks.append(sample_masks)
        logits.append(sample_logits)
        scores.append(key_iou / len(sample.key_frame_indices))
    return MaskCMASegmentationOutput(
        answers=answer["answers"], answer_ids=answer["answer_ids"], masks=masks, scores=scores, mask_logits=logits
    )


__all__ = [
    "VideoFrameMasks",
    "VideoFrameSource",
    "VideoMaskPropagation",
    "VideoSegmentationStream",
    "forced_answer_generate_kwargs",
    "iter_segment_video",
    "normalize_key_frame_indices",
    "segment_video",
]
