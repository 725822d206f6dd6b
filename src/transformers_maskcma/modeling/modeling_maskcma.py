"""MaskCMA: a multimodal LLM that answers with ``[SEG]`` tokens, SAM2 that decodes each ``[SEG]`` into a mask, and
a Mask-guided Cross-Modal Attention (CMA) between them.

This file is copied flat into Hub repositories as remote code: it imports only torch, transformers and the
modules beside it (with flat relative imports).
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn
from transformers import AutoModelForImageTextToText, PreTrainedModel, Sam2VideoModel
from transformers import initialization as init
from transformers.utils import ModelOutput, logging

from .cma import MaskGuidedCrossModalAttention, resolve_cross_modal_attention
from .configuration_maskcma import MaskCMAConfig
from .mask_decoding import (
    SamDecoderOutput,
    SamFrameFeatures,
    apply_object_presence,
    dice_loss,
    iou_prediction_loss,
    low_res_targets,
    object_presence_targets,
    object_score_loss,
    sigmoid_bce_loss,
    upsample_mask_logits,
)
from .mask_prior import ConvMaskPriorHead, MaskPriorOutput, resolve_mask_prior, resolve_propagation_mask_prior
from .sam2_tracking import MaskCMASam2VideoModel
from .target_mapping import build_seg_targets
from .tmc import mask_pooled_embeddings, text_mask_contrastive_loss
from .video_segmentation import VideoMaskPropagation, VideoSegmentationStream, video_samples
from .video_training import decode_targets_with_propagation, propagates, trained_memory_names

logger = logging.get_logger(__name__)


def _module_device(module: nn.Module, default: torch.device) -> torch.device:
    """Device of a module's first parameter (where its inputs must be); `default` for a module without any."""
    for parameter in module.parameters():
        return parameter.device
    return default


@dataclass
class MaskCMAOutput(ModelOutput):
    r"""
    Output of [`MaskCMAModel.forward`]. A *target* is one (``[SEG]`` token, frame) pair: an image sample with two
    objects has two targets, a video sample with one object and four frames has four.

    Args:
        loss (`torch.FloatTensor` of shape `()`, *optional*):
            ``lm_loss + mask_loss + tmc_weight·tmc_loss`` from the parts that were computable (LM part needs `labels`,
            the others `gt_masks`).
        lm_loss (`torch.FloatTensor` of shape `()`, *optional*): next-token loss over the answer tokens.
        mask_loss (`torch.FloatTensor` of shape `()`, *optional*): ``bce_loss_weight·mask_bce +
            dice_loss_weight·mask_dice + prior_loss_weight·prior_loss + iou_loss_weight·iou_loss +
            object_score_loss_weight·object_score_loss``, a mean over the targets.
        mask_bce, mask_dice, prior_loss, iou_loss, object_score_loss (`torch.FloatTensor` of shape `()`, *optional*):
            Its terms; `prior_loss` is BCE·w_bce + Dice·w_dice on the mask prior; `iou_loss` and `object_score_loss`
            are SAM2's losses for its IoU head (L1 to the actual IoU of every candidate, on present objects) and its
            object-score head (BCE against "the ground truth has a foreground pixel").
        tmc_loss (`torch.FloatTensor` of shape `()`, *optional*): the symmetric text–mask contrastive loss of the
            batch (`tmc.text_mask_contrastive_loss`), unweighted.
        tmc_skipped (`torch.BoolTensor` of shape `()`, *optional*): the batch had fewer than two visible objects, so
            `tmc_loss` is 0.
        logits (`torch.FloatTensor` of shape `(batch_size, sequence_length, vocab_size)`): language-model logits.
        pred_masks (`torch.FloatTensor` of shape `(num_targets, mask_height, mask_width)`): final low-resolution mask
            logits (256×256 for released SAM2).
        prior_masks (`torch.FloatTensor` of shape `(num_targets, mask_height, mask_width)`, *optional*): mask prior
            logits; `None` without CMA or with the ground-truth prior.
        iou_scores, object_score_logits (`torch.FloatTensor` of shape `(num_targets,)`): SAM2's predicted IoU of each
            chosen mask and its object-presence logit.
        seg_embeds (`torch.FloatTensor` of shape `(num_seg_tokens, 256)`): projected ``[SEG]`` embeddings, in
            reading order over the batch.
        target_seg_index, target_frame_index (`torch.LongTensor` of shape `(num_targets,)`): the row of `seg_embeds`
            and of `sam_pixel_values` each target was decoded with.
        seg_sample_index (`torch.LongTensor` of shape `(num_seg_tokens,)`): batch index of each ``[SEG]``.
        seg_object_ids (`torch.LongTensor` of shape `(num_seg_tokens,)`, *optional*): object identity of each
            ``[SEG]`` within its sample, when given (repeated objects share an id).
    """

    loss: torch.FloatTensor | None = None
    lm_loss: torch.FloatTensor | None = None
    mask_loss: torch.FloatTensor | None = None
    mask_bce: torch.FloatTensor | None = None
    mask_dice: torch.FloatTensor | None = None
    prior_loss: torch.FloatTensor | None = None
    iou_loss: torch.FloatTensor | None = None
    object_score_loss: torch.FloatTensor | None = None
    tmc_loss: torch.FloatTensor | None = None
    tmc_skipped: torch.BoolTensor | None = None
    logits: torch.FloatTensor | None = None
    pred_masks: torch.FloatTensor | None = None
    prior_masks: torch.FloatTensor | None = None
    iou_scores: torch.FloatTensor | None = None
    object_score_logits: torch.FloatTensor | None = None
    seg_embeds: torch.FloatTensor | None = None
    target_seg_index: torch.LongTensor | None = None
    target_frame_index: torch.LongTensor | None = None
    seg_sample_index: torch.LongTensor | None = None
    seg_object_ids: torch.LongTensor | None = None


@dataclass
class MaskCMASegmentationOutput(ModelOutput):
    r"""
    Output of [`MaskCMAModel.segment`], one entry per sample of the batch; decode `answer_ids` with the processor
    (`MaskCMAProcessor.decode_answers`).

    Args:
        answer_ids (`list[torch.LongTensor]`): generated token ids of each answer (without the prompt).
        masks (`list[torch.BoolTensor]`): per sample, `(num_objects, height, width)` for an image,
            `(num_objects, num_frames, height, width)` for a video (on the CPU), at the original size;
            `num_objects` is the number of ``[SEG]`` in the answer (0 is fine).
        scores (`list[torch.FloatTensor]`): per sample, `(num_objects,)`: SAM2's predicted IoU of each mask (mean over
            key frames for videos).
        mask_logits (`list[torch.FloatTensor]`): per sample, the low-resolution logits
            `(num_objects, [num_frames,] mask_height, mask_width)`.
    """

    answer_ids: list | None = None
    masks: list | None = None
    scores: list | None = None
    mask_logits: list | None = None


