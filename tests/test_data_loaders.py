"""Round trips of every data loader on tiny datasets written by `fixtures_data`, and their bad-input errors."""

from __future__ import annotations

import json
import os
import pickle

import numpy as np
import pytest
from fixtures_data import (
    REF_YTVOS_OFFICIAL_INDEX,
    VIDEO_SIZES,
    compressed_rle,
    frames_of,
    rect,
    ref_ytvos_official_mask,
    write_custom,
    write_gcg,
    write_image,
    write_mask_png,
    write_osprey,
    write_ref_ytvos_official,
    write_refcoco,
    write_video_dataset,
)

from transformers_maskcma.data import (
    RECORD_FEATURES,
    DataFormatError,
    EmptyMediaError,
    MalformedJSONError,
    MaskSizeError,
    decode_record_masks,
    load_custom,
    load_gcg,
    load_mevis,
    load_osprey,
    load_ref_davis,
    load_ref_ytvos,
    load_refcoco,
    load_revos,
)
from transformers_maskcma.data.records import pack_masks, unpack_masks


@pytest.fixture
def cache(tmp_path):
    return tmp_path / "hf_cache"


def by_id(dataset):
    return {row["sample_id"]: row for row in dataset}


def assert_masks_equal(record, expected: list[np.ndarray]):
    decoded = decode_record_masks(record)
    assert len(decoded) == len(expected)
    for got, want in zip(decoded, expected, strict=True):
        want = want if want.ndim == 3 else want[None]
        assert got.shape == want.shape
        np.testing.assert_array_equal(got, want)


# ------------------------------------------------------------------------------------------------ records


def test_pack_unpack_masks_round_trip():
    a, b = compressed_rle(rect(4, 5, 0, 0, 2, 2)), compressed_rle(rect(4, 5, 1, 1, 4, 5))
    masks = [[a, b], [b, a]]
    assert unpack_masks(pack_masks(masks)) == masks


# ------------------------------------------------------------------------------------------------ RefCOCO


@pytest.mark.parametrize("dataset", ["refcoco", "refcocog"])
def test_refcoco_round_trip_every_split(tmp_path, cache, dataset):
    expected = write_refcoco(tmp_path / dataset, dataset)
    splits = ("train", "val", "test") if dataset == "refcocog" else ("train", "val", "testA")
    seen = {}
    for split in splits:
        loaded = load_refcoco(tmp_path / dataset, dataset=dataset, split=split, cache_dir=cache)
        assert loaded.features == RECORD_FEATURES
        for sample_id, record in by_id(loaded).items():
            assert record["source"] == dataset and record["media_type"] == "image" and record["answer"] == ""
            assert json.loads(record["meta"])["split"] == split
            seen[sample_id] = record
    assert set(seen) == set(expected)
    for sample_id, mask in expected.items():
        assert_masks_equal(seen[sample_id], [mask])
    record = seen[f"{dataset}/train/0/1001"]
    assert record["prompt"] == "left guy"
    assert record["media_id"] == "COCO_train2014_000000000001.jpg"  # the image file, not the ref's file_name
    assert record["frames"][0].size == (30, 20)  # PIL (width, height), decoded on access


def test_frames_are_stored_as_paths_and_decoded_lazily(tmp_path, cache):
    write_refcoco(tmp_path, "refcoco")
    loaded = load_refcoco(tmp_path, split="train", cache_dir=cache)
    stored = loaded.data.column("frames").to_pylist()
    for frames in stored:
        assert frames[0]["bytes"] is None
        assert os.path.isabs(frames[0]["path"]) and os.path.isfile(frames[0]["path"])


def test_refcoco_unknown_split(tmp_path, cache):
    write_refcoco(tmp_path, "refcoco")
    with pytest.raises(ValueError, match=r"testA.*got split 'test'"):
        load_refcoco(tmp_path, split="test", cache_dir=cache)


def test_refcoco_missing_folder_and_image_dir(tmp_path, cache):
    with pytest.raises(FileNotFoundError, match="refcoco data folder not found"):
        load_refcoco(tmp_path / "nowhere", cache_dir=cache)
    write_refcoco(tmp_path, "refcoco")
    (tmp_path / "coco2014" / "train2014").rename(tmp_path / "elsewhere")
    with pytest.raises(FileNotFoundError, match=r"image folder not found; looked for:(.|\n)*coco2014"):
        load_refcoco(tmp_path, cache_dir=cache)
    loaded = load_refcoco(tmp_path, split="val", image_dir=tmp_path / "elsewhere", cache_dir=cache)
    assert len(loaded) == 1


