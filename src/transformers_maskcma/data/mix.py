"""Training mixes: several sources, each repeated a number of times, interleaved in one deterministic order.

A mix is a YAML file::

    seed: 0                      # order of the interleaved records (optional, default 0)
    data_root: /data/maskcma     # base of relative paths (optional; default: the YAML file's folder;
                                 # `load_mix(..., data_root=...)` and `--data-root` override it)
    shuffle: true                # false keeps the sources in file order, each repeated in place (optional)
    sources:
      - dataset: refcoco         # a name of DATASET_NAMES
        path: ref_seg/refcoco    # the dataset folder or annotation file (see load_dataset_by_name)
        split: train
        repeat: 4                # the source appears 4 times (a fraction, e.g. 0.5, keeps a seeded subset)
        options: {}              # extra keyword arguments of the loader (optional); keys ending in
                                 # _dir, _dirs or _file are paths relative to data_root

A bare YAML list of sources is accepted too. `load_mix` returns one `datasets.Dataset` in which every record of
a source with ``repeat: r`` (an integer) appears exactly ``r`` times, in an order fixed by ``seed``.
"""

from __future__ import annotations

import importlib
import logging
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import datasets
import numpy as np
import yaml

from .custom import load_custom
from .errors import DataFormatError, UnknownDatasetError
from .gcg import load_gcg
from .osprey import load_osprey
from .records import PathLike, first_existing, relative_or_absolute
from .refcoco import REFCOCO_DATASETS, load_refcoco
from .video_datasets import VIDEO_DATASETS, load_referring_video

logger = logging.getLogger(__name__)

DATASET_NAMES = (*REFCOCO_DATASETS, *VIDEO_DATASETS, "gcg", "osprey", "custom", "synthetic")
SEED_MIX_PATH = Path(__file__).resolve().parent.parent / "configs" / "seed_mix.yaml"
_SOURCE_KEYS = {"dataset", "path", "split", "repeat", "options"}


@dataclass(frozen=True)
class MixSource:
    """One entry of a mix: which loader, where, which split, how many times."""

    dataset: str
    path: str | None
    split: str
    repeat: float = 1
    options: dict = field(default_factory=dict)

    @property
    def label(self) -> str:
        """A short name for tables and logs, e.g. ``refcoco:train (ref_seg/refcoco)``."""
        return f"{self.dataset}:{self.split}" + (f" ({self.path})" if self.path else "")


@dataclass
class MixConfig:
    """A parsed mix file."""

    sources: list[MixSource]
    seed: int = 0
    shuffle: bool = True
    data_root: Path | None = None
    config_path: Path | None = None


def parse_mix(content: Any, where: str = "mix", base_dir: PathLike | None = None) -> MixConfig:
    """Validate a mix given as parsed YAML (a mapping with ``sources`` or a bare list). ``where`` names it in
    errors; ``base_dir`` is the folder a relative ``data_root`` is resolved against."""
    if isinstance(content, list):
        content = {"sources": content}
    if not isinstance(content, dict) or not isinstance(content.get("sources"), list) or not content["sources"]:
        raise DataFormatError(f"{where}: a mix is a list of sources or a mapping with a non-empty 'sources' list")
    unknown_top = sorted(set(content) - {"sources", "seed", "data_root", "shuffle"})
    if unknown_top:
        raise DataFormatError(f"{where}: unknown key(s) {unknown_top}; allowed: sources, seed, data_root, shuffle")
    sources = []
    for index, entry in enumerate(content["sources"]):
        entry_where = f"{where} sources[{index}]"
        if not isinstance(entry, dict):
            raise DataFormatError(f"{entry_where}: each source is a mapping {{dataset, path, split, repeat}}")
        unknown = sorted(set(entry) - _SOURCE_KEYS)
        if unknown:
            raise DataFormatError(f"{entry_where}: unknown key(s) {unknown}; allowed: {sorted(_SOURCE_KEYS)}")
        name = entry.get("dataset")
        if name not in DATASET_NAMES:
            raise UnknownDatasetError(
                f"{entry_where}: unknown dataset {name!r}; known datasets: {', '.join(DATASET_NAMES)}"
            )
        if name != "synthetic" and not entry.get("path"):
            raise DataFormatError(f"{entry_where}: dataset {name!r} needs a 'path'")
        repeat = entry.get("repeat", 1)
        if (
            isinstance(repeat, bool)
            or not isinstance(repeat, (int, float))
            or not repeat > 0
            or not math.isfinite(repeat)
        ):
            raise DataFormatError(f"{entry_where}: 'repeat' must be a positive number, got {repeat!r}")
        options = entry.get("options") or {}
        if not isinstance(options, dict):
            raise DataFormatError(f"{entry_where}: 'options' must be a mapping of loader keyword arguments")
        sources.append(
            MixSource(
                dataset=name,
                path=None if entry.get("path") is None else str(entry["path"]),
                split=str(entry.get("split", "train")),
                repeat=repeat,
                options=dict(options),
            )
        )
    seed = content.get("seed", 0)
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise DataFormatError(f"{where}: 'seed' must be an integer, got {seed!r}")
    data_root = content.get("data_root")
    if data_root is not None:
        data_root = relative_or_absolute(str(data_root), base_dir or ".")
    return MixConfig(sources=sources, seed=seed, shuffle=bool(content.get("shuffle", True)), data_root=data_root)


