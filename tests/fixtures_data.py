"""Writers of tiny on-disk datasets in every format the data loaders read, for the tests.

Each writer puts real files (JPEG/PNG images written with PIL, JSON, pickles, JSONL) under a folder and returns
the masks it wrote as numpy arrays, keyed by the ``sample_id`` the loader is expected to give, so a test can
decode the loaded RLEs and compare. Masks are rectangles whose pixels are stated by hand, not computed by the
code under test.
"""

from __future__ import annotations

import json
import pickle
from pathlib import Path

import numpy as np
from PIL import Image


def rect(height: int, width: int, top: int, left: int, bottom: int, right: int) -> np.ndarray:
    """A ``bool`` mask of shape ``(height, width)``, true on rows ``top:bottom`` and columns ``left:right``."""
    mask = np.zeros((height, width), dtype=bool)
    mask[top:bottom, left:right] = True
    return mask


def write_image(path: Path, height: int, width: int, seed: int) -> Path:
    """A random RGB image of ``(height, width)``; JPEG or PNG by the suffix of ``path``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    pixels = np.random.default_rng(seed).integers(0, 256, size=(height, width, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(path)
    return path


def write_mask_png(path: Path, mask: np.ndarray, value: int = 255) -> Path:
    """An 8-bit single-channel PNG, ``value`` where ``mask`` is true, 0 elsewhere."""
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(mask.astype(np.uint8) * value).save(path)
    return path


def uncompressed_rle(mask: np.ndarray) -> dict:
    """COCO *uncompressed* RLE computed by hand: run lengths of the column-major (Fortran) flattening, starting
    with a run of zeros (possibly of length 0). Independent of pycocotools."""
    flat = mask.astype(np.uint8).flatten(order="F")
    counts, current, run = [], 0, 0
    for value in flat:
        if value == current:
            run += 1
        else:
            counts.append(run)
            current, run = value, 1
    counts.append(run)
    return {"size": [int(mask.shape[0]), int(mask.shape[1])], "counts": counts}


def compressed_rle(mask: np.ndarray) -> dict:
    """COCO compressed RLE (``counts`` as str) via pycocotools, as the real annotation files store it."""
    from pycocotools import mask as coco_mask

    rle = coco_mask.encode(np.asfortranarray(mask.astype(np.uint8)))
    return {"size": [int(mask.shape[0]), int(mask.shape[1])], "counts": rle["counts"].decode("ascii")}


def rect_polygon(top: int, left: int, bottom: int, right: int) -> list[float]:
    """The polygon of :func:`rect`'s rectangle: pycocotools rasterises an integer-cornered axis-aligned polygon
    (x0, y0)–(x1, y1) to rows y0..y1-1 and columns x0..x1-1."""
    return [left, top, right, top, right, bottom, left, bottom]


# ----------------------------------------------------------------------------------------------------------------
# RefCOCO


def write_refcoco(root: Path, dataset: str = "refcoco") -> dict[str, np.ndarray]:
    """RefCOCO-style folder: ``refs(unc|umd).p``, ``instances.json`` and ``coco2014/train2014/*.jpg``.

    Three images; one annotation as two polygons, one as an uncompressed RLE, one as a compressed RLE, and a
    fourth on the first image. Returns ``{sample_id: mask}`` for every sentence of every split.
    """
    split_by = "umd" if dataset == "refcocog" else "unc"
    test_split = "test" if dataset == "refcocog" else "testA"
    image_dir = root / "coco2014" / "train2014"
    sizes = {1: (20, 30), 2: (24, 16), 3: (18, 18)}
    images = []
    for image_id, (height, width) in sizes.items():
        file_name = f"COCO_train2014_{image_id:012d}.jpg"
        write_image(image_dir / file_name, height, width, seed=image_id)
        images.append({"id": image_id, "file_name": file_name, "height": height, "width": width})
    mask1 = rect(20, 30, 2, 3, 8, 10) | rect(20, 30, 12, 20, 18, 28)
    mask2 = rect(24, 16, 5, 1, 23, 9)
    mask3 = rect(18, 18, 0, 0, 4, 18)
    mask4 = rect(20, 30, 10, 0, 20, 5)
    annotations = [
        {
            "id": 101,
            "image_id": 1,
            "category_id": 1,
            "segmentation": [rect_polygon(2, 3, 8, 10), rect_polygon(12, 20, 18, 28)],
        },
        {"id": 102, "image_id": 2, "category_id": 2, "segmentation": uncompressed_rle(mask2)},
        {"id": 103, "image_id": 3, "category_id": 3, "segmentation": compressed_rle(mask3)},
        {"id": 104, "image_id": 1, "category_id": 1, "segmentation": compressed_rle(mask4)},
    ]
    refs = [
        _ref(0, 101, 1, "train", [(1000, "man on the left"), (1001, "left guy")]),
        _ref(1, 102, 2, "val", [(1002, "tall thing")]),
        _ref(2, 103, 3, test_split, [(1003, "top strip")]),
        _ref(3, 104, 1, "train", [(1004, "bottom left corner")]),
    ]
    root.mkdir(parents=True, exist_ok=True)
    with open(root / f"refs({split_by}).p", "wb") as handle:
        pickle.dump(refs, handle)
    (root / "instances.json").write_text(json.dumps({"images": images, "annotations": annotations, "categories": []}))
    return {
        f"{dataset}/train/0/1000": mask1,
        f"{dataset}/train/0/1001": mask1,
        f"{dataset}/val/1/1002": mask2,
        f"{dataset}/{test_split}/2/1003": mask3,
        f"{dataset}/train/3/1004": mask4,
    }


def _ref(ref_id: int, ann_id: int, image_id: int, split: str, sentences: list[tuple[int, str]]) -> dict:
    return {
        "ref_id": ref_id,
        "ann_id": ann_id,
        "image_id": image_id,
        "category_id": 1,
        "split": split,
        "file_name": f"COCO_train2014_{image_id:012d}_{ann_id}.jpg",
        "sent_ids": [s for s, _ in sentences],
        "sentences": [
            {"sent_id": s, "sent": text, "raw": text.upper(), "tokens": text.split()} for s, text in sentences
        ],
    }


# ----------------------------------------------------------------------------------------------------------------
# Referring video datasets (Sa2VA layout)

VIDEO_SIZES = {"vidA": (16, 20, 4), "vidB": (12, 14, 3)}  # height, width, frames


def video_object_masks() -> dict[int, list[np.ndarray | None]]:
    """The masks of the three annotated objects, per frame (``None`` = absent in that frame)."""
    (ha, wa, _), (hb, wb, _) = VIDEO_SIZES["vidA"], VIDEO_SIZES["vidB"]
    return {
        0: [rect(ha, wa, 1, 1, 6, 6), rect(ha, wa, 2, 2, 7, 7), None, rect(ha, wa, 3, 3, 9, 9)],
        1: [rect(ha, wa, 10, 12, 15, 19), None, rect(ha, wa, 8, 10, 14, 18), rect(ha, wa, 9, 11, 15, 19)],
        2: [rect(hb, wb, 0, 0, 5, 5), rect(hb, wb, 1, 1, 6, 6), rect(hb, wb, 2, 2, 7, 7)],
    }


def write_video_frames(frames_dir: Path, video_names=("vidA", "vidB"), seed: int = 0) -> None:
    """``<frames_dir>/<video>/<00000..>.jpg`` for the fixture videos."""
    for offset, video in enumerate(video_names):
        height, width, num_frames = VIDEO_SIZES[video]
        for index in range(num_frames):
            write_image(frames_dir / video / f"{index:05d}.jpg", height, width, seed=seed + 100 * offset + index)


def write_video_dataset(root: Path, split: str = "train", layout: str = "mevis", with_masks: bool = True) -> dict:
    """Two videos (4 and 3 frames) in one of the Sa2VA layouts:

    ``"mevis"``: ``<root>/<split>/{JPEGImages, meta_expressions.json, mask_dict.json}``;
    ``"revos"``: ``<root>/{JPEGImages, mask_dict.json, mask_dict_foreground.json, meta_expressions_<split>_.json}``
    with ``type_id``; ``"ytvos"``: ``<root>/meta_expressions/<split>/meta_expressions.json`` and
    ``<root>/<split>/{JPEGImages, mask_dict.pkl}``.

    Expressions: vidA "0" → object 0, vidA "1" → objects 0 and 1, vidB "0" → object 2. Returns
    ``{"objects": per-object frame masks, "expressions": {(video, exp_id): [anno ids]}}``.
    """
    objects = video_object_masks()
    anno_ids = {("vidA", "0"): [0], ("vidA", "1"): [0, 1], ("vidB", "0"): [2]}
    texts = {("vidA", "0"): "the small square", ("vidA", "1"): "both squares", ("vidB", "0"): "the moving box"}
    videos = {}
    for video, (_, _, num_frames) in VIDEO_SIZES.items():
        expressions = {}
        for (vid, exp_id), ids in anno_ids.items():
            if vid != video:
                continue
            expression = {"exp": texts[(vid, exp_id)], "obj_id": ids}
            if with_masks:
                expression["anno_id"] = ids
            if layout == "revos":
                expression["type_id"] = 1 if exp_id == "1" else 0
            expressions[exp_id] = expression
        videos[video] = {"frames": [f"{i:05d}" for i in range(num_frames)], "expressions": expressions}
    mask_dict = {
        str(anno): [None if m is None else compressed_rle(m) for m in masks] for anno, masks in objects.items()
    }
    meta = {"videos": videos}
    if layout == "mevis":
        base = root / split
        write_video_frames(base / "JPEGImages")
        (base / "meta_expressions.json").write_text(json.dumps(meta))
        if with_masks:
            (base / "mask_dict.json").write_text(json.dumps(mask_dict))
    elif layout == "revos":
        write_video_frames(root / "JPEGImages")
        (root / f"meta_expressions_{split}_.json").write_text(json.dumps(meta))
        (root / "mask_dict.json").write_text(json.dumps(mask_dict))
        foreground = {}
        for video, ids in (("vidA", [0, 1]), ("vidB", [2])):
            height, width, num_frames = VIDEO_SIZES[video]
            union = []
            for t in range(num_frames):
                frame = np.zeros((height, width), dtype=bool)
                for anno in ids:
                    if objects[anno][t] is not None:
                        frame |= objects[anno][t]
                union.append(compressed_rle(frame))
            foreground[video] = {"masks_rle": union}
        (root / "mask_dict_foreground.json").write_text(json.dumps(foreground))
    elif layout == "ytvos":
        write_video_frames(root / split / "JPEGImages")
        (root / "meta_expressions" / split).mkdir(parents=True, exist_ok=True)
        (root / "meta_expressions" / split / "meta_expressions.json").write_text(json.dumps(meta))
        if with_masks:
            with open(root / split / "mask_dict.pkl", "wb") as handle:
                pickle.dump(mask_dict, handle)
    else:
        raise ValueError(layout)
    return {"objects": objects, "expressions": anno_ids, "texts": texts}


def frames_of(objects: dict, anno: int, video: str) -> np.ndarray:
    """Object ``anno`` as a ``(num_frames, height, width)`` array, absent frames empty."""
    height, width, _ = VIDEO_SIZES[video]
    return np.stack([np.zeros((height, width), bool) if m is None else m for m in objects[anno]])


# ----------------------------------------------------------------------------------------------------------------
# GCG (GLaMM GranD-f)


def write_gcg(root: Path) -> dict:
    """Three GCG files in ``root/annotations`` (GranDf, RefCOCOg-GCG, Flickr-GCG layouts) and their images in
    ``root/images``. Returns per file the expected answers and masks (in caption order)."""
    images = root / "images"
    write_image(images / "g1.jpg", 20, 24, seed=11)
    write_image(images / "g2.jpg", 10, 10, seed=12)
    write_image(images / "r1.jpg", 16, 16, seed=13)
    write_image(images / "f1.jpg", 14, 18, seed=14)
    annotations = root / "annotations"
    annotations.mkdir(parents=True, exist_ok=True)

    dog, ball_a, ball_b = rect(20, 24, 0, 0, 10, 10), rect(20, 24, 15, 15, 18, 18), rect(20, 24, 12, 2, 14, 4)
    caption = "A dog chases two balls on the grass."
    grandf = [
        {
            "file_name": "g1.jpg",
            "height": 20,
            "width": 24,
            "image_id": 1,
            "caption": f'"{caption}"',
            "groundings": {
                # listed out of caption order on purpose; the loader sorts by position
                "two balls": {
                    "token_positives": [caption.index("two balls"), caption.index("two balls") + 9],
                    "rle_masks": [compressed_rle(ball_a), compressed_rle(ball_b)],
                },
                "A dog": {"token_positives": [0, 5], "rle_masks": [compressed_rle(dog)]},
                "the grass": {
                    "token_positives": [caption.index("the grass"), caption.index("the grass") + 9],
                    "rle_masks": [],
                },
                "nothing": None,
            },
        },
        {
            "file_name": "g2.jpg",
            "height": 10,
            "width": 10,
            "image_id": 2,
            "caption": "An empty room.",
            "groundings": {},
        },
    ]
    (annotations / "GranDf_HA_GCG_train.json").write_text(json.dumps(grandf))

    person, bike = rect(16, 16, 0, 0, 8, 8), rect(16, 16, 8, 8, 16, 16)
    refcocog = [
        {
            "r1": {
                "img_file_name": "r1.jpg",
                "caption": "A Person riding a bike near a lake.",
                "refs": [
                    {"sentence": "a bike", "bbox": [8, 8, 8, 8], "segmentation": [rect_polygon(8, 8, 16, 16)]},
                    {"sentence": "A person", "bbox": [0, 0, 8, 8], "segmentation": compressed_rle(person)},
                    {"sentence": "a dragon", "bbox": [0, 0, 1, 1], "segmentation": [rect_polygon(0, 0, 1, 1)]},
                ],
            }
        }
    ]
    (annotations / "RefCOCOg_GCG_train.json").write_text(json.dumps(refcocog))

    man1, man2, hat = rect(14, 18, 0, 0, 7, 5), rect(14, 18, 0, 10, 7, 15), rect(14, 18, 10, 0, 14, 4)
    flickr = {
        "images": [{"id": 7, "file_name": "f1.jpg", "height": 14, "width": 18, "caption": "Two men and a hat."}],
        "annotations": [
            {
                "id": 1,
                "image_id": 7,
                "bbox": [0, 0, 5, 7],
                "area": 35,
                "tokens_positive": [[0, 7]],
                "sam_mask": compressed_rle(man1),
            },
            {
                "id": 2,
                "image_id": 7,
                "bbox": [10, 0, 5, 7],
                "area": 35,
                "tokens_positive": [[0, 7]],
                "sam_mask": compressed_rle(man2),
            },
            {
                "id": 3,
                "image_id": 7,
                "bbox": [0, 10, 4, 4],
                "area": 16,
                "tokens_positive": [[12, 17]],
                "sam_mask": compressed_rle(hat),
            },
            {
                "id": 4,
                "image_id": 7,
                "bbox": [0, 0, 1, 1],
                "area": 1,
                "tokens_positive": [[12, 17]],
                "ignore": True,
                "sam_mask": compressed_rle(rect(14, 18, 0, 0, 1, 1)),
            },
        ],
    }
    (annotations / "flickr_mergedGT_GCG_train.json").write_text(json.dumps(flickr))
    return {
        "GranDf_HA_GCG_train": [
            (
                "<p> A dog </p> [SEG] chases <p> two balls </p> [SEG] on <p> the grass </p> [SEG].",
                [dog, ball_a | ball_b, np.zeros((20, 24), bool)],
            ),
            ("An empty room.", []),
        ],
        "RefCOCOg_GCG_train": [
            ("<p> a person </p> [SEG] riding <p> a bike </p> [SEG] near a lake.", [person, bike]),
        ],
        "flickr_mergedGT_GCG_train": [("<p> Two men </p> [SEG] and <p> a hat </p> [SEG].", [man1 | man2, hat])],
    }


# ----------------------------------------------------------------------------------------------------------------
# Osprey


def write_osprey(root: Path) -> dict:
    """``osprey_detail_description.json`` and ``osprey_conversation.json`` with COCO-named images in
    ``root/train2017`` (the conversation file names them with a ``COCO_train2014_`` prefix, as Osprey's loader
    strips). Returns the region masks."""
    write_image(root / "train2017" / "000000000001.jpg", 12, 16, seed=21)
    write_image(root / "train2017" / "000000000002.jpg", 10, 10, seed=22)
    region1, region2 = rect(12, 16, 0, 0, 6, 6), rect(12, 16, 6, 8, 12, 16)
    region3 = rect(10, 10, 2, 2, 8, 8)
    description = [
        {
            "file_name": "000000000001.jpg",
            "height": 12,
            "width": 16,
            "image_id": 1,
            "annotation": [
                {"segmentation": [rect_polygon(0, 0, 6, 6)], "bbox": [0, 0, 6, 6]},
                {"segmentation": compressed_rle(region2), "bbox": [8, 6, 8, 6]},
            ],
            "description": ["<region1>: A red cup on the table.", "<region2>: A small plant in a pot."],
        }
    ]
    (root / "osprey_detail_description.json").write_text(json.dumps(description))
    conversation = [
        {
            "file_name": "COCO_train2014_000000000002.jpg",
            "height": 10,
            "width": 10,
            "id": 2,
            "annotation": [{"segmentation": uncompressed_rle(region3), "bbox": [2, 2, 6, 6]}],
            "conversations": [
                {"from": "human", "value": "What is <region1> doing?"},
                {"from": "gpt", "value": "It is resting."},
                {"from": "human", "value": "What colour is it?"},
                {"from": "gpt", "value": "Grey."},
            ],
        }
    ]
    (root / "osprey_conversation.json").write_text(json.dumps(conversation))
    return {"region1": region1, "region2": region2, "region3": region3}


# ----------------------------------------------------------------------------------------------------------------
# custom JSONL


def write_custom(root: Path) -> dict:
    """A custom JSONL (``root/train.jsonl``) with an image sample (PNG + RLE masks and an explicit answer), a
    ``video_dir`` sample (PNG masks with a null frame) and a ``frames`` sample (palette-value PNG masks).
    Returns ``{sample_id: [per-object (num_frames, height, width) masks]}``."""
    write_image(root / "images" / "cat.jpg", 12, 14, seed=31)
    cat_left, cat_right = rect(12, 14, 0, 0, 12, 6), rect(12, 14, 3, 8, 9, 14)
    write_mask_png(root / "masks" / "cat_left.png", cat_left)
    write_video_frames(root / "videos", video_names=("vidA",), seed=40)  # 4 frames of 16 x 20
    dog = [rect(16, 20, 0, t, 5, t + 5) for t in range(4)]
    for t in (0, 1, 3):
        write_mask_png(root / "masks" / "dog" / f"{t:05d}.png", dog[t])
    write_video_frames(root / "clips", video_names=("vidB",), seed=50)  # 3 frames of 12 x 14
    palette = []
    car = [rect(12, 14, t, 0, t + 3, 4) for t in range(3)]
    for t in range(3):
        ids = np.zeros((12, 14), dtype=np.uint8)
        ids[car[t]] = 2
        ids[10:12, 10:14] = 1  # another object id in the same PNG
        path = root / "clips" / "ann" / f"{t}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(ids).save(path)
        palette.append({"png": f"clips/ann/{t}.png", "value": 2})
    lines = [
        {
            "image": "images/cat.jpg",
            "prompt": "Segment both cats.",
            "answer": "The left cat [SEG] and the right cat [SEG].",
            "masks": ["masks/cat_left.png", compressed_rle(cat_right)],
            "id": "cats",
        },
        {
            "video_dir": "videos/vidA",
            "prompt": "the dog running right",
            "masks": [["masks/dog/00000.png", "masks/dog/00001.png", None, "masks/dog/00003.png"]],
            "id": "dog",
            "meta": {"note": "frame 2 is occluded"},
        },
        {
            "frames": [f"clips/vidB/{t:05d}.jpg" for t in range(3)],
            "prompt": "the red car",
            "masks": [palette],
            "id": "car",
            "media_id": "car_clip",
        },
    ]
    (root / "train.jsonl").write_text("\n".join(json.dumps(line) for line in lines) + "\n")
    dog_expected = np.stack([dog[0], dog[1], np.zeros((16, 20), bool), dog[3]])
    return {
        "cats": [cat_left[None], cat_right[None]],
        "dog": [dog_expected],
        "car": [np.stack(car)],
    }


# ----------------------------------------------------------------------------------------------------------------
# Ref-YouTube-VOS / Ref-DAVIS17 as distributed: meta files without anno_id, masks keyed by the official index

#: The official index of `write_ref_ytvos_official`'s meta file, written out by hand: one counter over every video
#: sorted by name ("a_test" and "c_test" have no frames in the split but are counted), expression ids sorted as
#: strings ("0", "1", "10", "11", "2", ..., "9").
REF_YTVOS_OFFICIAL_INDEX = {
    ("a_test", "0"): 0, ("a_test", "1"): 1,
    ("b_many", "0"): 2, ("b_many", "1"): 3, ("b_many", "10"): 4, ("b_many", "11"): 5, ("b_many", "2"): 6,
    ("b_many", "3"): 7, ("b_many", "4"): 8, ("b_many", "5"): 9, ("b_many", "6"): 10, ("b_many", "7"): 11,
    ("b_many", "8"): 12, ("b_many", "9"): 13,
    ("c_test", "0"): 14,
    ("d_two", "0"): 15, ("d_two", "1"): 16,
}
REF_YTVOS_OFFICIAL_SIZE = (8, 24)  # height, width of every frame; anno k's mask is column k of every frame


def ref_ytvos_official_mask(anno: int, num_frames: int = 2) -> np.ndarray:
    """The mask written for annotation ``anno``: column ``anno`` in every frame, ``(num_frames, 8, 24)``."""
    height, width = REF_YTVOS_OFFICIAL_SIZE
    return np.stack([rect(height, width, 0, anno, height, anno + 1)] * num_frames)


def write_ref_ytvos_official(root: Path, split: str = "train", dataset_layout: str = "ytvos") -> None:
    """A Ref-YouTube-VOS (``dataset_layout="ytvos"``) or Ref-DAVIS17 (``"davis"``) split as distributed: the meta
    file lists four videos *not* in name order, two of them ("a_test", "c_test") without frames in the split (like
    the test videos listed in the valid meta file); "b_many" has 12 expressions; no expression carries ``anno_id``;
    ``obj_id`` is written as strings. The mask dict is keyed by the official index
    (`REF_YTVOS_OFFICIAL_INDEX`), each annotation a different column so a wrong index picks a wrong mask."""
    frames = ["00000", "00005"]
    videos = {
        "d_two": {"frames": frames, "expressions": {"1": {"exp": "d one", "obj_id": "2"}, "0": {"exp": "d zero", "obj_id": "1"}}},
        "b_many": {
            "frames": frames,
            "expressions": {str(i): {"exp": f"b expression {i}", "obj_id": str(i % 3 + 1)} for i in range(12)},
        },
        "c_test": {"frames": frames, "expressions": {"0": {"exp": "c zero", "obj_id": "1"}}},
        "a_test": {"frames": frames, "expressions": {"0": {"exp": "a zero", "obj_id": "1"}, "1": {"exp": "a one", "obj_id": "1"}}},
    }
    height, width = REF_YTVOS_OFFICIAL_SIZE
    if dataset_layout == "ytvos":
        frames_dir = root / split / "JPEGImages"
        meta_path = root / "meta_expressions" / split / "meta_expressions.json"
        mask_path = root / split / "mask_dict.pkl"
    else:
        frames_dir = root / split / "JPEGImages"
        meta_path = root / split / "meta_expressions.json"
        mask_path = root / split / "mask_dict.json"
    for video_index, video in enumerate(("b_many", "d_two")):
        for frame_index, frame in enumerate(frames):
            write_image(frames_dir / video / f"{frame}.jpg", height, width, seed=700 + 10 * video_index + frame_index)
    meta_path.parent.mkdir(parents=True, exist_ok=True)
    meta_path.write_text(json.dumps({"videos": videos}))
    mask_dict = {
        str(anno): [compressed_rle(mask) for mask in ref_ytvos_official_mask(anno)]
        for anno in REF_YTVOS_OFFICIAL_INDEX.values()
    }
    mask_path.parent.mkdir(parents=True, exist_ok=True)
    if mask_path.suffix == ".pkl":
        with open(mask_path, "wb") as handle:
            pickle.dump(mask_dict, handle)
    else:
        mask_path.write_text(json.dumps(mask_dict))