def test_refcoco_missing_image_file(tmp_path, cache):
    write_refcoco(tmp_path, "refcoco")
    (tmp_path / "coco2014" / "train2014" / "COCO_train2014_000000000002.jpg").unlink()
    with pytest.raises(FileNotFoundError, match="COCO_train2014_000000000002.jpg"):
        load_refcoco(tmp_path, split="val", cache_dir=cache)


def test_refcoco_malformed_instances(tmp_path, cache):
    write_refcoco(tmp_path, "refcoco")
    (tmp_path / "instances.json").write_text('{"images": [1, 2,, 3]}')
    with pytest.raises(MalformedJSONError, match=r"instances\.json: malformed JSON at line 1 column 18 \(char 17\)"):
        load_refcoco(tmp_path, split="val", cache_dir=cache)


def test_refcoco_rle_of_wrong_size(tmp_path, cache):
    write_refcoco(tmp_path, "refcoco")
    instances = json.loads((tmp_path / "instances.json").read_text())
    instances["annotations"][2]["segmentation"] = compressed_rle(rect(10, 10, 0, 0, 2, 2))  # image 3 is 18 x 18
    (tmp_path / "instances.json").write_text(json.dumps(instances))
    with pytest.raises(
        MaskSizeError, match=r"instances\.json annotation 103: mask RLE has size \(10, 10\).*\(18, 18\)"
    ):
        load_refcoco(tmp_path, split="testA", cache_dir=cache)


def test_refcoco_resized_image_is_reported(tmp_path, cache):
    write_refcoco(tmp_path, "refcoco")
    write_image(tmp_path / "coco2014" / "train2014" / "COCO_train2014_000000000002.jpg", 12, 8, seed=0)
    with pytest.raises(MaskSizeError, match=r"000000000002\.jpg: image is \(12, 8\).*\(24, 16\)"):
        load_refcoco(tmp_path, split="val", cache_dir=cache)


# ------------------------------------------------------------------------------------------------ videos


def test_mevis_union_of_objects_per_expression(tmp_path, cache):
    info = write_video_dataset(tmp_path, "train", layout="mevis")
    objects = info["objects"]
    loaded = by_id(load_mevis(tmp_path, "train", cache_dir=cache))
    assert set(loaded) == {"mevis/train/vidA/0", "mevis/train/vidA/1", "mevis/train/vidB/0"}
    both = loaded["mevis/train/vidA/1"]
    assert both["prompt"] == "both squares" and both["media_id"] == "vidA" and both["media_type"] == "video"
    assert len(both["frames"]) == 4
    assert_masks_equal(both, [frames_of(objects, 0, "vidA") | frames_of(objects, 1, "vidA")])
    assert_masks_equal(loaded["mevis/train/vidA/0"], [frames_of(objects, 0, "vidA")])
    assert_masks_equal(loaded["mevis/train/vidB/0"], [frames_of(objects, 2, "vidB")])
    meta = json.loads(both["meta"])
    assert meta["anno_ids"] == [0, 1] and meta["has_masks"] is True and meta["frame_names"][0] == "00000"


def test_mevis_separate_objects(tmp_path, cache):
    objects = write_video_dataset(tmp_path, "train", layout="mevis")["objects"]
    loaded = by_id(load_mevis(tmp_path, "train", multi_object="separate", cache_dir=cache))
    assert_masks_equal(loaded["mevis/train/vidA/1"], [frames_of(objects, 0, "vidA"), frames_of(objects, 1, "vidA")])


def test_mevis_valid_without_masks(tmp_path, cache):
    write_video_dataset(tmp_path, "valid", layout="mevis", with_masks=False)
    loaded = load_mevis(tmp_path, "valid", cache_dir=cache)
    assert len(loaded) == 3
    for record in loaded:
        assert record["masks"] == [] and json.loads(record["meta"])["has_masks"] is False


def test_mevis_train_without_mask_dict_is_an_error(tmp_path, cache):
    write_video_dataset(tmp_path, "train", layout="mevis", with_masks=False)
    with pytest.raises(FileNotFoundError, match=r"no mask_dict.*mevis split 'train'"):
        load_mevis(tmp_path, "train", cache_dir=cache)


