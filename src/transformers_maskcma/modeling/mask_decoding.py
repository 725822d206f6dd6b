"""Small pieces shared by the image and video decoding paths: per-frame SAM2 features, mask losses and the
upsampling of low-resolution mask logits to the original image size. Imports only torch."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F


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
