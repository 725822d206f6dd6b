"""The mask prior ``G`` that gates the CMA, as strategy objects shared by the image and video paths: predicted
(`"pred"`), conv head (`"conv"`), ground truth (`"gt"`) and previous frame (frames produced by SAM2 propagation).
The model picks one when it is built ([`resolve_mask_prior`], [`resolve_propagation_mask_prior`]); all are called
the same way and return a [`MaskPriorOutput`].

This file imports only torch and transformers (it is copied flat into Hub repositories as remote code).
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from transformers.utils import ModelOutput

from .configuration_maskcma import MaskCMAConfig
from .mask_decoding import SamDecoderOutput

# `decoder_pass(image_embeddings (N, D, h, w), high_res_features, seg_embeds (N, D))`
#     → `SamDecoderOutput` (its `mask_logits` are `(N, 1, 4h, 4w)`)
DecoderPass = Callable[[torch.Tensor, list, torch.Tensor], SamDecoderOutput]
# `conv_head(image_embeddings (N, D, h, w), seg_embeds (N, D))` → prior logits `(N, 1, h, w)`
ConvHead = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


@dataclass
class MaskPriorOutput(ModelOutput):
    """
    Args:
        embedding_logits (`torch.FloatTensor` of shape `(num_objects, 1, height, width)`):
            The prior ``G`` as logits at the image embedding's resolution: the CMA's gate input.
        mask_logits (`torch.FloatTensor` of shape `(num_objects, 1, mask_height, mask_width)`, *optional*):
            The prior at the low-resolution mask size (4× the embedding), when the strategy predicts one (decoder
            pass or conv head): returned as `prior_masks` and supervised by the prior loss. `None` for the ground
            truth and the previous frame.
    """

    embedding_logits: torch.Tensor
    mask_logits: torch.Tensor | None = None


class ConvMaskPriorHead(nn.Module):
    """The paper's mask prior: two 1×1 convolutions over SAM2's image embedding concatenated with the object's
    ``[SEG]`` embedding broadcast to every position.

    Input `(num_objects, embed_dim, h, w)` and `(num_objects, embed_dim)`; output prior logits `(num_objects, 1, h, w)`.
    """

    def __init__(self, embed_dim: int = 256):
        super().__init__()
        self.conv1 = nn.Conv2d(2 * embed_dim, embed_dim, kernel_size=1)
        self.activation = nn.ReLU()
        self.conv2 = nn.Conv2d(embed_dim, 1, kernel_size=1)

    def forward(self, image_embeddings: torch.Tensor, seg_embeds: torch.Tensor) -> torch.Tensor:
        height, width = image_embeddings.shape[-2:]
        seg_map = seg_embeds[:, :, None, None].expand(-1, -1, height, width)
        hidden = self.activation(self.conv1(torch.cat([image_embeddings, seg_map.to(image_embeddings.dtype)], dim=1)))
        return self.conv2(hidden)


@functools.lru_cache(maxsize=64)
def _antialias_weights(in_size: int, out_size: int, device: torch.device) -> torch.Tensor:
    """The `(out_size, in_size)` float32 matrix of a 1-D bilinear anti-aliased resize: row `i` holds the weights of
    output sample `i`. Computed on the CPU (the resize of each unit vector by torch's anti-aliased kernel, forward
    only, in float32) and moved to `device` once per size and device (cached: no copy to the accelerator in the hot
    path), so no accelerator needs that kernel."""
    with torch.inference_mode(False), torch.no_grad():  # a plain tensor, usable in training after an inference call
        # the unit vectors as rows (1 × in images): torch's 2-D kernel resizes both axes with these horizontal weights
        unit_vectors = torch.eye(in_size, dtype=torch.float32).view(in_size, 1, 1, in_size)
        resized = F.interpolate(unit_vectors, size=(1, out_size), mode="bilinear", antialias=True)  # (in, 1, 1, out)
        return resized[:, 0, 0, :].transpose(0, 1).contiguous().to(device)


def antialiased_resize(logits: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Bilinear, anti-aliased resize of `(N, C, H, W)` to `(N, C, *size)`, in float32 (returned in float32).

    It equals `F.interpolate(logits.float(), size, mode="bilinear", antialias=True)` (the kernel is separable), but
    runs as two matrix products with the 1-D weight matrices (built on the CPU): the anti-aliased `F.interpolate` has
    no bfloat16/float16 kernel on CPU (and no kernel on MPS in older torch), and its CUDA backward is not deterministic
    (`torch.use_deterministic_algorithms(True)`, i.e. the Trainer's `full_determinism`, raises there), while matrix
    products are deterministic in both directions on every device. The gradient flows to `logits`.
    """
    height, width = (int(v) for v in size)
    weights_h = _antialias_weights(logits.shape[-2], height, logits.device)  # (h, H)
    weights_w = _antialias_weights(logits.shape[-1], width, logits.device)  # (w, W)
    return weights_h @ logits.float() @ weights_w.transpose(0, 1)


def logits_at_embedding(mask_logits: torch.Tensor, image_embeddings: torch.Tensor) -> torch.Tensor:
    """Mask logits `(N, 1, H, W)` resized (bilinear, antialiased, in float32) to the embedding's `(h, w)`:
    `(N, 1, h, w)` in float32 (the CMA computes its gate in float32)."""
    return antialiased_resize(mask_logits, image_embeddings.shape[-2:])


