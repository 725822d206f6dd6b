"""The train/evaluation leakage check finds planted overlaps by id and by content (renamed copies)."""

from __future__ import annotations

import json
import logging
import shutil

import pytest
import yaml
from fixtures_data import write_image, write_refcoco, write_video_dataset, write_video_frames

from transformers_maskcma.cli import main
from transformers_maskcma.data import (
    check_leakage,
    interleave_with_repeats,
    load_custom,
    load_mevis,
    load_refcoco,
    warn_if_leaking,
)
from transformers_maskcma.data.commands import parse_eval_spec


@pytest.fixture
def planted(tmp_path):
    """Training data: RefCOCO (3 images) and MeViS train (videos vidA, vidB). Evaluation data: a custom JSONL
    with a renamed byte copy of vidA, vidB under its own name, an unrelated video also called vidA, a fresh
    video, a renamed copy of a COCO image and a COCO image under its COCO name."""
    write_refcoco(tmp_path / "refcoco", "refcoco")
    write_video_dataset(tmp_path / "mevis", "train", layout="mevis")
    train_frames = tmp_path / "mevis" / "train" / "JPEGImages"
    coco = tmp_path / "refcoco" / "coco2014" / "train2014"
    evaluation = tmp_path / "eval"
    shutil.copytree(train_frames / "vidA", evaluation / "copies" / "renamed_clip")
    write_video_frames(evaluation / "other", video_names=("vidA",), seed=900)  # same name, other pixels
    write_video_frames(evaluation / "fresh", video_names=("vidB",), seed=700)
    (evaluation / "fresh" / "vidB").rename(evaluation / "fresh" / "newclip")
    shutil.copy(coco / "COCO_train2014_000000000003.jpg", evaluation / "photo_0042.jpg")
    write_image(evaluation / "unrelated.jpg", 18, 18, seed=4242)
    lines = [
        {"video_dir": "copies/renamed_clip", "prompt": "x"},
        {"frames": [str(train_frames / "vidB" / f"{t:05d}.jpg") for t in range(3)], "prompt": "x"},
        {"video_dir": "other/vidA", "prompt": "x"},
        {"video_dir": "fresh/newclip", "prompt": "x"},
        {"image": "photo_0042.jpg", "prompt": "x"},
        {
            "image": str(coco / "COCO_train2014_000000000001.jpg"),
            "prompt": "x",
            "media_id": "COCO_train2014_000000000001.jpg",
        },
        {"image": "unrelated.jpg", "prompt": "x"},
    ]
    (evaluation / "eval.jsonl").write_text("\n".join(json.dumps(line) for line in lines) + "\n")
    cache = tmp_path / "cache"
    train = {
        "refcoco:train": load_refcoco(tmp_path / "refcoco", split="train", cache_dir=cache),
        "refcoco:val": load_refcoco(tmp_path / "refcoco", split="val", cache_dir=cache),
        "refcoco:testA": load_refcoco(tmp_path / "refcoco", split="testA", cache_dir=cache),
        "mevis:train": load_mevis(tmp_path / "mevis", "train", cache_dir=cache),
    }
    return {
        "root": tmp_path,
        "train": train,
        "eval": {"mine:eval": load_custom(evaluation / "eval.jsonl", cache_dir=cache)},
    }


def found(overlaps) -> set[tuple[str, str, str, str]]:
    return {(o.train_source, o.train_media_id, o.eval_media_id, o.match) for o in overlaps}


def test_planted_overlaps_by_id_and_by_content(planted):
    overlaps = check_leakage(planted["train"], planted["eval"])
    assert found(overlaps) == {
        ("mevis:train", "vidA", "renamed_clip", "content"),
        ("mevis:train", "vidB", "vidB", "id+content"),
        ("mevis:train", "vidA", "vidA", "name-collision"),  # same name, other pixels: not leakage
        ("refcoco:testA", "COCO_train2014_000000000003.jpg", "photo_0042.jpg", "content"),
        ("refcoco:train", "COCO_train2014_000000000001.jpg", "COCO_train2014_000000000001.jpg", "id+content"),
    }
    assert {o.eval_source for o in overlaps} == {"mine:eval"}
    assert {o.media_type for o in overlaps if o.train_source == "mevis:train"} == {"video"}
    assert [o.eval_media_id for o in overlaps if not o.is_leak] == ["vidA"]


