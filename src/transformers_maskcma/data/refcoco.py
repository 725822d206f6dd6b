"""RefCOCO, RefCOCO+ and RefCOCOg (referring image segmentation on COCO train2014 images).

Expected files (the layout of Sa2VA's ``ref_seg/<dataset>/`` folders; the ``refer`` API layout also works)::

    <root>/                         e.g. ref_seg/refcoco
        refs(unc).p                 refcoco and refcoco+ ("unc" splits: train, val, testA, testB)
        refs(umd).p                 refcocog ("umd" splits: train, val, test; "google": train, val)
        instances.json              COCO instances of the images the refs use (polygons or RLE)
        coco2014/train2014/*.jpg    the images, or one of: images/, train2014/, images/train2014/,
                                    ../images/mscoco/images/train2014/ (refer API), ../coco2014/train2014/

``<root>/<dataset>/refs(...).p`` (a folder holding all three datasets) is accepted too. Pass ``image_dir`` when
the images live elsewhere.

``refs(*).p`` is a pickled list of ``{ref_id, ann_id, image_id, category_id, split, file_name, sent_ids,
sentences: [{sent_id, sent, raw, tokens}]}``; ``ann_id`` points at ``instances.json["annotations"]``, whose
``segmentation`` is a list of polygons, an uncompressed RLE (``counts`` a list) or a compressed RLE. The
``file_name`` in a ref carries an annotation suffix (``COCO_train2014_000000581857_16.jpg``); the image file is
``instances.json["images"][...]["file_name"]``, which is also the record's ``media_id``.

One record per sentence: ``prompt`` = the sentence's ``sent`` (lower-cased, tokenised text), ``answer`` = ""
(the processor's default template with one ``[SEG]``), one object with one frame.
"""

from __future__ import annotations

import logging
from pathlib import Path

import datasets

from .errors import DataFormatError, MaskSizeError
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
)

logger = logging.getLogger(__name__)

REFCOCO_DATASETS = ("refcoco", "refcoco+", "refcocog")
DEFAULT_SPLIT_BY = {"refcoco": "unc", "refcoco+": "unc", "refcocog": "umd"}
SPLITS = {"unc": ("train", "val", "testA", "testB"), "umd": ("train", "val", "test"), "google": ("train", "val")}


def resolve_refcoco_layout(
    root: PathLike,
    dataset: str,
    split_by: str,
    image_dir: PathLike | None = None,
    refs_file: PathLike | None = None,
    instances_file: PathLike | None = None,
) -> tuple[Path, Path, Path]:
    """Find ``(refs_file, instances_file, image_dir)`` for ``dataset`` under ``root`` (see the module docstring)."""
    root = require_dir(root, f"{dataset} data")
    hint = f"Pass refs_file=/instances_file=/image_dir= explicitly if your {dataset} layout differs."
    if refs_file is None:
        refs_file = first_existing(
            [root / f"refs({split_by}).p", root / dataset / f"refs({split_by}).p"],
            f"{dataset} refs pickle",
            hint,
            "file",
        )
    refs_file = Path(refs_file)
    if instances_file is None:
        instances_file = first_existing(
            [refs_file.parent / "instances.json", root / "instances.json"],
            f"{dataset} COCO instances.json",
            hint,
            "file",
        )
    if image_dir is None:
        base = refs_file.parent
        image_dir = first_existing(
            [
                base / "coco2014" / "train2014",
                base / "images",
                base / "train2014",
                base / "images" / "train2014",
                base.parent / "images" / "mscoco" / "images" / "train2014",
                base.parent / "coco2014" / "train2014",
            ],
            f"{dataset} image folder",
            hint,
            "dir",
        )
    return refs_file, Path(instances_file), require_dir(image_dir, f"{dataset} image")


