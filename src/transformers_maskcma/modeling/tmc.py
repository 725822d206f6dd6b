"""The symmetric text–mask contrastive (TMC) loss (docs/training.md, "The symmetric TMC loss").

For every ``[SEG]`` token of a batch whose object is visible in at least one of its targets:

- the text side is ``t = normalize(s)``, with ``s`` the projected ``[SEG]`` embedding (`seg_proj` output);
- the visual side is ``v = normalize(mean_f pooled_f)``: SAM2's image embedding averaged over the object's
  ground-truth mask (resized to the embedding grid) on each frame ``f`` the ``[SEG]`` is decoded on, then averaged
  over those frames. An image target has one frame; a video ``[SEG]`` averages its frames, so a video object is one
  row, not one row per frame (frames where the object is absent — an empty mask — are left out of the average).

With ``logits[i, j] = <v_i, t_j> / τ`` the loss is the symmetric InfoNCE
``0.5 · (CE(logits, i) + CE(logitsᵀ, i))`` averaged over the rows. Rows are grouped by (sample, object id): two
``[SEG]`` tokens of the same object in the same sample (a repeated object) are both positives of their own row and
are never used as negatives of each other — their entries are removed from both softmaxes, the diagonal stays.

The loss needs at least two distinct (sample, object) groups; with fewer it is 0 (the output says it was skipped,
and `MaskCMATrainer` logs how often that happened). `MaskCMAModel.forward` computes it whenever it gets `gt_masks`.
Imports only torch.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass
class TMCOutput:
    """
    Args:
        loss (`torch.FloatTensor` of shape `()`): the symmetric InfoNCE loss (0 when skipped).
        num_rows (`int` or `torch.LongTensor` of shape `()`): ``[SEG]`` tokens that took part (those with a
            visible target).
        num_objects (`int` or `torch.LongTensor` of shape `()`): distinct (sample, object) groups among them.
        skipped (`bool` or `torch.BoolTensor` of shape `()`): `True` when fewer than two distinct objects were
            present, so the loss is 0.

    The counts are 0-d tensors on the loss's device when computed (reading them is a host synchronisation, which
    the trainer does only when it logs); plain Python values for an empty batch.
    """

    loss: torch.Tensor
    num_rows: int | torch.Tensor
    num_objects: int | torch.Tensor
    skipped: bool | torch.Tensor


def _zero_loss(*tensors: torch.Tensor | None) -> torch.Tensor:
    """A 0 that stays attached to the graph of the inputs (so every rank of a distributed run has the same graph)."""
    total = None
    for tensor in tensors:
        if tensor is not None and tensor.is_floating_point():
            part = tensor.sum() * 0.0
            total = part if total is None else total + part
    if total is None:
        raise ValueError("text_mask_contrastive_loss needs seg_embeds and mask_pooled_embeds tensors")
    return total


def mask_pooled_embeddings(image_embeddings: torch.Tensor, gt_masks: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """SAM2's image embedding averaged over each target's ground-truth mask (resized with nearest to the grid).

    Args:
        image_embeddings: `(num_targets, D, h, w)`; gt_masks: `(num_targets, H, W)` in [0, 1].

    Returns:
        `(pooled (num_targets, D), has_mask (num_targets,))`; rows of empty masks are 0 and `has_mask` False.
    """
    masks = F.interpolate(gt_masks[:, None].float(), size=image_embeddings.shape[-2:], mode="nearest")
    area = masks.sum(dim=(2, 3))  # (N, 1)
    return (image_embeddings * masks).sum(dim=(2, 3)) / area.clamp_min(1.0), area[:, 0] > 0


def seg_visual_embeddings(
    mask_pooled_embeds: torch.Tensor,
    target_seg_index: torch.LongTensor,
    target_has_mask: torch.BoolTensor,
    num_seg: int,
) -> tuple[torch.Tensor, torch.BoolTensor]:
    """Average the mask-pooled embeddings of each ``[SEG]``'s targets that have a non-empty mask.

    Args:
        mask_pooled_embeds: `(num_targets, D)`; target_seg_index: `(num_targets,)`; target_has_mask: `(num_targets,)`.
        num_seg: number of ``[SEG]`` tokens of the batch.

    Returns:
        `(visual (num_seg, D), has_visual (num_seg,))`; rows without a visible target are 0 and `has_visual` False.
    """
    # under a device_map the targets' indices may live on the VLM's device and the embeddings on SAM2's
    target_seg_index = target_seg_index.to(mask_pooled_embeds.device)
    weights = target_has_mask.to(device=mask_pooled_embeds.device, dtype=mask_pooled_embeds.dtype)
    sums = mask_pooled_embeds.new_zeros(num_seg, mask_pooled_embeds.shape[-1])
    sums = sums.index_add(0, target_seg_index, mask_pooled_embeds * weights[:, None])
    counts = mask_pooled_embeds.new_zeros(num_seg).index_add(0, target_seg_index, weights)
    return sums / counts.clamp_min(1.0)[:, None], counts > 0


def group_rows(keys: torch.LongTensor) -> torch.LongTensor:
    """Group index of each row of `keys` `(R, K)`: rows that are equal share a group, groups are numbered in the
    lexicographic order of their keys. Equal to `torch.unique(keys, dim=0, return_inverse=True)[1]`, computed with
    stable sorts (one per column), which every backend implements (`unique(dim=0)` has no MPS kernel in older torch).

    Returns:
        `torch.LongTensor` of shape `(R,)`.
    """
    num_rows = keys.shape[0]
    order = torch.arange(num_rows, device=keys.device)
    for column in reversed(range(keys.shape[1])):  # least significant column first, stable sorts keep the rest
        order = order[torch.sort(keys[order, column], stable=True).indices]
    sorted_keys = keys[order]
    starts = torch.ones(num_rows, dtype=torch.long, device=keys.device)
    if num_rows > 1:
        starts[1:] = (sorted_keys[1:] != sorted_keys[:-1]).any(dim=1).long()
    group_of_sorted = starts.cumsum(0) - 1
    return torch.empty_like(group_of_sorted).scatter_(0, order, group_of_sorted)


def text_mask_contrastive_loss(
    seg_embeds: torch.Tensor,
    mask_pooled_embeds: torch.Tensor,
    target_seg_index: torch.LongTensor,
    target_has_mask: torch.BoolTensor,
    seg_sample_index: torch.LongTensor,
    seg_object_ids: torch.LongTensor | None = None,
    temperature: float = 0.15,
) -> TMCOutput:
    """Symmetric TMC loss over the objects of a batch (module docstring).

    Args:
        seg_embeds (`torch.FloatTensor` of shape `(num_seg, D)`): projected ``[SEG]`` embeddings, reading order.
        mask_pooled_embeds (`torch.FloatTensor` of shape `(num_targets, D)`): SAM2 embedding pooled over each
            target's ground-truth mask.
        target_seg_index (`torch.LongTensor` of shape `(num_targets,)`): the ``[SEG]`` of each target.
        target_has_mask (`torch.BoolTensor` of shape `(num_targets,)`): whether each target's mask is non-empty.
        seg_sample_index (`torch.LongTensor` of shape `(num_seg,)`): the batch sample of each ``[SEG]``.
        seg_object_ids (`torch.LongTensor` of shape `(num_seg,)`, *optional*): object id of each ``[SEG]`` within
            its sample; ``[SEG]`` tokens sharing an id in one sample are the same object. Default: every ``[SEG]``
            is its own object.
        temperature (`float`): τ > 0.

    Returns:
        [`TMCOutput`].
    """
    if temperature <= 0:
        raise ValueError(f"the TMC temperature must be > 0, got {temperature}")
    num_seg = seg_embeds.shape[0]
    if seg_sample_index.shape[0] != num_seg:
        raise ValueError(
            f"seg_sample_index has {seg_sample_index.shape[0]} entries but there are {num_seg} [SEG] embeddings"
        )
    if seg_object_ids is not None and seg_object_ids.shape[0] != num_seg:
        raise ValueError(
            f"seg_object_ids has {seg_object_ids.shape[0]} entries but there are {num_seg} [SEG] embeddings; "
            "give one object id per [SEG] token"
        )
    if not (mask_pooled_embeds.shape[0] == target_seg_index.shape[0] == target_has_mask.shape[0]):
        raise ValueError(
            f"mask_pooled_embeds ({mask_pooled_embeds.shape[0]}), target_seg_index ({target_seg_index.shape[0]}) "
            f"and target_has_mask ({target_has_mask.shape[0]}) must have one row per target"
        )
    if num_seg == 0:
        return TMCOutput(loss=_zero_loss(seg_embeds, mask_pooled_embeds), num_rows=0, num_objects=0, skipped=True)

    # Computed over every [SEG] row with a mask for the rows without a visible target, and without a branch on
    # the number of objects: no host synchronisation (the trainer reads the counts only when it logs).
    visual, has_visual = seg_visual_embeddings(mask_pooled_embeds, target_seg_index, target_has_mask.bool(), num_seg)
    device = seg_embeds.device
    has_visual = has_visual.to(device)
    if seg_object_ids is None:
        object_ids = torch.arange(num_seg, device=device)
    else:
        object_ids = seg_object_ids.to(device).long()
    keys = torch.stack([seg_sample_index.to(device).long(), object_ids], dim=1)  # (S, 2)
    group_index = group_rows(keys)
    group_visible = torch.zeros(num_seg, dtype=torch.long, device=device).scatter_reduce(
        0, group_index, has_visual.long(), reduce="amax"
    )
    num_rows = has_visual.sum()
    num_objects = group_visible.sum()
    skipped = num_objects < 2

    text = F.normalize(seg_embeds.float(), dim=-1)
    image = F.normalize(visual.to(device).float(), dim=-1)
    logits = image @ text.T / temperature  # (S, S): row i = visual of [SEG] i, column j = text of [SEG] j
    same_object = group_index[:, None] == group_index[None, :]
    diagonal = torch.eye(num_seg, dtype=torch.bool, device=device)
    # off the diagonal, drop the entries of the same object and of rows/columns without a visible target
    removed = (same_object | ~has_visual[:, None] | ~has_visual[None, :]) & ~diagonal
    masked = logits.masked_fill(removed, float("-inf"))
    targets = torch.arange(num_seg, device=device)
    per_row = F.cross_entropy(masked, targets, reduction="none") + F.cross_entropy(masked.T, targets, reduction="none")
    weights = has_visual.float()
    loss = 0.5 * (per_row * weights).sum() / weights.sum().clamp_min(1.0)
    loss = torch.where(skipped, _zero_loss(seg_embeds, mask_pooled_embeds), loss)
    return TMCOutput(loss=loss, num_rows=num_rows, num_objects=num_objects, skipped=skipped)


__all__ = ["TMCOutput", "group_rows", "mask_pooled_embeddings", "seg_visual_embeddings", "text_mask_contrastive_loss"]
