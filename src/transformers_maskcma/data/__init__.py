"""Dataset loaders (RefCOCO/+/g, MeViS, ReVOS, Ref-YTVOS/DAVIS, GCG, Osprey, custom JSONL), the training mix
and synthetic data. Every loader returns a `datasets.Dataset` with the record format of `schema.py`."""

from .custom import load_custom
from .errors import (
    DataFormatError,
    DataValidationError,
    EmptyDatasetError,
    EmptyMediaError,
    MalformedJSONError,
    MaskSizeError,
    UnknownDatasetError,
)
from .gcg import load_gcg
from .leakage import Overlap, check_leakage, format_overlaps, warn_if_leaking
from .mix import (
    DATASET_NAMES,
    SEED_MIX_PATH,
    MixConfig,
    MixSource,
    interleave_with_repeats,
    load_dataset_by_name,
    load_mix,
    load_mix_sources,
    read_mix,
)
from .osprey import load_osprey
from .records import decode_record_masks, pack_masks, unpack_masks
from .refcoco import load_refcoco
from .schema import RECORD_FEATURES, decode_rle, empty_rle, encode_rle, make_meta
from .validation import RecordProblem, ValidationReport, drop_invalid, validate_records
from .video_datasets import load_mevis, load_ref_davis, load_ref_ytvos, load_referring_video, load_revos

__all__ = [
    "RECORD_FEATURES",
    "decode_rle",
    "empty_rle",
    "encode_rle",
    "make_meta",
    "DATASET_NAMES",
    "SEED_MIX_PATH",
    "DataFormatError",
    "DataValidationError",
    "EmptyDatasetError",
    "EmptyMediaError",
    "MalformedJSONError",
    "MaskSizeError",
    "MixConfig",
    "MixSource",
    "Overlap",
    "RecordProblem",
    "UnknownDatasetError",
    "ValidationReport",
    "check_leakage",
    "decode_record_masks",
    "drop_invalid",
    "format_overlaps",
    "interleave_with_repeats",
    "load_custom",
    "load_dataset_by_name",
    "load_gcg",
    "load_mevis",
    "load_mix",
    "load_mix_sources",
    "load_osprey",
    "load_ref_davis",
    "load_ref_ytvos",
    "load_referring_video",
    "load_refcoco",
    "load_revos",
    "pack_masks",
    "read_mix",
    "unpack_masks",
    "validate_records",
    "warn_if_leaking",
]