class MaskPrior:
    """Base of the strategies. Call with the targets' SAM2 embedding and ``[SEG]`` embeddings (and, per strategy,
    the high-resolution features, the ground truth or the previous frame's logits)."""

    def __call__(
        self,
        image_embeddings: torch.Tensor,
        seg_embeds: torch.Tensor,
        high_res_features: list[torch.Tensor] | None = None,
        gt_masks: torch.Tensor | None = None,
        previous_mask_logits: torch.Tensor | None = None,
    ) -> MaskPriorOutput:
        """
        Args:
            image_embeddings (`torch.FloatTensor` of shape `(num_objects, embed_dim, h, w)`): SAM2's embedding.
            seg_embeds (`torch.FloatTensor` of shape `(num_objects, embed_dim)`): the ``[SEG]`` embeddings.
            high_res_features (`list[torch.FloatTensor]`, *optional*): the decoder's `(N, 32, 4h, 4w)` and
                `(N, 64, 2h, 2w)` features (predicted and conv-head priors).
            gt_masks (`torch.FloatTensor` of shape `(num_objects, H, W)`, *optional*): ground truth in {0, 1}, given
                in training only (ground-truth prior).
            previous_mask_logits (`torch.FloatTensor` of shape `(num_objects, 1, H, W)`, *optional*): the objects'
                mask logits on the previous frame (previous-frame prior).
        """
        raise NotImplementedError(f"{type(self).__name__} must implement __call__")


class PredictedMaskPrior(MaskPrior):
    """``G`` from a first SAM2 decoder pass with the ``[SEG]`` prompt (the research code's prior).

    Args:
        decoder_pass (`Callable`): the model's decoder pass, `(image_embeddings, high_res_features, seg_embeds)` →
            a `SamDecoderOutput` whose `mask_logits` are `(N, 1, 4h, 4w)`.
    """

    def __init__(self, decoder_pass: DecoderPass):
        self.decoder_pass = decoder_pass

    def __call__(self, image_embeddings, seg_embeds, high_res_features=None, gt_masks=None, previous_mask_logits=None):
        if high_res_features is None:
            raise ValueError("the predicted mask prior needs the high-resolution features for its decoder pass")
        mask_logits = self.decoder_pass(image_embeddings, high_res_features, seg_embeds).mask_logits
        return MaskPriorOutput(
            embedding_logits=logits_at_embedding(mask_logits, image_embeddings), mask_logits=mask_logits
        )


class ConvHeadMaskPrior(MaskPrior):
    """``G`` from the [`ConvMaskPriorHead`] (the paper's prior); `mask_logits` is ``G`` upsampled (bilinear) to the
    low-resolution mask size, 4× the embedding.

    Args:
        conv_head (`Callable`): runs the model's [`ConvMaskPriorHead`], looked up at each call (the weights live in
            the model, and peft may wrap the module).
    """

    def __init__(self, conv_head: ConvHead):
        self.conv_head = conv_head

    def __call__(self, image_embeddings, seg_embeds, high_res_features=None, gt_masks=None, previous_mask_logits=None):
        embedding_logits = self.conv_head(image_embeddings, seg_embeds)
        mask_size = tuple(4 * size for size in image_embeddings.shape[-2:])
        mask_logits = F.interpolate(embedding_logits, size=mask_size, mode="bilinear")
        return MaskPriorOutput(embedding_logits=embedding_logits, mask_logits=mask_logits)


class GroundTruthMaskPrior(MaskPrior):
    """``G`` from the ground truth: the logit of the foreground fraction of each embedding cell (clamped to
    [1e-6, 1 − 1e-6]). Without ground truth (inference), the `fallback` strategy decides.

    Args:
        fallback ([`MaskPrior`]): used when `gt_masks` is `None` (a [`PredictedMaskPrior`] in the model).
    """

    def __init__(self, fallback: MaskPrior):
        self.fallback = fallback

    def __call__(self, image_embeddings, seg_embeds, high_res_features=None, gt_masks=None, previous_mask_logits=None):
        if gt_masks is None:
            return self.fallback(image_embeddings, seg_embeds, high_res_features=high_res_features)
        fraction = F.interpolate(gt_masks[:, None].float(), size=image_embeddings.shape[-2:], mode="area")
        embedding_logits = torch.logit(fraction.clamp(1e-6, 1 - 1e-6)).to(image_embeddings.dtype)
        return MaskPriorOutput(embedding_logits=embedding_logits)


class PreviousFrameMaskPrior(MaskPrior):
    """``G`` from the object's mask logits on the previous frame in propagation order (no extra decoder pass),
    resized like the predicted prior."""

    def __call__(self, image_embeddings, seg_embeds, high_res_features=None, gt_masks=None, previous_mask_logits=None):
        if previous_mask_logits is None:
            raise ValueError(
                "the previous-frame mask prior needs previous_mask_logits (the objects' mask logits on the frame "
                "before in propagation order)"
            )
        return MaskPriorOutput(embedding_logits=logits_at_embedding(previous_mask_logits, image_embeddings))


def resolve_mask_prior(config: MaskCMAConfig, decoder_pass: DecoderPass, conv_head: ConvHead) -> MaskPrior:
    """The strategy of `config.mask_source` for key frames and images."""
    if config.mask_source == "conv":
        return ConvHeadMaskPrior(conv_head)
    predicted = PredictedMaskPrior(decoder_pass)
    return GroundTruthMaskPrior(fallback=predicted) if config.mask_source == "gt" else predicted


def resolve_propagation_mask_prior(config: MaskCMAConfig, conv_head: ConvHead) -> MaskPrior:
    """The strategy for frames produced by SAM2 memory propagation: the conv head with `mask_source="conv"`, the
    previous frame's mask otherwise."""
    return ConvHeadMaskPrior(conv_head) if config.mask_source == "conv" else PreviousFrameMaskPrior()