def test_revos_type_id_and_foreground(tmp_path, cache):
    objects = write_video_dataset(tmp_path, "valid", layout="revos")["objects"]
    loaded = by_id(load_revos(tmp_path, "valid", cache_dir=cache))
    assert json.loads(loaded["revos/valid/vidA/1"]["meta"])["type_id"] == 1
    assert json.loads(loaded["revos/valid/vidA/0"]["meta"])["type_id"] == 0
    foreground = json.loads(loaded["revos/valid/vidA/0"]["meta"])["foreground"]
    union = frames_of(objects, 0, "vidA") | frames_of(objects, 1, "vidA")
    from transformers_maskcma.data import decode_rle

    np.testing.assert_array_equal(np.stack([decode_rle(r) for r in foreground]), union)


def test_revos_foreground_computed_without_file(tmp_path, cache):
    objects = write_video_dataset(tmp_path, "valid", layout="revos")["objects"]
    (tmp_path / "mask_dict_foreground.json").unlink()
    record = by_id(load_revos(tmp_path, "valid", cache_dir=cache))["revos/valid/vidB/0"]
    from transformers_maskcma.data import decode_rle

    foreground = np.stack([decode_rle(r) for r in json.loads(record["meta"])["foreground"]])
    np.testing.assert_array_equal(foreground, frames_of(objects, 2, "vidB"))


def test_ref_ytvos_layout_with_pickled_masks(tmp_path, cache):
    objects = write_video_dataset(tmp_path, "train", layout="ytvos")["objects"]
    loaded = by_id(load_ref_ytvos(tmp_path, "train", cache_dir=cache))
    assert_masks_equal(loaded["ref_ytvos/train/vidB/0"], [frames_of(objects, 2, "vidB")])


@pytest.mark.parametrize(("layout", "loader"), [("ytvos", load_ref_ytvos), ("davis", load_ref_davis)])
def test_meta_without_anno_id_loads_with_the_official_index(tmp_path, cache, caplog, layout, loader):
    write_ref_ytvos_official(tmp_path, "train", dataset_layout=layout)
    with caplog.at_level("WARNING", logger="transformers_maskcma.data.video_datasets"):
        loaded = by_id(loader(tmp_path, "train", cache_dir=cache))
    name = "ref_ytvos" if layout == "ytvos" else "ref_davis"
    # only the two videos with frames load; the two without are counted in a warning
    expected = {key: anno for key, anno in REF_YTVOS_OFFICIAL_INDEX.items() if key[0] in ("b_many", "d_two")}
    assert set(loaded) == {f"{name}/train/{video}/{exp_id}" for video, exp_id in expected}
    assert "2 of 4 videos" in caplog.text and "a_test, c_test" in caplog.text
    for (video, exp_id), anno in expected.items():
        record = loaded[f"{name}/train/{video}/{exp_id}"]
        meta = json.loads(record["meta"])
        assert meta["anno_ids"] == [anno] and meta["anno_index"] == "official"
        assert all(isinstance(obj, int) for obj in meta["obj_ids"])
        assert_masks_equal(record, [ref_ytvos_official_mask(anno)])
    # "10" comes right after "1": a numeric order would give expression 2 the mask of anno 4
    assert json.loads(loaded[f"{name}/train/b_many/2"]["meta"])["anno_ids"] == [6]
    assert json.loads(loaded[f"{name}/train/b_many/10"]["meta"])["anno_ids"] == [4]
    assert json.loads(loaded[f"{name}/train/d_two/1"]["meta"])["obj_ids"] == [2]


def test_ref_ytvos_valid_meta_listing_test_videos_loads_without_masks(tmp_path, cache, caplog):
    write_ref_ytvos_official(tmp_path, "valid")
    (tmp_path / "valid" / "mask_dict.pkl").unlink()  # the valid split is scored by the server
    with caplog.at_level("WARNING", logger="transformers_maskcma.data.video_datasets"):
        loaded = load_ref_ytvos(tmp_path, "valid", cache_dir=cache)
    assert len(loaded) == 14 and set(loaded["media_id"]) == {"b_many", "d_two"}
    assert all(json.loads(meta)["has_masks"] is False for meta in loaded["meta"])
    assert "2 of 4 videos" in caplog.text


