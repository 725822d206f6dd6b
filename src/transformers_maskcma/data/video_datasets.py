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
"obj_id": [...], "anno_id": [...]}}}}}``; ReVOS adds ``"type_id"`` (0 referring, 1 reasoning, 2 excluded by the
official scorers) to each expression. ``obj_id`` may be written as strings; records carry ints.

Ref-YouTube-VOS and Ref-DAVIS17 meta files as distributed carry no ``anno_id``: the loader then builds the index
of the official readers (`official_annotation_index`: one running counter over every video of the file sorted by
name and, inside a video, over the expression ids sorted as strings), which keys the distributed mask dicts.
Videos listed in the meta file without a frame folder in the split (Ref-YouTube-VOS ``valid`` lists the 305 test
videos too) are left out *after* indexing, with a warning that counts them. ``meta["anno_index"]`` says which
index a record used (``"file"`` or ``"official"``).
Frame names may omit the extension (the file in the video folder with that stem is used). ``mask_dict`` =
``{str(anno_id): [COCO RLE or null per frame]}``, aligned to the video's ``frames`` list *in the order given*; a null
is an empty mask of the frame size. ``mask_dict_foreground.json`` = ``{video: {"masks_rle": [RLE per frame]}}``.

Several objects in one expression (MeViS, ReVOS): by default (``multi_object="union"``) the objects' masks are
OR-ed into one target per frame, as Sa2VA does for MeViS/ReVOS training (its video dataset merges all ``anno_id``
masks of an expression into one mask) and as the VISA/MeViS evaluators score (the GT of an expression is the
union of its objects). ``multi_object="separate"`` keeps one object (one ``[SEG]``) per ``anno_id`` instead.
With the union, the pixels two or more objects share are kept in ``meta["overlap"]`` (``{frame: [RLE of >= 2
objects, >= 3, ...]}``, frames with an overlap only), which the official ReVOS A and R need.

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
import numpy as np
from pycocotools import mask as coco_mask

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
from .schema import decode_rle, empty_rle, encode_rle

logger = logging.getLogger(__name__)

VIDEO_DATASETS = ("mevis", "revos", "ref_ytvos", "ref_davis")
# splits whose ground truth is withheld (scored by an evaluation server)
MASKLESS_SPLITS = {"mevis": ("valid", "test"), "ref_ytvos": ("valid", "test"), "revos": (), "ref_davis": ()}
MULTI_OBJECT_MODES = ("union", "separate")
# datasets whose meta files may omit anno_id: the masks are then keyed by the official running index
OFFICIAL_INDEX_DATASETS = ("ref_ytvos", "ref_davis")


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


def official_annotation_index(videos: dict) -> dict[tuple[str, str], int]:
    """The annotation index the official Ref-YouTube-VOS / Ref-DAVIS17 readers build for a meta file without
    ``anno_id``: one running counter over **every** video of the file sorted by name and, inside each video, over
    the expression ids sorted **as strings** (``"0", "1", "10", "11", "2", ...``). The mask dicts distributed for
    these datasets are keyed by this counter. Videos that have no frames on disk still advance the counter.

    Returns:
        ``{(video, exp_id): anno_id}``.
    """
    index: dict[tuple[str, str], int] = {}
    counter = 0
    for video in sorted(videos):
        expressions = videos[video].get("expressions") or {}
        for exp_id in sorted(str(key) for key in expressions):
            index[(video, exp_id)] = counter
            counter += 1
    return index


def _obj_ids(value, where: str) -> list[int] | None:
    """``obj_id`` as a list of ints (the files write ``"1"`` or ``1`` or a list of either)."""
    if value is None:
        return None
    values = value if isinstance(value, list) else [value]
    result = []
    for item in values:
        if isinstance(item, bool) or not (isinstance(item, int) or (isinstance(item, str) and item.strip().isdigit())):
            raise DataFormatError(f"{where}: obj_id must be an integer or a string of digits, got {item!r}")
        result.append(int(item))
    return result


def _anno_id_mode(name: str, videos: dict, meta_file: str, needs_masks: bool) -> str:
    """``"file"`` when every expression carries ``anno_id``, ``"official"`` when none does (Ref-YouTube-VOS and
    Ref-DAVIS17), ``"none"`` when none does and no masks are loaded (other datasets); a file mixing both is an
    error."""
    with_ids = without_ids = 0
    for info in videos.values():
        for expression in (info.get("expressions") or {}).values():
            if isinstance(expression, dict) and expression.get("anno_id") is not None:
                with_ids += 1
            else:
                without_ids += 1
    if without_ids == 0:
        return "file"
    if with_ids:
        raise DataFormatError(
            f"{meta_file}: {with_ids} expressions carry 'anno_id' and {without_ids} do not; give it for every "
            "expression or for none (then the official index is used)"
        )
    if name not in OFFICIAL_INDEX_DATASETS:
        if not needs_masks:
            return "none"
        raise DataFormatError(
            f"{meta_file}: the expressions carry no 'anno_id'; {name} files name the masks of each expression "
            f"explicitly (only {', '.join(OFFICIAL_INDEX_DATASETS)} use the official running index)"
        )
    return "official"


