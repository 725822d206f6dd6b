"""Dataset loaders (RefCOCO/+/g, MeViS, ReVOS, Ref-YTVOS/DAVIS, GCG, Osprey, custom JSONL), the training mix
and synthetic data. Every loader returns a `datasets.Dataset` with the record format of `schema.py`."""

from .schema import RECORD_FEATURES, decode_rle, empty_rle, encode_rle, make_meta

__all__ = ["RECORD_FEATURES", "decode_rle", "empty_rle", "encode_rle", "make_meta"]
