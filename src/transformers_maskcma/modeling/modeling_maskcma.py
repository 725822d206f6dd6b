"""MaskCMA: a multimodal LLM that answers with ``[SEG]`` tokens, SAM2 that decodes each ``[SEG]`` into a mask, and
a Mask-guided Cross-Modal Attention (CMA) between them.

This file is copied flat into Hub repositories as remote code: it imports only torch, transformers and the
modules beside it (with flat relative imports).
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from transformers import (
    AutoModelForImageTextToText,
    AutoTokenizer,
    PreTrainedModel,
    Sam2VideoModel,
)
from transformers import initialization as init
from transformers.utils import ModelOutput, cached_file, logging

from .cma import MaskGuidedCrossModalAttention, resolve_cross_modal_attention
from .configuration_maskcma import MaskCMAConfig
from .mask_decoding import (
    SamDecoderOutput,
    SamFrameFeatures,
    apply_object_presence,
    dice_loss,
    iou_prediction_loss,
    object_presence_targets,
    object_score_loss,
    sigmoid_bce_loss,
    upsample_mask_logits,
)
from .mask_prior import ConvMaskPriorHead, resolve_mask_prior, resolve_propagation_mask_prior
from .sam2_tracking import MaskCMASam2VideoModel
from .target_mapping import SegTargets, build_seg_targets
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
            ``lm_loss + bce_loss_weight·mask_bce + dice_loss_weight·mask_dice + prior_loss_weight·prior_loss
            + iou_loss_weight·iou_loss + object_score_loss_weight·object_score_loss``, from the parts that were
            computable (LM part needs `labels`, mask parts need `gt_masks`).
        lm_loss, mask_bce, mask_dice, prior_loss (`torch.FloatTensor` of shape `()`, *optional*):
            The components; `prior_loss` is BCE·w_bce + Dice·w_dice on the mask prior.
        iou_loss, object_score_loss (`torch.FloatTensor` of shape `()`, *optional*):
            SAM2's losses for its IoU head (L1 to the actual IoU of every candidate mask, on present objects) and its
            object-score head (BCE against "the ground truth has a foreground pixel"), on the final decoder pass.
        logits (`torch.FloatTensor` of shape `(batch_size, sequence_length, vocab_size)`):
            Language-model logits.
        pred_masks (`torch.FloatTensor` of shape `(num_targets, mask_height, mask_width)`):
            Final low-resolution mask logits (256×256 for released SAM2).
        prior_masks (`torch.FloatTensor` of shape `(num_targets, mask_height, mask_width)`, *optional*):
            Mask prior logits (pass 1 or the conv head, upsampled); `None` without CMA or with the GT prior.
        iou_scores (`torch.FloatTensor` of shape `(num_targets,)`):
            SAM2's predicted IoU of each chosen mask.
        object_score_logits (`torch.FloatTensor` of shape `(num_targets,)`):
            SAM2's object-presence logit of each target.
        seg_embeds (`torch.FloatTensor` of shape `(num_seg_tokens, 256)`):
            Projected ``[SEG]`` embeddings, in reading order over the batch.
        mask_pooled_embeds (`torch.FloatTensor` of shape `(num_targets, 256)`, *optional*):
            SAM2 image embedding averaged over each target's ground-truth mask (for the contrastive loss);
            zero rows where the ground truth is empty (see `target_has_mask`).
        target_has_mask (`torch.BoolTensor` of shape `(num_targets,)`, *optional*):
            Whether each target's ground-truth mask has a foreground pixel.
        target_seg_index (`torch.LongTensor` of shape `(num_targets,)`):
            Row of `seg_embeds` each target was decoded with.
        target_frame_index (`torch.LongTensor` of shape `(num_targets,)`):
            Row of `sam_pixel_values` each target was decoded on.
        seg_sample_index (`torch.LongTensor` of shape `(num_seg_tokens,)`):
            Batch index of each ``[SEG]`` token.
        seg_object_ids (`torch.LongTensor` of shape `(num_seg_tokens,)`, *optional*):
            Object identity of each ``[SEG]`` within its sample, when given (repeated objects share an id).
    """

    loss: torch.FloatTensor | None = None
    lm_loss: torch.FloatTensor | None = None
    mask_bce: torch.FloatTensor | None = None
    mask_dice: torch.FloatTensor | None = None
    prior_loss: torch.FloatTensor | None = None
    iou_loss: torch.FloatTensor | None = None
    object_score_loss: torch.FloatTensor | None = None
    logits: torch.FloatTensor | None = None
    pred_masks: torch.FloatTensor | None = None
    prior_masks: torch.FloatTensor | None = None
    iou_scores: torch.FloatTensor | None = None
    object_score_logits: torch.FloatTensor | None = None
    seg_embeds: torch.FloatTensor | None = None
    mask_pooled_embeds: torch.FloatTensor | None = None
    target_has_mask: torch.BoolTensor | None = None
    target_seg_index: torch.LongTensor | None = None
    target_frame_index: torch.LongTensor | None = None
    seg_sample_index: torch.LongTensor | None = None
    seg_object_ids: torch.LongTensor | None = None


@dataclass
class MaskCMASegmentationOutput(ModelOutput):
    r"""
    Output of [`MaskCMAModel.segment`], one entry per sample of the batch.

    Args:
        answers (`list[str]` or `None`):
            Decoded answers (`None` when the model has no tokenizer attached; see `answer_ids`).
        answer_ids (`list[torch.LongTensor]`):
            Generated token ids of each answer (without the prompt).
        masks (`list[torch.BoolTensor]`):
            Per sample, `(num_objects, height, width)` for an image, `(num_objects, num_frames, height, width)`
            for a video, at the original size; `num_objects` is the number of ``[SEG]`` in the answer (0 is fine).
        scores (`list[torch.FloatTensor]`):
            Per sample, `(num_objects,)`: SAM2's predicted IoU of each mask (mean over key frames for videos).
        mask_logits (`list[torch.FloatTensor]`):
            Per sample, the low-resolution logits `(num_objects, [num_frames,] mask_height, mask_width)`.
    """

    answers: list | None = None
    answer_ids: list | None = None
    masks: list | None = None
    scores: list | None = None
    mask_logits: list | None = None


