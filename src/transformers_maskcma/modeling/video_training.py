"""Video training through SAM2's memory (`MaskCMAConfig.video_training="propagate"`).

With `"independent"` (the research code) every frame of a video sample is decoded from the ``[SEG]`` prompts
through the image path, so SAM2's memory attention, memory encoder and object pointers — and the CMA on
memory-conditioned features — never receive a loss. With `"propagate"`, a training clip runs the way inference runs
it ([`VideoMaskPropagation`] in `video_segmentation.py`), with gradients:

1. SAM2 encodes every frame of the batch once (the session's feature cache is filled with these features, so
   nothing is encoded twice and the image encoder trains when it is trainable);
2. the clip's *conditioning* frames (the key frames the VLM saw, `conditioning_frame_mask`) are decoded from the
   ``[SEG]`` prompts with the CMA exactly as an image is (`MaskCMAModel.decode_masks`) and stored as SAM2
   conditioning frames (`MaskCMASam2VideoModel.store_conditioning_frame`: masks after the presence rule, object pointers
   from the output tokens, memory encoding);
3. every other frame is propagated (`MaskCMASam2VideoModel.track_frame`): memory attention over the conditioning
   and recent frames' memories and object pointers, the CMA on the memory-conditioned embedding when
   `cma_on_propagation` (prior: the previous frame's mask, or the conv head with `mask_source="conv"`), SAM2's mask
   decoder without prompt, then the frame's own memory. Frames before the first conditioning frame are tracked
   backwards from it first, then the rest forwards, as at inference.

Nothing in the clip is detached, so the loss of a propagated frame reaches the memory attention, the memory
encoder, the object-pointer projection, the CMA and — through the memories of earlier frames — the ``[SEG]``
prompts of the key frames. The result has the fields of the image path's `decode_masks` (one row per target, in
target order), so `MaskCMAModel.forward` computes the same loss terms (BCE, Dice, IoU, object score, prior) over all
targets and the trainer weights them alike. Prior rows of propagated frames hold the prior the CMA used there (the
previous frame's mask logits, or the conv head's mask); without the CMA on propagated frames they hold the frame's
own mask logits.

Images and video samples without a propagated frame in the same batch take the image path unchanged.

This file is copied flat into Hub repositories as remote code: it imports only torch, transformers and the modules
beside it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from transformers.models.sam2_video.modeling_sam2_video import Sam2VideoInferenceSession

from .mask_decoding import SamDecoderOutput, SamFrameFeatures, low_res_targets
from .mask_prior import PreviousFrameMaskPrior
from .target_mapping import SegTargets

if TYPE_CHECKING:
    from .modeling_maskcma import MaskCMAModel

#: `VideoTraining` values (`MaskCMAConfig.video_training`).
VIDEO_TRAINING_MODES = ("independent", "propagate")

#: SAM2 submodules that only video propagation uses: trained (not frozen by `freeze_sam2_image_encoder`, and in the
#: LoRA default's `modules_to_save`) when `video_training="propagate"`.
SAM2_MEMORY_MODULES = (
    "memory_attention",
    "memory_encoder",
    "object_pointer_proj",
    "temporal_positional_encoding_projection_layer",
)
#: SAM2's own parameters (not in a submodule) that only video propagation uses, trained likewise (full fine-tuning
#: or default freezing; peft's `modules_to_save` takes modules only, so a LoRA run keeps them frozen).
SAM2_MEMORY_PARAMETERS = ("memory_temporal_positional_encoding", "no_object_pointer", "occlusion_spatial_embedding_parameter")

_DECODED_FIELDS = (
    "mask_logits",
    "iou_scores",
    "prior_logits",
    "object_score_logits",
    "output_tokens",
    "multimask_logits",
    "multimask_iou_scores",
)


def trained_memory_names(config) -> tuple[str, ...]:
    """The SAM2 submodule and parameter names (`SAM2_MEMORY_MODULES` + `SAM2_MEMORY_PARAMETERS`) that train with
    this config: all of them with `video_training="propagate"`, none otherwise."""
    if getattr(config, "video_training", "independent") == "propagate":
        return SAM2_MEMORY_MODULES + SAM2_MEMORY_PARAMETERS
    return ()


def propagates(config, conditioning_frame_mask: torch.Tensor | None, target_frame_index: torch.Tensor) -> bool:
    """Whether a batch takes the propagation path: `video_training="propagate"` and at least one target lies on a
    frame that is not a conditioning frame.

    Args:
        conditioning_frame_mask (`torch.BoolTensor` of shape `(num_frames,)`, *optional*): the collator's mask.
        target_frame_index (`torch.LongTensor` of shape `(num_targets,)`).
    """
    if config.video_training != "propagate" or conditioning_frame_mask is None or target_frame_index.numel() == 0:
        return False
    mask = conditioning_frame_mask.to(target_frame_index.device).bool()
    return not bool(mask[target_frame_index].all())


def _rows(decoded: dict, index: torch.Tensor) -> dict:
    return {name: None if decoded.get(name) is None else decoded[name].index_select(0, index) for name in _DECODED_FIELDS}


def _with_candidates(decoded: dict, num_candidates: int) -> dict:
    """`decoded` with `num_candidates` candidate masks: SAM2 configured for one mask when tracking
    (`multimask_output_for_tracking=False`) gives one candidate, repeated here to the key frames' count (the IoU
    loss's mean over candidates is unchanged)."""
    have = decoded["multimask_logits"].shape[1]
    if have == num_candidates:
        return decoded
    if have != 1:
        raise ValueError(f"cannot match {have} candidate masks to {num_candidates}")
    repeated = dict(decoded)
    repeated["multimask_logits"] = decoded["multimask_logits"].expand(-1, num_candidates, -1, -1)
    repeated["multimask_iou_scores"] = decoded["multimask_iou_scores"].expand(-1, num_candidates)
    return repeated