def read_mix(path: PathLike) -> MixConfig:
    """Read and validate a mix YAML file (errors name the file and the entry)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"mix file not found: {path}")
    with open(path, encoding="utf-8") as handle:
        try:
            content = yaml.safe_load(handle)
        except yaml.YAMLError as error:
            raise DataFormatError(f"{path}: malformed YAML: {error}") from None
    config = parse_mix(content, where=str(path), base_dir=path.parent)
    config.config_path = path
    return config


def _resolve_options(options: dict, data_root: Path) -> dict:
    resolved = {}
    for key, value in options.items():
        if key.endswith(("_dir", "_file")) and isinstance(value, str):
            value = str(relative_or_absolute(value, data_root))
        elif key.endswith("_dirs") and isinstance(value, (list, tuple)):
            value = [str(relative_or_absolute(v, data_root)) for v in value]
        elif key.endswith("_dirs") and isinstance(value, str):
            value = [str(relative_or_absolute(value, data_root))]
        resolved[key] = value
    return resolved


def _annotation_file(data_root: Path, split: str, suffixes: tuple[str, ...], what: str) -> Path:
    if data_root.is_dir():
        return first_existing([data_root / f"{split}{suffix}" for suffix in suffixes], what, kind="file")
    if not data_root.is_file():
        raise FileNotFoundError(f"{what} not found: {data_root}")
    return data_root


def load_dataset_by_name(name: str, data_root: PathLike | None, split: str, **options) -> datasets.Dataset:
    """Load one source by dataset name (one of `DATASET_NAMES`).

    ``data_root`` means, per name:
        refcoco, refcoco+, refcocog: the folder with ``refs(*).p`` and ``instances.json`` (`load_refcoco`);
        mevis, revos, ref_ytvos, ref_davis: the dataset folder (`load_referring_video`);
        gcg: the GLaMM GCG JSON file, or a folder holding ``<split>.json`` (`load_gcg`; ``image_dir`` option,
            default ``<json folder>/images``);
        osprey: the Osprey-724K JSON file or a folder holding ``<split>.json`` (`load_osprey`; ``image_dirs``
            option, default ``<json folder>/images``);
        custom: the JSONL file, or a folder holding ``<split>.jsonl`` (`load_custom`);
        synthetic: ignored; calls ``transformers_maskcma.data.synthetic.load_synthetic(split=split, **options)``.
    ``options`` are passed to the loader (e.g. ``image_dir``, ``multi_object``, ``task``, ``cache_dir``).
    """
    if name not in DATASET_NAMES:
        raise UnknownDatasetError(f"unknown dataset {name!r}; known datasets: {', '.join(DATASET_NAMES)}")
    if name == "synthetic":
        synthetic = importlib.import_module("transformers_maskcma.data.synthetic")
        return synthetic.load_synthetic(split=split, **options)
    if data_root is None:
        raise ValueError(f"dataset {name!r} needs a data_root (its folder or annotation file)")
    root = Path(data_root)
    if name in REFCOCO_DATASETS:
        return load_refcoco(root, dataset=name, split=split, **options)
    if name in VIDEO_DATASETS:
        return load_referring_video(name, root, split, **options)
    if name == "gcg":
        annotation = _annotation_file(root, split, (".json",), "GCG annotation file")
        if "image_dir" not in options:
            options["image_dir"] = first_existing(
                [annotation.parent / "images"], "GCG image folder", "Set the 'image_dir' option.", "dir"
            )
        return load_gcg(annotation, **options)
    if name == "osprey":
        annotation = _annotation_file(root, split, (".json",), "Osprey annotation file")
        if "image_dirs" not in options:
            options["image_dirs"] = [
                first_existing(
                    [annotation.parent / "images"], "Osprey image folder", "Set the 'image_dirs' option.", "dir"
                )
            ]
        return load_osprey(annotation, **options)
    annotation = _annotation_file(root, split, (".jsonl", ".json"), "custom JSONL file")
    return load_custom(annotation, **options)


def load_mix_sources(
    mix: MixConfig | PathLike, data_root: PathLike | None = None, cache_dir: PathLike | None = None
) -> list[tuple[MixSource, datasets.Dataset]]:
    """Load every source of a mix (a `MixConfig` or a YAML path) once, without repeats: ``[(source, dataset)]``."""
    config = mix if isinstance(mix, MixConfig) else read_mix(mix)
    if data_root is not None:
        root = Path(data_root)
    elif config.data_root is not None:
        root = config.data_root
    elif config.config_path is not None:
        root = config.config_path.parent
    else:
        root = Path(".")
    loaded = []
    for source in config.sources:
        options = _resolve_options(source.options, root)
        if cache_dir is not None and source.dataset != "synthetic":
            options.setdefault("cache_dir", cache_dir)
        path = None if source.path is None else relative_or_absolute(source.path, root)
        logger.info("loading %s from %s", source.label, path)
        dataset = load_dataset_by_name(source.dataset, path, source.split, **options)
        loaded.append((source, dataset))
    return loaded


def repeated_length(num_rows: int, repeat: float) -> int:
    """How many rows a source of ``num_rows`` rows contributes with repeat factor ``repeat`` (`repeat_indices`)."""
    whole = int(math.floor(repeat))
    return whole * num_rows + int(round((repeat - whole) * num_rows))


def repeat_indices(num_rows: int, repeat: float, rng: np.random.Generator) -> np.ndarray:
    """Row indices of one source repeated ``repeat`` times: ``floor(repeat)`` full copies plus, for a fractional
    part ``f``, ``round(f * num_rows)`` distinct rows drawn with ``rng``. Shape ``(≈ repeat * num_rows,)``."""
    whole = int(math.floor(repeat))
    parts = [np.tile(np.arange(num_rows, dtype=np.int64), whole)]
    extra = int(round((repeat - whole) * num_rows))
    if extra:
        parts.append(np.sort(rng.choice(num_rows, size=extra, replace=False)).astype(np.int64))
    return np.concatenate(parts)


def interleave_with_repeats(
    sources: list[datasets.Dataset], repeats: list[float], seed: int = 0, shuffle: bool = True
) -> datasets.Dataset:
    """Concatenate ``sources``, each repeated ``repeats[i]`` times (`repeat_indices`), and, with ``shuffle``,
    permute all rows with ``numpy.random.default_rng(seed)``: the same inputs and seed give the same order.
    Rows are not copied: the result is an index mapping over the concatenated tables."""
    if len(sources) != len(repeats):
        raise ValueError(f"got {len(sources)} datasets but {len(repeats)} repeat factors")
    if not sources:
        raise ValueError("a mix needs at least one source")
    rng = np.random.default_rng(seed)
    offsets = np.cumsum([0] + [len(d) for d in sources[:-1]])
    indices = np.concatenate(
        [repeat_indices(len(d), r, rng) + offset for d, r, offset in zip(sources, repeats, offsets, strict=True)]
    )
    if shuffle:
        indices = indices[rng.permutation(len(indices))]
    combined = datasets.concatenate_datasets(sources)
    return combined.select(indices)


def load_mix(
    mix: MixConfig | PathLike,
    data_root: PathLike | None = None,
    seed: int | None = None,
    cache_dir: PathLike | None = None,
) -> datasets.Dataset:
    """Load a mix (a `MixConfig` or YAML path) into one `datasets.Dataset` of records (module docstring).
    ``seed`` overrides the file's seed."""
    config = mix if isinstance(mix, MixConfig) else read_mix(mix)
    loaded = load_mix_sources(config, data_root=data_root, cache_dir=cache_dir)
    for source, dataset in loaded:
        logger.info("%s: %d records x %s", source.label, len(dataset), source.repeat)
    return interleave_with_repeats(
        [dataset for _, dataset in loaded],
        [source.repeat for source, _ in loaded],
        seed=config.seed if seed is None else seed,
        shuffle=config.shuffle,
    )
