"""Batching of per-sample MaskCMA training features (the output of `MaskCMAProcessor(...)` / `prepare_record`).

Each sample holds its own token sequence `(1, L_i)`, VLM tiles, SAM2 frames `(F_i, 3, S, S)`, ground-truth masks
`(N_i, g, g)` and the indices that tie them together, all local to the sample. The batch concatenates them and
shifts the indices:

- `target_seg_index` (which ``[SEG]`` in reading order over the batch) by the ``[SEG]`` count of the samples before;
- `target_frame_index` (a row of `sam_pixel_values`) by the number of frames of the samples before;
- `frame_sample_index` becomes the batch index of each frame.

Samples may mix images and videos, numbers of objects (0 included) and numbers of frames.

Training clips for `video_training="propagate"` carry `conditioning_frame_mask` `(F_i,)` (True on the key frames
decoded from ``[SEG]``, False on the frames SAM2 propagates); when any sample of a batch has one, the batch gets
`conditioning_frame_mask` `(Σ F_i,)`, True on every frame of the samples without one (images, videos trained frame by
frame). Batches without clips are exactly what they were without this field.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch

#: keys every training feature must have
REQUIRED_KEYS = (
    "input_ids",
    "attention_mask",
    "labels",
    "text_token_mask",
    "pixel_values",
    "sam_pixel_values",
    "gt_masks",
    "target_seg_index",
    "target_frame_index",
    "seg_object_ids",
)


class MaskCMADataCollator:
    """Pad and concatenate per-sample features into one batch for `MaskCMAModel.forward`.

    Args:
        processor ([`MaskCMAProcessor`], *optional*): gives the padding id and the ``[SEG]`` id (to check each
            sample's ``[SEG]`` count against its object ids).
        pad_token_id (`int`, *optional*): padding id when no processor is given (default 0).
        pad_to_multiple_of (`int`, *optional*): pad the sequence length to a multiple of this.
        padding_side (`str`, defaults to `"right"`): `"right"` or `"left"`.

    Returns (from `__call__`) a dict of tensors: `input_ids`, `attention_mask`, `labels` (-100 on padding),
    `text_token_mask` (False on padding) `(B, L)`; `pixel_values` `(Σ tiles, 3, t, t)`; `sam_pixel_values`
    `(Σ F_i, 3, S, S)`; `frame_sample_index` `(Σ F_i,)`; `gt_masks` `(Σ N_i, g, g)`; `target_seg_index`,
    `target_frame_index` `(Σ N_i,)`; `seg_object_ids` `(Σ num_seg_i,)`; `original_sizes` `(B, 2)` when every
    sample has it; `conditioning_frame_mask` `(Σ F_i,)` when any sample is a propagation clip (module docstring).
    """

    def __init__(
        self,
        processor=None,
        pad_token_id: int | None = None,
        pad_to_multiple_of: int | None = None,
        padding_side: str = "right",
    ):
        if padding_side not in ("right", "left"):
            raise ValueError(f"padding_side={padding_side!r} is not valid; use 'right' or 'left'")
        self.processor = processor
        if pad_token_id is None and processor is not None:
            pad_token_id = processor.tokenizer.pad_token_id
        self.pad_token_id = 0 if pad_token_id is None else int(pad_token_id)
        self.seg_token_id = getattr(processor, "seg_token_id", None)
        self.pad_to_multiple_of = pad_to_multiple_of
        self.padding_side = padding_side

    @staticmethod
    def _row(value: torch.Tensor, key: str, index: int) -> torch.Tensor:
        value = torch.as_tensor(value)
        if value.ndim == 2:
            if value.shape[0] != 1:
                raise ValueError(
                    f"sample {index}: {key} has shape {tuple(value.shape)}; the collator expects one sample per "
                    "feature dict (shape (1, L) or (L,))"
                )
            value = value[0]
        if value.ndim != 1:
            raise ValueError(f"sample {index}: {key} must have shape (1, L) or (L,), got {tuple(value.shape)}")
        return value

    def _check_sample(self, feature: Mapping, index: int) -> None:
        missing = [key for key in REQUIRED_KEYS if key not in feature]
        if missing:
            raise ValueError(
                f"sample {index} lacks {missing}; build training features with processor(..., answer=..., masks=...) "
                "or processor.prepare_record(record)"
            )
        num_frames = feature["sam_pixel_values"].shape[0]
        num_seg = feature["seg_object_ids"].shape[0]
        num_targets = feature["gt_masks"].shape[0]
        if self.seg_token_id is not None:
            count = int((torch.as_tensor(feature["input_ids"]) == self.seg_token_id).sum())
            if count != num_seg:
                raise ValueError(
                    f"sample {index}: input_ids hold {count} [SEG] tokens but seg_object_ids has {num_seg} entries"
                )
        for key in ("target_seg_index", "target_frame_index"):
            if feature[key].shape[0] != num_targets:
                raise ValueError(
                    f"sample {index}: {key} has {feature[key].shape[0]} entries for {num_targets} ground-truth masks"
                )
        if num_targets and (int(feature["target_frame_index"].max()) >= num_frames):
            raise ValueError(f"sample {index}: target_frame_index refers past its {num_frames} SAM2 frames")
        if "conditioning_frame_mask" in feature:
            mask = torch.as_tensor(feature["conditioning_frame_mask"])
            if mask.shape != (num_frames,) or not bool(mask.bool().any()):
                raise ValueError(
                    f"sample {index}: conditioning_frame_mask must have one flag per SAM2 frame ({num_frames}) with at "
                    f"least one key frame, got {mask.tolist()}"
                )
        if num_targets and (int(feature["target_seg_index"].max()) >= num_seg):
            raise ValueError(f"sample {index}: target_seg_index refers past its {num_seg} [SEG] tokens")

    def __call__(self, features: Sequence[Mapping]) -> dict[str, torch.Tensor]:
        if len(features) == 0:
            raise ValueError("the collator got an empty list of samples")
        for index, feature in enumerate(features):
            self._check_sample(feature, index)

        rows = {
            key: [self._row(feature[key], key, i) for i, feature in enumerate(features)]
            for key in ("input_ids", "attention_mask", "labels", "text_token_mask")
        }
        length = max(row.shape[0] for row in rows["input_ids"])
        if self.pad_to_multiple_of:
            multiple = int(self.pad_to_multiple_of)
            length = (length + multiple - 1) // multiple * multiple
        pad_values = {"input_ids": self.pad_token_id, "attention_mask": 0, "labels": -100, "text_token_mask": False}
        dtypes = {
            "input_ids": torch.long,
            "attention_mask": torch.long,
            "labels": torch.long,
            "text_token_mask": torch.bool,
        }
        batch: dict[str, torch.Tensor] = {}
        for key, values in rows.items():
            padded = torch.full((len(features), length), pad_values[key], dtype=dtypes[key])
            for row, value in enumerate(values):
                if self.padding_side == "right":
                    padded[row, : value.shape[0]] = value.to(dtypes[key])
                else:
                    padded[row, length - value.shape[0] :] = value.to(dtypes[key])
            batch[key] = padded

        self._check_shapes(features, "pixel_values", "VLM tiles")
        self._check_shapes(features, "sam_pixel_values", "SAM2 frames")
        self._check_shapes(features, "gt_masks", "ground-truth masks")
        batch["pixel_values"] = torch.cat([torch.as_tensor(f["pixel_values"]) for f in features])
        batch["sam_pixel_values"] = torch.cat([torch.as_tensor(f["sam_pixel_values"]) for f in features])
        batch["gt_masks"] = torch.cat([torch.as_tensor(f["gt_masks"]).float() for f in features])
        batch["seg_object_ids"] = torch.cat([torch.as_tensor(f["seg_object_ids"]).long() for f in features])

        seg_offset = frame_offset = 0
        seg_index, frame_index, frame_sample = [], [], []
        for sample, feature in enumerate(features):
            num_frames = feature["sam_pixel_values"].shape[0]
            seg_index.append(torch.as_tensor(feature["target_seg_index"]).long() + seg_offset)
            frame_index.append(torch.as_tensor(feature["target_frame_index"]).long() + frame_offset)
            frame_sample.append(torch.full((num_frames,), sample, dtype=torch.long))
            seg_offset += feature["seg_object_ids"].shape[0]
            frame_offset += num_frames
        batch["target_seg_index"] = torch.cat(seg_index)
        batch["target_frame_index"] = torch.cat(frame_index)
        batch["frame_sample_index"] = torch.cat(frame_sample)
        if any("conditioning_frame_mask" in f for f in features):
            batch["conditioning_frame_mask"] = torch.cat(
                [
                    torch.as_tensor(f["conditioning_frame_mask"]).bool()
                    if "conditioning_frame_mask" in f
                    else torch.ones(f["sam_pixel_values"].shape[0], dtype=torch.bool)
                    for f in features
                ]
            )
        if all("original_sizes" in f for f in features):
            batch["original_sizes"] = torch.cat([torch.as_tensor(f["original_sizes"]).view(-1, 2) for f in features])
        return batch

    @staticmethod
    def _check_shapes(features: Sequence[Mapping], key: str, what: str) -> None:
        shapes = [tuple(torch.as_tensor(f[key]).shape[1:]) for f in features]
        if len(set(shapes)) > 1:
            first = shapes[0]
            odd = next(i for i, shape in enumerate(shapes) if shape != first)
            raise ValueError(
                f"sample {odd}: {key} ({what}) have per-item shape {shapes[odd]} but sample 0 has {first}; process "
                "every sample with the same processor settings"
            )


__all__ = ["MaskCMADataCollator"]
