"""Tests of the synthetic shapes generator (`transformers_maskcma.data.synthetic`).

The checks are independent of the generator: prompts are parsed here with our own keyword lists and resolved
against the object attributes stored in ``meta``; masks are compared with the decoded PNG pixels.
"""

from __future__ import annotations

import io
import json
import re

import datasets
import numpy as np
import pytest
from PIL import Image

from transformers_maskcma.data.schema import RECORD_FEATURES, decode_rle
from transformers_maskcma.data.synthetic import (
    SyntheticConfig,
    assert_disjoint,
    generate_synthetic,
    load_synthetic,
    shuffled_prompts,
)

CONFIG = SyntheticConfig(image_size=64, num_frames=4, video_fraction=0.5, multi_object_fraction=0.2, seed=3)
SIZE = CONFIG.image_size

COLOR_WORDS = {"red", "green", "blue", "yellow", "purple", "orange", "cyan"}
SHAPE_WORDS = {"circle", "square", "triangle"}
MOTION_MARKERS = {"moves", "moving", "going", "still", "static", "move"}
POSITION_WORDS = {
    "left": "left",
    "leftmost": "left",
    "right": "right",
    "rightmost": "right",
    "top": "top",
    "topmost": "top",
    "highest": "top",
    "bottom": "bottom",
    "bottommost": "bottom",
    "lowest": "bottom",
}


@pytest.fixture(scope="module")
def train() -> datasets.Dataset:
    return generate_synthetic(60, CONFIG, split="train", show_progress=False)


@pytest.fixture(scope="module")
def validation() -> datasets.Dataset:
    return generate_synthetic(30, CONFIG, split="validation", show_progress=False)


@pytest.fixture(scope="module")
def test_split() -> datasets.Dataset:
    return generate_synthetic(30, CONFIG, split="test", show_progress=False)


# ------------------------------------------------------------------------------------------- helpers


def frame_bytes(dataset: datasets.Dataset) -> list[tuple[bytes, ...]]:
    raw = dataset.cast_column("frames", datasets.Sequence(datasets.Image(decode=False)))
    return [tuple(frame["bytes"] for frame in frames) for frames in raw["frames"]]


def decode_frames(record: dict) -> np.ndarray:
    """(T, H, W, 3) uint8 from the PIL images of a decoded record."""
    return np.stack([np.asarray(image.convert("RGB")) for image in record["frames"]])


def object_masks(masks_entry) -> np.ndarray:
    """(T, H, W) bool for one object of a record's ``masks`` (list of RLE dicts, or the dict-of-lists layout that
    ``datasets`` gives a ``Sequence`` of a dict)."""
    if isinstance(masks_entry, dict):
        masks_entry = [{"size": s, "counts": c} for s, c in zip(masks_entry["size"], masks_entry["counts"])]
    return np.stack([decode_rle(rle, expected_size=(SIZE, SIZE)) for rle in masks_entry])


def parse_expression(text: str) -> dict:
    """Our own reading of one referring expression: colour, shape, position and motion words."""
    words = re.findall(r"[a-z]+", text.lower())
    colors = [w for w in words if w in COLOR_WORDS]
    shapes = [w for w in words if w in SHAPE_WORDS]
    assert len(colors) <= 1 and len(shapes) <= 1, f"expression {text!r} names several colours or shapes"
    parsed = {"color": colors[0] if colors else None, "shape": shapes[0] if shapes else None}
    parsed["position"] = parsed["motion"] = None
    if MOTION_MARKERS & set(words):
        directions = [w for w in words if w in {"up", "down", "left", "right"}]
        parsed["motion"] = directions[0] if directions else "still"
    else:
        positions = [POSITION_WORDS[w] for w in words if w in POSITION_WORDS]
        parsed["position"] = positions[0] if positions else None
    assert parsed != {"color": None, "shape": None, "position": None, "motion": None}, f"empty expression {text!r}"
    return parsed


def satisfying_objects(parsed: dict, objects: list[dict], margin_px: float) -> list[int]:
    """Ids of the objects a parsed expression describes. A position picks, among the objects matching the colour
    and shape (at least two), the one beyond all others by more than the margin on the first frame."""
    matching = [
        o
        for o in objects
        if (parsed["color"] in (None, o["color"]))
        and (parsed["shape"] in (None, o["shape"]))
        and (parsed["motion"] in (None, o["motion"]))
    ]
    if parsed["position"] is None:
        return [o["id"] for o in matching]
    if len(matching) < 2:
        return []
    axis = 0 if parsed["position"] in ("left", "right") else 1
    sign = -1.0 if parsed["position"] in ("left", "top") else 1.0
    winners = []
    for candidate in matching:
        value = sign * candidate["centers"][0][axis]
        if all(value - sign * other["centers"][0][axis] > margin_px for other in matching if other is not candidate):
            winners.append(candidate["id"])
    return winners


# ------------------------------------------------------------------------------------------- tests