def test_meta_mixing_anno_id_and_none_is_refused(tmp_path, cache):
    write_ref_ytvos_official(tmp_path, "train")
    _rewrite_meta(
        tmp_path / "meta_expressions" / "train" / "meta_expressions.json",
        lambda m: m["videos"]["b_many"]["expressions"]["3"].update(anno_id=[7]),
    )
    with pytest.raises(DataFormatError, match=r"1 expressions carry 'anno_id' and 16 do not"):
        load_ref_ytvos(tmp_path, "train", cache_dir=cache)


def test_mevis_meta_without_anno_id_is_an_error(tmp_path, cache):
    write_video_dataset(tmp_path, "train", layout="mevis")
    for expressions in (v["expressions"] for v in json.loads((tmp_path / "train" / "meta_expressions.json").read_text())["videos"].values()):
        assert all("anno_id" in e for e in expressions.values())
    _rewrite_meta(
        tmp_path / "train" / "meta_expressions.json",
        lambda m: [e.pop("anno_id") for v in m["videos"].values() for e in v["expressions"].values()],
    )
    with pytest.raises(DataFormatError, match=r"carry no 'anno_id'; mevis files name the masks"):
        load_mevis(tmp_path, "train", cache_dir=cache)


def test_obj_id_that_is_not_a_number_is_named(tmp_path, cache):
    write_ref_ytvos_official(tmp_path, "train")
    _rewrite_meta(
        tmp_path / "meta_expressions" / "train" / "meta_expressions.json",
        lambda m: m["videos"]["d_two"]["expressions"]["0"].update(obj_id="first"),
    )
    with pytest.raises(DataFormatError, match=r"video 'd_two' expression '0': obj_id must be an integer"):
        load_ref_ytvos(tmp_path, "train", cache_dir=cache)


def test_revos_overlapping_objects_keep_their_overlap(tmp_path, cache):
    write_video_dataset(tmp_path, "valid", layout="revos")
    masks = json.loads((tmp_path / "mask_dict.json").read_text())
    masks["1"][0] = compressed_rle(rect(16, 20, 4, 4, 8, 8))  # overlaps object 0 (rows 1-5, cols 1-5) on 4 pixels
    (tmp_path / "mask_dict.json").write_text(json.dumps(masks))
    record = by_id(load_revos(tmp_path, "valid", cache_dir=cache))["revos/valid/vidA/1"]
    overlap = json.loads(record["meta"])["overlap"]
    assert list(overlap) == ["0"] and len(overlap["0"]) == 1
    from transformers_maskcma.data import decode_rle

    np.testing.assert_array_equal(decode_rle(overlap["0"][0]), rect(16, 20, 4, 4, 6, 6))


def _rewrite_meta(path, change):
    meta = json.loads(path.read_text())
    change(meta)
    path.write_text(json.dumps(meta))


def test_video_expression_with_no_frames(tmp_path, cache):
    write_video_dataset(tmp_path, "train", layout="mevis")
    _rewrite_meta(tmp_path / "train" / "meta_expressions.json", lambda m: m["videos"]["vidB"].update(frames=[]))
    with pytest.raises(EmptyMediaError, match=r"meta_expressions\.json video 'vidB': the video lists no frames"):
        load_mevis(tmp_path, "train", cache_dir=cache)


def test_video_rle_of_wrong_size(tmp_path, cache):
    write_video_dataset(tmp_path, "train", layout="mevis")
    masks = json.loads((tmp_path / "train" / "mask_dict.json").read_text())
    masks["2"][1] = compressed_rle(rect(16, 20, 0, 0, 2, 2))  # vidB frames are 12 x 14
    (tmp_path / "train" / "mask_dict.json").write_text(json.dumps(masks))
    with pytest.raises(MaskSizeError, match=r"anno_id 2 frame 1 \(.*mask_dict\.json\).*\(16, 20\).*\(12, 14\)"):
        load_mevis(tmp_path, "train", cache_dir=cache)


def test_video_mask_list_not_aligned_to_frames(tmp_path, cache):
    write_video_dataset(tmp_path, "train", layout="mevis")
    masks = json.loads((tmp_path / "train" / "mask_dict.json").read_text())
    masks["2"] = masks["2"][:2]
    (tmp_path / "train" / "mask_dict.json").write_text(json.dumps(masks))
    with pytest.raises(DataFormatError, match=r"has 2 masks for anno_id 2 but the video has 3 frames"):
        load_mevis(tmp_path, "train", cache_dir=cache)