def videos_without_frames(videos: dict, frames_root: Path) -> list[str]:
    """The videos of a meta file whose frame folder is absent under ``frames_root`` (e.g. the 305 test videos
    listed in Ref-YouTube-VOS's ``valid`` meta file, whose frames are not in the valid folder)."""
    return sorted(video for video in videos if not (frames_root / video).is_dir())


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
    videos = meta["videos"]
    anno_mode = _anno_id_mode(name, videos, meta_file, needs_masks=mask_file is not None)
    official_index = official_annotation_index(videos) if anno_mode == "official" else None
    mask_dict = _read_mask_dict(mask_file) if mask_file is not None else None
    foreground = None
    if include_foreground and foreground_file is not None:
        foreground = read_json(foreground_file, "foreground mask dict")
    frames_root = Path(frames_dir)
    # indexing above covers every video; videos without frames in this split are left out only now
    absent = set(videos_without_frames(videos, frames_root))
    for video in sorted(videos):
        if video in absent:
            continue
        info = videos[video]
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
        for exp_id in sorted(expressions, key=str):
            expression = expressions[exp_id]
            exp_where = f"{where} expression {exp_id!r}"
            if not isinstance(expression, dict) or "exp" not in expression:
                raise DataFormatError(f"{exp_where}: missing the 'exp' text")
            if official_index is not None:
                anno_ids = [official_index[(video, str(exp_id))]]
            elif anno_mode == "file":
                anno_ids = expression["anno_id"]
                anno_ids = anno_ids if isinstance(anno_ids, list) else [anno_ids]
            else:
                anno_ids = None
            obj_ids = _obj_ids(expression.get("obj_id"), exp_where)
            overlap = None
            if mask_dict is not None:
                per_object = [_object_masks(mask_dict, a, len(frames), size, exp_where, mask_file) for a in anno_ids]
                if multi_object == "union":
                    masks = [[union_rles([obj[t] for obj in per_object], *size) for t in range(len(frames))]]
                    overlap = _overlap_levels(per_object, size)
                else:
                    masks = per_object
            else:
                masks = []
            record_meta = {
                "dataset": name,
                "split": split,
                "video": video,
                "exp_id": str(exp_id),
                "obj_ids": obj_ids,
                "anno_ids": anno_ids,
                "anno_index": anno_mode,
                "frame_names": [str(f) for f in frames],
                "has_masks": mask_dict is not None,
                "multi_object": multi_object,
            }
            if overlap:
                record_meta["overlap"] = overlap
            if "type_id" in expression:
                record_meta["type_id"] = int(expression["type_id"])
            if video_foreground is not None:
                record_meta["foreground"], foreground_area = video_foreground
                if foreground_area is not None:
                    record_meta["foreground_area"] = foreground_area
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


def _overlap_levels(per_object: list[list[dict]], size: tuple[int, int]) -> dict[str, list[dict]]:
    """Where the objects of one expression overlap, which the union target loses: ``{str(frame): [RLE of the
    pixels covered by at least 2 objects, by at least 3, ...]}`` for the frames with an overlap (empty for one
    object). With the union it gives the per-pixel object count, the ground truth of the official ReVOS scorers
    (the uint8 sum of the objects' masks)."""
    if len(per_object) < 2:
        return {}
    levels: dict[str, list[dict]] = {}
    for frame in range(len(per_object[0])):
        rles = [obj[frame] for obj in per_object]
        if sum(int(coco_mask.area(_as_bytes(rle))) for rle in rles) == int(
            coco_mask.area(_as_bytes(union_rles(rles, *size)))
        ):
            continue  # no pixel is covered twice
        count = np.zeros(size, dtype=np.int64)
        for rle in rles:
            count += decode_rle(rle)
        levels[str(frame)] = [encode_rle((count >= level).astype(np.uint8)) for level in range(2, int(count.max()) + 1)]
    return levels


def _as_bytes(rle: dict) -> dict:
    counts = rle["counts"]
    return {"size": list(rle["size"]), "counts": counts.encode("ascii") if isinstance(counts, str) else counts}


def _video_foreground(
    video, info, foreground, foreground_file, mask_dict, mask_file, size, where
) -> tuple[list[dict], list[int] | None]:
    """The per-frame union of all objects of the video (ReVOS R metric): from mask_dict_foreground.json when
    given, else the union of every anno_id any expression of the video uses.

    Returns:
        ``(rles, areas)``: one union RLE per frame, and, when the file stores a frame's foreground as a list of
        per-object RLEs, the official scorers' foreground area of every frame (the sum of the objects' areas,
        which counts overlapping pixels once per object); ``None`` otherwise.
    """
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
        result, areas = [], []
        for index, rle in enumerate(rles):
            frame_where = f"{foreground_file} video {video!r} frame {index}"
            result.append(empty_rle(*size) if rle is None else segmentation_to_rle(rle, size[0], size[1], frame_where))
            parts = [] if rle is None else rle if isinstance(rle, list) else [rle]
            areas.append(
                sum(
                    int(coco_mask.area(_as_bytes(segmentation_to_rle(part, size[0], size[1], frame_where))))
                    for part in parts
                )
            )
        has_lists = any(isinstance(rle, list) for rle in rles)
        return result, areas if has_lists else None
    anno_ids = sorted({str(a) for exp in info["expressions"].values() for a in (exp.get("anno_id") or [])})
    per_object = [_object_masks(mask_dict, a, num_frames, size, where, mask_file) for a in anno_ids]
    return [union_rles([obj[t] for obj in per_object], *size) for t in range(num_frames)], None


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
    meta = read_json(meta_path, "meta_expressions file")
    if isinstance(meta, dict) and isinstance(meta.get("videos"), dict):
        absent = videos_without_frames(meta["videos"], frames_path)
        if absent:
            logger.warning(
                "%s split %r: %d of %d videos of %s have no frames under %s and are left out (e.g. %s); the "
                "annotation index still counts them",
                name, split, len(absent), len(meta["videos"]), meta_path, frames_path, ", ".join(absent[:3]),
            )
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