def test_features_and_layout(train):
    assert train.features == RECORD_FEATURES
    assert len(train) == 60
    assert len(set(train["sample_id"])) == 60
    assert set(train["source"]) == {"synthetic"}
    assert set(train["media_type"]) == {"image", "video"}
    metas = [json.loads(m) for m in train["meta"]]
    assert {m["background"] for m in metas} == {"plain", "textured"}
    kinds = {kind for m in metas for kind in m["prompt_kinds"]}
    assert kinds == {"color_shape", "color", "shape", "position", "motion"}
    for record, meta in zip(train, metas):
        expected_frames = CONFIG.num_frames if record["media_type"] == "video" else 1
        assert len(record["frames"]) == expected_frames
        assert all(image.size == (SIZE, SIZE) and image.mode == "RGB" for image in record["frames"])
        assert len(record["masks"]) == len(meta["targets"])
        assert CONFIG.min_shapes <= len(meta["objects"]) <= CONFIG.max_shapes
        if len(record["masks"]) == 1:
            assert record["answer"] == ""
        else:
            assert record["answer"] == "[SEG] and [SEG]."
    assert any(len(m["targets"]) == 2 for m in metas)


def test_same_seed_gives_identical_bytes(train):
    again = generate_synthetic(60, CONFIG, split="train", show_progress=False)
    assert frame_bytes(again) == frame_bytes(train)
    for column in ("prompt", "answer", "masks", "meta", "media_id", "sample_id"):
        assert again[column] == train[column]
    # A shorter dataset is a prefix of a longer one (each sample has its own seed).
    prefix = generate_synthetic(7, CONFIG, split="train", show_progress=False)
    assert frame_bytes(prefix) == frame_bytes(train)[:7]
    assert prefix["prompt"] == train["prompt"][:7]
    # Another seed gives other scenes.
    other = generate_synthetic(7, SyntheticConfig(**{**CONFIG.__dict__, "seed": 4}), show_progress=False)
    assert not set(frame_bytes(other)) & set(frame_bytes(train))


def test_masks_are_exactly_the_object_pixels(train):
    """Every GT mask is the set of pixels painted in the object's RGB value (an independent pixel check), covers
    most of the ideal shape area, and is centred where meta says the object is."""
    ideal_area = {"circle": np.pi / 4, "square": 1.0, "triangle": 0.5}
    for record in train:
        meta = json.loads(record["meta"])
        frames = decode_frames(record)
        for masks_entry, target in zip(record["masks"], meta["targets"]):
            obj = meta["objects"][target]
            masks = object_masks(masks_entry)
            assert masks.shape == frames.shape[:3]
            same_rgb = [o for o in meta["objects"] if o["rgb"] == obj["rgb"]]
            painted = np.all(frames == np.asarray(obj["rgb"], dtype=np.uint8), axis=-1)
            if len(same_rgb) == 1:
                np.testing.assert_array_equal(masks, painted)
            else:
                assert np.all(painted[masks])
            area = ideal_area[obj["shape"]] * obj["size"] ** 2
            for t in range(masks.shape[0]):
                assert masks[t].sum() >= 0.6 * CONFIG.min_visible_fraction * area
                ys, xs = np.nonzero(masks[t])
                centroid = np.array([xs.mean() + 0.5, ys.mean() + 0.5])
                assert np.abs(centroid - np.asarray(obj["centers"][t])).max() < 0.25 * obj["size"] + 2.0
        # Pixels outside every object are near-grey background, never a shape colour.
        saturated = frames.max(axis=-1).astype(int) - frames.min(axis=-1) > 60
        all_objects_rgb = {tuple(o["rgb"]) for o in meta["objects"]}
        colours_present = {tuple(c) for c in frames[saturated].reshape(-1, 3)}
        assert colours_present <= all_objects_rgb


def test_every_prompt_identifies_exactly_its_targets(train, validation):
    for dataset in (train, validation):
        for prompt, answer, meta_text in zip(dataset["prompt"], dataset["answer"], dataset["meta"]):
            meta = json.loads(meta_text)
            parts = prompt.split(" and ")
            assert len(parts) == len(meta["targets"])
            margin = meta["position_margin"] * meta["image_size"]
            for part, target in zip(parts, meta["targets"]):
                parsed = parse_expression(part)
                assert satisfying_objects(parsed, meta["objects"], margin) == [target], (prompt, meta["objects"])
                if meta["num_frames"] == 1:
                    assert parsed["motion"] is None
                else:
                    assert parsed["position"] is None
            assert len(set(meta["targets"])) == len(meta["targets"])