def test_video_malformed_meta_and_missing_frame(tmp_path, cache):
    write_video_dataset(tmp_path, "train", layout="mevis")
    meta_path = tmp_path / "train" / "meta_expressions.json"
    good = meta_path.read_text()
    meta_path.write_text('{"videos":\n {"vidA": }}')
    with pytest.raises(MalformedJSONError, match=r"meta_expressions\.json: malformed JSON at line 2 column 11"):
        load_mevis(tmp_path, "train", cache_dir=cache)
    meta_path.write_text(good)
    (tmp_path / "train" / "JPEGImages" / "vidA" / "00002.jpg").unlink()
    with pytest.raises(FileNotFoundError, match=r"frame '00002' not found in .*vidA"):
        load_mevis(tmp_path, "train", cache_dir=cache)


def test_video_unknown_anno_id(tmp_path, cache):
    write_video_dataset(tmp_path, "train", layout="mevis")
    _rewrite_meta(
        tmp_path / "train" / "meta_expressions.json",
        lambda m: m["videos"]["vidB"]["expressions"]["0"].update(anno_id=[99]),
    )
    with pytest.raises(DataFormatError, match=r"anno_id 99 is not in .*mask_dict\.json"):
        load_mevis(tmp_path, "train", cache_dir=cache)


# ------------------------------------------------------------------------------------------------ GCG


@pytest.mark.parametrize("stem", ["GranDf_HA_GCG_train", "RefCOCOg_GCG_train", "flickr_mergedGT_GCG_train"])
def test_gcg_round_trip(tmp_path, cache, stem):
    expected = write_gcg(tmp_path)[stem]
    loaded = load_gcg(tmp_path / "annotations" / f"{stem}.json", tmp_path / "images", cache_dir=cache)
    assert len(loaded) == len(expected)
    for record, (answer, masks) in zip(loaded, expected, strict=True):
        assert record["answer"] == answer
        assert record["answer"].count("[SEG]") == len(masks)
        assert_masks_equal(record, masks)


def test_gcg_meta_reports_ungrounded_and_ignored(tmp_path, cache):
    write_gcg(tmp_path)
    refcocog = load_gcg(tmp_path / "annotations" / "RefCOCOg_GCG_train.json", tmp_path / "images", cache_dir=cache)
    assert json.loads(refcocog[0]["meta"])["ungrounded_phrases"] == ["a dragon"]
    flickr = load_gcg(tmp_path / "annotations" / "flickr_mergedGT_GCG_train.json", tmp_path / "images", cache_dir=cache)
    assert json.loads(flickr[0]["meta"])["ignored_annotations"] == 1


def test_gcg_overlapping_phrases_are_made_disjoint():
    from transformers_maskcma.data.gcg import tag_caption

    a, b, c = (compressed_rle(rect(4, 4, i, 0, i + 1, 4)) for i in range(3))
    caption = "a man in a red hat smiles"
    # "a man in a red hat" [0, 18) overlaps "a red hat" [9, 18); "a man" [0, 5) shares its start with the first
    answer, rles, texts = tag_caption(caption, [(0, 18, a), (9, 18, b), (0, 5, c)], 4, 4)
    assert texts == ["a man in", "a red hat"]
    assert answer == "<p> a man in </p> [SEG] <p> a red hat </p> [SEG] smiles"
    from transformers_maskcma.data import decode_rle

    np.testing.assert_array_equal(decode_rle(rles[0]), rect(4, 4, 0, 0, 1, 4) | rect(4, 4, 2, 0, 3, 4))


def test_gcg_not_a_gcg_file(tmp_path, cache):
    write_gcg(tmp_path)
    (tmp_path / "other.json").write_text(json.dumps([{"image": "x"}]))
    with pytest.raises(DataFormatError, match=r"other\.json: not a GLaMM GCG file"):
        load_gcg(tmp_path / "other.json", tmp_path / "images", cache_dir=cache)


# ------------------------------------------------------------------------------------------------ Osprey