def test_a_mixed_dataset_with_repeats_is_checked_once_per_medium(planted):
    sources = list(planted["train"].values())
    mixed = interleave_with_repeats(sources, [3, 1, 1, 2], seed=0)
    overlaps = check_leakage({"mix": mixed}, planted["eval"])
    assert {(o.train_media_id, o.eval_media_id, o.match) for o in overlaps} == {
        (train_id, eval_id, match)
        for _, train_id, eval_id, match in found(check_leakage(planted["train"], planted["eval"]))
    }
    assert len(overlaps) == 5


def test_ids_only_without_content_hash(planted):
    overlaps = check_leakage(planted["train"], planted["eval"], content_hash=False)
    assert found(overlaps) == {
        ("mevis:train", "vidB", "vidB", "id"),
        ("mevis:train", "vidA", "vidA", "id"),
        ("refcoco:train", "COCO_train2014_000000000001.jpg", "COCO_train2014_000000000001.jpg", "id"),
    }


def test_first_frame_hash_versus_all_frames(tmp_path):
    write_video_dataset(tmp_path / "mevis", "train", layout="mevis")
    frames = tmp_path / "mevis" / "train" / "JPEGImages" / "vidA"
    clip = tmp_path / "eval" / "clip"
    shutil.copytree(frames, clip)
    write_image(clip / "00003.jpg", 16, 20, seed=31337)  # same first frame, a different last frame
    (tmp_path / "eval" / "eval.jsonl").write_text(json.dumps({"video_dir": "clip", "prompt": "x"}) + "\n")
    cache = tmp_path / "cache"
    train = [load_mevis(tmp_path / "mevis", "train", cache_dir=cache)]
    evaluation = [load_custom(tmp_path / "eval" / "eval.jsonl", cache_dir=cache)]
    assert check_leakage(train, evaluation, video_frames="all") == []
    first = check_leakage(train, evaluation, video_frames="first")
    assert found(first) == {("mevis#0", "vidA", "clip", "content")}


def test_no_overlap_between_disjoint_sets(planted, tmp_path):
    fresh = tmp_path / "clean"
    write_image(fresh / "a.jpg", 10, 10, seed=1)
    (fresh / "clean.jsonl").write_text(json.dumps({"image": "a.jpg", "prompt": "x"}) + "\n")
    clean = load_custom(fresh / "clean.jsonl", cache_dir=tmp_path / "cache")
    assert check_leakage(planted["train"], {"clean": clean}) == []


def test_warn_if_leaking_logs_a_loud_warning(planted, caplog):
    with caplog.at_level(logging.WARNING, logger="transformers_maskcma.data.leakage"):
        overlaps = warn_if_leaking(planted["train"], planted["eval"])
    assert len(overlaps) == 5
    assert "DATA LEAKAGE: 4 evaluation image(s)/video(s) also appear in the training data (mine:eval: 4)" in caplog.text
    assert "renamed_clip" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="transformers_maskcma.data.leakage"):
        assert (
            warn_if_leaking({"mevis": planted["train"]["mevis:train"]}, {"refcoco": planted["train"]["refcoco:val"]})
            == []
        )
    assert caplog.text == ""


def test_cli_data_check_exit_codes(planted, capsys):
    root = planted["root"]
    mix = root / "mix.yaml"
    mix.write_text(
        yaml.safe_dump(
            {
                "sources": [
                    {"dataset": "refcoco", "path": "refcoco", "split": "train"},
                    {"dataset": "mevis", "path": "mevis", "split": "train", "repeat": 4},
                ]
            }
        )
    )
    cache = str(root / "cache")
    code = main(
        [
            "data",
            "check",
            str(mix),
            "--eval",
            f"custom:eval:{root / 'eval' / 'eval.jsonl'}",
            "--cache-dir",
            cache,
            "--json",
            str(root / "overlaps.json"),
        ]
    )
    output = capsys.readouterr()
    assert code == 1
    assert "renamed_clip" in output.out and "mevis:train (mevis)" in output.out
    assert "LEAKAGE: 3 evaluation image(s)/video(s)" in output.err  # refcoco testA is not in this mix
    assert "1 name collision(s): the same name on different pictures" in output.out
    saved = json.loads((root / "overlaps.json").read_text())
    assert len(saved) == 4 and [o["eval_media_id"] for o in saved if not o["is_leak"]] == ["vidA"]

    code = main(["data", "check", str(mix), "--eval", f"refcoco:val:{root / 'refcoco'}", "--cache-dir", cache])
    assert code == 0
    assert "no overlap" in capsys.readouterr().out