@dataclass
class MaskCMAAnswer(ModelOutput):
    r"""
    Output of [`MaskCMAModel.generate_answer`]: the answers and the projected states read from their generation.

    Args:
        seg_embeds (`torch.FloatTensor` of shape `(num_seg, 256)`), seg_sample_index (`(num_seg,)`): the projected
            ``[SEG]`` states in reading order over the batch and the sample of each; seg_hidden_states `(num_seg, H)`:
            the last-layer states they were projected from.
        answer_ids (`list[torch.LongTensor]`): per sample, the generated token ids up to and including the first
            end-of-sequence token (decode them with `MaskCMAProcessor.decode_answers`).
        text_tokens (`torch.FloatTensor` of shape `(batch_size, T, 256)`), text_token_mask (`(batch_size, T)`): the
            prompt's projected text tokens (the CMA's keys), gathered to the front of each row; text_hidden_states
            `(batch_size, T, H)`: the last-layer states they were projected from.
    """

    seg_embeds: torch.FloatTensor | None = None
    seg_sample_index: torch.LongTensor | None = None
    seg_hidden_states: torch.FloatTensor | None = None
    answer_ids: list | None = None
    text_tokens: torch.FloatTensor | None = None
    text_token_mask: torch.BoolTensor | None = None
    text_hidden_states: torch.FloatTensor | None = None


class LastHiddenStateRecorder:
    r"""Records the last-layer hidden states the VLM's language model computes while the recorder is open: the
    states of one `generate` call, read without a second forward.

    A forward hook on the language model (`vlm.get_decoder()`) keeps its `last_hidden_state`: `(batch, prompt_len, H)`
    from the prefill, then `(batch, 1, H)` from every decoding step (the state of the token that step consumed). No
    other layer is kept. `states()` concatenates the calls along the sequence: with a key/value cache, column `t` is
    the state of token `t` of `generate`'s output sequence.

    Args:
        language_model (`nn.Module`): the module whose output carries `last_hidden_state`.
    """

    def __init__(self, language_model: nn.Module):
        self.language_model = language_model
        self.chunks: list[torch.Tensor] = []
        self._handle = None

    def __enter__(self) -> LastHiddenStateRecorder:
        self.chunks = []
        self._handle = self.language_model.register_forward_hook(self._record)
        return self

    def __exit__(self, *exc_info) -> None:
        self._handle.remove()
        self._handle = None

    def _record(self, module: nn.Module, args, output) -> None:
        state = getattr(output, "last_hidden_state", None)
        if state is None and isinstance(output, (tuple, list)) and output and isinstance(output[0], torch.Tensor):
            state = output[0]
        if not isinstance(state, torch.Tensor) or state.ndim != 3:
            raise TypeError(
                f"{type(module).__name__} (the VLM's language model, from vlm.get_decoder()) returned "
                f"{type(output).__name__}, which carries no last_hidden_state of shape (batch, seq, hidden); "
                "segment() reads the [SEG] states from it"
            )
        self.chunks.append(state.detach())

    def states(self) -> torch.Tensor:
        """The recorded states `(batch_size, num_positions, H)`, calls concatenated in order."""
        if not self.chunks:
            raise RuntimeError("the language model was not called while the recorder was open: nothing was recorded")
        return torch.cat(self.chunks, dim=1)


def forced_answer_generate_kwargs(
    answer_token_ids: Sequence[Sequence[int]], prompt_length: int, eos_token_id: int
) -> dict:
    """Generation arguments that make the VLM produce given answers (to evaluate the masks of a known answer, or to
    test the mask path of a random model): a `prefix_allowed_tokens_fn` allowing only the next token of each row's
    answer, then `eos_token_id`; `prompt_length` is `input_ids.shape[1]`.

    Returns:
        `{"prefix_allowed_tokens_fn": ..., "max_new_tokens": longest answer + 1}`.
    """
    sequences = [[int(token) for token in ids] + [int(eos_token_id)] for ids in answer_token_ids]

    def allowed_tokens(batch_id: int, generated: torch.Tensor) -> list[int]:
        forced = sequences[batch_id]
        return [forced[min(generated.shape[-1] - prompt_length, len(forced) - 1)]]

    return {"prefix_allowed_tokens_fn": allowed_tokens, "max_new_tokens": max(len(seq) for seq in sequences)}


class MaskCMAPreTrainedModel(PreTrainedModel):
    config_class = MaskCMAConfig
    config: MaskCMAConfig
    base_model_prefix = "maskcma"
    main_input_name = "input_ids"
    input_modalities = ("image", "video", "text")
    supports_gradient_checkpointing = True
    _supports_sdpa = True
    _supports_flash_attn = True
    # no flex attention: transformers' Sam2VideoModel does not support it (the CMA runs SDPA under flash kernels)
    _supports_flex_attn = False
    _supports_attention_backend = True
    # SAM2 stays whole on one device under `device_map` (its decoder, memory and prompt encoder exchange many
    # tensors per frame); the VLM's own blocks are added by transformers from the VLM's `_no_split_modules`
    _no_split_modules = ["VisualToTextAttention", "TextToVisualAttention", "MaskCMASam2VideoModel"]
    # Trainer must not divide our loss by the number of items in the batch: the loss is already a mean
    accepts_loss_kwargs = False

    @torch.no_grad()
    def _init_weights(self, module: nn.Module) -> None:
        std = 0.02
        if isinstance(module, MaskGuidedCrossModalAttention):
            init.zeros_(module.gamma)
            init.ones_(module.warmup_factor_tensor)  # non-persistent: never loaded, so set here after from_pretrained
        if isinstance(module, (nn.Linear, nn.Conv2d)):
            init.normal_(module.weight, mean=0.0, std=std)
            if module.bias is not None:
                init.zeros_(module.bias)
        elif isinstance(module, nn.LayerNorm):
            init.ones_(module.weight)
            init.zeros_(module.bias)