def test_osprey_descriptions_as_referring(tmp_path, cache):
    regions = write_osprey(tmp_path)
    loaded = load_osprey(tmp_path / "osprey_detail_description.json", tmp_path / "train2017", cache_dir=cache)
    assert [r["prompt"] for r in loaded] == ["A red cup on the table.", "A small plant in a pot."]
    assert_masks_equal(loaded[0], [regions["region1"]])
    assert_masks_equal(loaded[1], [regions["region2"]])
    assert loaded[0]["media_id"] == "000000000001.jpg" and loaded[0]["answer"] == ""


def test_osprey_conversation_as_region_caption(tmp_path, cache):
    regions = write_osprey(tmp_path)
    path = tmp_path / "osprey_conversation.json"
    loaded = load_osprey(path, [tmp_path / "train2017"], task="region_caption", cache_dir=cache)
    record = loaded[0]
    assert (record["prompt"], record["answer"]) == ("What is <region1> doing?", "It is resting.")
    meta = json.loads(record["meta"])
    assert meta["mask_role"] == "prompt_regions" and len(meta["conversation"]) == 4
    assert_masks_equal(record, [regions["region3"]])
    with pytest.raises(DataFormatError, match=r"osprey_conversation\.json entry #0: task='referring' needs"):
        load_osprey(path, [tmp_path / "train2017"], cache_dir=cache)


def test_osprey_missing_image(tmp_path, cache):
    write_osprey(tmp_path)
    (tmp_path / "train2017" / "000000000001.jpg").unlink()
    with pytest.raises(FileNotFoundError, match=r"image '000000000001\.jpg' not found"):
        load_osprey(tmp_path / "osprey_detail_description.json", tmp_path / "train2017", cache_dir=cache)


# ------------------------------------------------------------------------------------------------ custom


def test_custom_round_trip(tmp_path, cache):
    expected = write_custom(tmp_path)
    loaded = by_id(load_custom(tmp_path / "train.jsonl", cache_dir=cache))
    assert set(loaded) == set(expected)
    for sample_id, masks in expected.items():
        assert_masks_equal(loaded[sample_id], masks)
    assert loaded["cats"]["media_type"] == "image" and loaded["cats"]["answer"].count("[SEG]") == 2
    assert loaded["dog"]["media_type"] == "video" and loaded["dog"]["media_id"] == "vidA"
    assert len(loaded["dog"]["frames"]) == VIDEO_SIZES["vidA"][2]
    assert json.loads(loaded["dog"]["meta"])["note"] == "frame 2 is occluded"
    assert loaded["car"]["media_id"] == "car_clip"


def _custom_lines(tmp_path, lines):
    (tmp_path / "bad.jsonl").write_text(
        "\n".join(json.dumps(line) if isinstance(line, dict) else line for line in lines)
    )
    return tmp_path / "bad.jsonl"


def test_custom_bad_inputs(tmp_path, cache):
    write_custom(tmp_path)
    cat = {"image": "images/cat.jpg", "prompt": "a cat"}
    cases = [
        ([cat, '{"image": "images/cat.jpg", "prompt": }'], MalformedJSONError, r"bad\.jsonl: malformed JSON on line 2"),
        ([{**cat, "image": "images/none.jpg"}], FileNotFoundError, r"line 1: image not found: .*none\.jpg"),
        ([{"frames": [], "prompt": "x"}], EmptyMediaError, r"line 1: 'frames' is empty"),
        (
            [{**cat, "answer": "[SEG] and [SEG]", "masks": [None]}],
            DataFormatError,
            r"2 \[SEG\] token\(s\) but 'masks' has 1",
        ),
        ([{**cat, "masks": [compressed_rle(rect(5, 5, 0, 0, 1, 1))]}], MaskSizeError, r"line 1 masks\[0\]: .*\(5, 5\)"),
        (
            [{"video_dir": "videos/vidA", "prompt": "x", "masks": [[None, None]]}],
            DataFormatError,
            r"one mask \(or null\) per frame \(4 frames\)",
        ),
        ([{**cat, "colour": "red"}], DataFormatError, r"unknown field\(s\) \['colour'\]"),
        ([{"image": "images/cat.jpg"}], DataFormatError, r"'prompt' \(a non-empty string\) is required"),
    ]
    for lines, error, pattern in cases:
        with pytest.raises(error, match=pattern):
            load_custom(_custom_lines(tmp_path, lines), cache_dir=cache)


