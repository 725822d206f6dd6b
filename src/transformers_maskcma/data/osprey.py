"""Osprey-724K region–text annotations (``osprey_detail_description.json``, ``osprey_conversation.json``,
``osprey_short_form.json``, ``osprey_part_level.json``, ``osprey_lvis_positive_negative.json``).

Every file is a JSON list of entries::

    {"file_name": "000000123456.jpg" (COCO 2017) or "COCO_train2014_000000123456.jpg",
     "height": int, "width": int, "id"/"image_id": ...,
     "annotation": [{"segmentation": polygons or COCO RLE, "bbox": [x, y, w, h], "category_id"?: ...}, ...],
     "description": ["<region1>: text about region 1", ...]                 # detail_description only
     "conversations": [{"from": "human", "value": "... <region1> ..."}, {"from": "gpt", "value": "..."}, ...]}

``<regionK>`` in the texts names ``annotation[K - 1]``. Osprey (and Sa2VA) feed the region masks to the model as
*visual prompts* and train it to talk about them. MaskCMA has no visual-prompt input, so two readings are offered:

``task="referring"`` (default; needs ``description``): each region description becomes a referring sample —
    ``prompt`` = the description text, ``answer`` = "" (default ``[SEG]`` template), ``masks`` = that region.
    One record per region. This is how the seed mix uses Osprey.
``task="region_caption"`` (needs ``conversations``): one record per entry; ``masks`` = all regions in order,
    ``prompt``/``answer`` = the first human/gpt turns, the whole conversation in ``meta["conversation"]`` and
    ``meta["mask_role"] = "prompt_regions"``: these masks are inputs, not ``[SEG]`` targets. Only a model with a
    region-prompt encoder can train on them.

Images are looked up in each of ``image_dirs`` as ``<dir>/<file_name>`` and then ``<dir>/<last "_" part of
file_name>`` (Osprey's own loader strips the ``COCO_train2014_`` prefix to find the COCO 2017 file).
``media_id`` = ``file_name`` as written in the JSON.
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Sequence
from pathlib import Path

import datasets

from .errors import DataFormatError, MaskSizeError
from .records import (
    PathLike,
    build_dataset,
    file_signature,
    image_size,
    make_record,
    read_json,
    require_dir,
    require_file,
    segmentation_to_rle,
)

logger = logging.getLogger(__name__)

OSPREY_TASKS = ("referring", "region_caption")
_DESCRIPTION = re.compile(r"^\s*<region(\d+)>\s*:?\s*(.*)$", re.DOTALL)


def _find_image(file_name: str, image_dirs: Sequence[Path], cache: dict, where: str) -> Path:
    if file_name in cache:
        return cache[file_name]
    candidates = []
    for directory in image_dirs:
        candidates.append(directory / file_name)
        candidates.append(directory / file_name.split("_")[-1])
    for candidate in candidates:
        if os.path.isfile(candidate):
            cache[file_name] = candidate
            return candidate
    tried = ", ".join(str(c) for c in candidates)
    raise FileNotFoundError(f"{where}: image {file_name!r} not found; tried {tried} (check image_dirs)")


def _generate_osprey(
    annotation_file: str, image_dirs: list, task: str, verify_image_sizes: bool, signature: list, **cache_key
):
    data = read_json(annotation_file, "Osprey annotation file")
    if not isinstance(data, list):
        raise DataFormatError(f"{annotation_file}: an Osprey file is a JSON list of entries, got {type(data).__name__}")
    directories = [Path(d) for d in image_dirs]
    stem = Path(annotation_file).stem
    found: dict[str, Path] = {}
    verified: set[Path] = set()
    for index, entry in enumerate(data):
        where = f"{annotation_file} entry #{index}"
        missing = [key for key in ("file_name", "height", "width", "annotation") if key not in entry]
        if missing:
            raise DataFormatError(f"{where}: missing field(s) {missing}")
        height, width = int(entry["height"]), int(entry["width"])
        image_path = _find_image(entry["file_name"], directories, found, where)
        if verify_image_sizes and image_path not in verified:
            actual = image_size(image_path)
            if actual != (height, width):
                raise MaskSizeError(
                    f"{where}: image {image_path} is {actual} (height, width), the entry says {(height, width)}"
                )
            verified.add(image_path)
        regions = [
            segmentation_to_rle(region["segmentation"], height, width, f"{where} region {k + 1}")
            for k, region in enumerate(entry["annotation"])
        ]
        common = {"dataset": "osprey", "file": stem, "entry": index, "image_id": entry.get("image_id", entry.get("id"))}
        if task == "referring":
            if "description" not in entry:
                raise DataFormatError(
                    f"{where}: task='referring' needs a 'description' list ('<regionK>: text'); this file has "
                    "conversations only: load it with task='region_caption' or use osprey_detail_description.json"
                )
            for line in entry["description"]:
                match = _DESCRIPTION.match(line)
                if match is None:
                    raise DataFormatError(f"{where}: description {line!r:.80} does not start with '<regionK>:'")
                region_number, text = int(match.group(1)), match.group(2).strip()
                if not 1 <= region_number <= len(regions):
                    raise DataFormatError(f"{where}: <region{region_number}> but the entry has {len(regions)} regions")
                yield make_record(
                    sample_id=f"osprey/{stem}/{index}/region{region_number}",
                    source="osprey",
                    media_type="image",
                    media_id=entry["file_name"],
                    frames=[image_path],
                    prompt=text,
                    answer="",
                    masks=[[regions[region_number - 1]]],
                    meta={**common, "region": region_number, "mask_role": "target"},
                    where=f"{where} <region{region_number}>",
                )
        else:
            conversation = entry.get("conversations")
            if not conversation:
                raise DataFormatError(f"{where}: task='region_caption' needs a non-empty 'conversations' list")
            human = next((turn["value"] for turn in conversation if turn.get("from") == "human"), None)
            gpt = next((turn["value"] for turn in conversation if turn.get("from") == "gpt"), None)
            if human is None or gpt is None:
                raise DataFormatError(f"{where}: the conversation needs a 'human' and a 'gpt' turn")
            yield make_record(
                sample_id=f"osprey/{stem}/{index}",
                source="osprey",
                media_type="image",
                media_id=entry["file_name"],
                frames=[image_path],
                prompt=human,
                answer=gpt,
                masks=[[rle] for rle in regions],
                meta={**common, "mask_role": "prompt_regions", "conversation": conversation},
                where=where,
            )


def load_osprey(
    annotation_file: PathLike,
    image_dirs: PathLike | Sequence[PathLike],
    *,
    task: str = "referring",
    verify_image_sizes: bool = True,
    cache_dir: PathLike | None = None,
) -> datasets.Dataset:
    """Load an Osprey-724K JSON file as image records (see the module docstring for ``task``).

    Args:
        annotation_file: one of the Osprey-724K JSON files.
        image_dirs: one folder or a list of folders searched in order (COCO train2014/val2014/train2017/...).
        task: ``"referring"`` (description → mask) or ``"region_caption"`` (masks are region prompts).
        verify_image_sizes: check each image's header against the entry's height/width.
    """
    if task not in OSPREY_TASKS:
        raise ValueError(f"task must be one of {OSPREY_TASKS}, got {task!r}")
    annotation_path = require_file(annotation_file, "Osprey annotation file")
    if isinstance(image_dirs, (str, os.PathLike)):
        image_dirs = [image_dirs]
    if not image_dirs:
        raise ValueError("image_dirs is empty: give the folder(s) that hold the COCO images Osprey refers to")
    directories = [str(require_dir(d, "Osprey image")) for d in image_dirs]
    return build_dataset(
        _generate_osprey,
        {
            "annotation_file": str(annotation_path),
            "image_dirs": directories,
            "task": task,
            "verify_image_sizes": verify_image_sizes,
            "signature": file_signature([annotation_path]),
        },
        description=f"Osprey file {annotation_path} (task {task!r})",
        cache_dir=cache_dir,
    )