def _generate_refcoco(
    refs_file: str,
    instances_file: str,
    image_dir: str,
    dataset: str,
    split: str,
    split_by: str,
    verify_image_sizes: bool,
    signature: list,
    **cache_key,
):
    refs = read_pickle(refs_file, f"{dataset} refs pickle")
    if not isinstance(refs, list):
        raise DataFormatError(f"{refs_file}: expected a pickled list of refs, got {type(refs).__name__}")
    instances = read_json(instances_file, "COCO instances file")
    if not isinstance(instances, dict) or "images" not in instances or "annotations" not in instances:
        raise DataFormatError(f"{instances_file}: a COCO instances file needs top-level 'images' and 'annotations'")
    images = {image["id"]: image for image in instances["images"]}
    annotations = {annotation["id"]: annotation for annotation in instances["annotations"]}
    image_dir = Path(image_dir)
    checked_images: set[str] = set()
    for index, ref in enumerate(refs):
        if ref.get("split") != split:
            continue
        where = f"{refs_file} ref #{index} (ref_id {ref.get('ref_id')})"
        missing = [key for key in ("ref_id", "ann_id", "image_id", "sentences") if key not in ref]
        if missing:
            raise DataFormatError(f"{where}: missing field(s) {missing}")
        image = images.get(ref["image_id"])
        if image is None:
            raise DataFormatError(f"{where}: image_id {ref['image_id']} is not in {instances_file}")
        annotation = annotations.get(ref["ann_id"])
        if annotation is None:
            raise DataFormatError(f"{where}: ann_id {ref['ann_id']} is not in {instances_file}")
        if annotation.get("image_id") != ref["image_id"]:
            raise DataFormatError(
                f"{where}: annotation {ref['ann_id']} belongs to image {annotation.get('image_id')}, the ref to "
                f"image {ref['image_id']}; refs and instances.json come from different releases"
            )
        height, width = int(image["height"]), int(image["width"])
        image_path = image_dir / image["file_name"]
        if image["file_name"] not in checked_images:
            if not image_path.is_file():
                raise FileNotFoundError(f"{where}: image file not found: {image_path} (check image_dir)")
            if verify_image_sizes:
                actual = image_size(image_path)
                if actual != (height, width):
                    raise MaskSizeError(
                        f"{image_path}: image is {actual} (height, width) but {instances_file} says "
                        f"{(height, width)}; the images were resized or belong to another COCO release"
                    )
            checked_images.add(image["file_name"])
        rle = segmentation_to_rle(
            annotation["segmentation"], height, width, f"{instances_file} annotation {ref['ann_id']}"
        )
        for sentence in ref["sentences"]:
            sent_id = sentence.get("sent_id")
            yield make_record(
                sample_id=f"{dataset}/{split}/{ref['ref_id']}/{sent_id}",
                source=dataset,
                media_type="image",
                media_id=image["file_name"],
                frames=[image_path],
                prompt=sentence["sent"],
                answer="",
                masks=[[rle]],
                meta={
                    "dataset": dataset,
                    "split": split,
                    "split_by": split_by,
                    "ref_id": ref["ref_id"],
                    "ann_id": ref["ann_id"],
                    "image_id": ref["image_id"],
                    "sent_id": sent_id,
                    "category_id": ref.get("category_id"),
                },
                where=f"{where} sentence {sent_id}",
            )


def load_refcoco(
    root: PathLike,
    dataset: str = "refcoco",
    split: str = "val",
    *,
    split_by: str | None = None,
    image_dir: PathLike | None = None,
    refs_file: PathLike | None = None,
    instances_file: PathLike | None = None,
    verify_image_sizes: bool = True,
    cache_dir: PathLike | None = None,
) -> datasets.Dataset:
    """Load one split of RefCOCO / RefCOCO+ / RefCOCOg as records of `RECORD_FEATURES` (one per sentence).

    Args:
        root: the dataset folder (see the module docstring for the layout).
        dataset: ``"refcoco"``, ``"refcoco+"`` or ``"refcocog"``.
        split: ``train``/``val``/``testA``/``testB`` (unc) or ``train``/``val``/``test`` (umd).
        split_by: the refs file flavour; defaults to ``unc`` for refcoco/refcoco+ and ``umd`` for refcocog.
        image_dir, refs_file, instances_file: override the automatic layout detection.
        verify_image_sizes: read each image's header once and check it against ``instances.json``.
        cache_dir: where `datasets` writes the Arrow table (default: the Hugging Face datasets cache).

    Each record: ``frames`` = [image path], ``masks`` = one object with one RLE of the image size.
    """
    if dataset not in REFCOCO_DATASETS:
        raise ValueError(f"dataset must be one of {REFCOCO_DATASETS}, got {dataset!r}")
    split_by = split_by or DEFAULT_SPLIT_BY[dataset]
    if split_by not in SPLITS:
        raise ValueError(f"split_by must be one of {tuple(SPLITS)}, got {split_by!r}")
    if split not in SPLITS[split_by]:
        raise ValueError(f"{dataset} ({split_by}) has splits {SPLITS[split_by]}, got split {split!r}")
    refs_path, instances_path, images_path = resolve_refcoco_layout(
        root, dataset, split_by, image_dir, refs_file, instances_file
    )
    return build_dataset(
        _generate_refcoco,
        {
            "refs_file": str(refs_path),
            "instances_file": str(instances_path),
            "image_dir": str(images_path),
            "dataset": dataset,
            "split": split,
            "split_by": split_by,
            "verify_image_sizes": verify_image_sizes,
            "signature": file_signature([refs_path, instances_path]),
        },
        description=f"{dataset} split {split!r} ({refs_path})",
        cache_dir=cache_dir,
    )