def test_video_masks_move_as_stated(train):
    checked_moving = checked_still = 0
    for record in train:
        if record["media_type"] != "video":
            continue
        meta = json.loads(record["meta"])
        for part, masks_entry, target in zip(record["prompt"].split(" and "), record["masks"], meta["targets"]):
            motion = meta["objects"][target]["motion"]
            parsed = parse_expression(part)
            if parsed["motion"] is not None:
                assert parsed["motion"] == motion
            masks = object_masks(masks_entry)
            centroids = []
            for frame_mask in masks:
                ys, xs = np.nonzero(frame_mask)
                centroids.append((xs.mean(), ys.mean()))
            dx, dy = np.asarray(centroids[-1]) - np.asarray(centroids[0])
            if motion == "still":
                assert np.hypot(dx, dy) < 0.1 * SIZE
                checked_still += 1
                continue
            along, across = {"up": (-dy, dx), "down": (dy, dx), "left": (-dx, dy), "right": (dx, dy)}[motion]
            assert along > 0.15 * SIZE and abs(across) < along, (motion, dx, dy)
            checked_moving += 1
    assert checked_moving >= 5 and checked_still >= 1


def test_splits_are_disjoint(train, validation, test_split):
    train_frames, validation_frames, test_frames = map(frame_bytes, (train, validation, test_split))
    assert not set(train_frames) & set(validation_frames)
    assert not set(train_frames) & set(test_frames)
    assert not set(validation_frames) & set(test_frames)
    train_pairs = set(zip(train_frames, train["prompt"]))
    assert not train_pairs & set(zip(validation_frames, validation["prompt"]))
    assert not set(train["media_id"]) & set(validation["media_id"])
    assert_disjoint(train, validation)
    assert_disjoint(train, test_split)
    with pytest.raises(ValueError, match="share"):
        assert_disjoint(train, train.select(range(3)))


def test_load_synthetic_matches_generate_and_checks_disjointness(validation):
    loaded = load_synthetic("validation", num_samples=30, config=CONFIG, check_train_samples=40)
    assert frame_bytes(loaded) == frame_bytes(validation)
    assert loaded["prompt"] == validation["prompt"]
    with pytest.raises(ValueError, match="unknown synthetic split 'val'"):
        load_synthetic("val", num_samples=5, config=CONFIG)
    with pytest.raises(ValueError, match="num_samples"):
        load_synthetic("train", num_samples=0, config=CONFIG)


def test_shuffled_prompts_keep_masks_and_move_prompts(train):
    shuffled = shuffled_prompts(train, seed=0)
    assert shuffled.features == train.features
    assert frame_bytes(shuffled) == frame_bytes(train)
    assert shuffled["masks"] == train["masks"]
    assert sorted(shuffled["prompt"]) == sorted(train["prompt"])
    original = {sid: (p, a) for sid, p, a in zip(train["sample_id"], train["prompt"], train["answer"])}
    still_correct = 0
    for record in shuffled:
        meta = json.loads(record["meta"])
        source = meta["shuffled_from"]
        assert source is not None and source != record["sample_id"]
        assert (record["prompt"], record["answer"]) == original[source]
        assert record["answer"].count("[SEG]") in (0, len(record["masks"]))
        assert len(record["prompt"].split(" and ")) == len(record["masks"])
        # Does the moved prompt happen to still pick exactly the masked objects?
        margin = meta["position_margin"] * meta["image_size"]
        parts = record["prompt"].split(" and ")
        picked = [satisfying_objects(parse_expression(part), meta["objects"], margin) for part in parts]
        still_correct += picked == [[t] for t in meta["targets"]]
    assert still_correct < 0.3 * len(shuffled)
    assert shuffled_prompts(train, seed=0)["prompt"] == shuffled["prompt"]
    assert shuffled_prompts(train, seed=1)["prompt"] != shuffled["prompt"]


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"colors": ("red", "pink")}, "colors"),
        ({"shapes": ("hexagon",)}, "shapes"),
        ({"min_shapes": 3, "max_shapes": 2}, "max_shapes"),
        ({"video_fraction": 1.5}, "video_fraction"),
        ({"max_shape_size": 0.5, "max_motion": 0.5}, "max_motion"),
    ],
)
def test_bad_config_is_rejected(overrides, message):
    with pytest.raises(ValueError, match=message):
        SyntheticConfig(**overrides)


def test_bad_arguments_are_rejected():
    with pytest.raises(ValueError, match="num_samples"):
        generate_synthetic(0, CONFIG)
    with pytest.raises(ValueError, match="unknown synthetic split"):
        generate_synthetic(2, CONFIG, split="dev")
    with pytest.raises(TypeError, match="SyntheticConfig"):
        generate_synthetic(2, {"image_size": 64})
    with pytest.raises(TypeError, match="datasets.Dataset"):
        shuffled_prompts([{"prompt": "the red circle"}])


def test_png_frames_are_self_contained(train):
    raw = train.cast_column("frames", datasets.Sequence(datasets.Image(decode=False)))
    frame = raw[0]["frames"][0]
    assert frame["path"] is None
    assert frame["bytes"].startswith(b"\x89PNG")
    assert Image.open(io.BytesIO(frame["bytes"])).size == (SIZE, SIZE)
