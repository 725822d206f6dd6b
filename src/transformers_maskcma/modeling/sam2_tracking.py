"""SAM2's video model with the per-frame steps of MaskCMA's video path.

[`MaskCMASam2VideoModel`] is a subclass of transformers' `Sam2VideoModel` that adds no module and no weight (its
checkpoint keys are SAM2's). It adds one decoding call and three steps on a `Sam2VideoInferenceSession`:

- `decode`: SAM2's prompt encoder and mask decoder with an optional extra prompt token (the image path's and the
  key frames' ``[SEG]``; none when tracking);
- `frame_features`: SAM2's features of one frame (computed once and cached by the session);
- `store_conditioning_frame`: a key frame decoded from the ``[SEG]`` prompts becomes a conditioning frame: its
  mask, object pointer and object score are stored and its memory is encoded;
- `track_frame`: one propagation step for every object: memory attention, an optional refinement of the
  memory-conditioned embedding (the CMA), SAM2's mask decoder without prompt, the object-presence rule, the object
  pointer and the memory encoding.

The last two store the same per-frame state as `Sam2VideoModel.forward` (the object pointer is the learned no-object pointer
and the memory gets the no-object embedding where the object score is <= 0); they differ from it only in the mask
itself, which follows `object_presence`: `"keep"` keeps the decoded mask whatever the object score (as Sa2VA runs
SAM2), `"blank"` replaces it by SAM2's no-object logits (what `Sam2VideoModel.forward` does). transformers has no
public seam between the memory-conditioned embedding and the mask decoder, nor for the mask blanking, so the step is
written here around SAM2's modules and the private methods listed in `SAM2_PRIVATE_METHODS` (guarded by a test that
fails when one of their signatures changes; docs/architecture.md names the transformers version checked).

This file is copied flat into Hub repositories as remote code: it imports only torch, transformers and the modules
beside it.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, fields

import torch
import torch.nn.functional as F
from transformers import Sam2VideoModel
from transformers.models.sam2_video.modeling_sam2_video import Sam2VideoInferenceSession

from .mask_decoding import SamDecoderOutput, SamFrameFeatures, apply_object_presence
from .precision import run_in_float32

_DECODER_FIELDS = tuple(field.name for field in fields(SamDecoderOutput))

#: The private `Sam2VideoModel` methods this module calls, with their parameter names as checked (the guard test
#: compares them with the installed transformers).
SAM2_PRIVATE_METHODS: dict[str, tuple[str, ...]] = {
    "_prepare_vision_features": ("self", "inference_session", "frame_idx", "batch_size"),
    "_prepare_memory_conditioned_features": (
        "self",
        "inference_session",
        "frame_idx",
        "obj_idx",
        "is_initial_conditioning_frame",
        "current_vision_features",
        "current_vision_positional_embeddings",
        "num_total_frames",
        "track_in_reverse_time",
        "streaming",
    ),
    "_use_multimask": ("self", "is_init_cond_frame", "point_inputs"),
    "_batch_encode_memories": (
        "self",
        "inference_session",
        "frame_idx",
        "objects_needing_memory_encoding",
        "high_res_masks_for_memory",
        "object_score_logits_for_memory",
        "is_mask_from_pts_per_obj",
    ),
}

#: `refine(conditioned (1, 256, h, w), object_index, frame_index, reverse) -> (1, 256, h, w)`: applied to the
#: memory-conditioned embedding of one object before the mask decoder (MaskCMA passes its CMA here).
MemoryFeatureRefiner = Callable[[torch.Tensor, int, int, bool], torch.Tensor]


@dataclass
class Sam2TrackedFrame:
    """The objects' results on one frame.

    Args:
        mask_logits (`torch.FloatTensor` of shape `(num_objects, h, w)`): low-resolution logits after the
            object-presence rule.
        iou_scores (`torch.FloatTensor` of shape `(num_objects,)`): predicted IoU of each object's chosen mask.
        object_score_logits (`torch.FloatTensor` of shape `(num_objects,)`): SAM2's object-presence logits.
        decoded ([`SamDecoderOutput`], *optional*): the mask decoder's output of the N objects before the presence
            rule (chosen mask `(N, 1, h, w)`, every candidate `(N, M, h, w)` and their predicted IoUs `(N, M)`, output
            tokens, object scores): what the training losses read.
    """

    mask_logits: torch.Tensor
    iou_scores: torch.Tensor
    object_score_logits: torch.Tensor
    decoded: SamDecoderOutput | None = None


class MaskCMASam2VideoModel(Sam2VideoModel):
    """transformers' `Sam2VideoModel` with the conditioning and tracking steps of MaskCMA's video path (module
    docstring). Same modules and checkpoint keys as `Sam2VideoModel`; everything else it does is unchanged."""

    def __init__(self, config):
        super().__init__(config)
        # the IoU head picks the candidate mask: float32 scores, so that bf16 rounding cannot tie them (precision.py)
        run_in_float32(self.mask_decoder.iou_prediction_head)

    # -- features --------------------------------------------------------------------------------------------------

    @classmethod
    def from_sam2_video_model(cls, sam2: Sam2VideoModel) -> MaskCMASam2VideoModel:
        """The same SAM2 as this class, sharing `sam2`'s tensors (nothing is copied): the subclass adds no weight, so
        every parameter and buffer maps one to one (strictly)."""
        if isinstance(sam2, cls):
            return sam2
        with torch.device("meta"):
            tracking = cls(sam2.config)
        tracking.load_state_dict(sam2.state_dict(), strict=True, assign=True)
        source_buffers = dict(sam2.named_buffers())
        for name, buffer in list(tracking.named_buffers()):
            if buffer.is_meta:  # non-persistent buffers are not in the state dict
                owner, _, leaf = name.rpartition(".")
                tracking.get_submodule(owner)._buffers[leaf] = source_buffers[name]
        for name, parameter in tracking.named_parameters():
            parameter.requires_grad_(sam2.get_parameter(name).requires_grad)
        return tracking.train(sam2.training)

    def frame_features(self, inference_session: Sam2VideoInferenceSession, frame_idx: int) -> SamFrameFeatures:
        """SAM2's features of frame `frame_idx`, as the image path uses them (with the no-memory embedding added).

        The session computes them once (reading the frame from its frame store) and caches them for the memory
        encoder.

        Returns:
            [`SamFrameFeatures`] with one row: `(1, 256, h, w)` and the projected high-resolution levels.
        """
        vision_features, _ = self._prepare_vision_features(inference_session, frame_idx, batch_size=1)
        maps = self._feature_maps(vision_features)
        return SamFrameFeatures(
            image_embeddings=maps[-1] + self.no_memory_embedding.view(1, -1, 1, 1), high_res_features=maps[:-1]
        )

    def _feature_maps(self, vision_features: list[torch.Tensor]) -> list[torch.Tensor]:
        """SAM2's flattened `(h·w, batch, C)` feature levels as `(batch, C, h, w)` maps."""
        return [
            level.permute(1, 2, 0).reshape(level.shape[1], level.shape[2], *size)
            for level, size in zip(vision_features, self.backbone_feature_sizes)
        ]

    # -- the state SAM2's memory reads -----------------------------------------------------------------------------

    def _memory_state(
        self, decoded: SamDecoderOutput, object_presence: str
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """The per-object state of a decoded frame.

        Args:
            decoded ([`SamDecoderOutput`]): the candidates `(N, M, h, w)` and their predicted IoUs, the chosen output
                token `(N, 256)` and the object score `(N,)` of N objects.
            object_presence (`str`): `"keep"` or `"blank"` (`apply_object_presence`).

        Returns:
            `(low_res (N, 1, h, w), high_res (N, 1, S, S), object_pointer (N, 1, 256), object_scores (N, 1, 1))`:
            the mask after the presence rule, at SAM2's input size for the memory encoder, and the object pointer,
            which is the learned no-object pointer where the object score is <= 0 (whatever `object_presence`
            says). Per object, the shapes SAM2's own tracking step stores.
        """
        object_scores = decoded.object_score_logits.reshape(-1, 1, 1)
        # every candidate is resized and the chosen one taken, as SAM2's own step does (same values, bit for bit)
        candidates = apply_object_presence(decoded.multimask_logits, object_scores, object_presence)
        candidates_high_res = F.interpolate(
            candidates.float(), size=(self.image_size, self.image_size), mode="bilinear", align_corners=False
        ).to(candidates.dtype)
        rows = torch.arange(candidates.shape[0], device=candidates.device)
        best = decoded.multimask_iou_scores.argmax(dim=-1)
        low_res, high_res = candidates[rows, best, None], candidates_high_res[rows, best, None]
        pointer = self.object_pointer_proj(decoded.output_tokens[:, None])
        appearing = (object_scores > 0).to(pointer.dtype)  # (N, 1, 1)
        pointer = appearing * pointer + (1 - appearing) * self.no_object_pointer
        return low_res, high_res, pointer, object_scores

    def _encode_memories(
        self,
        inference_session: Sam2VideoInferenceSession,
        frame_idx: int,
        high_res: torch.Tensor,
        object_scores: torch.Tensor,
    ) -> None:
        """SAM2's memory encoder on the frame's masks of every object (a no-op without memory)."""
        if self.num_maskmem == 0:
            return
        num_objects = high_res.shape[0]
        self._batch_encode_memories(
            inference_session=inference_session,
            frame_idx=frame_idx,
            objects_needing_memory_encoding=list(range(num_objects)),
            high_res_masks_for_memory=[high_res[obj : obj + 1] for obj in range(num_objects)],
            object_score_logits_for_memory=[object_scores[obj : obj + 1] for obj in range(num_objects)],
            is_mask_from_pts_per_obj=[False] * num_objects,
        )

    # -- key frames ------------------------------------------------------------------------------------------------

    def store_conditioning_frame(
        self,
        inference_session: Sam2VideoInferenceSession,
        frame_idx: int,
        decoded: SamDecoderOutput,
        object_presence: str,
    ) -> Sam2TrackedFrame:
        """Make frame `frame_idx` a conditioning frame of every object from masks decoded elsewhere (the ``[SEG]``
        prompts): store its masks (after the presence rule), object pointers and object scores, and encode its
        memory. Runs under the caller's autograd mode: inference calls it under `torch.no_grad()`; with gradients
        enabled (`video_training`) the stored pointers and memory features stay attached to `decoded` (and through it
        to the ``[SEG]`` prompts), so later frames' losses reach them.

        Args:
            inference_session (`Sam2VideoInferenceSession`): objects `0..N-1` already registered.
            frame_idx (`int`): the frame.
            decoded ([`SamDecoderOutput`]): the decoder output of the N objects on this frame.
            object_presence (`str`): `"keep"` or `"blank"`.
        """
        low_res, high_res, pointer, object_scores = self._memory_state(decoded, object_presence)
        for obj in range(low_res.shape[0]):
            inference_session.store_output(
                obj,
                frame_idx,
                output_value={
                    "pred_masks": low_res[obj : obj + 1],
                    "object_pointer": pointer[obj : obj + 1],
                    "high_res_masks": high_res[obj : obj + 1],
                    "object_score_logits": object_scores[obj : obj + 1],
                },
                is_conditioning_frame=True,
            )
        self._encode_memories(inference_session, frame_idx, high_res, object_scores)
        return Sam2TrackedFrame(
            mask_logits=low_res[:, 0],
            iou_scores=decoded.iou_scores,
            object_score_logits=decoded.object_score_logits,
            decoded=decoded,
        )

    # -- propagated frames -----------------------------------------------------------------------------------------

    def decode(
        self,
        image_embeddings: torch.Tensor,
        high_res_features: list[torch.Tensor],
        prompt_embeddings: torch.Tensor | None = None,
        multimask_output: bool = True,
    ) -> SamDecoderOutput:
        """SAM2's mask decoder with the sparse prompt `[no-point pad]` (how SAM2 tracks an object) or
        `[no-point pad, p]` (MaskCMA's ``[SEG]`` embedding `p`); the candidate of highest predicted IoU is kept.

        Args:
            image_embeddings (`torch.FloatTensor` of shape `(N, 256, h, w)`): one row per target.
            high_res_features (`list[torch.FloatTensor]`): `[(N, 32, 4h, 4w), (N, 64, 2h, 2w)]`.
            prompt_embeddings (`torch.FloatTensor` of shape `(N, 256)`, *optional*): an extra sparse prompt token.
            multimask_output (`bool`): three candidates (else one).

        Returns:
            [`SamDecoderOutput`].
        """
        num_rows, dtype, device = image_embeddings.shape[0], image_embeddings.dtype, image_embeddings.device
        points = torch.zeros(num_rows, 1, 1, 2, dtype=dtype, device=device)
        labels = -torch.ones(num_rows, 1, 1, dtype=torch.int32, device=device)
        sparse, dense = self.prompt_encoder(
            input_points=points, input_labels=labels, input_boxes=None, input_masks=None
        )
        if prompt_embeddings is not None:
            sparse = torch.cat([sparse, prompt_embeddings[:, None, None, :].to(sparse.dtype)], dim=2)
        positional = self.get_image_wide_positional_embeddings().repeat(num_rows, 1, 1, 1)
        mask_logits, iou_scores, output_tokens, object_scores = self.mask_decoder(
            image_embeddings=image_embeddings,
            image_positional_embeddings=positional.to(dtype),
            sparse_prompt_embeddings=sparse,
            dense_prompt_embeddings=dense.to(dtype),
            multimask_output=multimask_output,
            high_resolution_features=high_res_features,
        )
        # one prompt per row: drop the point-batch axis
        return SamDecoderOutput.choose_best(mask_logits[:, 0], iou_scores[:, 0], output_tokens[:, 0], object_scores)

    def track_frame(
        self,
        inference_session: Sam2VideoInferenceSession,
        frame_idx: int,
        reverse: bool,
        object_presence: str,
        refine_memory_features: MemoryFeatureRefiner | None = None,
    ) -> Sam2TrackedFrame:
        """One propagation step of every object of the session on frame `frame_idx` (not a conditioning frame),
        under the caller's autograd mode (inference calls it under `torch.no_grad()`): with gradients enabled, the
        result and the stored state (pointer, memory features) stay attached to the memory read, so a loss on this
        frame reaches the memory attention, the memory encoder and the object pointers of earlier frames
        (`video_training`).

        For each object: SAM2's memory attention over its memory bank and object pointers, then
        `refine_memory_features` (when given) on the memory-conditioned embedding, then SAM2's mask decoder without
        prompt, the presence rule and the object pointer; the frame's state is stored as SAM2 stores a tracked frame
        and the masks of all objects are encoded into memory in one batch.

        Args:
            inference_session (`Sam2VideoInferenceSession`): with at least one conditioning frame per object.
            frame_idx (`int`): the frame to segment.
            reverse (`bool`): whether tracking runs backwards in time.
            object_presence (`str`): `"keep"` or `"blank"`.
            refine_memory_features ([`MemoryFeatureRefiner`], *optional*): e.g. the CMA.

        Returns:
            [`Sam2TrackedFrame`].
        """
        vision_features, vision_positions = self._prepare_vision_features(inference_session, frame_idx, batch_size=1)
        high_res_features = self._feature_maps(vision_features[:-1])
        multimask_output = self._use_multimask(is_init_cond_frame=False, point_inputs=None)
        decoded_objects = []
        for obj in range(inference_session.get_obj_num()):
            conditioned = self._prepare_memory_conditioned_features(
                inference_session=inference_session,
                frame_idx=frame_idx,
                obj_idx=obj,
                is_initial_conditioning_frame=False,
                current_vision_features=vision_features[-1],
                current_vision_positional_embeddings=vision_positions[-1],
                num_total_frames=inference_session.num_frames,
                track_in_reverse_time=reverse,
                streaming=False,
            )
            if refine_memory_features is not None:
                conditioned = refine_memory_features(conditioned, obj, frame_idx, reverse)
            decoded = self.decode(conditioned, high_res_features, multimask_output=multimask_output)
            low_res, high_res, pointer, object_scores = self._memory_state(decoded, object_presence)
            inference_session.store_output(
                obj,
                frame_idx,
                output_value={
                    "pred_masks": low_res,
                    "object_pointer": pointer,
                    "high_res_masks": high_res,
                    "object_score_logits": object_scores,
                },
                is_conditioning_frame=False,
            )
            inference_session.frames_tracked_per_obj[obj][frame_idx] = {"reverse": reverse}
            decoded_objects.append((decoded, low_res, high_res, object_scores))
        low_res = torch.cat([entry[1] for entry in decoded_objects])
        high_res = torch.cat([entry[2] for entry in decoded_objects])
        object_scores = torch.cat([entry[3] for entry in decoded_objects])
        self._encode_memories(inference_session, frame_idx, high_res, object_scores)
        decoded = [entry[0] for entry in decoded_objects]
        return Sam2TrackedFrame(
            mask_logits=low_res[:, 0],
            iou_scores=torch.cat([entry.iou_scores for entry in decoded]),
            object_score_logits=object_scores.reshape(-1),
            decoded=SamDecoderOutput(  # fields every object has (no prior: SAM2's own pass)
                **{
                    name: torch.cat([getattr(entry, name) for entry in decoded])
                    for name in _DECODER_FIELDS
                    if getattr(decoded[0], name) is not None
                }
            ),
        )

    # -- training ----------------------------------------------------------------------------------------------------

    def vision_levels(self, pixel_values: torch.Tensor, encoder_grad: bool) -> tuple[list, list]:
        """SAM2's image encoder on a batch of frames, in the layout the session caches: per level `(h·w, F, C)`
        features (levels 0 and 1 projected by the decoder's `conv_s0`/`conv_s1`, as `get_image_features` does) and
        position encodings.

        Args:
            pixel_values (`torch.FloatTensor` of shape `(F, 3, S, S)`).
            encoder_grad (`bool`): whether the image encoder itself records gradients (the projections always
                follow the caller's autograd mode, as in `MaskCMAModel.encode_frames`).
        """
        with torch.set_grad_enabled(torch.is_grad_enabled() and encoder_grad):
            outputs = self.vision_encoder(pixel_values, return_dict=True)
        maps = list(outputs.fpn_hidden_states)
        maps[0] = self.mask_decoder.conv_s0(maps[0])
        maps[1] = self.mask_decoder.conv_s1(maps[1])
        features = [level.flatten(2).permute(2, 0, 1) for level in maps]
        positions = [level.flatten(2).permute(2, 0, 1) for level in outputs.fpn_position_encoding]
        return features, positions

    def features_of_levels(self, features: list[torch.Tensor]) -> SamFrameFeatures:
        """The image path's [`SamFrameFeatures`] `(F, 256, h, w)` (with the no-memory embedding) from `vision_levels`
        output: the same values as `MaskCMAModel.encode_frames` on the same frames."""
        maps = self._feature_maps(features)
        return SamFrameFeatures(
            image_embeddings=maps[-1] + self.no_memory_embedding.view(1, -1, 1, 1), high_res_features=maps[:-1]
        )

    @staticmethod
    def cache_frame_features(
        inference_session: Sam2VideoInferenceSession,
        frame_idx: int,
        features: list[torch.Tensor],
        positions: list[torch.Tensor],
        row: int,
    ) -> None:
        """Put row `row` of `vision_levels` output into the session's feature cache as frame `frame_idx`, so that
        SAM2's steps read these (possibly gradient-carrying) features instead of encoding the frame again. The
        session's cache must hold every frame of the clip (`max_vision_features_cache_size`)."""
        inference_session.cache.cache_vision_features(
            frame_idx,
            {
                "vision_feats": [level[:, row : row + 1] for level in features],
                "vision_pos_embeds": [level[:, row : row + 1] for level in positions],
            },
        )


__all__ = ["MaskCMASam2VideoModel", "MemoryFeatureRefiner", "SAM2_PRIVATE_METHODS", "Sam2TrackedFrame"]
