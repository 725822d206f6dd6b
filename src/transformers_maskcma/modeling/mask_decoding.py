"""Small pieces shared by the image and video decoding paths: per-frame SAM2 features, one decoder pass's outputs,
the object-presence rule, the mask losses, SAM2's losses for its IoU and object-score heads, and the upsampling of
low-resolution mask logits to the original image size. Imports only torch and transformers."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F
from transformers.models.sam2_video.modeling_sam2_video import NO_OBJ_SCORE
from transformers.utils import ModelOutput


@dataclass
class SamFrameFeatures:
    """SAM2 image-encoder outputs for a set of frames (or targets).

    Args:
        image_embeddings (`torch.FloatTensor` of shape `(num_frames, 256, h, w)`): the lowest-resolution FPN level
            plus SAM2's no-memory embedding (64×64 for 1024-px inputs).
        high_res_features (`list[torch.FloatTensor]`): the two higher-resolution levels after the mask decoder's
            1×1 projections, `(num_frames, 32, 4h, 4w)` and `(num_frames, 64, 2h, 2w)`.
    """

    image_embeddings: torch.Tensor
    high_res_features: list[torch.Tensor]

    def select(self, index: torch.LongTensor) -> SamFrameFeatures:
        """Rows `index` (e.g. one row per target, repeating a frame for each of its objects)."""
        return SamFrameFeatures(
            image_embeddings=self.image_embeddings.index_select(0, index),
            high_res_features=[features.index_select(0, index) for features in self.high_res_features],
        )


@dataclass
class SamDecoderOutput(ModelOutput):
    """One multimask pass of SAM2's mask decoder, with the mask of highest predicted IoU chosen for each target.

    Args:
        mask_logits (`torch.FloatTensor` of shape `(num_targets, 1, h, w)`): the chosen mask's low-resolution logits.
        iou_scores (`torch.FloatTensor` of shape `(num_targets,)`): its predicted IoU.
        object_score_logits (`torch.FloatTensor` of shape `(num_targets,)`): SAM2's object-presence logit.
        output_tokens (`torch.FloatTensor` of shape `(num_targets, 256)`): the chosen mask's output token (SAM2's
            video memory turns it into the object pointer).
        multimask_logits (`torch.FloatTensor` of shape `(num_targets, num_masks, h, w)`): every candidate mask.
        multimask_iou_scores (`torch.FloatTensor` of shape `(num_targets, num_masks)`): their predicted IoUs.
        prior_logits (`torch.FloatTensor` of shape `(num_targets, 1, h, w)`, *optional*): the mask prior of the CMA
            that ran before this pass (`MaskCMAModel.decode_masks`), when it was predicted.
    """

    mask_logits: Optional[torch.FloatTensor] = None
    iou_scores: Optional[torch.FloatTensor] = None
    object_score_logits: Optional[torch.FloatTensor] = None
    output_tokens: Optional[torch.FloatTensor] = None
    multimask_logits: Optional[torch.FloatTensor] = None
    multimask_iou_scores: Optional[torch.FloatTensor] = None
    prior_logits: Optional[torch.FloatTensor] = None

    @classmethod
    def choose_best(
        cls,
        multimask_logits: torch.Tensor,
        multimask_iou_scores: torch.Tensor,
        output_tokens: torch.Tensor,
        object_score_logits: torch.Tensor,
    ) -> SamDecoderOutput:
        """Keep, for each target, the candidate with the highest predicted IoU (SAM2's rule).

        Args:
            multimask_logits: `(N, M, h, w)`; multimask_iou_scores: `(N, M)`; output_tokens: `(N, M, C)`;
            object_score_logits: `(N,)` or `(N, 1)`.
        """
        rows = torch.arange(multimask_logits.shape[0], device=multimask_logits.device)
        best = multimask_iou_scores.float().argmax(dim=-1)  # float32; a tie keeps the first candidate in any dtype
        return cls(
            mask_logits=multimask_logits[rows, best].unsqueeze(1),
            iou_scores=multimask_iou_scores[rows, best],
            object_score_logits=object_score_logits.reshape(-1),
            output_tokens=output_tokens[rows, best],
            multimask_logits=multimask_logits,
            multimask_iou_scores=multimask_iou_scores,
        )


#: `MaskCMAConfig.object_presence` values: keep the decoded mask (Sa2VA), or blank it where SAM2 sees no object.
OBJECT_PRESENCE_KEEP = "keep"
OBJECT_PRESENCE_BLANK = "blank"


def low_res_targets(gt_masks: torch.Tensor, features: SamFrameFeatures) -> torch.Tensor:
    """Ground-truth masks `(num_targets, H, W)` at the decoder's low resolution `(num_targets, 4h, 4w)` (nearest), the
    size of `SamDecoderOutput.mask_logits`."""
    low_res_size = features.high_res_features[0].shape[-2:]
    return F.interpolate(gt_masks[:, None].float(), size=low_res_size, mode="nearest")[:, 0]


def apply_object_presence(mask_logits: torch.Tensor, object_score_logits: torch.Tensor, rule: str) -> torch.Tensor:
    """The object-presence rule, the same on images, key frames and propagated frames.

    Args:
        mask_logits (`torch.FloatTensor` of shape `(num_targets, ...)`): decoded mask logits.
        object_score_logits (`torch.FloatTensor` with `num_targets` elements): SAM2's object-presence logits.
        rule (`str`): `"keep"` returns the logits unchanged (Sa2VA); `"blank"` replaces the mask of every target
            whose logit is <= 0 by SAM2's no-object score (-1024 everywhere: an empty mask), as SAM2 does.

    Returns:
        `torch.FloatTensor` of the shape of `mask_logits`.
    """
    if rule == OBJECT_PRESENCE_KEEP:
        return mask_logits
    if rule != OBJECT_PRESENCE_BLANK:
        raise ValueError(
            f"object_presence={rule!r} is not valid; use {OBJECT_PRESENCE_KEEP!r} or {OBJECT_PRESENCE_BLANK!r}"
        )
    present = object_score_logits.reshape(-1, *([1] * (mask_logits.ndim - 1))) > 0
    return torch.where(present, mask_logits, NO_OBJ_SCORE)


def binary_mask_iou(mask_logits: torch.Tensor, gt_masks: torch.Tensor) -> torch.Tensor:
    """The actual IoU of predicted masks (logit > 0) with the ground truth (value > 0.5), 0 where both are empty.

    Args:
        mask_logits: `(..., H, W)`; gt_masks: broadcastable to it, values in [0, 1].

    Returns:
        `(...)` float IoUs (no gradient).
    """
    predicted = (mask_logits > 0).flatten(-2)
    target = (gt_masks > 0.5).expand_as(mask_logits).flatten(-2)
    intersection = (predicted & target).sum(-1).float()
    union = (predicted | target).sum(-1).float()
    return intersection / union.clamp_min(1.0)


def object_presence_targets(gt_masks: torch.Tensor) -> torch.BoolTensor:
    """Whether each target's object is present: its ground truth has a foreground pixel.

    Args:
        gt_masks: `(N, H, W)` at any resolution (the full-resolution masks, so that small objects count).
    """
    return (gt_masks.flatten(1) > 0).any(dim=1)


def iou_prediction_loss(
    multimask_logits: torch.Tensor,
    multimask_iou_scores: torch.Tensor,
    gt_masks: torch.Tensor,
    object_present: torch.Tensor,
) -> torch.Tensor:
    """SAM2's loss for its IoU head: the L1 distance between the predicted IoU of *every* candidate mask and its
    actual IoU with the ground truth (`binary_mask_iou`), averaged over the candidates, counted only for targets
    whose object is present, and divided by the number of all targets (SAM2's `iou_loss` with
    `iou_use_l1_loss=True, supervise_all_iou=True`).

    Args:
        multimask_logits: `(N, M, h, w)`; multimask_iou_scores: `(N, M)`; gt_masks: `(N, h, w)` in [0, 1] at the
        logits' resolution; object_present: `(N,)` bool (`object_presence_targets`).
    """
    if multimask_logits.shape[0] == 0:
        return multimask_iou_scores.sum() * 0.0
    actual = binary_mask_iou(multimask_logits.detach(), gt_masks[:, None])
    per_target = (multimask_iou_scores.float() - actual).abs().mean(dim=-1)
    return (per_target * object_present.float()).sum() / multimask_logits.shape[0]


def object_score_loss(object_score_logits: torch.Tensor, object_present: torch.Tensor) -> torch.Tensor:
    """SAM2's loss for its object-score head: binary cross-entropy between the logit and whether the object is
    present (SAM2's focal loss with gamma 0 and no alpha, i.e. plain BCE), averaged over targets.

    Args:
        object_score_logits: `(N,)`; object_present: `(N,)` bool (`object_presence_targets`).
    """
    if object_score_logits.shape[0] == 0:
        return object_score_logits.sum() * 0.0
    return F.binary_cross_entropy_with_logits(object_score_logits.float(), object_present.float())


def sigmoid_bce_loss(mask_logits: torch.Tensor, gt_masks: torch.Tensor) -> torch.Tensor:
    """Per-pixel binary cross-entropy, averaged over pixels and targets.

    Args:
        mask_logits: `(num_targets, H, W)`; gt_masks: `(num_targets, H, W)` in {0, 1}.
    """
    if mask_logits.shape[0] == 0:
        return mask_logits.sum() * 0.0
    return F.binary_cross_entropy_with_logits(mask_logits.float(), gt_masks.float())


def dice_loss(mask_logits: torch.Tensor, gt_masks: torch.Tensor, smooth: float = 1.0) -> torch.Tensor:
    """``1 − (2·Σ p·g + smooth) / (Σ p + Σ g + smooth)`` per target with ``p = sigmoid(logits)``, averaged over
    targets.

    Args:
        mask_logits: `(num_targets, H, W)`; gt_masks: `(num_targets, H, W)` in {0, 1}.
    """
    if mask_logits.shape[0] == 0:
        return mask_logits.sum() * 0.0
    probs = mask_logits.float().sigmoid().flatten(1)
    targets = gt_masks.float().flatten(1)
    numerator = 2.0 * (probs * targets).sum(dim=1) + smooth
    denominator = probs.sum(dim=1) + targets.sum(dim=1) + smooth
    return (1.0 - numerator / denominator).mean()


def upsample_mask_logits(
    mask_logits: torch.Tensor, size: tuple[int, int], intermediate_size: int | None = None
) -> torch.Tensor:
    """Bilinear upsampling of low-resolution logits `(..., h, w)` to `(..., height, width)`.

    SAM2's input is a plain resize of the whole image (no padding), so the low-resolution mask covers the image
    exactly and one interpolation maps it back.

    Args:
        mask_logits: `(..., h, w)` logits (e.g. SAM2's 256×256 masks).
        size: `(height, width)` of the output.
        intermediate_size (`int`, *optional*): when set, the logits are first upsampled to `intermediate_size`² and
            then to `size`, two bilinear steps (`MaskCMAConfig.mask_intermediate_size`; Sa2VA's chain
            256² → 1024² → image size). `None`: one step.

    Returns:
        `torch.FloatTensor` of shape `(..., height, width)`.
    """
    leading = mask_logits.shape[:-2]
    flat = mask_logits.reshape(-1, 1, *mask_logits.shape[-2:]).float()
    if flat.shape[0] == 0:
        return mask_logits.new_zeros(*leading, *size, dtype=torch.float32)
    if intermediate_size is not None:
        flat = F.interpolate(
            flat, size=(int(intermediate_size), int(intermediate_size)), mode="bilinear", align_corners=False
        )
    upsampled = F.interpolate(flat, size=tuple(int(v) for v in size), mode="bilinear", align_corners=False)
    return upsampled.reshape(*leading, *upsampled.shape[-2:])
