"""From dataset records to training features: a torch `Dataset` that runs the processor on each record."""

from __future__ import annotations

import datasets
import numpy as np
import torch
from torch.utils.data import Dataset

#: Processor outputs that are not model inputs (they describe the sample for inference-time post-processing).
NON_MODEL_KEYS = ("original_sizes", "key_frame_indices")


class ProcessedRecords(Dataset):
    """Training features of the records of a `datasets.Dataset` (`transformers_maskcma.data.schema` format).

    Item ``i`` is ``processor.prepare_record(records[i], **processor_kwargs)`` as a dict of tensors for one sample
    (`input_ids` `(1, L)`, `pixel_values` `(tiles, 3, t, t)`, `sam_pixel_values` `(F, 3, S, S)`, `gt_masks`
    `(targets, g, g)`, …), without the keys that only serve inference (`NON_MODEL_KEYS`), ready for
    `MaskCMADataCollator`.

    Args:
        records: the records.
        processor: a `MaskCMAProcessor` (training mode is selected by `prepare_record`).
        cache (`bool`): keep each processed sample in memory after its first use (small datasets trained for
            several epochs: decoding and resizing happen once). The features are the same either way.
        video_clip_frames (`int`, *optional*): training through SAM2's memory (`video_training="propagate"`): each
            video record becomes a clip of this many consecutive frames (`clip_window`), every frame of it decoded
            (`train_frames="all"`), and the item gets `conditioning_frame_mask` `(F,)` — True on the key frames the
            processor chose within the clip (decoded from ``[SEG]``), False on the frames SAM2 propagates. `None`
            (default): records are processed as they are.
        clip_seed (`int`): seed of the clips' start frames (a record's window depends only on it and the index).
        processor_kwargs: passed to `prepare_record` (e.g. `train_frames="all"`).
    """

    def __init__(
        self,
        records: datasets.Dataset,
        processor,
        cache: bool = False,
        video_clip_frames: int | None = None,
        clip_seed: int = 0,
        **processor_kwargs,
    ):
        if not hasattr(processor, "prepare_record"):
            raise TypeError(
                f"ProcessedRecords needs a MaskCMAProcessor (with prepare_record), got {type(processor).__name__}"
            )
        if video_clip_frames is not None:
            if isinstance(video_clip_frames, bool) or not isinstance(video_clip_frames, int) or video_clip_frames < 2:
                raise ValueError(f"video_clip_frames={video_clip_frames!r} must be an integer >= 2")
            key_frames = int(processor.num_key_frames)
            if key_frames >= video_clip_frames:
                raise ValueError(
                    f"training clips of {video_clip_frames} frames with {key_frames} key frames leave no frame to "
                    "propagate: raise video_training_clip_frames above the processor's num_key_frames, or lower "
                    "num_key_frames"
                )
        self.records = records
        self.processor = processor
        self.processor_kwargs = processor_kwargs
        self.video_clip_frames = video_clip_frames
        self.clip_seed = int(clip_seed)
        self._cache: dict[int, dict[str, torch.Tensor]] | None = {} if cache else None

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        if self._cache is not None and index in self._cache:
            return self._cache[index]
        record = self.records[int(index)]
        if self.video_clip_frames is not None and record["media_type"] == "video":
            start, stop = clip_window(len(record["frames"]), self.video_clip_frames, self.clip_seed, int(index))
            record = {
                **record,
                "frames": record["frames"][start:stop],
                "masks": [object_masks[start:stop] for object_masks in record["masks"]],
            }
            features = self.processor.prepare_record(record, **{**self.processor_kwargs, "train_frames": "all"})
            keys = torch.as_tensor(features["key_frame_indices"]).reshape(-1)
            features["conditioning_frame_mask"] = torch.isin(torch.arange(stop - start), keys)
        else:
            features = self.processor.prepare_record(record, **self.processor_kwargs)
        item = {key: value for key, value in features.items() if key not in NON_MODEL_KEYS}
        if self._cache is not None:
            self._cache[index] = item
        return item


def clip_window(num_frames: int, clip_frames: int, seed: int, index: int) -> tuple[int, int]:
    """`(start, stop)` of the training clip of record `index`: `clip_frames` consecutive frames starting at a frame
    drawn uniformly with `numpy.random.default_rng([seed, index])` (the whole video when it is not longer)."""
    if num_frames <= clip_frames:
        return 0, num_frames
    start = int(np.random.default_rng([seed, index]).integers(0, num_frames - clip_frames + 1))
    return start, start + clip_frames


def _frame_size(frame) -> tuple[int, int]:
    """`(height, width)` of a record frame (a PIL image, or an undecoded ``{"bytes", "path"}`` dict), from its header."""
    import io

    from PIL import Image

    if isinstance(frame, Image.Image):
        return frame.size[1], frame.size[0]
    source = io.BytesIO(frame["bytes"]) if frame.get("bytes") else frame["path"]
    with Image.open(source) as image:
        return image.size[1], image.size[0]


def training_sequence_length(processor, record: dict) -> int:
    """Tokens of a record's templated training sequence, as `processor.prepare_record` builds it (chat template,
    image or key-frame tokens, prompt, answer and end of turn), computed from the frame headers without decoding or
    tiling any image.

    Used to check every record against the model's limit (`processor.max_length`) before step 0.
    """
    from ..processing.training_features import default_answer
    from ..processing.video_io import sample_key_frames

    media = record.get("media_type")
    frames = record.get("frames") or []
    if not frames:
        return 0  # a record without frames is reported by the validation pass itself
    if media == "video":
        key_frames = sample_key_frames(len(frames), processor.num_key_frames, processor.key_frame_sampling)
        tiles = [1] * len(key_frames)
    else:
        try:
            height, width = _frame_size(frames[0])
        except (OSError, KeyError, TypeError, ValueError):
            return 0  # an unreadable frame is reported by the validation pass itself
        tiles = [int(processor.image_processor.get_number_of_image_patches(height, width, {}))]
    before, between, after = processor._chat_parts()
    media_ids = processor.media_token_ids(tiles, is_video=media == "video")
    prompt_ids = processor._tokenize(record.get("prompt") or "")
    answer = record.get("answer") or default_answer(len(record.get("masks") or []), processor.seg_token, media)
    answer_ids = processor._tokenize(answer)
    return len(before) + len(media_ids) + len(between) + len(prompt_ids) + len(after) + len(answer_ids) + 1


__all__ = ["NON_MODEL_KEYS", "ProcessedRecords", "clip_window", "training_sequence_length"]
