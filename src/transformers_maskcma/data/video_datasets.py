"""Referring video segmentation benchmarks in the Sa2VA / VISA layout: MeViS, ReVOS, Ref-YouTube-VOS, Ref-DAVIS17.

Files (``<root>`` is the dataset folder; the loader tries these places in order)::

    frames        <root>/<split>/JPEGImages/<video>/<frame>.jpg      or <root>/JPEGImages/<video>/<frame>.jpg
    expressions   <root>/<split>/meta_expressions.json               (MeViS, Ref-DAVIS17 from VISA)
                  <root>/meta_expressions/<split>/meta_expressions.json   (Ref-YouTube-VOS, Ref-DAVIS17 from Sa2VA)
                  <root>/meta_expressions_<split>_.json                (ReVOS: meta_expressions_{train,valid}_.json)
                  <root>/meta_expressions.json                         (``root`` is the split folder itself)
    masks         <root>/<split>/mask_dict.json|.pkl  or  <root>/mask_dict.json|.pkl
    foreground    mask_dict_foreground.json next to the mask dict (ReVOS; used by the R metric)

``meta_expressions.json`` = ``{"videos": {video: {"frames": ["00000", ...], "expressions": {exp_id: {"exp": str,
"obj_id": [...], "anno_id": [...]}}}}}``; ReVOS adds ``"type_id"`` (0 referring, 1 reasoning) to each expression.
Frame names may omit the extension (the file in the video folder with that stem is used). ``mask_dict`` =
``{str(anno_id): [COCO RLE or null per frame]}``, aligned to the video's ``frames`` list *in the order given*; a null
is an empty mask of the frame size. ``mask_dict_foreground.json`` = ``{video: {"masks_rle": [RLE per frame]}}``.

Several objects in one expression (MeViS, ReVOS): by default (``multi_object="union"``) the objects' masks are
OR-ed into one target per frame, as Sa2VA does for MeViS/ReVOS training (its video dataset merges all ``anno_id``
masks of an expression into one mask) and as the VISA/MeViS evaluators score (the GT of an expression is the
union of its objects). ``multi_object="separate"`` keeps one object (one ``[SEG]``) per ``anno_id`` instead.

Splits without masks (MeViS ``valid``/``test``, Ref-YouTube-VOS ``valid``/``test``: scored by an online server)
load with ``masks=[]`` and ``meta["has_masks"] = false``. For any other split a missing mask dict is an error.

One record per expression: ``media_id`` = the video name, ``frames`` = every frame path of the video,
``prompt`` = the expression, ``answer`` = "" (default template).
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import datasets

from .errors import DataFormatError, EmptyMediaError
from .records import (
    PathLike,
    build_dataset,
    file_signature,
    first_existing,
    image_size,
    make_record,
    read_json,
    read_pickle,
    require_dir,
    segmentation_to_rle,
    union_rles,
)
from .schema import empty_rle

logger = logging.getLogger(__name__)

VIDEO_DATASETS = ("mevis", "revos", "ref_ytvos", "ref_davis")
# splits whose ground truth is withheld (scored by an evaluation server)
MASKLESS_SPLITS = {"mevis": ("valid", "test"), "ref_ytvos": ("valid", "test"), "revos": (), "ref_davis": ()}
MULTI_OBJECT_MODES = ("union", "separate")


def resolve_video_layout(
    root: PathLike,
    split: str,
    frames_dir: PathLike | None = None,
    meta_file: PathLike | None = None,
    mask_file: PathLike | None = None,
) -> tuple[Path, Path, Path | None]:
    """Find ``(frames_dir, meta_file, mask_file or None)`` for ``split`` under ``root`` (module docstring)."""
    root = require_dir(root, "video dataset")
    hint = "Pass frames_dir=/meta_file=/mask_file= explicitly if your layout differs."
    if meta_file is None:
        meta_file = first_existing(
            [
                root / split / "meta_expressions.json",
                root / "meta_expressions" / split / "meta_expressions.json",
                root / f"meta_expressions_{split}_.json",
                root / f"meta_expressions_{split}.json",
                root / "meta_expressions.json",
            ],
            f"meta_expressions file for split {split!r}",
            hint,
            "file",
        )
    meta_file = Path(meta_file)
    if frames_dir is None:
        frames_dir = first_existing(
            [root / split / "JPEGImages", root / "JPEGImages", meta_file.parent / "JPEGImages"],
            f"JPEGImages folder for split {split!r}",
            hint,
            "dir",
        )
    if mask_file is None:
        candidates = [
            root / split / "mask_dict.json",
            root / split / "mask_dict.pkl",
            meta_file.parent / "mask_dict.json",
            meta_file.parent / "mask_dict.pkl",
            root / "mask_dict.json",
            root / "mask_dict.pkl",
        ]
        mask_file = next((Path(c) for c in candidates if os.path.isfile(c)), None)
    return Path(frames_dir), meta_file, None if mask_file is None else Path(mask_file)


def _read_mask_dict(path: str) -> dict:
    mask_dict = read_pickle(path, "mask dict") if path.endswith(".pkl") else read_json(path, "mask dict")
    if not isinstance(mask_dict, dict):
        raise DataFormatError(
            f"{path}: a mask dict maps str(anno_id) to a list of RLEs, got {type(mask_dict).__name__}"
        )
    return mask_dict


def _frame_paths(video_dir: Path, frames: list, where: str) -> list[Path]:
    try:
        names = os.listdir(video_dir)
    except FileNotFoundError:
        raise FileNotFoundError(f"{where}: video folder not found: {video_dir}") from None
    name_set = set(names)
    by_stem: dict[str, str] = {}
    for name in sorted(names):
        by_stem.setdefault(os.path.splitext(name)[0], name)
    paths = []
    for frame in frames:
        frame = str(frame)
        name = frame if frame in name_set else by_stem.get(frame)
        if name is None:
            raise FileNotFoundError(f"{where}: frame {frame!r} not found in {video_dir}")
        paths.append(video_dir / name)
    return paths


def _object_masks(mask_dict: dict, anno_id, num_frames: int, size: tuple[int, int], where: str, mask_file: str) -> list:
    entries = mask_dict.get(str(anno_id))
    if entries is None:
        raise DataFormatError(f"{where}: anno_id {anno_id} is not in {mask_file}")
    if len(entries) != num_frames:
        raise DataFormatError(
            f"{where}: {mask_file} has {len(entries)} masks for anno_id {anno_id} but the video has {num_frames} "
            "frames; the mask list must be aligned to the video's 'frames'"
        )
    masks = []
    for frame_index, entry in enumerate(entries):
        frame_where = f"{where} anno_id {anno_id} frame {frame_index} ({mask_file})"
        if entry is None:
            masks.append(empty_rle(*size))
        else:
            masks.append(segmentation_to_rle(entry, size[0], size[1], frame_where))
    return masks


def _exp_sort_key(exp_id: str):
    return (0, int(exp_id), "") if str(exp_id).isdigit() else (1, 0, str(exp_id))


def _generate_video(
    name: str,
    split: str,
    frames_dir: str,
    meta_file: str,
    mask_file: str | None,
    foreground_file: str | None,
    multi_object: str,
    include_foreground: bool,
    signature: list,
    **cache_key,
):
    meta = read_json(meta_file, "meta_expressions file")
    if not isinstance(meta, dict) or not isinstance(meta.get("videos"), dict):
        raise DataFormatError(
            f"{meta_file}: expected {{'videos': {{video: {{'frames': [...], 'expressions': {{...}}}}}}}}"
        )
    mask_dict = _read_mask_dict(mask_file) if mask_file is not None else None
    foreground = None
    if include_foreground and foreground_file is not None:
        foreground = read_json(foreground_file, "foreground mask dict")
    frames_root = Path(frames_dir)
    for video in sorted(meta["videos"]):
        info = meta["videos"][video]
        where = f"{meta_file} video {video!r}"
        frames = info.get("frames")
        if not frames:
            raise EmptyMediaError(f"{where}: the video lists no frames; every expression needs at least one frame")
        expressions = info.get("expressions")
        if not isinstance(expressions, dict):
            raise DataFormatError(f"{where}: 'expressions' must be a dict {{exp_id: {{'exp': ...}}}}")
        if not expressions:
            continue
        frame_paths = _frame_paths(frames_root / video, frames, where)
        size = image_size(frame_paths[0])
        video_foreground = None
        if include_foreground and mask_dict is not None:
            video_foreground = _video_foreground(
                video, info, foreground, foreground_file, mask_dict, mask_file, size, where
            )
        for exp_id in sorted(expressions, key=_exp_sort_key):
            expression = expressions[exp_id]
            exp_where = f"{where} expression {exp_id!r}"
            if "exp" not in expression:
                raise DataFormatError(f"{exp_where}: missing the 'exp' text")
            anno_ids = expression.get("anno_id")
            obj_ids = expression.get("obj_id")
            if mask_dict is not None:
                if anno_ids is None:
                    raise DataFormatError(f"{exp_where}: no 'anno_id' although masks are loaded from {mask_file}")
                anno_ids = anno_ids if isinstance(anno_ids, list) else [anno_ids]
                per_object = [_object_masks(mask_dict, a, len(frames), size, exp_where, mask_file) for a in anno_ids]
                if multi_object == "union":
                    masks = [[union_rles([obj[t] for obj in per_object], *size) for t in range(len(frames))]]
                else:
                    masks = per_object
            else:
                masks = []
            record_meta = {
                "dataset": name,
                "split": split,
                "video": video,
                "exp_id": str(exp_id),
                "obj_ids": obj_ids if isinstance(obj_ids, list) or obj_ids is None else [obj_ids],
                "anno_ids": anno_ids if isinstance(anno_ids, list) or anno_ids is None else [anno_ids],
                "frame_names": [str(f) for f in frames],
                "has_masks": mask_dict is not None,
                "multi_object": multi_object,
            }
            if "type_id" in expression:
                record_meta["type_id"] = int(expression["type_id"])
            if video_foreground is not None:
                record_meta["foreground"] = video_foreground
            yield make_record(
                sample_id=f"{name}/{split}/{video}/{exp_id}",
                source=name,
                media_type="video",
                media_id=video,
                frames=frame_paths,
                prompt=expression["exp"],
                answer="",
                masks=masks,
                meta=record_meta,
                where=exp_where,
            )


def _video_foreground(video, info, foreground, foreground_file, mask_dict, mask_file, size, where) -> list[dict]:
    """The per-frame union of all objects of the video (ReVOS R metric): from mask_dict_foreground.json when
    given, else the union of every anno_id any expression of the video uses."""
    num_frames = len(info["frames"])
    if foreground is not None:
        entry = foreground.get(video)
        if entry is None or "masks_rle" not in entry:
            raise DataFormatError(f"{foreground_file}: no 'masks_rle' for video {video!r}")
        rles = entry["masks_rle"]
        if len(rles) != num_frames:
            raise DataFormatError(
                f"{foreground_file}: video {video!r} has {len(rles)} foreground masks, {num_frames} frames"
            )
        result = []
        for index, rle in enumerate(rles):
            frame_where = f"{foreground_file} video {video!r} frame {index}"
            result.append(empty_rle(*size) if rle is None else segmentation_to_rle(rle, size[0], size[1], frame_where))
        return result
    anno_ids = sorted({str(a) for exp in info["expressions"].values() for a in (exp.get("anno_id") or [])})
    per_object = [_object_masks(mask_dict, a, num_frames, size, where, mask_file) for a in anno_ids]
    return [union_rles([obj[t] for obj in per_object], *size) for t in range(num_frames)]


def load_referring_video(
    name: str,
    root: PathLike,
    split: str,
    *,
    frames_dir: PathLike | None = None,
    meta_file: PathLike | None = None,
    mask_file: PathLike | None = None,
    multi_object: str = "union",
    require_masks: bool | None = None,
    include_foreground: bool | None = None,
    cache_dir: PathLike | None = None,
) -> datasets.Dataset:
    """Load one split of a referring video dataset (``name`` in `VIDEO_DATASETS`) as records, one per expression.

    Args:
        name: ``"mevis"``, ``"revos"``, ``"ref_ytvos"`` or ``"ref_davis"`` (the ``source`` of the records).
        root: the dataset folder (layout in the module docstring).
        split: e.g. ``train``, ``valid_u``, ``valid``.
        frames_dir, meta_file, mask_file: override the layout detection.
        multi_object: ``"union"`` (one target per expression, default) or ``"separate"`` (one per ``anno_id``).
        require_masks: ``True``: a missing mask dict is an error; ``False``: load without masks even if present;
            ``None`` (default): masks are optional only for the splits in `MASKLESS_SPLITS`.
        include_foreground: store the per-frame union of all objects of the video in ``meta["foreground"]``
            (RLE list, for the ReVOS R metric). Default: ReVOS splits other than ``train``.
    """
    if name not in VIDEO_DATASETS:
        raise ValueError(f"name must be one of {VIDEO_DATASETS}, got {name!r}")
    if multi_object not in MULTI_OBJECT_MODES:
        raise ValueError(f"multi_object must be one of {MULTI_OBJECT_MODES}, got {multi_object!r}")
    frames_path, meta_path, mask_path = resolve_video_layout(root, split, frames_dir, meta_file, mask_file)
    if require_masks is False:
        mask_path = None
    elif mask_path is None and (require_masks or split not in MASKLESS_SPLITS[name]):
        raise FileNotFoundError(
            f"no mask_dict.json / mask_dict.pkl found for {name} split {split!r} under {root}; this split needs "
            f"ground-truth masks (only {MASKLESS_SPLITS[name] or 'no'} splits load without). Pass mask_file=..."
        )
    if include_foreground is None:
        include_foreground = name == "revos" and split != "train"
    foreground_path = None
    if mask_path is not None and (mask_path.parent / "mask_dict_foreground.json").is_file():
        foreground_path = mask_path.parent / "mask_dict_foreground.json"
    if mask_path is None:
        logger.info("%s split %r: no mask dict, records have masks=[] (meta has_masks=false)", name, split)
    return build_dataset(
        _generate_video,
        {
            "name": name,
            "split": split,
            "frames_dir": str(frames_path),
            "meta_file": str(meta_path),
            "mask_file": None if mask_path is None else str(mask_path),
            "foreground_file": None if foreground_path is None else str(foreground_path),
            "multi_object": multi_object,
            "include_foreground": bool(include_foreground),
            "signature": file_signature([meta_path, mask_path, foreground_path]),
        },
        description=f"{name} split {split!r} ({meta_path})",
        cache_dir=cache_dir,
    )


def load_mevis(root: PathLike, split: str = "train", **kwargs) -> datasets.Dataset:
    """MeViS (``train``, ``valid_u`` with masks; ``valid``/``test`` without). See `load_referring_video`."""
    return load_referring_video("mevis", root, split, **kwargs)


def load_revos(root: PathLike, split: str = "train", **kwargs) -> datasets.Dataset:
    """ReVOS (``train``, ``valid``); ``meta["type_id"]`` is 0 for referring and 1 for reasoning expressions."""
    return load_referring_video("revos", root, split, **kwargs)


def load_ref_ytvos(root: PathLike, split: str = "train", **kwargs) -> datasets.Dataset:
    """Ref-YouTube-VOS in the Sa2VA layout (``train``; ``valid`` has no masks). See `load_referring_video`."""
    return load_referring_video("ref_ytvos", root, split, **kwargs)


def load_ref_davis(root: PathLike, split: str = "valid", **kwargs) -> datasets.Dataset:
    """Ref-DAVIS17 in the Sa2VA layout (``valid``, ``train``). See `load_referring_video`."""
    return load_referring_video("ref_davis", root, split, **kwargs)
