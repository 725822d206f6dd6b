"""Grounded Conversation Generation (GCG) annotations released with GLaMM (GranD-f), used by Sa2VA's training mix.

A GCG sample is an image, a caption, and a mask for each grounded phrase of the caption. The record's ``answer``
is the caption with ``<p> phrase </p> [SEG]`` around and after each grounded phrase (the tagging GLaMM and Sa2VA
train on), ``masks`` holds one object per ``[SEG]`` in caption order, and ``prompt`` is `GCG_PROMPT`.

The three JSON layouts of GranD-f (``GranDf/annotations/train/``), detected automatically (``variant="auto"``):

``"grandf"`` — ``GranDf_HA_GCG_train.json`` and ``OpenPsgGCG_{train,val}.json``: a list of
    ``{"file_name": str, "height": int, "width": int, "image_id": ..., "caption": str,
    "groundings": {phrase: {"token_positives": [start, end], "rle_masks": [COCO RLE, ...]} | null}}``.
    ``[start, end)`` are character offsets into the caption (after stripping surrounding quotes and blanks); the
    ``rle_masks`` of a phrase are OR-ed into one mask.
``"refcocog"`` — ``RefCOCOg_GCG_{train,val}.json``: a list of one-key dicts ``{id: {"img_file_name": str,
    "caption": str, "refs": [{"sentence": str, "bbox": [...], "segmentation": polygons or RLE}]}}``. Phrases are
    located by searching each ``sentence`` in the lower-cased caption; a sentence that does not occur in the
    caption is not grounded (listed in ``meta["ungrounded_phrases"]``).
``"flickr"`` — ``flickr_mergedGT_GCG_{train,val}.json``: COCO style ``{"images": [{"id", "file_name", "height",
    "width", "caption"}], "annotations": [{"image_id", "bbox", "area", "tokens_positive": [[start, end], ...],
    "sam_mask": COCO RLE, "ignore"?: bool}]}``. The first ``tokens_positive`` span names the phrase; annotations
    sharing one span are OR-ed into one mask; ``ignore``-d annotations are left out and counted in
    ``meta["ignored_annotations"]``.

Overlapping phrase spans (they occur in RefCOCOg-GCG) are made disjoint: an earlier phrase is cut where the next
one starts; a phrase cut to nothing has its mask OR-ed into the phrase that starts at the same place.
An image without any grounded phrase becomes a caption-only record (``masks=[]``), never dropped.

Images: ``<image_dir>/<file_name>`` (Sa2VA: ``glamm_data/images/{grandf/train, coco2014/train2014, coco2017,
flickr30k/Flickr30K}``). ``media_id`` = ``file_name``.
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
    image_size,
    make_record,
    read_json,
    require_dir,
    require_file,
    segmentation_to_rle,
    union_rles,
)

logger = logging.getLogger(__name__)

GCG_VARIANTS = ("grandf", "refcocog", "flickr")
GCG_PROMPT = (
    "Describe the image briefly. Mark each object you mention as <p> phrase </p> followed by [SEG], "
    "so that it gets a segmentation mask."
)


def detect_gcg_variant(data, path: PathLike) -> str:
    """Which GCG layout ``data`` (parsed JSON) has; raises `DataFormatError` naming ``path`` if none fits."""
    if isinstance(data, dict) and "images" in data and "annotations" in data:
        return "flickr"
    if isinstance(data, list) and data:
        first = data[0]
        if isinstance(first, dict) and "groundings" in first:
            return "grandf"
        if isinstance(first, dict) and len(first) == 1:
            inner = next(iter(first.values()))
            if isinstance(inner, dict) and "refs" in inner:
                return "refcocog"
    raise DataFormatError(
        f"{path}: not a GLaMM GCG file: expected a list of {{'caption', 'groundings'}} (GranDf/OpenPSG), a list "
        "of {id: {'img_file_name', 'caption', 'refs'}} (RefCOCOg-GCG) or COCO-style {'images', 'annotations'} "
        "(Flickr-GCG)"
    )


def tag_caption(caption: str, phrases: list[tuple[int, int, dict]], height: int, width: int) -> tuple[str, list, list]:
    """Insert ``<p> ... </p> [SEG]`` for each ``(start, end, rle)`` span of ``caption``.

    Returns ``(answer, rles, phrase_texts)`` in caption order, with overlapping spans made disjoint (module
    docstring).
    """
    spans = sorted(((int(s), int(e), rle) for s, e, rle in phrases), key=lambda item: (item[0], item[1]))
    merged: list[list] = []
    for start, end, rle in spans:
        if not caption[start:end].strip():
            raise DataFormatError(f"phrase span [{start}, {end}) is empty or blank in caption {caption!r:.200}")
        if merged and merged[-1][1] > start:
            previous = merged[-1]
            if not caption[previous[0] : start].strip():
                # the earlier phrase would be cut to nothing: one phrase, the union of both masks, the longer span
                merged.pop()
                rle = union_rles([previous[2], rle], height, width)
                start, end = previous[0], max(previous[1], end)
            else:
                previous[1] = start
        merged.append([start, end, rle])
    pieces, rles, texts, cursor = [], [], [], 0
    for start, end, rle in merged:
        raw = caption[start:end]
        text = raw.strip()
        leading, trailing = raw[: len(raw) - len(raw.lstrip())], raw[len(raw.rstrip()) :]
        pieces.append(caption[cursor:start] + leading)
        pieces.append(f"<p> {text} </p> [SEG]{trailing}")
        cursor = end
        rles.append(rle)
        texts.append(text)
    pieces.append(caption[cursor:])
    return "".join(pieces), rles, texts


def _check_image(image_path: Path, size: tuple[int, int] | None, verify: bool, where: str) -> tuple[int, int]:
    if not image_path.is_file():
        raise FileNotFoundError(f"{where}: image file not found: {image_path} (check image_dir)")
    if size is None or verify:
        actual = image_size(image_path)
        if size is not None and actual != size:
            raise MaskSizeError(f"{image_path}: image is {actual} (height, width) but the annotation says {size}")
        return actual
    return size


def _grandf_items(data, path, image_dir: Path, verify: bool):
    for index, entry in enumerate(data):
        where = f"{path} entry #{index}"
        if "file_name" not in entry or "caption" not in entry:
            raise DataFormatError(f"{where}: needs 'file_name' and 'caption'")
        given = (int(entry["height"]), int(entry["width"])) if "height" in entry and "width" in entry else None
        image_path = image_dir / entry["file_name"]
        height, width = _check_image(image_path, given, verify, where)
        caption = entry["caption"].strip('"').strip()
        phrases = []
        for phrase, grounding in (entry.get("groundings") or {}).items():
            if grounding is None:
                continue
            start, end = grounding["token_positives"]
            rles = [segmentation_to_rle(r, height, width, f"{where} phrase {phrase!r}") for r in grounding["rle_masks"]]
            phrases.append((start, end, union_rles(rles, height, width)))
        yield entry["file_name"], image_path, caption, phrases, (height, width), {"ungrounded_phrases": []}, where


def _refcocog_items(data, path, image_dir: Path, verify: bool):
    for index, wrapper in enumerate(data):
        where = f"{path} entry #{index}"
        if not isinstance(wrapper, dict) or len(wrapper) != 1:
            raise DataFormatError(f"{where}: RefCOCOg-GCG entries are one-key dicts {{id: {{...}}}}")
        ((entry_id, entry),) = wrapper.items()
        where = f"{path} entry {entry_id!r}"
        image_path = image_dir / entry["img_file_name"]
        height, width = _check_image(image_path, None, verify, where)
        caption = entry["caption"].strip('"').strip().lower()
        phrases, ungrounded = [], []
        for ref in entry.get("refs", []):
            sentence = ref["sentence"].strip()
            start = caption.find(sentence.lower())
            if start < 0 or not sentence:
                ungrounded.append(sentence)
                continue
            rle = segmentation_to_rle(ref["segmentation"], height, width, f"{where} ref {sentence!r}")
            phrases.append((start, start + len(sentence), rle))
        yield (
            entry["img_file_name"],
            image_path,
            caption,
            phrases,
            (height, width),
            {"ungrounded_phrases": ungrounded},
            where,
        )


def _flickr_items(data, path, image_dir: Path, verify: bool):
    by_image: dict = {}
    for annotation in data["annotations"]:
        by_image.setdefault(annotation["image_id"], []).append(annotation)
    for image in data["images"]:
        where = f"{path} image id {image['id']}"
        image_path = image_dir / image["file_name"]
        height, width = _check_image(image_path, (int(image["height"]), int(image["width"])), verify, where)
        caption = image["caption"]
        spans: dict[tuple[int, int], list] = {}
        ignored = 0
        for annotation in by_image.get(image["id"], []):
            if annotation.get("ignore", False):
                ignored += 1
                continue
            start, end = annotation["tokens_positive"][0]
            rle = segmentation_to_rle(
                annotation["sam_mask"], height, width, f"{where} annotation {annotation.get('id')}"
            )
            spans.setdefault((int(start), int(end)), []).append(rle)
        phrases = [(s, e, union_rles(rles, height, width)) for (s, e), rles in spans.items()]
        extra = {"ungrounded_phrases": [], "ignored_annotations": ignored}
        yield image["file_name"], image_path, caption, phrases, (height, width), extra, where


def _generate_gcg(
    annotation_file: str, image_dir: str, variant: str, verify_image_sizes: bool, signature: list, **cache_key
):
    data = read_json(annotation_file, "GCG annotation file")
    detected = detect_gcg_variant(data, annotation_file)
    if variant != "auto" and variant != detected:
        raise DataFormatError(
            f"{annotation_file}: looks like a {detected!r} GCG file, but variant={variant!r} was asked"
        )
    items = {"grandf": _grandf_items, "refcocog": _refcocog_items, "flickr": _flickr_items}[detected]
    stem = Path(annotation_file).stem
    ungrounded_total = 0
    for index, (file_name, image_path, caption, phrases, size, extra, where) in enumerate(
        items(data, annotation_file, Path(image_dir), verify_image_sizes)
    ):
        try:
            answer, rles, texts = tag_caption(caption, phrases, *size)
        except DataFormatError as error:
            raise DataFormatError(f"{where}: {error}") from None
        ungrounded_total += len(extra["ungrounded_phrases"])
        yield make_record(
            sample_id=f"gcg/{stem}/{index}",
            source="gcg",
            media_type="image",
            media_id=file_name,
            frames=[image_path],
            prompt=GCG_PROMPT,
            answer=answer,
            masks=[[rle] for rle in rles],
            meta={"dataset": "gcg", "variant": detected, "file": stem, "caption": caption, "phrases": texts, **extra},
            where=where,
        )
    if ungrounded_total:
        logger.warning(
            "%s: %d phrase(s) not found in their caption were left ungrounded", annotation_file, ungrounded_total
        )


def load_gcg(
    annotation_file: PathLike,
    image_dir: PathLike,
    *,
    variant: str = "auto",
    verify_image_sizes: bool = True,
    cache_dir: PathLike | None = None,
) -> datasets.Dataset:
    """Load a GLaMM GCG annotation file (any of the layouts in the module docstring) as image records.

    Args:
        annotation_file: e.g. ``GranDf_HA_GCG_train.json``.
        image_dir: the folder holding the images the file names.
        variant: ``"auto"`` or one of `GCG_VARIANTS` (then checked against the file).
        verify_image_sizes: read each image header and check it against the annotation's height/width.
    """
    if variant != "auto" and variant not in GCG_VARIANTS:
        raise ValueError(f"variant must be 'auto' or one of {GCG_VARIANTS}, got {variant!r}")
    annotation_path = require_file(annotation_file, "GCG annotation file")
    image_path = require_dir(image_dir, "GCG image")
    return build_dataset(
        _generate_gcg,
        {
            "annotation_file": str(annotation_path),
            "image_dir": str(image_path),
            "variant": variant,
            "verify_image_sizes": verify_image_sizes,
            "signature": file_signature([annotation_path]),
        },
        description=f"GCG file {annotation_path}",
        cache_dir=cache_dir,
    )