def test_cli_data_summary(planted, capsys):
    root = planted["root"]
    mix = root / "mix.yaml"
    mix.write_text(
        yaml.safe_dump({"sources": [{"dataset": "mevis", "path": "mevis", "split": "train", "repeat": 2.5}]})
    )
    assert main(["data", "summary", str(mix), "--cache-dir", str(root / "cache")]) == 0
    out = capsys.readouterr().out
    assert "mevis:train (mevis)  3" in out and "x2.5" in out
    assert "total records in the mix: 8" in out  # 2 x 3 + round(0.5 x 3)


def test_eval_spec_parsing():
    assert parse_eval_spec("ref_davis:valid:/data/davis:17") == ("ref_davis", "valid", "/data/davis:17")
    import argparse

    with pytest.raises(argparse.ArgumentTypeError, match="NAME:SPLIT:ROOT"):
        parse_eval_spec("ref_davis:valid")
    with pytest.raises(argparse.ArgumentTypeError, match="unknown dataset 'davis'"):
        parse_eval_spec("davis:valid:/x")


def test_re_encoded_copy_under_its_name_is_leakage_and_a_name_clash_is_not(tmp_path, capsys):
    """The same name on a re-encoded copy (JPEG quality 60, other bytes) is leakage ("id+pixels"); the same name
    on another picture is a name collision, reported apart, and `data check` then exits 0."""
    from PIL import Image

    write_video_dataset(tmp_path / "mevis", "train", layout="mevis")
    train_frames = tmp_path / "mevis" / "train" / "JPEGImages"
    for t in range(4):
        target = tmp_path / "eval" / "reencoded" / "vidA" / f"{t:05d}.jpg"
        target.parent.mkdir(parents=True, exist_ok=True)
        with Image.open(train_frames / "vidA" / f"{t:05d}.jpg") as image:
            image.save(target, quality=60)
        assert target.read_bytes() != (train_frames / "vidA" / f"{t:05d}.jpg").read_bytes()
    write_video_frames(tmp_path / "eval" / "other", video_names=("vidB",), seed=555)  # same name, other pixels
    lines = [{"video_dir": "reencoded/vidA", "prompt": "x"}, {"video_dir": "other/vidB", "prompt": "x"}]
    (tmp_path / "eval" / "eval.jsonl").write_text("\n".join(json.dumps(line) for line in lines) + "\n")
    cache = tmp_path / "cache"
    train = {"mevis:train": load_mevis(tmp_path / "mevis", "train", cache_dir=cache)}
    evaluation = {"mine": load_custom(tmp_path / "eval" / "eval.jsonl", cache_dir=cache)}
    assert found(check_leakage(train, evaluation)) == {
        ("mevis:train", "vidA", "vidA", "id+pixels"),
        ("mevis:train", "vidB", "vidB", "name-collision"),
    }

    (tmp_path / "eval" / "clash.jsonl").write_text(json.dumps(lines[1]) + "\n")
    mix = tmp_path / "mix.yaml"
    mix.write_text(yaml.safe_dump({"sources": [{"dataset": "mevis", "path": "mevis", "split": "train"}]}))
    code = main(["data", "check", str(mix), "--eval", f"custom:clash:{tmp_path / 'eval' / 'clash.jsonl'}",
                 "--cache-dir", str(cache)])
    output = capsys.readouterr()
    assert code == 0 and "LEAKAGE" not in output.err
    assert "1 name collision(s)" in output.out and "name-collision" in output.out and "no leakage" in output.out