class ClipPropagation:
    """One training clip (one sample) through SAM2's memory, with gradients (module docstring).

    Args:
        model ([`MaskCMAModel`]).
        levels, positions: `MaskCMASam2VideoModel.vision_levels` output of every frame of the batch.
        features ([`SamFrameFeatures`]): the same frames in the image path's layout `(F_batch, 256, h, w)`.
        frame_rows (`list[int]`): the batch rows of this clip's frames, in time order.
        conditioning (`list[bool]`): per clip frame, whether it is a conditioning (key) frame.
        seg_embeds (`torch.FloatTensor` of shape `(num_objects, 256)`): one ``[SEG]`` per object of the clip.
        text_tokens (`torch.FloatTensor` of shape `(T, 256)`), text_token_mask (`torch.BoolTensor` `(T,)`): the
            sample's projected prompt tokens.
        ground_truth (`dict[(object, frame), torch.FloatTensor (h, w)]`, *optional*): low-resolution targets,
            used as the key frames' prior with `mask_source="gt"` (as the image path does).
    """

    def __init__(self, model: MaskCMAModel, levels, positions, features, frame_rows, conditioning, seg_embeds,
                 text_tokens, text_token_mask, ground_truth=None):
        self.model = model
        self.ground_truth = ground_truth
        self.sam2 = model.sam2
        self.features = features
        self.frame_rows = frame_rows
        self.seg_embeds = seg_embeds
        self.text_tokens = text_tokens
        self.text_token_mask = text_token_mask
        self.num_objects = seg_embeds.shape[0]
        self.key_frames = [t for t, is_key in enumerate(conditioning) if is_key]
        if not self.key_frames:
            raise ValueError(
                "a training clip has no conditioning frame: conditioning_frame_mask must mark at least one frame of "
                "every video sample (its key frames, decoded from the [SEG] prompts)"
            )
        config = model.config
        self.object_presence = config.object_presence
        self.cma_on_propagation = bool(config.use_cma and config.cma_on_propagation)
        self.prior_from_previous_frame = self.cma_on_propagation and isinstance(
            model.propagation_mask_prior, PreviousFrameMaskPrior
        )
        device = features.image_embeddings.device
        dtype = features.image_embeddings.dtype
        session = Sam2VideoInferenceSession(
            inference_device=device,
            inference_state_device=device,
            video_storage_device=device,
            dtype=dtype,
            max_vision_features_cache_size=len(frame_rows),
        )
        # the frame store only gives the session its length: every frame's features are already in its cache
        session.processed_frames = dict(enumerate(frame_rows))
        for t, row in enumerate(frame_rows):
            self.sam2.cache_frame_features(session, t, levels, positions, row)
        for obj in range(self.num_objects):
            session.obj_id_to_idx(obj)
        self.session = session
        self.priors: dict[tuple[int, int], torch.Tensor] = {}

    def run(self) -> dict[tuple[int, int], dict]:
        """Decode every (object, frame) of the clip; returns `{(object, frame): one-row decoded dict}`."""
        results: dict[tuple[int, int], dict] = {}
        num_objects, keys = self.num_objects, self.key_frames
        rows = torch.tensor([self.frame_rows[t] for t in keys], device=self.seg_embeds.device)
        # every key frame of every object in one image-path decode (frame-major rows: key k, object o → k·N + o)
        key_features = self.features.select(rows.repeat_interleave(num_objects))
        decoded = self.model.decode_masks(
            key_features,
            self.seg_embeds.repeat(len(keys), 1),
            self.text_tokens[None].expand(len(keys) * num_objects, -1, -1),
            self.text_token_mask[None].expand(len(keys) * num_objects, -1),
            self._key_frame_ground_truth(),
        )
        for k, t in enumerate(keys):
            index = torch.arange(k * num_objects, (k + 1) * num_objects, device=rows.device)
            frame = _rows(decoded, index)
            final = SamDecoderOutput(**{name: frame[name] for name in _DECODED_FIELDS if name != "prior_logits"})
            self.sam2.store_conditioning_frame(self.session, t, final, self.object_presence)
            for obj in range(num_objects):
                results[(obj, t)] = _rows(frame, index.new_tensor([obj]))
        first = keys[0]
        order = [(t, True) for t in range(first - 1, -1, -1)]
        order += [(t, False) for t in range(first + 1, len(self.frame_rows)) if t not in keys]
        for t, reverse in order:
            tracked = self.sam2.track_frame(
                self.session,
                t,
                reverse,
                self.object_presence,
                refine_memory_features=self._refine if self.cma_on_propagation else None,
            )
            frame = {name: getattr(tracked.decoded, name) for name in _DECODED_FIELDS if name != "prior_logits"}
            if self.model.config.use_cma:
                frame["prior_logits"] = torch.cat(
                    [self.priors.get((obj, t), tracked.decoded.mask_logits[obj : obj + 1]) for obj in range(num_objects)]
                )
            else:
                frame["prior_logits"] = None
            for obj in range(num_objects):
                index = torch.tensor([obj], device=tracked.decoded.mask_logits.device)
                results[(obj, t)] = _rows(frame, index)
        return results

    def _key_frame_ground_truth(self) -> torch.Tensor | None:
        """The ground truth `(K·N, h, w)` of every (key frame, object), frame-major, for the ground-truth prior
        (`mask_source="gt"`, as the image path passes it); `None` when a pair has no target."""
        if self.ground_truth is None:
            return None
        pairs = [self.ground_truth.get((obj, t)) for t in self.key_frames for obj in range(self.num_objects)]
        return None if any(mask is None for mask in pairs) else torch.stack(pairs)

    def _refine(self, conditioned: torch.Tensor, obj: int, t: int, reverse: bool) -> torch.Tensor:
        """`F' = cma(F_mem, T ∪ {s}, G)` for one object on a propagated frame (as inference's `_refine_with_cma`),
        keeping the prior's mask logits for the prior loss.

        Args:
            conditioned (`torch.FloatTensor` of shape `(1, 256, h, w)`): SAM2's memory-conditioned embedding.
        """
        seg_embed = self.seg_embeds[obj : obj + 1]
        previous_logits = None
        if self.prior_from_previous_frame:
            previous = t + 1 if reverse else t - 1
            outputs = self.session.output_dict_per_obj[obj]
            entry = outputs["non_cond_frame_outputs"].get(previous, outputs["cond_frame_outputs"].get(previous))
            logits = entry["pred_masks"]
            previous_logits = logits.reshape(1, 1, *logits.shape[-2:])
        refined, prior = self.model.refine_propagated_frame(
            conditioned, seg_embed, self.text_tokens, self.text_token_mask, previous_logits
        )
        prior_mask = prior.mask_logits if prior.mask_logits is not None else previous_logits
        if prior_mask is not None:
            self.priors[(obj, t)] = prior_mask
        return refined