def test_custom_png_mask_of_wrong_size(tmp_path, cache):
    write_custom(tmp_path)
    write_mask_png(tmp_path / "masks" / "small.png", rect(6, 6, 0, 0, 3, 3))
    path = _custom_lines(tmp_path, [{"image": "images/cat.jpg", "prompt": "a cat", "masks": ["masks/small.png"]}])
    with pytest.raises(MaskSizeError, match=r"mask PNG .*small\.png.*\(6, 6\).*\(12, 14\)"):
        load_custom(path, cache_dir=cache)


def test_custom_cache_follows_edited_masks(tmp_path, cache):
    write_custom(tmp_path)
    first = by_id(load_custom(tmp_path / "train.jsonl", cache_dir=cache))["cats"]
    new_left = rect(12, 14, 0, 0, 2, 2)
    write_mask_png(tmp_path / "masks" / "cat_left.png", new_left)
    os.utime(tmp_path / "masks" / "cat_left.png", ns=(1, 1))  # a different mtime even on coarse clocks
    second = by_id(load_custom(tmp_path / "train.jsonl", cache_dir=cache))["cats"]
    assert not np.array_equal(decode_record_masks(first)[0], decode_record_masks(second)[0])
    np.testing.assert_array_equal(decode_record_masks(second)[0][0], new_left)


def test_refs_pickle_that_is_not_a_pickle(tmp_path, cache):
    write_refcoco(tmp_path, "refcoco")
    (tmp_path / "refs(unc).p").write_bytes(b"not a pickle at all")
    with pytest.raises(DataFormatError, match=r"refs\(unc\)\.p: cannot unpickle"):
        load_refcoco(tmp_path, split="val", cache_dir=cache)
    with open(tmp_path / "refs(unc).p", "wb") as handle:
        pickle.dump({"not": "a list"}, handle)
    with pytest.raises(DataFormatError, match="expected a pickled list of refs"):
        load_refcoco(tmp_path, split="val", cache_dir=cache)


@pytest.mark.parametrize(
    ("counts", "error"),
    [
        ([100, -4, 72], r"run 1 has the negative length -4"),  # pycocotools alone: OverflowError
        ([10, 20], r"the run lengths sum to 30 but a 12x14 mask has 168 pixels"),  # would decode to nonsense
        ("0M", r"run 1 has the negative length -3"),
    ],
)
def test_custom_invalid_rle_names_file_and_line(tmp_path, cache, counts, error):
    write_custom(tmp_path)
    lines = (tmp_path / "train.jsonl").read_text().splitlines()
    sample = json.loads(lines[0])
    sample["masks"][1] = {"size": [12, 14], "counts": counts}
    lines[0] = json.dumps(sample)
    (tmp_path / "train.jsonl").write_text("\n".join(lines) + "\n")
    with pytest.raises(DataFormatError, match=r"train\.jsonl line 1 masks\[1\]: invalid RLE counts: " + error):
        load_custom(tmp_path / "train.jsonl", cache_dir=cache)


def test_revos_foreground_listed_per_object_keeps_the_official_area(tmp_path, cache):
    objects = write_video_dataset(tmp_path, "valid", layout="revos")["objects"]
    foreground = json.loads((tmp_path / "mask_dict_foreground.json").read_text())
    height, width, _ = VIDEO_SIZES["vidA"]
    shared = rect(height, width, 4, 4, 8, 8)  # overlaps object 0 of frame 0 (rows 1-5, cols 1-5) on 4 pixels
    per_object = [compressed_rle(objects[0][0]), compressed_rle(shared)]
    foreground["vidA"]["masks_rle"][0] = per_object
    (tmp_path / "mask_dict_foreground.json").write_text(json.dumps(foreground))
    meta = json.loads(by_id(load_revos(tmp_path, "valid", cache_dir=cache))["revos/valid/vidA/0"]["meta"])
    from transformers_maskcma.data import decode_rle

    # the official scorers sum the listed objects: 25 + 16 = 41 (the 4 shared pixels twice); the union has 37
    assert meta["foreground_area"][0] == 25 + 16
    assert meta["foreground_area"][1:] == [int(frames_of(objects, 0, "vidA")[t].sum() + frames_of(objects, 1, "vidA")[t].sum()) for t in (1, 2, 3)]
    assert int(decode_rle(meta["foreground"][0]).sum()) == 37
