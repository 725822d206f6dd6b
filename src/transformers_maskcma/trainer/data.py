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


__all__ = ["NON_MODEL_KEYS", "ProcessedRecords"]