def decode_targets_with_propagation(
    model: MaskCMAModel,
    sam_pixel_values: torch.Tensor,
    targets: SegTargets,
    seg_embeds: torch.Tensor,
    text_tokens: torch.Tensor,
    text_mask: torch.Tensor,
    gt_masks: torch.Tensor | None,
    conditioning_frame_mask: torch.Tensor,
    frame_sample_index: torch.Tensor | None,
) -> tuple[SamDecoderOutput, SamFrameFeatures]:
    """The decoding step of `MaskCMAModel.forward` with the clips of the batch propagated through SAM2's memory (module docstring).

    Args:
        model ([`MaskCMAModel`]).
        sam_pixel_values (`torch.FloatTensor` of shape `(F, 3, S, S)`): every frame of the batch.
        targets ([`SegTargets`]): the resolved (``[SEG]``, frame, sample) of each of the N targets.
        seg_embeds (`torch.FloatTensor` of shape `(num_seg, 256)`).
        text_tokens (`torch.FloatTensor` of shape `(B, T, 256)`), text_mask (`torch.BoolTensor` `(B, T)`).
        gt_masks (`torch.FloatTensor` of shape `(N, g, g)`, *optional*).
        conditioning_frame_mask (`torch.BoolTensor` of shape `(F,)`): True on frames decoded from the ``[SEG]``
            prompts (images, key frames), False on frames propagated from SAM2's memory.
        frame_sample_index (`torch.LongTensor` of shape `(F,)`, *optional*): the sample of each frame (default: one
            frame per sample).

    Returns:
        The targets' [`SamDecoderOutput`] (`N` rows, in target order, as the image path's `decode_masks` gives them)
        and the targets' [`SamFrameFeatures`] (`(N, 256, h, w)`, for the contrastive loss's mask pooling).
    """
    sam2 = model.sam2
    pixels = sam_pixel_values.to(sam2.device)
    num_frames = pixels.shape[0]
    if conditioning_frame_mask.shape != (num_frames,):
        raise ValueError(
            f"conditioning_frame_mask has shape {tuple(conditioning_frame_mask.shape)} but sam_pixel_values has "
            f"{num_frames} frames: pass one flag per SAM2 frame (the collator's conditioning_frame_mask)"
        )
    encoder_trainable = any(p.requires_grad for p in sam2.vision_encoder.parameters())
    levels, positions = sam2.vision_levels(pixels, encoder_trainable)
    features: SamFrameFeatures = sam2.features_of_levels(levels)
    device = features.image_embeddings.device
    conditioning = conditioning_frame_mask.to(device).bool()
    frame_samples = (
        torch.arange(num_frames, device=device) if frame_sample_index is None else frame_sample_index.to(device)
    )
    frame_index = targets.frame_index.to(device)
    seg_index = targets.seg_index.to(device)
    sample_index = targets.sample_index.to(device)
    target_seg = seg_embeds.to(device)[seg_index]
    text_tokens, text_mask = text_tokens.to(device), text_mask.to(device)
    target_features = features.select(frame_index)
    gt_low_res = None if gt_masks is None else low_res_targets(gt_masks.to(device), target_features)

    clip_samples = sorted({int(s) for s in frame_samples[~conditioning].tolist()})
    in_clip = torch.isin(sample_index, torch.tensor(clip_samples, dtype=torch.long, device=device))
    parts: list[tuple[torch.Tensor, dict]] = []
    image_rows = (~in_clip).nonzero(as_tuple=True)[0]
    if image_rows.numel():
        decoded = model.decode_masks(
            target_features.select(image_rows),
            target_seg[image_rows],
            text_tokens[sample_index[image_rows]],
            text_mask[sample_index[image_rows]],
            None if gt_low_res is None else gt_low_res[image_rows],
        )
        parts.append((image_rows, {name: decoded.get(name) for name in _DECODED_FIELDS}))
    for sample in clip_samples:
        rows = (sample_index == sample).nonzero(as_tuple=True)[0]
        if rows.numel() == 0:
            continue  # a clip without [SEG]: nothing to decode
        frame_rows = (frame_samples == sample).nonzero(as_tuple=True)[0].tolist()
        objects = sorted({int(s) for s in seg_index[rows].tolist()})
        position = {row: t for t, row in enumerate(frame_rows)}
        pairs = [(objects.index(int(seg_index[r])), position[int(frame_index[r])]) for r in rows.tolist()]
        ground_truth = None if gt_low_res is None else {pair: gt_low_res[r] for pair, r in zip(pairs, rows.tolist())}
        clip = ClipPropagation(
            model,
            levels,
            positions,
            features,
            frame_rows,
            [bool(conditioning[row]) for row in frame_rows],
            seg_embeds.to(device)[torch.tensor(objects, device=device)],
            text_tokens[sample],
            text_mask[sample],
            ground_truth,
        )
        results = clip.run()
        ordered = [results[pair] for pair in pairs]
        parts.append((rows, {name: _cat([entry[name] for entry in ordered]) for name in _DECODED_FIELDS}))

    num_candidates = max(part["multimask_logits"].shape[1] for _, part in parts)
    parts = [(rows, _with_candidates(part, num_candidates)) for rows, part in parts]
    order = torch.cat([rows for rows, _ in parts])
    if not torch.equal(torch.sort(order).values, torch.arange(frame_index.shape[0], device=device)):
        raise RuntimeError("the propagation path did not decode every target exactly once")
    inverse = torch.argsort(order)
    decoded = {}
    for name in _DECODED_FIELDS:
        values = [part[name] for _, part in parts]
        decoded[name] = None if any(v is None for v in values) else torch.cat(values).index_select(0, inverse)
    return SamDecoderOutput(**decoded), target_features


def _cat(values: list) -> torch.Tensor | None:
    return None if any(v is None for v in values) else torch.cat(values)


__all__ = [
    "ClipPropagation",
    "SAM2_MEMORY_MODULES",
    "SAM2_MEMORY_PARAMETERS",
    "VIDEO_TRAINING_MODES",
    "decode_targets_with_propagation",
    "propagates",
    "trained_memory_names",
]
