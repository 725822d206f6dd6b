"""From dataset records to training features: a torch `Dataset` that runs the processor on each record."""

from __future__ import annotations

import datasets
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
        processor_kwargs: passed to `prepare_record` (e.g. `train_frames="all"`).
    """

    def __init__(self, records: datasets.Dataset, processor, cache: bool = False, **processor_kwargs):
        if not hasattr(processor, "prepare_record"):
            raise TypeError(
                f"ProcessedRecords needs a MaskCMAProcessor (with prepare_record), got {type(processor).__name__}"
            )
        self.records = records
        self.processor = processor
        self.processor_kwargs = processor_kwargs
        self._cache: dict[int, dict[str, torch.Tensor]] | None = {} if cache else None

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        if self._cache is not None and index in self._cache:
            return self._cache[index]
        features = self.processor.prepare_record(self.records[int(index)], **self.processor_kwargs)
        item = {key: value for key, value in features.items() if key not in NON_MODEL_KEYS}
        if self._cache is not None:
            self._cache[index] = item
        return item


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


__all__ = ["NON_MODEL_KEYS", "ProcessedRecords", "training_sequence_length"]