class MaskCMAModel(MaskCMAPreTrainedModel):
    r"""
    The MaskCMA referring-segmentation model.

    Holds:
    - `vlm`: the image-text-to-text model (`AutoModelForImageTextToText`, InternVL by default);
    - `sam2`: [`MaskCMASam2VideoModel`], transformers' `Sam2VideoModel` (same weights and keys) with the
      conditioning and tracking steps of the video path;
    - `seg_proj`: `Linear(H, H) → ReLU → Linear(H, 256)` on the ``[SEG]`` hidden state;
    - `text_proj`: `Linear(H, 256)` on the prompt's text-token hidden states (the CMA's keys);
    - `cma`: [`VisualToTextAttention`] or [`TextToVisualAttention`] (`cma_config.direction`); `prior_head`:
      [`ConvMaskPriorHead`] when `mask_source="conv"`;
    - `mask_prior` / `propagation_mask_prior`: the [`MaskPrior`] strategies for images and key frames / for frames
      produced by SAM2 propagation (plain attributes, no weights of their own).

    Decoding one target (``[SEG]`` ``s`` on a frame with SAM2 embedding ``F``):
    pass 1 `decoder(F, [no-point pad, s])` → prior ``G``; `F' = cma(F, T ∪ {s}, G)`; pass 2 `decoder(F', …)`.
    With `use_cma=False`, only one pass (the plain Sa2VA path). Answer text is decoded by the processor.
    """

    def __init__(self, config: MaskCMAConfig):
        super().__init__(config)
        self.vlm = AutoModelForImageTextToText.from_config(config.vlm_config)
        self.sam2 = MaskCMASam2VideoModel(config.sam2_config)
        hidden_size, embed_dim = config.text_hidden_size, config.seg_embed_dim
        self.seg_proj = nn.Sequential(nn.Linear(hidden_size, hidden_size), nn.ReLU(), nn.Linear(hidden_size, embed_dim))
        self.text_proj = nn.Linear(hidden_size, embed_dim)
        self.cma = resolve_cross_modal_attention(config)
        self.prior_head = ConvMaskPriorHead(embed_dim) if config.mask_source == "conv" else None
        self.mask_prior = resolve_mask_prior(config, self._decoder_pass, self._conv_prior_logits)
        self.propagation_mask_prior = resolve_propagation_mask_prior(config, self._conv_prior_logits)
        self.post_init()
        self.apply_default_freezing()

    # -- parameter groups --------------------------------------------------------------------------------------

    def vision_tower(self) -> nn.Module:
        """The VLM's vision encoder (frozen by default)."""
        inner = getattr(self.vlm, "model", self.vlm)
        for name in ("vision_tower", "visual", "vision_model"):
            module = getattr(inner, name, None)
            if module is not None:
                return module
        raise AttributeError(
            f"cannot find the vision tower of {type(self.vlm).__name__}; expected an attribute 'vision_tower', "
            "'visual' or 'vision_model' on the VLM"
        )

    def sam2_frozen_modules(self) -> list[nn.Module]:
        """SAM2 parts that stay frozen: everything except the mask decoder (image encoder, prompt encoder, memory).
        Inside the decoder, a head whose loss weight is 0 (IoU head, object-score head) stays frozen too (no loss
        would reach it, and frozen it keeps DDP free of unused trainable parameters)."""
        decoder = self.sam2.mask_decoder
        memory = trained_memory_names(self.config)  # SAM2's memory modules train with video_training="propagate"
        frozen = [module for name, module in self.sam2.named_children() if name != "mask_decoder" and name not in memory]
        if self.config.iou_loss_weight == 0:
            frozen.append(decoder.iou_prediction_head)
        if self.config.object_score_loss_weight == 0:
            frozen.append(decoder.pred_obj_score_head)
        return frozen

    def apply_default_freezing(self) -> None:
        """Freeze SAM2's image encoder and memory modules and the VLM's vision tower, as configured."""
        if self.config.freeze_sam2_image_encoder:
            for module in self.sam2_frozen_modules():
                module.requires_grad_(False)
            for name, parameter in self.sam2.named_parameters(recurse=False):
                parameter.requires_grad_(name in trained_memory_names(self.config))
        if self.config.freeze_vision_tower:
            self.vision_tower().requires_grad_(False)

    def get_input_embeddings(self) -> nn.Module:
        return self.vlm.get_input_embeddings()

    def set_input_embeddings(self, value: nn.Module) -> None:
        self.vlm.set_input_embeddings(value)

    def get_output_embeddings(self) -> nn.Module:
        return self.vlm.get_output_embeddings()

    def set_cma_warmup_factor(self, factor: float) -> None:
        """Set the CMA warm-up factor (γ multiplier, or ω for the `"mask"` target); 1.0 at inference. Fills each CMA's
        non-persistent buffer `warmup_factor_tensor` in place (peft's trained copy included): no new constant for a
        compiled forward."""
        if not 0.0 <= factor <= 1.0:
            raise ValueError(f"the CMA warm-up factor must lie in [0, 1], got {factor}")
        for module in self.modules():
            if isinstance(module, MaskGuidedCrossModalAttention):
                module.warmup_factor = float(factor)

    # -- SAM2 side ---------------------------------------------------------------------------------------------

    def encode_frames(self, sam_pixel_values: torch.Tensor) -> SamFrameFeatures:
        """SAM2's image encoder on `(num_frames, 3, S, S)` frames (resized to SAM2's input size, ImageNet-normalised).

        Returns:
            [`SamFrameFeatures`]: `image_embeddings` `(num_frames, 256, S/16, S/16)` (with SAM2's no-memory embedding
            added) and the decoder-projected features `(num_frames, 32, S/4, S/4)` and `(num_frames, 64, S/8, S/8)`.
        """
        encoder_trainable = any(p.requires_grad for p in self.sam2.vision_encoder.parameters())
        with torch.set_grad_enabled(torch.is_grad_enabled() and encoder_trainable):
            feature_maps = self.sam2.vision_encoder(sam_pixel_values, return_dict=True).fpn_hidden_states
        decoder = self.sam2.mask_decoder
        return SamFrameFeatures(
            image_embeddings=feature_maps[-1] + self.sam2.no_memory_embedding.view(1, -1, 1, 1),
            high_res_features=[decoder.conv_s0(feature_maps[0]), decoder.conv_s1(feature_maps[1])],
        )

    def _conv_prior_logits(self, image_embeddings: torch.Tensor, seg_embeds: torch.Tensor) -> torch.Tensor:
        """`prior_head(image_embeddings, seg_embeds)`, looked up at each call (peft may wrap the head)."""
        return self.prior_head(image_embeddings, seg_embeds)

    def _decoder_pass(
        self, image_embeddings: torch.Tensor, high_res_features: list[torch.Tensor], seg_embeds: torch.Tensor
    ) -> SamDecoderOutput:
        """SAM2's mask decoder with the sparse prompt `[no-point pad, s]`, best predicted IoU of three candidates
        kept (`MaskCMASam2VideoModel.decode`); `image_embeddings` `(N, 256, h, w)`, `seg_embeds` `(N, 256)`."""
        seg_embeds = seg_embeds.to(image_embeddings.device)  # SAM2 may sit on another device than the heads
        return self.sam2.decode(image_embeddings, high_res_features, seg_embeds, multimask_output=True)

    def refine_propagated_frame(
        self,
        conditioned: torch.Tensor,
        seg_embed: torch.Tensor,
        text_tokens: torch.Tensor,
        text_token_mask: torch.Tensor,
        previous_mask_logits: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, MaskPriorOutput]:
        """The CMA on a frame SAM2 propagates from its memory (`config.cma_on_propagation`), for one object:
        `F' = cma(F_mem, T ∪ {s}, G)` with the propagation prior `G` (inference and `video_training="propagate"`).

        Args:
            conditioned (`torch.FloatTensor` of shape `(1, 256, h, w)`): SAM2's memory-conditioned embedding.
            seg_embed (`torch.FloatTensor` of shape `(1, 256)`): the object's ``[SEG]`` embedding.
            text_tokens (`torch.FloatTensor` of shape `(num_text_tokens, 256)`), text_token_mask (`torch.BoolTensor`
                of shape `(num_text_tokens,)`): the sample's projected prompt tokens.
            previous_mask_logits (`torch.FloatTensor` of shape `(1, 1, 4h, 4w)`, *optional*): the object's mask
                logits on the previous frame (the prior with `propagation_mask_source="previous"`).

        Returns:
            The refined embedding `(1, 256, h, w)` and the [`MaskPriorOutput`] the CMA used.
        """
        prior = self.propagation_mask_prior(conditioned, seg_embed, previous_mask_logits=previous_mask_logits)
        refined = self.cma(
            conditioned, text_tokens[None], text_token_mask[None], seg_embed, prior.embedding_logits.to(conditioned.dtype)
        )
        return refined.image_embeddings, prior

    def decode_masks(
        self,
        frame_features: SamFrameFeatures,
        seg_embeds: torch.Tensor,
        text_tokens: torch.Tensor,
        text_token_mask: torch.Tensor,
        gt_prior_masks: torch.Tensor | None = None,
    ) -> SamDecoderOutput:
        """Decode one mask per target, with the CMA between two decoder passes.

        Args:
            frame_features (`SamFrameFeatures`): per-target SAM2 features (row i is target i's frame).
            seg_embeds (`torch.FloatTensor` of shape `(num_targets, 256)`).
            text_tokens (`torch.FloatTensor` of shape `(num_targets, num_text_tokens, 256)`).
            text_token_mask (`torch.BoolTensor` of shape `(num_targets, num_text_tokens)`).
            gt_prior_masks (`torch.FloatTensor` of shape `(num_targets, h, w)`, *optional*): ground truth used as the
                prior when `mask_source="gt"` in training.

        Returns:
            [`SamDecoderOutput`] of the final pass (`mask_logits` `(N, 1, 4h, 4w)`, scores, output tokens and the three
            candidates), with `prior_logits` `(N, 1, 4h, 4w)` when the prior was predicted. The object-presence rule
            is applied by the inference paths (`apply_object_presence`).
        """
        image_embeddings, high_res = frame_features.image_embeddings, frame_features.high_res_features
        if image_embeddings.shape[0] == 0:  # no [SEG] in the batch: nothing to decode
            return self._decode_no_target(frame_features, seg_embeds, text_tokens, text_token_mask, gt_prior_masks)
        if not self.config.use_cma:
            return self._decoder_pass(image_embeddings, high_res, seg_embeds)
        device = image_embeddings.device
        seg_embeds = seg_embeds.to(device)
        prior = self.mask_prior(  # the ground truth is a prior in training only
            image_embeddings, seg_embeds, high_res_features=high_res, gt_masks=gt_prior_masks if self.training else None
        )
        refined = self.cma(
            image_embeddings, text_tokens.to(device), text_token_mask.to(device), seg_embeds, prior.embedding_logits.to(device)
        )
        final = self._decoder_pass(refined.image_embeddings, high_res, seg_embeds)
        return dataclasses.replace(final, prior_logits=prior.mask_logits)

    def _decode_no_target(self, frame_features, seg_embeds, text_tokens, text_token_mask, gt_prior_masks):
        """Empty outputs for a batch without targets, attached to one zero-input pass through the decoder, the CMA
        and the prior head with weight 0: every trainable module takes part in the graph on every process, as DDP
        with `find_unused_parameters=False` requires."""

        def one_zero_row(tensor):  # a zero row that stays attached to `tensor`'s graph
            return tensor.new_zeros(1, *tensor.shape[1:]) + 0.0 * tensor.sum()

        image_embeddings, high_res = frame_features.image_embeddings, frame_features.high_res_features
        num_text = max(text_tokens.shape[1], 1)
        dummy_text = text_tokens.new_zeros(1, num_text, text_tokens.shape[-1]) + 0.0 * text_tokens.sum()
        dummy = self.decode_masks(
            SamFrameFeatures(one_zero_row(image_embeddings), [one_zero_row(level) for level in high_res]),
            one_zero_row(seg_embeds),
            dummy_text,
            torch.ones(1, num_text, dtype=torch.bool, device=dummy_text.device),
            None if gt_prior_masks is None else one_zero_row(gt_prior_masks),
        )
        zero = sum(0.0 * value.float().sum() for value in dummy.values())
        empty = image_embeddings.new_zeros(0, 1, *high_res[0].shape[-2:]) + zero.to(image_embeddings.dtype)
        no_scores = image_embeddings.new_zeros(0)
        return SamDecoderOutput(
            mask_logits=empty,
            iou_scores=no_scores,
            object_score_logits=no_scores,
            output_tokens=image_embeddings.new_zeros(0, image_embeddings.shape[1]),
            multimask_logits=empty,
            multimask_iou_scores=image_embeddings.new_zeros(0, 1),
            prior_logits=empty if self.config.use_cma else None,
        )

    # -- language side -----------------------------------------------------------------------------------------

    def _prompt_text_mask(self, input_ids, attention_mask, labels, text_token_mask) -> torch.BoolTensor:
        """`(batch, seq_len)`: the prompt's text tokens. The processor's `text_token_mask` when given, else every
        attended position that is not an image token, ``[SEG]``, a beginning/end/padding token of the VLM's
        configs, nor part of the answer (positions with a label)."""
        if text_token_mask is not None:
            return text_token_mask.bool()
        mask = torch.ones_like(input_ids, dtype=torch.bool) if attention_mask is None else attention_mask.bool()
        text_config = self.config.vlm_config.get_text_config()
        special = {self.config.image_token_id, self.config.seg_token_id, getattr(text_config, "bos_token_id", None)}
        special.update(self._eos_token_ids() + [self._pad_token_id()])
        for special_id in special - {None}:
            mask = mask & (input_ids != special_id)
        return mask if labels is None else mask & (labels == -100)

    def project_text_and_seg(
        self, last_hidden_state: torch.Tensor, input_ids: torch.LongTensor, prompt_text_mask: torch.BoolTensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """Project the ``[SEG]`` states and the prompt's text-token states `(batch, seq_len, H)` to SAM2's width.

        Returns:
            `seg_embeds (num_seg, 256)` in reading order, `seg_sample_index (num_seg,)`, `text_tokens (batch, T, 256)`
            and `text_token_mask (batch, T)`, `T` the largest number of prompt text tokens in the batch (at least 1).
        """
        self._check_seg_token_id()
        device = last_hidden_state.device
        seg_hidden, seg_sample_index = self.gather_seg_states(last_hidden_state, input_ids.to(device) == self.config.seg_token_id)
        text_hidden, text_token_mask = self.gather_text_states(last_hidden_state, prompt_text_mask.to(device))
        seg_embeds = self.seg_proj(seg_hidden.to(_module_device(self.seg_proj, device)))
        return seg_embeds, seg_sample_index, self.text_proj(text_hidden.to(_module_device(self.text_proj, device))), text_token_mask

    @staticmethod
    def gather_seg_states(hidden_states: torch.Tensor, seg_mask: torch.BoolTensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The states `(batch, seq_len, H)` at the ``[SEG]`` positions `(num_seg, H)`, in reading order over the batch,
        and the batch index of each `(num_seg,)`."""
        seg_positions = seg_mask.nonzero(as_tuple=False)  # row-major = reading order
        return hidden_states[seg_positions[:, 0], seg_positions[:, 1]], seg_positions[:, 0]

    @staticmethod
    def gather_text_states(hidden_states: torch.Tensor, prompt_text_mask: torch.BoolTensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The prompt's text-token states moved to the front of each row: `(batch, T, H)` and their mask `(batch, T)`,
        `T` the largest number of prompt text tokens in the batch (at least 1)."""
        counts = prompt_text_mask.sum(dim=1)
        num_text = max(int(counts.max().item()) if counts.numel() else 0, 1)
        order = torch.argsort((~prompt_text_mask).to(torch.int8), dim=1, stable=True)[:, :num_text]
        gathered = hidden_states.gather(1, order.unsqueeze(-1).expand(-1, -1, hidden_states.shape[-1]))
        return gathered, prompt_text_mask.gather(1, order)

    def _check_seg_token_id(self) -> None:
        if self.config.seg_token_id is None:
            raise ValueError(
                "MaskCMAConfig.seg_token_id is not set; build the model with the tokenizer's [SEG] id "
                "(config.seg_token_id = tokenizer.convert_tokens_to_ids('[SEG]'))"
            )

    # -- training forward --------------------------------------------------------------------------------------

    def forward(
        self,
        input_ids: torch.LongTensor,
        attention_mask: torch.Tensor | None = None,
        pixel_values: torch.FloatTensor | None = None,
        sam_pixel_values: torch.FloatTensor | None = None,
        gt_masks: torch.Tensor | None = None,
        labels: torch.LongTensor | None = None,
        text_token_mask: torch.Tensor | None = None,
        target_seg_index: torch.LongTensor | None = None,
        target_frame_index: torch.LongTensor | None = None,
        frame_sample_index: torch.LongTensor | None = None,
        seg_object_ids: torch.LongTensor | None = None,
        conditioning_frame_mask: torch.BoolTensor | None = None,
        original_sizes: torch.LongTensor | None = None,
        key_frame_indices: Sequence[int] | torch.LongTensor | None = None,
    ) -> MaskCMAOutput:
        r"""
        Args:
            input_ids (`torch.LongTensor` of shape `(batch_size, seq_len)`): prompt and answer tokens, image
                placeholders and ``[SEG]`` tokens included.
            attention_mask (`torch.Tensor` of shape `(batch_size, seq_len)`, *optional*).
            pixel_values (`torch.FloatTensor` of shape `(num_tiles, 3, tile, tile)`, *optional*): the VLM's image
                tiles for the whole batch, in sample order.
            sam_pixel_values (`torch.FloatTensor` of shape `(num_frames, 3, S, S)`, *optional*): SAM2 inputs; by
                default one frame per sample (images). Required to decode masks.
            gt_masks (`torch.Tensor` of shape `(num_targets, H, W)`, *optional*): ground-truth masks (any
                resolution; resized with nearest to the low-resolution mask size). Gives the mask and TMC losses.
            labels (`torch.LongTensor` of shape `(batch_size, seq_len)`, *optional*): LM labels, -100 where no loss
                is taken.
            text_token_mask (`torch.BoolTensor` of shape `(batch_size, seq_len)`, *optional*): the prompt's text
                tokens (the CMA's keys), as the processor returns them.
            target_seg_index, target_frame_index (`torch.LongTensor` of shape `(num_targets,)`, *optional*): for each
                target, its ``[SEG]`` (reading order over the batch) and its row of `sam_pixel_values`. Default:
                target i is the i-th ``[SEG]`` on its sample's frame.
            frame_sample_index (`torch.LongTensor` of shape `(num_frames,)`, *optional*): sample of each SAM2 frame;
                default `arange(batch_size)`.
            seg_object_ids (`torch.LongTensor` of shape `(num_seg_tokens,)`, *optional*): object identity of each
                ``[SEG]`` within its sample (repeated objects are one object for the TMC loss).
            conditioning_frame_mask (`torch.BoolTensor` of shape `(num_frames,)`, *optional*): with
                `config.video_training="propagate"`, False on the frames of a clip that SAM2 propagates from its key
                frames (`video_training.py`); the collator gives it for batches with clips.
            original_sizes, key_frame_indices: what the processor returns for inference (mask sizes, the frames the
                VLM saw); the forward does not read them, so that a processor output can be passed whole. Any other
                argument is a `TypeError` naming it.

        Returns:
            [`MaskCMAOutput`].
        """
        vlm_outputs = self.vlm(
            input_ids=input_ids,
            attention_mask=attention_mask,
            pixel_values=pixel_values,
            labels=labels,
            output_hidden_states=True,
            return_dict=True,
        )
        prompt_text_mask = self._prompt_text_mask(input_ids, attention_mask, labels, text_token_mask)
        seg_embeds, seg_sample_index, text_tokens, text_mask = self.project_text_and_seg(
            vlm_outputs.hidden_states[-1], input_ids, prompt_text_mask
        )
        fields = {"loss": vlm_outputs.loss, "lm_loss": vlm_outputs.loss, "logits": vlm_outputs.logits}
        fields.update(seg_embeds=seg_embeds, seg_sample_index=seg_sample_index, seg_object_ids=seg_object_ids)
        if sam_pixel_values is None:
            if gt_masks is not None:
                raise ValueError("gt_masks were given without sam_pixel_values: the masks cannot be decoded")
            return MaskCMAOutput(**fields)

        targets = build_seg_targets(
            seg_sample_index=seg_sample_index,
            batch_size=input_ids.shape[0],
            num_frames=sam_pixel_values.shape[0],
            num_gt_masks=None if gt_masks is None else gt_masks.shape[0],
            target_seg_index=target_seg_index,
            target_frame_index=target_frame_index,
            frame_sample_index=frame_sample_index,
        )
        if propagates(self.config, conditioning_frame_mask, targets.frame_index):
            # video_training="propagate": the batch's clips go through SAM2's memory (video_training.py)
            decoded, features = decode_targets_with_propagation(
                self, sam_pixel_values, targets, seg_embeds, text_tokens, text_mask, gt_masks,
                conditioning_frame_mask, frame_sample_index,
            )
            gt_masks = None if gt_masks is None else gt_masks.to(features.image_embeddings.device)
            gt_low_res = None if gt_masks is None else low_res_targets(gt_masks, features)
        else:
            frame_features = self.encode_frames(sam_pixel_values.to(self.sam2.device))
            device = frame_features.image_embeddings.device
            features = frame_features.select(targets.frame_index.to(device))
            target_samples = targets.sample_index.to(device)
            gt_masks = None if gt_masks is None else gt_masks.to(device)
            gt_low_res = None if gt_masks is None else low_res_targets(gt_masks, features)
            decoded = self.decode_masks(
                features,
                seg_embeds.to(device)[targets.seg_index.to(device)],
                text_tokens.to(device)[target_samples],
                text_mask.to(device)[target_samples],
                gt_low_res,
            )
        fields.update(
            pred_masks=decoded.mask_logits[:, 0],
            prior_masks=None if decoded.prior_logits is None else decoded.prior_logits[:, 0],
            iou_scores=decoded.iou_scores,
            object_score_logits=decoded.object_score_logits,
            target_seg_index=targets.seg_index,
            target_frame_index=targets.frame_index,
        )
        if gt_masks is not None:
            fields.update(self._mask_losses(decoded, gt_masks, gt_low_res))
            pooled, has_mask = mask_pooled_embeddings(features.image_embeddings, gt_masks)
            tmc = text_mask_contrastive_loss(
                seg_embeds, pooled, targets.seg_index, has_mask, seg_sample_index, seg_object_ids,
                temperature=self.config.tmc_temperature,
            )
            fields["tmc_loss"] = tmc.loss
            fields["tmc_skipped"] = torch.as_tensor(tmc.skipped, device=tmc.loss.device)
            extra = fields["mask_loss"] + self.config.tmc_weight * tmc.loss.to(fields["mask_loss"].device)
            fields["loss"] = extra if fields["loss"] is None else fields["loss"] + extra.to(fields["loss"].device)
        return MaskCMAOutput(**fields)

    def _mask_losses(self, decoded: SamDecoderOutput, gt_masks: torch.Tensor, gt_low_res: torch.Tensor) -> dict:
        """The mask loss terms of `MaskCMAOutput` and their weighted sum `mask_loss` (the config's weights)."""
        config = self.config

        def bce_dice(logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            return sigmoid_bce_loss(logits, gt_low_res), dice_loss(logits, gt_low_res)

        present = object_presence_targets(gt_masks)
        bce, dice = bce_dice(decoded.mask_logits[:, 0])
        iou = iou_prediction_loss(decoded.multimask_logits, decoded.multimask_iou_scores, gt_low_res, present)
        object_score = object_score_loss(decoded.object_score_logits, present)
        mask_loss = (
            config.bce_loss_weight * bce
            + config.dice_loss_weight * dice
            + config.iou_loss_weight * iou
            + config.object_score_loss_weight * object_score
        )
        prior = None
        if decoded.prior_logits is not None:
            prior_bce, prior_dice = bce_dice(decoded.prior_logits[:, 0])
            prior = config.bce_loss_weight * prior_bce + config.dice_loss_weight * prior_dice
            mask_loss = mask_loss + config.prior_loss_weight * prior
        return {
            "mask_loss": mask_loss, "mask_bce": bce, "mask_dice": dice, "prior_loss": prior, "iou_loss": iou,
            "object_score_loss": object_score,
        }

    # -- inference ---------------------------------------------------------------------------------------------

    @torch.no_grad()
    def segment(
        self,
        input_ids: torch.LongTensor,
        attention_mask: torch.Tensor | None = None,
        pixel_values: torch.FloatTensor | None = None,
        max_new_tokens: int = 32,
        sam_pixel_values: torch.FloatTensor | None = None,
        original_sizes: torch.LongTensor | None = None,
        text_token_mask: torch.Tensor | None = None,
        mask_threshold: float | None = None,
        answer_ids: Sequence[Sequence[int]] | None = None,
        video_frames=None,
        key_frame_indices=None,
        offload_state_to_cpu: bool = False,
        bounded_memory: bool = True,
        show_progress: bool = False,
        stream: bool = False,
        **generate_kwargs,
    ) -> MaskCMASegmentationOutput | VideoSegmentationStream:
        r"""Generate an answer for each prompt and decode every ``[SEG]`` of it into a mask (images) or a mask per
        frame (videos; see `video_segmentation`).

        Args:
            input_ids (`torch.LongTensor` of shape `(batch_size, prompt_len)`): left-padded prompts.
            attention_mask (`torch.Tensor` of shape `(batch_size, prompt_len)`, *optional*).
            pixel_values (`torch.FloatTensor` of shape `(num_tiles, 3, tile, tile)`): the VLM's tiles (of every key
                frame for videos).
            max_new_tokens (`int`): answer length limit.
            sam_pixel_values (`torch.FloatTensor`): SAM2 inputs, `(batch_size, 3, S, S)` for images or
                `(batch_size, num_frames, 3, S, S)` for short videos.
            original_sizes (`torch.LongTensor` of shape `(batch_size, 2)`): `(height, width)` of each image or video;
                masks are returned at this size (default: SAM2's input size).
            text_token_mask (`torch.BoolTensor` of shape `(batch_size, prompt_len)`, *optional*).
            mask_threshold (`float`, *optional*): logit threshold (default `config.mask_threshold`).
            answer_ids (list of token-id lists, *optional*): force these answers instead of generating freely
                ([`forced_answer_generate_kwargs`]).
            video_frames (*optional*): a video as a frame sequence (`len()` and `[i]` → `(3, S, S)` SAM2-ready
                tensor), as the processor returns for `videos=`, or a list of them (one per video).
            key_frame_indices: for videos, the frames the VLM saw (a list per video, or one list for one video).
            offload_state_to_cpu (`bool`): keep SAM2's per-frame video state on the CPU.
            bounded_memory (`bool`): drop SAM2 video state no later frame reads (default); `False` keeps it all.
            show_progress (`bool`): a progress bar over the video frames.
            stream (`bool`): for one video, return a [`VideoSegmentationStream`] that segments the frames while the
                caller iterates (nothing is kept once a frame is yielded).
            generate_kwargs: further arguments of `generate` (e.g. `do_sample`).

        Returns:
            [`MaskCMASegmentationOutput`]: masks `(num_objects, H, W)` per image and `(num_objects, num_frames, H, W)`
            per video (on the CPU); an answer without ``[SEG]`` gives zero objects. With `stream=True`, the stream.
        """
        batch_size = input_ids.shape[0]
        is_video = video_frames is not None or (sam_pixel_values is not None and sam_pixel_values.ndim == 5)
        if is_video:
            if stream and batch_size != 1:
                raise ValueError(f"stream=True streams one video, got a batch of {batch_size} prompts")
            image_size = self.sam2.config.image_size
            samples = video_samples(batch_size, sam_pixel_values, video_frames, key_frame_indices, original_sizes, image_size)
        elif sam_pixel_values is None:
            raise ValueError("segment() needs sam_pixel_values (the processor's SAM2 input) to decode masks")
        elif stream or key_frame_indices is not None:
            raise ValueError("stream and key_frame_indices are for videos (video_frames or 5-D sam_pixel_values)")
        answer = self.generate_answer(
            input_ids, attention_mask, max_new_tokens, pixel_values, text_token_mask, answer_ids, **generate_kwargs
        )
        if not is_video:
            return self.decode_answer_masks(answer, sam_pixel_values, original_sizes, mask_threshold)
        threshold = self.config.mask_threshold if mask_threshold is None else mask_threshold
        streams = []
        for index, sample in enumerate(samples):
            rows = (answer.seg_sample_index == index).nonzero(as_tuple=True)[0]
            propagation = VideoMaskPropagation(
                self,
                sample.frames,
                sample.key_frame_indices,
                answer.seg_embeds[rows],
                answer.text_tokens[index],
                answer.text_token_mask[index],
                offload_state_to_cpu=offload_state_to_cpu,
                bounded_memory=bounded_memory,
                show_progress=show_progress,
            )
            streams.append(
                VideoSegmentationStream(
                    propagation, sample.original_size, threshold, self.config.mask_intermediate_size,
                    answer.answer_ids[index],
                )
            )
        if stream:
            return streams[0]
        masks, scores, logits = zip(*(video.collect() for video in streams))
        return MaskCMASegmentationOutput(
            answer_ids=answer.answer_ids, masks=list(masks), scores=list(scores), mask_logits=list(logits)
        )

    @torch.no_grad()
    def decode_answer_masks(
        self,
        answer: MaskCMAAnswer,
        sam_pixel_values: torch.FloatTensor,
        original_sizes: torch.LongTensor | None = None,
        mask_threshold: float | None = None,
    ) -> MaskCMASegmentationOutput:
        r"""The image half of `segment()`: SAM2 encodes each image `(batch_size, 3, S, S)` once and every ``[SEG]`` of
        `answer` ([`~MaskCMAModel.generate_answer`]) is decoded into a mask (with the CMA), at `original_sizes`
        (default `S×S`) after the object-presence rule."""
        threshold = self.config.mask_threshold if mask_threshold is None else mask_threshold
        batch_size = sam_pixel_values.shape[0]
        if original_sizes is None:
            sizes = [tuple(sam_pixel_values.shape[-2:])] * batch_size
        else:
            sizes = [(int(h), int(w)) for h, w in original_sizes.tolist()]
        frame_features = self.encode_frames(sam_pixel_values.to(self.sam2.device))
        device = frame_features.image_embeddings.device
        seg_sample_index = answer.seg_sample_index.to(device)
        decoded = self.decode_masks(
            frame_features.select(seg_sample_index),
            answer.seg_embeds.to(device),
            answer.text_tokens.to(device)[seg_sample_index],
            answer.text_token_mask.to(device)[seg_sample_index],
        )
        mask_logits = apply_object_presence(decoded.mask_logits, decoded.object_score_logits, self.config.object_presence)
        masks, scores, logits = [], [], []
        for sample in range(batch_size):
            rows = (seg_sample_index == sample).nonzero(as_tuple=True)[0]
            logits.append(mask_logits[rows, 0])
            scores.append(decoded.iou_scores[rows])
            upsampled = upsample_mask_logits(logits[-1], sizes[sample], self.config.mask_intermediate_size)
            masks.append(upsampled > threshold)
        return MaskCMASegmentationOutput(answer_ids=answer.answer_ids, masks=masks, scores=scores, mask_logits=logits)

    def generate_answer(
        self,
        input_ids: torch.LongTensor,
        attention_mask: torch.Tensor | None = None,
        max_new_tokens: int = 32,
        pixel_values: torch.FloatTensor | None = None,
        text_token_mask: torch.Tensor | None = None,
        answer_ids: Sequence[Sequence[int]] | None = None,
        **generate_kwargs,
    ) -> MaskCMAAnswer:
        """Generate the answers and read, from that same generation, the last-layer hidden states at every ``[SEG]``
        of the answers and at the prompt's text tokens: one VLM pass, the vision tower runs once.

        The prefill computes the prompt's states; each decoding step the state of the token it consumes (a
        [`LastHiddenStateRecorder`] keeps them). The last generated token is never consumed, so when it is a
        ``[SEG]`` (the answer hit `max_new_tokens`), one more step runs over it with the generation's key/value cache.
        The states equal those of a teacher-forced forward over prompt + answer (the training computation).

        Greedy and sampled decoding are supported; beam search, several sequences per prompt and assisted decoding
        are not (their per-step states do not follow the returned sequences) and raise a `ValueError`. `answer_ids`
        forces the answers ([`forced_answer_generate_kwargs`]).

        Returns:
            [`MaskCMAAnswer`].
        """
        if answer_ids is not None:
            if "prefix_allowed_tokens_fn" in generate_kwargs:
                raise ValueError("pass either answer_ids or prefix_allowed_tokens_fn, not both")
            if len(answer_ids) != input_ids.shape[0]:
                raise ValueError(f"answer_ids has {len(answer_ids)} answers for a batch of {input_ids.shape[0]} prompts")
            if not self._eos_token_ids():
                raise ValueError("answer_ids needs the VLM's end-of-sequence token id (generation_config.eos_token_id)")
            forced = forced_answer_generate_kwargs(answer_ids, input_ids.shape[1], self._eos_token_ids()[0])
            max_new_tokens = forced.pop("max_new_tokens")
            generate_kwargs = {**generate_kwargs, **forced}
        self._check_one_pass_generation(generate_kwargs)
        self._check_seg_token_id()
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        prompt_len, pad_id = input_ids.shape[1], self._pad_token_id()
        recorder = LastHiddenStateRecorder(self._language_model())
        with recorder:
            generated = self.vlm.generate(
                input_ids=input_ids,
                attention_mask=attention_mask,
                pixel_values=pixel_values,
                max_new_tokens=max_new_tokens,
                do_sample=generate_kwargs.pop("do_sample", False),
                pad_token_id=pad_id,
                return_dict_in_generate=True,
                use_cache=True,
                **generate_kwargs,
            )
            sequences = generated.sequences
            generated_ids = sequences[:, prompt_len:]
            answer_mask = self._answer_mask(generated_ids)
            seg_mask = (generated_ids == self.config.seg_token_id) & answer_mask
            seg_is_last = generated_ids.shape[1] > 0 and bool(seg_mask[:, -1].any())
            if seg_is_last:
                self._decode_last_token(sequences, attention_mask, generated, pad_id)
            del generated  # the key/value cache
        states = recorder.states()
        recorder.chunks.clear()
        consumed = sequences.shape[1] - (0 if seg_is_last else 1)
        if states.shape[1] != consumed:
            raise RuntimeError(
                f"generate computed states for {states.shape[1]} positions, expected {consumed} (prompt {prompt_len} + "
                f"answer {generated_ids.shape[1]}{'' if seg_is_last else ' - 1'}): the generation did not run one "
                "prefill and one cached step per token; segment() supports greedy or sampled decoding with a cache"
            )
        answer_states = states[:, prompt_len:]
        seg_hidden, seg_sample_index = self.gather_seg_states(answer_states, seg_mask[:, : answer_states.shape[1]])
        prompt_mask = self._prompt_text_mask(input_ids, attention_mask, None, text_token_mask)
        text_hidden, text_mask = self.gather_text_states(states[:, :prompt_len], prompt_mask)
        if seg_hidden.shape[0] == 0:
            logger.warning("the answer contains no [SEG] token: no mask is returned")
        return MaskCMAAnswer(
            answer_ids=[row[mask] for row, mask in zip(generated_ids, answer_mask)],
            seg_embeds=self.seg_proj(seg_hidden),
            seg_sample_index=seg_sample_index,
            text_tokens=self.text_proj(text_hidden),
            text_token_mask=text_mask,
            seg_hidden_states=seg_hidden,
            text_hidden_states=text_hidden,
        )

    def _answer_mask(self, answer_ids: torch.LongTensor) -> torch.BoolTensor:
        """`(batch, answer_len)`: the answer's tokens up to and including the first end-of-sequence token (after it
        generate pads the finished rows)."""
        eos_ids = torch.tensor(self._eos_token_ids(), device=answer_ids.device, dtype=answer_ids.dtype)
        is_eos = torch.isin(answer_ids, eos_ids)
        return (is_eos.cumsum(dim=1) - is_eos.int()) == 0

    def _language_model(self) -> nn.Module:
        """The VLM's language model (the decoder whose `last_hidden_state` holds the ``[SEG]`` states)."""
        decoder = self.vlm.get_decoder()
        if decoder is None or decoder is self.vlm:
            raise AttributeError(
                f"cannot find the language model of {type(self.vlm).__name__}: vlm.get_decoder() must return the text "
                "decoder (its output's last_hidden_state holds the [SEG] states)"
            )
        return decoder

    def _check_one_pass_generation(self, generate_kwargs: dict) -> None:
        """Reject generation settings whose per-step states do not follow the returned sequences."""
        config = generate_kwargs.get("generation_config") or self.vlm.generation_config
        reserved = sorted(set(generate_kwargs) & {"return_dict_in_generate", "use_cache", "output_hidden_states"})
        if reserved:
            raise ValueError(
                f"segment() sets {reserved} itself (it reads the [SEG] states from generate's own pass); do not pass them"
            )
        problems = []
        num_beams = generate_kwargs.get("num_beams", getattr(config, "num_beams", 1)) or 1
        if num_beams > 1:
            problems.append(f"num_beams={num_beams} (beam search)")
        num_sequences = generate_kwargs.get("num_return_sequences", getattr(config, "num_return_sequences", 1)) or 1
        if num_sequences > 1:
            problems.append(f"num_return_sequences={num_sequences}")
        for key in ("assistant_model", "prompt_lookup_num_tokens", "assistant_early_exit"):
            if generate_kwargs.get(key, getattr(config, key, None)) is not None:
                problems.append(f"{key} (assisted decoding)")
        if problems:
            raise ValueError(
                f"segment() reads the [SEG] states from the generation itself, which needs one sequence per prompt "
                f"decoded token by token (greedy or sampling); unsupported: {', '.join(problems)}"
            )

    def _decode_last_token(self, sequences: torch.LongTensor, prompt_attention_mask: torch.Tensor, generated, pad_id: int):
        """One more decoding step over the last generated token, continuing from the generation's key/value cache;
        the open recorder keeps its state. The token this step would add is discarded."""
        field_names = {field.name for field in dataclasses.fields(generated)}
        cache_name = "cache" if "cache" in field_names else "past_key_values"
        cache = getattr(generated, cache_name, None)
        if cache is None:
            raise RuntimeError("generate returned no key/value cache; the last [SEG]'s state cannot be computed")
        answer_len = sequences.shape[1] - prompt_attention_mask.shape[1]
        attention_mask = torch.cat([prompt_attention_mask, prompt_attention_mask.new_ones(sequences.shape[0], answer_len)], 1)
        self.vlm.generate(
            input_ids=sequences,
            attention_mask=attention_mask,
            max_new_tokens=1,
            do_sample=False,
            pad_token_id=pad_id,
            use_cache=True,
            **{cache_name: cache},
        )

    def _pad_token_id(self) -> int:
        pad = getattr(self.config.vlm_config.get_text_config(), "pad_token_id", None)
        if pad is None:
            pad = self.vlm.generation_config.pad_token_id
        return 0 if pad is None else int(pad)

    def _eos_token_ids(self) -> list[int]:
        eos = self.vlm.generation_config.eos_token_id
        if eos is None:
            eos = self.config.vlm_config.get_text_config().eos_token_id
        if eos is None:
            return []
        return [int(token) for token in eos] if isinstance(eos, (list, tuple)) else [int(eos)]

    # -- building and loading ----------------------------------------------------------------------------------

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, *model_args, **kwargs):
        """Load a saved MaskCMA model strictly: any missing, unexpected or mismatched weight raises a `ValueError`
        that names the keys (docs/design_notes.md, "Strict loading"). Load the processor separately
        (`MaskCMAProcessor.from_pretrained`): it decodes the answers."""
        wants_info = kwargs.pop("output_loading_info", False)
        model, loading_info = super().from_pretrained(
            pretrained_model_name_or_path, *model_args, output_loading_info=True, **kwargs
        )
        _raise_on_loading_problems(loading_info, f"the checkpoint at {str(pretrained_model_name_or_path)!r}", "MaskCMAModel",
                                   "re-export the model with `maskcma export`, or convert foreign checkpoints with "
                                   "`maskcma convert`")
        return (model, loading_info) if wants_info else model

    @classmethod
    def from_pretrained_parts(
        cls,
        vlm: str | os.PathLike | PreTrainedModel,
        sam2: str | os.PathLike | PreTrainedModel,
        tokenizer=None,
        seg_token: str = "[SEG]",
        dtype: torch.dtype | str | None = None,
        **config_overrides,
    ) -> MaskCMAModel:
        """Build a MaskCMA model from an existing VLM and SAM2 (folders, Hub ids or loaded models).

        The CMA, `seg_proj`, `text_proj` (and the conv prior head) are freshly initialised, with γ = 0 so the masks
        equal those of the CMA-free path until training. When a `tokenizer` is given, ``[SEG]`` is added to it if
        missing and the VLM's embeddings are resized to it (the tokenizer itself belongs to the processor).

        VLM and SAM2 checkpoints given by name are loaded strictly: a missing, unexpected or mismatched weight is a
        `ValueError` naming the checkpoint and the keys.

        One dtype: the VLM, SAM2, the heads and the CMA all end in `dtype` (`torch_dtype=` is accepted as its old
        name). `dtype=None` loads named checkpoints in torch's default dtype and keeps a given VLM's dtype;
        `dtype="auto"` takes the VLM checkpoint's saved dtype. Models passed in are cast in place. The VLM and SAM2
        become the submodules themselves; the new heads are built on the meta device and materialised on SAM2's.
        """
        if "torch_dtype" in config_overrides:
            legacy = config_overrides.pop("torch_dtype")
            if dtype is not None and legacy != dtype:
                raise ValueError(f"pass either dtype= or torch_dtype=, not both (got {dtype} and {legacy})")
            dtype = legacy
        if isinstance(dtype, str) and dtype != "auto":
            resolved = getattr(torch, dtype, None)
            if not isinstance(resolved, torch.dtype):
                raise ValueError(f"unknown dtype {dtype!r}; use e.g. 'bfloat16', 'float16', 'float32' or 'auto'")
            dtype = resolved
        load_dtype = torch.get_default_dtype() if dtype is None else dtype

        def load_strictly(loader, name, what):
            loaded, info = loader.from_pretrained(name, output_loading_info=True, dtype=load_dtype)
            _raise_on_loading_problems(info, f"the {what} checkpoint {str(name)!r}", type(loaded).__name__,
                                       f"pass a complete {what} checkpoint of a supported architecture (or a model "
                                       "you loaded yourself)")
            return loaded

        if not isinstance(vlm, PreTrainedModel):
            vlm = load_strictly(AutoModelForImageTextToText, vlm, "VLM")
        if not isinstance(sam2, PreTrainedModel):
            sam2 = load_strictly(MaskCMASam2VideoModel, sam2, "SAM2")
        if not isinstance(sam2, Sam2VideoModel):
            raise TypeError(
                f"sam2 must be a Sam2VideoModel (it holds the image path and the video memory), got {type(sam2).__name__}; "
                "load SAM2 checkpoints with Sam2VideoModel.from_pretrained"
            )
        sam2 = MaskCMASam2VideoModel.from_sam2_video_model(sam2)  # same tensors, with the video path's steps
        seg_token_id = config_overrides.pop("seg_token_id", None)
        if tokenizer is not None:
            if seg_token not in tokenizer.get_vocab():
                tokenizer.add_special_tokens({"additional_special_tokens": [seg_token]})
            seg_token_id = tokenizer.convert_tokens_to_ids(seg_token)
            if len(tokenizer) > vlm.get_input_embeddings().weight.shape[0]:
                vlm.resize_token_embeddings(len(tokenizer))
        if seg_token_id is None:
            raise ValueError("pass the tokenizer (or seg_token_id=...) so that the model knows the [SEG] token id")
        target_dtype = vlm.dtype if dtype in (None, "auto") else dtype
        vlm.to(dtype=target_dtype)
        sam2.to(dtype=target_dtype)
        config = MaskCMAConfig(vlm_config=vlm.config, sam2_config=sam2.config, seg_token_id=seg_token_id, **config_overrides)
        with torch.device("meta"):  # nothing allocated; the loaded VLM and SAM2 become the submodules
            model = cls(config)
        model.vlm, model.sam2 = vlm, sam2
        head_device = next(sam2.parameters()).device
        for name, module in model.named_children():
            if name not in ("vlm", "sam2"):
                module.to_empty(device=head_device)
                module.apply(model._init_weights)
                module.to(dtype=target_dtype)
        model.config.dtype = target_dtype
        still_meta = [name for name, tensor in model.state_dict().items() if tensor.device.type == "meta"]
        if still_meta:
            raise RuntimeError(f"from_pretrained_parts left tensors on the meta device: {still_meta[:10]}")
        model.apply_default_freezing()
        return model


def _raise_on_loading_problems(loading_info: dict, what: str, model_name: str, fix: str) -> None:
    """A `ValueError` naming the missing, unexpected and mismatched keys of a load, if any."""
    problems = {
        kind: sorted(str(key[0] if isinstance(key, tuple) else key) for key in loading_info.get(f"{kind}_keys") or [])
        for kind in ("missing", "unexpected", "mismatched")
    }
    listed = "; ".join(
        f"{kind} keys ({len(keys)}): {', '.join(keys[:10])}{' ...' if len(keys) > 10 else ''}"
        for kind, keys in problems.items()
        if keys
    )
    if listed:
        raise ValueError(f"{what} does not match {model_name}: {listed}. Every weight must load: {fix}.")


__all__ = [
    "LastHiddenStateRecorder",
    "MaskCMAAnswer",
    "MaskCMAModel",
    "MaskCMAOutput",
    "MaskCMAPreTrainedModel",
    "MaskCMASegmentationOutput",
    "forced_answer_generate_kwargs",
]
