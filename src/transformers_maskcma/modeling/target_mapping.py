"""The explicit mapping between ``[SEG]`` tokens, SAM2 frames and ground-truth masks.

A *target* is one mask to decode: a ``[SEG]`` token (the object) on one SAM2 frame. Images have one frame per
sample, so by default target i is the i-th ``[SEG]`` of the batch decoded on its sample's frame; videos and
other layouts pass the mapping explicitly. Every inconsistency raises instead of truncating. Imports only torch.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class SegTargets:
    """
    Args:
        seg_index (`torch.LongTensor` of shape `(num_targets,)`): the ``[SEG]`` (reading order over the batch).
        frame_index (`torch.LongTensor` of shape `(num_targets,)`): the row of `sam_pixel_values`.
        sample_index (`torch.LongTensor` of shape `(num_targets,)`): the batch sample.
    """

    seg_index: torch.LongTensor
    frame_index: torch.LongTensor
    sample_index: torch.LongTensor


def build_seg_targets(
    seg_sample_index: torch.LongTensor,
    batch_size: int,
    num_frames: int,
    num_gt_masks: int | None = None,
    target_seg_index: torch.LongTensor | None = None,
    target_frame_index: torch.LongTensor | None = None,
    frame_sample_index: torch.LongTensor | None = None,
) -> SegTargets:
    """Resolve and check the target mapping.

    Args:
        seg_sample_index: `(num_seg,)` sample of each ``[SEG]``.
        batch_size: number of samples; num_frames: rows of `sam_pixel_values`.
        num_gt_masks: number of ground-truth masks, when training.
        target_seg_index, target_frame_index: `(num_targets,)` explicit mapping (both or neither).
        frame_sample_index: `(num_frames,)` sample of each frame (default: frame i belongs to sample i).
    """
    device = seg_sample_index.device
    num_seg = seg_sample_index.shape[0]
    if frame_sample_index is None:
        if num_frames != batch_size:
            raise ValueError(
                f"sam_pixel_values has {num_frames} frames for {batch_size} samples; pass frame_sample_index "
                "(the sample of each frame) when samples do not have exactly one frame"
            )
        frame_sample_index = torch.arange(batch_size, device=device)
    elif frame_sample_index.shape[0] != num_frames:
        raise ValueError(
            f"frame_sample_index has {frame_sample_index.shape[0]} entries but sam_pixel_values has {num_frames} frames"
        )
    frame_sample_index = frame_sample_index.to(device)

    if (target_seg_index is None) != (target_frame_index is None):
        raise ValueError("pass both target_seg_index and target_frame_index, or neither")
    if target_seg_index is None:
        if bool((frame_sample_index != torch.arange(num_frames, device=device)).any()):
            raise ValueError(
                "with several frames per sample the [SEG]-to-frame mapping is ambiguous; "
                "pass target_seg_index and target_frame_index"
            )
        if num_gt_masks is not None and num_gt_masks != num_seg:
            per_sample = torch.bincount(seg_sample_index, minlength=batch_size).tolist()
            raise ValueError(
                f"the batch has {num_seg} [SEG] tokens (per sample: {per_sample}) but {num_gt_masks} ground-truth "
                "masks; each [SEG] in the answer needs exactly one mask (check the answer template and the "
                "object list of each sample)"
            )
        seg_index = torch.arange(num_seg, device=device)
        frame_index = seg_sample_index.clone()
    else:
        seg_index = target_seg_index.to(device).long()
        frame_index = target_frame_index.to(device).long()
        if seg_index.shape != frame_index.shape or seg_index.ndim != 1:
            raise ValueError(
                f"target_seg_index {tuple(seg_index.shape)} and target_frame_index {tuple(frame_index.shape)} must be "
                "1-D tensors of the same length (one entry per target)"
            )
        if num_gt_masks is not None and num_gt_masks != seg_index.shape[0]:
            raise ValueError(
                f"{seg_index.shape[0]} targets are mapped but {num_gt_masks} ground-truth masks were given"
            )
        if seg_index.numel() and (int(seg_index.min()) < 0 or int(seg_index.max()) >= num_seg):
            raise ValueError(f"target_seg_index refers to [SEG] {int(seg_index.max())}, but the batch has {num_seg}")
        if frame_index.numel() and (int(frame_index.min()) < 0 or int(frame_index.max()) >= num_frames):
            raise ValueError(f"target_frame_index refers to frame {int(frame_index.max())}, but there are {num_frames}")
        mismatched = (seg_sample_index[seg_index] != frame_sample_index[frame_index]).nonzero(as_tuple=True)[0]
        if mismatched.numel():
            first = int(mismatched[0])
            raise ValueError(
                f"target {first} decodes [SEG] {int(seg_index[first])} of sample {int(seg_sample_index[seg_index[first]])} "
                f"on frame {int(frame_index[first])} of sample {int(frame_sample_index[frame_index[first]])}"
            )
    return SegTargets(seg_index=seg_index, frame_index=frame_index, sample_index=seg_sample_index[seg_index])