class LastHiddenStateRecorder:
    r"""Records the last-layer hidden states that the VLM's language model computes while the recorder is open — the
    states of one `generate` call, read without a second forward.

    A forward hook on the language model (`vlm.get_decoder()`) keeps its `last_hidden_state` (what
    `hidden_states[-1]` of a forward with `output_hidden_states=True` holds): `(batch_size, prompt_len, H)` from the
    prefill, then `(batch_size, 1, H)` from every decoding step, the state of the token that step consumed. No other
    layer is kept (`generate(output_hidden_states=True)` would keep every layer of every step until it returns).

    Use as a context manager; `states()` concatenates the recorded calls along the sequence: with greedy or sampled
    decoding and a key/value cache, column `t` is the state of token `t` of `generate`'s output sequence.

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
    - `sam2`: [`MaskCMASam2VideoModel`], transformers' `Sam2VideoModel` (image encoder, prompt encoder, mask decoder,
      memory; same weights and keys) with the conditioning and tracking steps of the video path;
    - `seg_proj`: `Linear(H, H) → ReLU → Linear(H, 256)` on the ``[SEG]`` hidden state;
    - `text_proj`: `Linear(H, 256)` on the prompt's text-token hidden states (the CMA's keys);
    - `cma`: [`VisualToTextAttention`] or [`TextToVisualAttention`] (`cma_config.direction`); `prior_head`:
      [`ConvMaskPriorHead`] when `mask_source="conv"`;
    - `mask_prior` / `propagation_mask_prior`: the [`MaskPrior`] strategies for images and key frames / for frames
      produced by SAM2 propagation (plain attributes, no weights of their own).

    Decoding one target (``[SEG]`` ``s`` on a frame with SAM2 embedding ``F``):
    pass 1 `decoder(F, [no-point pad, s])` → prior ``G``; `F' = cma(F, T ∪ {s}, G)`; pass 2 `decoder(F', …)`.
    With `use_cma=False`, only one pass (the plain Sa2VA path).
    """

    def __init__(self, config: MaskCMAConfig):
        super().__init__(config)
        self.vlm = AutoModelForImageTextToText.from_config(config.vlm_config)
        self.sam2 = MaskCMASam2VideoModel(config.sam2_config)
        hidden_size = config.text_hidden_size
        embed_dim = config.seg_embed_dim
        # checkpoints saved with a trailing `Dropout(0.0)` load unchanged: it held no weights
        self.seg_proj = nn.Sequential(nn.Linear(hidden_size, hidden_size), nn.ReLU(), nn.Linear(hidden_size, embed_dim))
        self.text_proj = nn.Linear(hidden_size, embed_dim)
        self.cma = resolve_cross_modal_attention(config)
        self.prior_head = ConvMaskPriorHead(embed_dim) if config.mask_source == "conv" else None
        self.mask_prior = resolve_mask_prior(config, self._decoder_pass, self._conv_prior_logits)
        self.propagation_mask_prior = resolve_propagation_mask_prior(config, self._conv_prior_logits)
        self.tokenizer = None
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
        Inside the decoder, the IoU head is trained by SAM2's IoU loss and the object-score head by its object-score
        loss; a head whose loss weight is 0 stays frozen (no loss would reach it, and frozen it keeps DDP free of
        unused trainable parameters). The decoder's `conv_s0`/`conv_s1` (projections of the high-resolution
        features) are trained."""
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

    # -- SAM2 features -----------------------------------------------------------------------------------------

    def encode_frames(self, sam_pixel_values: torch.Tensor) -> SamFrameFeatures:
        """Run SAM2's image encoder.

        Args:
            sam_pixel_values (`torch.FloatTensor` of shape `(num_frames, 3, S, S)`): frames resized to SAM2's input
                size S (1024 for released SAM2) and normalised with ImageNet mean/std.

        Returns:
            [`SamFrameFeatures`]: `image_embeddings` `(num_frames, 256, S/16, S/16)` (with SAM2's no-memory
            embedding added, as for a single image) and the decoder-projected high-resolution features
            `(num_frames, 32, S/4, S/4)` and `(num_frames, 64, S/8, S/8)`.
        """
        encoder_trainable = any(p.requires_grad for p in self.sam2.vision_encoder.parameters())
        with torch.set_grad_enabled(torch.is_grad_enabled() and encoder_trainable):
            vision_outputs = self.sam2.vision_encoder(sam_pixel_values, return_dict=True)
        feature_maps = vision_outputs.fpn_hidden_states
        decoder = self.sam2.mask_decoder
        high_res_s0 = decoder.conv_s0(feature_maps[0])
        high_res_s1 = decoder.conv_s1(feature_maps[1])
        no_memory = self.sam2.no_memory_embedding.view(1, -1, 1, 1)
        image_embeddings = feature_maps[-1] + no_memory
        return SamFrameFeatures(image_embeddings=image_embeddings, high_res_features=[high_res_s0, high_res_s1])

    def _conv_prior_logits(self, image_embeddings: torch.Tensor, seg_embeds: torch.Tensor) -> torch.Tensor:
        """`prior_head(image_embeddings, seg_embeds)`, looked up at each call (peft may wrap the head)."""
        return self.prior_head(image_embeddings, seg_embeds)

    # -- one decoder pass -------------------------------------------------------------------------------------

    def _decoder_pass(
        self, image_embeddings: torch.Tensor, high_res_features: list[torch.Tensor], seg_embeds: torch.Tensor
    ) -> SamDecoderOutput:
        """SAM2's mask decoder with the sparse prompt `[no-point pad, s]`, multimask output, best predicted IoU kept
        (`MaskCMASam2VideoModel.decode`).

        Args:
            image_embeddings: `(N, 256, h, w)`; high_res_features: `[(N, 32, 4h, 4w), (N, 64, 2h, 2w)]`;
            seg_embeds: `(N, 256)`.

        Returns:
            [`SamDecoderOutput`]: the chosen mask `(N, 1, 4h, 4w)`, its predicted IoU, the object score, the output
            token, and all candidates.
        """
        seg_embeds = seg_embeds.to(image_embeddings.device)  # SAM2 may sit on another device than the heads
        return self.sam2.decode(image_embeddings, high_res_features, seg_embeds, multimask_output=True)

    def decode_masks(
        self,
        frame_features: SamFrameFeatures,
        seg_embeds: torch.Tensor,
        text_tokens: torch.Tensor,
        text_token_mask: torch.Tensor,
        gt_prior_masks: torch.Tensor | None = None,
    ) -> dict[str, torch.Tensor | None]:
        """Decode one mask per target, with the CMA between two decoder passes.

        Args:
            frame_features (`SamFrameFeatures`): per-target SAM2 features (row i is target i's frame).
            seg_embeds (`torch.FloatTensor` of shape `(num_targets, 256)`).
            text_tokens (`torch.FloatTensor` of shape `(num_targets, num_text_tokens, 256)`).
            text_token_mask (`torch.BoolTensor` of shape `(num_targets, num_text_tokens)`).
            gt_prior_masks (`torch.FloatTensor` of shape `(num_targets, H, W)`, *optional*): ground truth used as the
                prior when `mask_source="gt"` in training.

        Returns:
            dict with `mask_logits` `(N, 1, 4h, 4w)`, `iou_scores` `(N,)`, `prior_logits` `(N, 1, 4h, 4w)` or None,
            and from the final decoder pass `object_score_logits` `(N,)`, `output_tokens` `(N, 256)`,
            `multimask_logits` `(N, M, 4h, 4w)` and `multimask_iou_scores` `(N, M)` (M = 3 candidates). The masks
            are as decoded: the object-presence rule is applied by the inference paths (`apply_object_presence`).
        """
        image_embeddings = frame_features.image_embeddings
        high_res = frame_features.high_res_features
        if image_embeddings.shape[0] == 0:  # no [SEG] in the batch: nothing to decode
            return self._decode_no_target(frame_features, seg_embeds, text_tokens, text_token_mask, gt_prior_masks)
        if not self.config.use_cma:
            final = self._decoder_pass(image_embeddings, high_res, seg_embeds)
            return self._decoded(final, prior_logits=None)

        device = image_embeddings.device
        seg_embeds = seg_embeds.to(device)
        prior = self.mask_prior(  # the ground truth is a prior in training only
            image_embeddings, seg_embeds, high_res_features=high_res, gt_masks=gt_prior_masks if self.training else None
        )
        cma_output = self.cma(
            image_embeddings,
            text_tokens.to(device),
            text_token_mask.to(device),
            seg_embeds,
            prior.embedding_logits.to(device),
        )
        final = self._decoder_pass(cma_output.image_embeddings, high_res, seg_embeds)
        return self._decoded(final, prior.mask_logits)

    @staticmethod
    def _decoded(final: SamDecoderOutput, prior_logits: torch.Tensor | None) -> dict[str, torch.Tensor | None]:
        return {
            "mask_logits": final.mask_logits,
            "iou_scores": final.iou_scores,
            "prior_logits": prior_logits,
            "object_score_logits": final.object_score_logits,
            "output_tokens": final.output_tokens,
            "multimask_logits": final.multimask_logits,
            "multimask_iou_scores": final.multimask_iou_scores,
        }

    def _decode_no_target(self, frame_features, seg_embeds, text_tokens, text_token_mask, gt_prior_masks):
        """Empty outputs for a batch without targets, attached to one zero-input pass through the decoder, the CMA
        and the prior head with weight 0: every trainable module takes part in the graph on every process, as DDP
        with `find_unused_parameters=False` requires (a micro-batch without ``[SEG]`` otherwise skips them)."""
        image_embeddings = frame_features.image_embeddings
        high_res = frame_features.high_res_features

        def one_zero_row(tensor):  # a zero row that stays attached to `tensor`'s graph
            return tensor.new_zeros(1, *tensor.shape[1:]) + 0.0 * tensor.sum()

        num_text = max(text_tokens.shape[1], 1)
        dummy_text = text_tokens.new_zeros(1, num_text, text_tokens.shape[-1]) + 0.0 * text_tokens.sum()
        dummy = self.decode_masks(
            SamFrameFeatures(
                image_embeddings=one_zero_row(image_embeddings), high_res_features=[one_zero_row(f) for f in high_res]
            ),
            one_zero_row(seg_embeds),
            dummy_text,
            torch.ones(1, num_text, dtype=torch.bool, device=dummy_text.device),
            None if gt_prior_masks is None else one_zero_row(gt_prior_masks),
        )
        zero = sum(0.0 * value.float().sum() for value in dummy.values() if value is not None)
        empty = image_embeddings.new_zeros(0, 1, *high_res[0].shape[-2:]) + zero.to(image_embeddings.dtype)
        no_scores = image_embeddings.new_zeros(0)
        return {
            "mask_logits": empty,
            "iou_scores": no_scores,
            "prior_logits": empty if self.config.use_cma else None,
            "object_score_logits": no_scores,
            "output_tokens": image_embeddings.new_zeros(0, image_embeddings.shape[1]),
            "multimask_logits": empty,
            "multimask_iou_scores": image_embeddings.new_zeros(0, 1),
        }

    # -- language side -----------------------------------------------------------------------------------------

    def _prompt_text_mask(
        self,
        input_ids: torch.LongTensor,
        attention_mask: torch.Tensor | None,
        labels: torch.LongTensor | None,
        text_token_mask: torch.Tensor | None,
    ) -> torch.BoolTensor:
        """Which positions are the prompt's text tokens: the processor's `text_token_mask` when given, else every
        attended position that is not an image token, not ``[SEG]``, not a special token and not part of the
        answer (positions with a label)."""
        if text_token_mask is not None:
            return text_token_mask.bool()
        mask = torch.ones_like(input_ids, dtype=torch.bool) if attention_mask is None else attention_mask.bool()
        mask = mask & (input_ids != self.config.image_token_id) & (input_ids != self.config.seg_token_id)
        special_ids = set(self.tokenizer.all_special_ids) if self.tokenizer is not None else set()
        for special_id in special_ids:
            mask = mask & (input_ids != special_id)
        if labels is not None:
            mask = mask & (labels == -100)
        return mask

    def project_text_and_seg(
        self,
        last_hidden_state: torch.Tensor,
        input_ids: torch.LongTensor,
        prompt_text_mask: torch.BoolTensor,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """Project the ``[SEG]`` hidden states and the prompt's text-token hidden states to SAM2's width.

        Args:
            last_hidden_state: `(batch_size, seq_len, H)`; input_ids: `(batch_size, seq_len)`;
            prompt_text_mask: `(batch_size, seq_len)` bool.

        Returns:
            `seg_embeds (num_seg, 256)`, `seg_sample_index (num_seg,)`, `text_tokens (batch_size, T, 256)` and
            `text_token_mask (batch_size, T)` with `T` the largest number of prompt text tokens in the batch.
        """
        if self.config.seg_token_id is None:
            raise ValueError(
                "MaskCMAConfig.seg_token_id is not set; build the model with the tokenizer's [SEG] id "
                "(config.seg_token_id = tokenizer.convert_tokens_to_ids('[SEG]'))"
            )
        seg_embeds, seg_sample_index = self.project_seg_states(
            last_hidden_state, input_ids.to(last_hidden_state.device) == self.config.seg_token_id
        )
        text_tokens, text_token_mask = self.project_text_states(last_hidden_state, prompt_text_mask)
        return seg_embeds, seg_sample_index, text_tokens, text_token_mask

    def project_seg_states(
        self, hidden_states: torch.Tensor, seg_mask: torch.BoolTensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """`seg_proj` of the hidden states at the ``[SEG]`` positions.

        Args:
            hidden_states: `(batch_size, seq_len, H)`; seg_mask: `(batch_size, seq_len)` bool, the ``[SEG]`` positions.

        Returns:
            `seg_embeds (num_seg, 256)` in reading order over the batch (row-major) and `seg_sample_index (num_seg,)`.
        """
        seg_hidden, seg_sample_index = self.gather_seg_states(hidden_states, seg_mask.to(hidden_states.device))
        return self.seg_proj(seg_hidden.to(_module_device(self.seg_proj, seg_hidden.device))), seg_sample_index

    @staticmethod
    def gather_seg_states(
        hidden_states: torch.Tensor, seg_mask: torch.BoolTensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The hidden states at the ``[SEG]`` positions `(num_seg, H)`, in reading order over the batch (row-major),
        and the batch index of each `(num_seg,)`."""
        seg_positions = seg_mask.nonzero(as_tuple=False)  # row-major = reading order
        return hidden_states[seg_positions[:, 0], seg_positions[:, 1]], seg_positions[:, 0]

    def project_text_states(
        self, hidden_states: torch.Tensor, prompt_text_mask: torch.BoolTensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """`text_proj` of the prompt's text-token hidden states, gathered to the front of each row.

        Args:
            hidden_states: `(batch_size, seq_len, H)`; prompt_text_mask: `(batch_size, seq_len)` bool.

        Returns:
            `text_tokens (batch_size, T, 256)` and `text_token_mask (batch_size, T)`, `T` the largest number of prompt
            text tokens in the batch (at least 1).
        """
        gathered, text_token_mask = self.gather_text_states(hidden_states, prompt_text_mask.to(hidden_states.device))
        return self.text_proj(gathered.to(_module_device(self.text_proj, gathered.device))), text_token_mask

    @staticmethod
    def gather_text_states(
        hidden_states: torch.Tensor, prompt_text_mask: torch.BoolTensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The prompt's text-token hidden states moved to the front of each row: `(batch_size, T, H)` and their mask
        `(batch_size, T)`, `T` the largest number of prompt text tokens in the batch (at least 1)."""
        counts = prompt_text_mask.sum(dim=1)
        num_text = max(int(counts.max().item()) if counts.numel() else 0, 1)
        order = torch.argsort((~prompt_text_mask).to(torch.int8), dim=1, stable=True)[:, :num_text]
        gathered = hidden_states.gather(1, order.unsqueeze(-1).expand(-1, -1, hidden_states.shape[-1]))
        return gathered, prompt_text_mask.gather(1, order)

    # -- forward -----------------------------------------------------------------------------------------------

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
        **kwargs,
    ) -> MaskCMAOutput:
        r"""
        Args:
            input_ids (`torch.LongTensor` of shape `(batch_size, seq_len)`):
                Prompt and answer tokens; image placeholders and ``[SEG]`` tokens included.
            attention_mask (`torch.Tensor` of shape `(batch_size, seq_len)`, *optional*).
            pixel_values (`torch.FloatTensor` of shape `(num_tiles, 3, tile, tile)`, *optional*):
                The VLM's image tiles for the whole batch, in sample order.
            sam_pixel_values (`torch.FloatTensor` of shape `(num_frames, 3, S, S)`, *optional*):
                SAM2 inputs; by default one frame per sample (images). Required to decode masks.
            gt_masks (`torch.Tensor` of shape `(num_targets, H, W)`, *optional*):
                Ground-truth masks (any resolution; resized with nearest to the low-resolution mask size).
            labels (`torch.LongTensor` of shape `(batch_size, seq_len)`, *optional*):
                LM labels, -100 where no loss is taken (prompt, image tokens, padding).
            text_token_mask (`torch.BoolTensor` of shape `(batch_size, seq_len)`, *optional*):
                The prompt's text tokens (the CMA's keys); computed from the other inputs when missing.
            target_seg_index (`torch.LongTensor` of shape `(num_targets,)`, *optional*):
                For each target, which ``[SEG]`` (in reading order over the batch) decodes it. Default: target i is
                the i-th ``[SEG]``.
            target_frame_index (`torch.LongTensor` of shape `(num_targets,)`, *optional*):
                For each target, the row of `sam_pixel_values` it is decoded on. Default: the frame of the
                ``[SEG]``'s sample (one frame per sample).
            frame_sample_index (`torch.LongTensor` of shape `(num_frames,)`, *optional*):
                Sample of each SAM2 frame; default `arange(batch_size)`.
            seg_object_ids (`torch.LongTensor` of shape `(num_seg_tokens,)`, *optional*):
                Object identity of each ``[SEG]`` within its sample (passed through for the contrastive loss).
            conditioning_frame_mask (`torch.BoolTensor` of shape `(num_frames,)`, *optional*, in `kwargs`):
                With `config.video_training="propagate"`: False on the frames of a clip that SAM2 propagates from
                its key frames (`video_training.py`); the collator gives it for batches with clips.

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
        last_hidden_state = vlm_outputs.hidden_states[-1]
        prompt_text_mask = self._prompt_text_mask(input_ids, attention_mask, labels, text_token_mask)
        seg_embeds, seg_sample_index, text_tokens, text_mask = self.project_text_and_seg(
            last_hidden_state, input_ids, prompt_text_mask
        )
        output = MaskCMAOutput(
            lm_loss=vlm_outputs.loss,
            logits=vlm_outputs.logits,
            seg_embeds=seg_embeds,
            seg_sample_index=seg_sample_index,
            seg_object_ids=seg_object_ids,
        )
        loss = vlm_outputs.loss

        if sam_pixel_values is not None:
            targets = build_seg_targets(
                seg_sample_index=seg_sample_index,
                batch_size=input_ids.shape[0],
                num_frames=sam_pixel_values.shape[0],
                num_gt_masks=None if gt_masks is None else gt_masks.shape[0],
                target_seg_index=target_seg_index,
                target_frame_index=target_frame_index,
                frame_sample_index=frame_sample_index,
            )
            conditioning_frame_mask = kwargs.get("conditioning_frame_mask")  # video_training="propagate" clips
            if propagates(self.config, conditioning_frame_mask, targets.frame_index):
                decoded = decode_targets_with_propagation(
                    self, sam_pixel_values, targets, seg_embeds, text_tokens, text_mask, gt_masks,
                    conditioning_frame_mask, frame_sample_index,
                )
            else:
                decoded = self._decode_targets(
                    sam_pixel_values, targets, seg_embeds, text_tokens, text_mask, gt_masks
                )
            output.pred_masks = decoded["mask_logits"][:, 0]
            output.iou_scores = decoded["iou_scores"]
            output.object_score_logits = decoded["object_score_logits"]
            output.prior_masks = None if decoded["prior_logits"] is None else decoded["prior_logits"][:, 0]
            output.target_seg_index = targets.seg_index
            output.target_frame_index = targets.frame_index
            if gt_masks is not None:
                mask_losses = self._mask_losses(decoded, gt_masks)
                output.mask_bce, output.mask_dice, output.prior_loss = (
                    mask_losses["bce"], mask_losses["dice"], mask_losses["prior"]
                )
                output.iou_loss, output.object_score_loss = mask_losses["iou"], mask_losses["object_score"]
                output.mask_pooled_embeds = decoded["mask_pooled_embeds"]
                output.target_has_mask = decoded["target_has_mask"]
                mask_total = (
                    self.config.bce_loss_weight * mask_losses["bce"]
                    + self.config.dice_loss_weight * mask_losses["dice"]
                    + self.config.iou_loss_weight * mask_losses["iou"]
                    + self.config.object_score_loss_weight * mask_losses["object_score"]
                )
                if mask_losses["prior"] is not None:
                    mask_total = mask_total + self.config.prior_loss_weight * mask_losses["prior"]
                loss = mask_total if loss is None else loss + mask_total
        elif gt_masks is not None:
            raise ValueError("gt_masks were given without sam_pixel_values: the masks cannot be decoded")
        output.loss = loss
        return output

    def _decode_targets(
        self,
        sam_pixel_values: torch.Tensor,
        targets: SegTargets,
        seg_embeds: torch.Tensor,
        text_tokens: torch.Tensor,
        text_mask: torch.Tensor,
        gt_masks: torch.Tensor | None,
    ) -> dict[str, torch.Tensor | None]:
        frame_features = self.encode_frames(sam_pixel_values.to(self.sam2.device))
        device = frame_features.image_embeddings.device
        target_features = frame_features.select(targets.frame_index.to(device))
        target_samples = targets.sample_index.to(device)
        target_seg = seg_embeds.to(device)[targets.seg_index.to(device)]
        low_res_size = target_features.high_res_features[0].shape[-2:]
        gt_low_res = None
        if gt_masks is not None:
            gt_masks = gt_masks.to(device)
            gt_low_res = F.interpolate(gt_masks[:, None].float(), size=low_res_size, mode="nearest")[:, 0]
        decoded = self.decode_masks(
            target_features,
            target_seg,
            text_tokens.to(device)[target_samples],
            text_mask.to(device)[target_samples],
            gt_low_res,
        )
        if gt_masks is not None:
            embeddings = target_features.image_embeddings
            gt_at_embedding = F.interpolate(gt_masks[:, None].float(), size=embeddings.shape[-2:], mode="nearest")
            area = gt_at_embedding.sum(dim=(2, 3))  # (N, 1)
            pooled = (embeddings * gt_at_embedding).sum(dim=(2, 3)) / area.clamp_min(1.0)
            decoded["mask_pooled_embeds"] = pooled
            decoded["target_has_mask"] = area[:, 0] > 0
            decoded["gt_low_res"] = gt_low_res
        return decoded

    def _mask_losses(self, decoded: dict, gt_masks: torch.Tensor) -> dict[str, torch.Tensor | None]:
        gt_low_res = decoded["gt_low_res"]
        logits = decoded["mask_logits"][:, 0]
        present = object_presence_targets(gt_masks)
        losses = {
            "bce": sigmoid_bce_loss(logits, gt_low_res),
            "dice": dice_loss(logits, gt_low_res),
            "prior": None,
            "iou": iou_prediction_loss(
                decoded["multimask_logits"], decoded["multimask_iou_scores"], gt_low_res, present
            ),
            "object_score": object_score_loss(decoded["object_score_logits"], present),
        }
        if decoded["prior_logits"] is not None:
            prior = decoded["prior_logits"][:, 0]
            losses["prior"] = (
                self.config.bce_loss_weight * sigmoid_bce_loss(prior, gt_low_res)
                + self.config.dice_loss_weight * dice_loss(prior, gt_low_res)
            )
        return losses

    # -- inference ---------------------------------------------------------------------------------------------

    @torch.no_grad()
    def segment(
        self,
        input_ids: torch.LongTensor,
        attention_mask: torch.Tensor | None = None,
        pixel_values: torch.FloatTensor | None = None,
        sam_pixel_values: torch.FloatTensor | None = None,
        original_sizes: torch.LongTensor | None = None,
        text_token_mask: torch.Tensor | None = None,
        max_new_tokens: int = 32,
        mask_threshold: float | None = None,
        video_frames=None,
        **kwargs,
    ) -> MaskCMASegmentationOutput:
        r"""Generate an answer for each prompt and decode every ``[SEG]`` of it into a mask (images) or a mask per
        frame (videos).

        Args:
            input_ids (`torch.LongTensor` of shape `(batch_size, prompt_len)`): left-padded prompts.
            attention_mask (`torch.Tensor` of shape `(batch_size, prompt_len)`, *optional*).
            pixel_values (`torch.FloatTensor` of shape `(num_tiles, 3, tile, tile)`): the VLM's tiles.
            sam_pixel_values (`torch.FloatTensor` of shape `(batch_size, 3, S, S)`): SAM2 inputs, one per sample.
            original_sizes (`torch.LongTensor` of shape `(batch_size, 2)`): `(height, width)` of each image; masks
                are returned at this size (default: SAM2's input size).
            text_token_mask (`torch.BoolTensor` of shape `(batch_size, prompt_len)`, *optional*).
            max_new_tokens (`int`): answer length limit.
            mask_threshold (`float`, *optional*): logit threshold (default `config.mask_threshold`, i.e. 0.5 after
                the sigmoid).
            video_frames (*optional*): a video as a lazy frame source (`len()` and `[i]` → `(3, S, S)` SAM2-ready
                tensor), as the processor returns for `videos=`; or pass `sam_pixel_values` of shape
                `(batch_size, num_frames, 3, S, S)` for short clips. Videos also take `key_frame_indices`
                (`(num_key_frames,)`, the frames the VLM saw), `offload_state_to_cpu`, `bounded_memory`,
                `show_progress` and `answer_ids`; see `video_segmentation.segment_video`.
            kwargs: further generation arguments (e.g. `do_sample`), passed to `generate`.

        Returns:
            [`MaskCMASegmentationOutput`]. Masks are `(num_objects, H, W)` per image and `(num_objects, num_frames,
            H, W)` per video; an answer without ``[SEG]`` gives zero objects.
        """
        if video_frames is not None or (sam_pixel_values is not None and sam_pixel_values.ndim == 5):
            from .video_segmentation import segment_video

            return segment_video(
                self,
                input_ids=input_ids,
                attention_mask=attention_mask,
                pixel_values=pixel_values,
                sam_pixel_values=sam_pixel_values,
                video_frames=video_frames,
                original_sizes=original_sizes,
                text_token_mask=text_token_mask,
                max_new_tokens=max_new_tokens,
                mask_threshold=mask_threshold,
                **kwargs,
            )
        if sam_pixel_values is None:
            raise ValueError("segment() needs sam_pixel_values (the processor's SAM2 input) to decode masks")
        answer = self.generate_answer(input_ids, attention_mask, pixel_values, text_token_mask, max_new_tokens, **kwargs)
        return self.decode_answer_masks(answer, sam_pixel_values, original_sizes, mask_threshold)

    @torch.no_grad()
    def decode_answer_masks(
        self,
        answer: dict,
        sam_pixel_values: torch.FloatTensor,
        original_sizes: torch.LongTensor | None = None,
        mask_threshold: float | None = None,
    ) -> MaskCMASegmentationOutput:
        r"""The image half of `segment()`: SAM2 encodes each image once and every ``[SEG]`` of the answers is decoded
        into a mask (with the CMA).

        Args:
            answer (`dict`): what [`~MaskCMAModel.generate_answer`] returns.
            sam_pixel_values (`torch.FloatTensor` of shape `(batch_size, 3, S, S)`): SAM2 inputs, one per sample.
            original_sizes (`torch.LongTensor` of shape `(batch_size, 2)`, *optional*): mask sizes (default `S×S`).
            mask_threshold (`float`, *optional*): logit threshold (default `config.mask_threshold`).

        Returns:
            [`MaskCMASegmentationOutput`].
        """
        threshold = self.config.mask_threshold if mask_threshold is None else mask_threshold
        batch_size = sam_pixel_values.shape[0]
        sizes = self._original_sizes(original_sizes, batch_size, sam_pixel_values)
        frame_features = self.encode_frames(sam_pixel_values.to(self.sam2.device))
        device = frame_features.image_embeddings.device
        seg_sample_index = answer["seg_sample_index"].to(device)
        decoded = self.decode_masks(
            frame_features.select(seg_sample_index),
            answer["seg_embeds"].to(device),
            answer["text_tokens"].to(device)[seg_sample_index],
            answer["text_token_mask"].to(device)[seg_sample_index],
        )
        # the object-presence rule of every inference path (config.object_presence)
        mask_logits = apply_object_presence(
            decoded["mask_logits"], decoded["object_score_logits"], self.config.object_presence
        )
        masks, scores, logits = [], [], []
        for sample in range(batch_size):
            rows = (seg_sample_index == sample).nonzero(as_tuple=True)[0]
            sample_logits = mask_logits[rows, 0]
            logits.append(sample_logits)
            scores.append(decoded["iou_scores"][rows])
            upsampled = upsample_mask_logits(sample_logits, tuple(sizes[sample]), self.config.mask_intermediate_size)
            masks.append(upsampled > threshold)
        return MaskCMASegmentationOutput(
            answers=answer["answers"], answer_ids=answer["answer_ids"], masks=masks, scores=scores, mask_logits=logits
        )

    def _original_sizes(self, original_sizes, batch_size, sam_pixel_values) -> list[tuple[int, int]]:
        if original_sizes is None:
            size = tuple(sam_pixel_values.shape[-2:])
            return [size] * batch_size
        return [(int(h), int(w)) for h, w in original_sizes.tolist()]

    def generate_answer(
        self,
        input_ids: torch.LongTensor,
        attention_mask: torch.Tensor | None,
        pixel_values: torch.FloatTensor | None,
        text_token_mask: torch.Tensor | None,
        max_new_tokens: int,
        **generate_kwargs,
    ) -> dict:
        """Generate the answers and read, from that same generation, the last-layer hidden states at every ``[SEG]``
        of the answers and at the prompt's text tokens: one VLM pass, the vision tower runs once.

        The prefill computes the prompt's states; each decoding step computes the state of the token it consumes
        (a [`LastHiddenStateRecorder`] keeps them, last layer only). The last generated token is never consumed, so
        when it is a ``[SEG]`` (the answer hit `max_new_tokens`), one more decoding step runs over it with the
        generation's key/value cache. The states equal those of a teacher-forced forward over prompt + answer
        (the training computation) with generate's position ids.

        Greedy and sampled decoding are supported; beam search, several sequences per prompt and assisted decoding
        are not (their per-step states do not follow the returned sequences) and raise a `ValueError`.

        Returns a dict with `answers` (list of str, or None without tokenizer), `answer_ids` (list of 1-D tensors),
        `seg_embeds` `(num_seg, 256)`, `seg_sample_index` `(num_seg,)`, `text_tokens` `(batch, T, 256)`,
        `text_token_mask` `(batch, T)`, and the last-layer states they were projected from, `seg_hidden_states`
        `(num_seg, H)` and `text_hidden_states` `(batch, T, H)`.
        """
        self._check_one_pass_generation(generate_kwargs)
        if self.config.seg_token_id is None:
            raise ValueError(
                "MaskCMAConfig.seg_token_id is not set; build the model with the tokenizer's [SEG] id "
                "(config.seg_token_id = tokenizer.convert_tokens_to_ids('[SEG]'))"
            )
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        prompt_len = input_ids.shape[1]
        pad_id = self._pad_token_id()
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
            answer_ids = sequences[:, prompt_len:]
            answer_mask = self._answer_mask(answer_ids)
            seg_mask = (answer_ids == self.config.seg_token_id) & answer_mask
            seg_is_last = answer_ids.shape[1] > 0 and bool(seg_mask[:, -1].any())
            if seg_is_last:
                self._decode_last_token(sequences, attention_mask, generated, pad_id)
            del generated  # the key/value cache
        states = recorder.states()
        recorder.chunks.clear()
        consumed = sequences.shape[1] - (0 if seg_is_last else 1)
        if states.shape[1] != consumed:
            raise RuntimeError(
                f"generate computed states for {states.shape[1]} positions, expected {consumed} (prompt {prompt_len} + "
                f"answer {answer_ids.shape[1]}{'' if seg_is_last else ' - 1'}): the generation did not run one "
                "prefill and one cached step per token; segment() supports greedy or sampled decoding with a cache"
            )
        answer_states = states[:, prompt_len:]
        seg_hidden, seg_sample_index = self.gather_seg_states(answer_states, seg_mask[:, : answer_states.shape[1]])
        if text_token_mask is None:
            prompt_mask = self._prompt_text_mask(input_ids, attention_mask, None, None)
        else:
            prompt_mask = text_token_mask.bool()
        text_hidden, text_mask = self.gather_text_states(states[:, :prompt_len], prompt_mask)
        seg_embeds, text_tokens = self.seg_proj(seg_hidden), self.text_proj(text_hidden)
        kept_ids = [row[mask] for row, mask in zip(answer_ids, answer_mask)]
        answers = None
        if self.tokenizer is not None:
            answers = [self.tokenizer.decode(ids, skip_special_tokens=False) for ids in kept_ids]
            answers = [self._strip_answer(text) for text in answers]
        if seg_embeds.shape[0] == 0:
            logger.warning("the answer contains no [SEG] token: no mask is returned")
        return {
            "answers": answers,
            "answer_ids": kept_ids,
            "seg_embeds": seg_embeds,
            "seg_sample_index": seg_sample_index,
            "text_tokens": text_tokens,
            "text_token_mask": text_mask,
            "seg_hidden_states": seg_hidden,
            "text_hidden_states": text_hidden,
        }

    def _answer_mask(self, answer_ids: torch.LongTensor) -> torch.BoolTensor:
        """`(batch, answer_len)`: the answer's tokens up to and including the first end-of-sequence token (after it
        generate pads the finished rows)."""
        eos_ids = self._eos_token_ids()
        is_eos = torch.isin(answer_ids, torch.tensor(eos_ids, device=answer_ids.device, dtype=answer_ids.dtype))
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

    def _decode_last_token(
        self, sequences: torch.LongTensor, prompt_attention_mask: torch.Tensor, generated, pad_id: int
    ) -> None:
        """One more decoding step over the last generated token, continuing from the generation's key/value cache
        (generate only processes the token the cache lacks); the open recorder keeps its state. The token this step
        would add is discarded."""
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

    def _strip_answer(self, text: str) -> str:
        for token in (self.tokenizer.eos_token, self.tokenizer.pad_token, "<|im_end|>"):
            if token:
                text = text.replace(token, "")
        return text.strip()

    def _pad_token_id(self) -> int:
        text_config = self.config.vlm_config.get_text_config()
        pad = getattr(text_config, "pad_token_id", None)
        if pad is None and self.tokenizer is not None:
            pad = self.tokenizer.pad_token_id
        return 0 if pad is None else int(pad)

    def _eos_token_ids(self) -> list[int]:
        eos = self.vlm.generation_config.eos_token_id
        if eos is None:
            eos = self.config.vlm_config.get_text_config().eos_token_id
        if eos is None and self.tokenizer is not None:
            eos = self.tokenizer.eos_token_id
        if eos is None:
            return []
        return list(eos) if isinstance(eos, (list, tuple)) else [int(eos)]

    # -- building and loading ----------------------------------------------------------------------------------

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, *model_args, **kwargs):
        """Load a saved MaskCMA model strictly: any missing or unexpected weight raises a `ValueError` that names
        the keys (see docs/design_notes.md, "Strict loading"). The tokenizer saved beside the
        weights, when present, is attached so that `segment()` returns decoded answers."""
        wants_info = kwargs.pop("output_loading_info", False)
        model, loading_info = super().from_pretrained(
            pretrained_model_name_or_path, *model_args, output_loading_info=True, **kwargs
        )
        problems = {
            kind: sorted(loading_info.get(kind) or [])
            for kind in ("missing_keys", "unexpected_keys", "mismatched_keys")
            if loading_info.get(kind)
        }
        if problems:
            details = "; ".join(f"{kind}: {keys}" for kind, keys in problems.items())
            raise ValueError(
                f"the checkpoint at {pretrained_model_name_or_path!r} does not match MaskCMAModel ({details}). "
                "Every weight must load: re-export the model with `maskcma export`, or convert foreign checkpoints "
                "with `maskcma convert`."
            )
        tokenizer_kwargs = {k: kwargs[k] for k in ("revision", "token", "cache_dir", "local_files_only") if k in kwargs}
        trust_remote_code = kwargs.get("trust_remote_code")
        tokenizer_file = cached_file(
            pretrained_model_name_or_path,
            "tokenizer_config.json",
            _raise_exceptions_for_missing_entries=False,
            **tokenizer_kwargs,
        )
        if tokenizer_file is not None:
            model.tokenizer = AutoTokenizer.from_pretrained(
                os.path.dirname(tokenizer_file), trust_remote_code=trust_remote_code
            )
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
        missing and the VLM's embeddings are resized to the tokenizer.

        VLM and SAM2 checkpoints given by name are loaded strictly: a weight the model expects but the checkpoint
        lacks (which transformers would fill with random values), one the checkpoint holds but the model does not
        use, or one of another shape is a `ValueError` naming the checkpoint and the keys.

        One dtype: the VLM, SAM2, the heads and the CMA all end in `dtype` (`torch_dtype=` is accepted as its old
        name). `dtype=None` loads named checkpoints in torch's default dtype (float32) and keeps a given VLM's dtype;
        `dtype="auto"` takes the VLM checkpoint's saved dtype. Models passed in are cast in place.

        Memory: the VLM and SAM2 are loaded once and become the submodules themselves (no second copy is built and
        filled); the new heads are built on the meta device and materialised on SAM2's device.
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
            problems = {
                "missing": sorted(info.get("missing_keys") or []),
                "unexpected": sorted(info.get("unexpected_keys") or []),
                "mismatched": sorted(str(entry[0]) for entry in info.get("mismatched_keys") or []),
            }
            if any(problems.values()):
                listed = "; ".join(
                    f"{kind} keys ({len(keys)}): {', '.join(keys[:10])}{' ...' if len(keys) > 10 else ''}"
                    for kind, keys in problems.items()
                    if keys
                )
                raise ValueError(
                    f"the {what} checkpoint {str(name)!r} does not match {type(loaded).__name__}: {listed}. Pass a "
                    f"complete {what} checkpoint of a supported architecture (or a model you loaded yourself)"
                )
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
        config = MaskCMAConfig(
            vlm_config=vlm.config, sam2_config=sam2.config, seg_token_id=seg_token_id, **config_overrides
        )
        # Build on the meta device (nothing allocated), then use the loaded VLM and SAM2 as the submodules and
        # materialise only the new heads. post_init's weight initialisation is `_init_weights`, applied below.
        with torch.device("meta"):
            model = cls(config)
        model.vlm = vlm
        model.sam2 = sam2
        head_device = next(sam2.parameters()).device
        for name, module in model.named_children():
            if name in ("vlm", "sam2"):
                continue
            module.to_empty(device=head_device)
            module.apply(model._init_weights)
            module.to(dtype=target_dtype)
        model.config.dtype = target_dtype
        still_meta = [name for name, tensor in model.state_dict().items() if tensor.device.type == "meta"]
        if still_meta:
            raise RuntimeError(f"from_pretrained_parts left tensors on the meta device: {still_meta[:10]}")
        model.apply_default_freezing()
        model.tokenizer = tokenizer
        return model


__all__ = [
    "LastHiddenStateRecorder",
    "MaskCMAModel",
    "MaskCMAPreTrainedModel",
    "MaskCMAOutput",
    "MaskCMASegmentationOutput",
]
