"""The training mix: YAML parsing, repeat factors, deterministic interleaving, dispatch by dataset name."""

from __future__ import annotations

import collections
import json

import datasets
import pytest
import yaml
from fixtures_data import write_custom, write_gcg, write_image, write_osprey, write_refcoco, write_video_dataset

from transformers_maskcma.data import (
    DATASET_NAMES,
    RECORD_FEATURES,
    SEED_MIX_PATH,
    DataFormatError,
    UnknownDatasetError,
    interleave_with_repeats,
    load_dataset_by_name,
    load_mix,
    read_mix,
)
from transformers_maskcma.data.records import make_record


def toy_source(tmp_path, name: str, size: int) -> datasets.Dataset:
    image = write_image(tmp_path / "toy.png", 4, 4, seed=0)
    rows = [
        make_record(
            sample_id=f"{name}/{i}",
            source=name,
            media_type="image",
            media_id=f"{name}{i}.png",
            frames=[image],
            prompt=f"{name} {i}",
            answer="",
            masks=[],
            meta={},
            where="toy",
        )
        for i in range(size)
    ]
    return datasets.Dataset.from_list(rows, features=RECORD_FEATURES)


def ids(dataset) -> list[str]:
    return dataset["sample_id"]


def test_integer_repeats_every_row_exactly_r_times(tmp_path):
    a, b = toy_source(tmp_path, "a", 3), toy_source(tmp_path, "b", 2)
    mixed = interleave_with_repeats([a, b], [2, 3], seed=0)
    counts = collections.Counter(ids(mixed))
    assert len(mixed) == 3 * 2 + 2 * 3
    assert counts == {"a/0": 2, "a/1": 2, "a/2": 2, "b/0": 3, "b/1": 3}


def test_interleaving_is_deterministic_per_seed(tmp_path):
    a, b = toy_source(tmp_path, "a", 5), toy_source(tmp_path, "b", 5)
    first = ids(interleave_with_repeats([a, b], [2, 1], seed=7))
    assert ids(interleave_with_repeats([a, b], [2, 1], seed=7)) == first
    assert ids(interleave_with_repeats([a, b], [2, 1], seed=8)) != first
    # interleaved, not one source after the other
    sources = [sample_id[0] for sample_id in first]
    assert sources != sorted(sources) and sources != sorted(sources, reverse=True)


def test_no_shuffle_keeps_file_order(tmp_path):
    a, b = toy_source(tmp_path, "a", 3), toy_source(tmp_path, "b", 2)
    mixed = interleave_with_repeats([a, b], [2, 3], seed=0, shuffle=False)
    assert ids(mixed) == ["a/0", "a/1", "a/2"] * 2 + ["b/0", "b/1"] * 3


def test_fractional_repeat_keeps_a_seeded_subset(tmp_path):
    a = toy_source(tmp_path, "a", 4)
    half = ids(interleave_with_repeats([a], [0.5], seed=3))
    assert len(half) == 2 and len(set(half)) == 2
    one_and_half = collections.Counter(ids(interleave_with_repeats([a], [1.5], seed=3)))
    assert sum(one_and_half.values()) == 6 and set(one_and_half) == {f"a/{i}" for i in range(4)}
    assert sorted(one_and_half.values()) == [1, 1, 2, 2]


def write_mix(path, content) -> None:
    path.write_text(yaml.safe_dump(content))


def test_load_mix_from_yaml(tmp_path):
    root = tmp_path / "data"
    write_refcoco(root / "ref_seg" / "refcoco", "refcoco")
    write_video_dataset(root / "mevis", "train", layout="mevis")
    write_custom(root / "mine")
    mix_file = root / "mix.yaml"
    write_mix(
        mix_file,
        {
            "seed": 5,
            "sources": [
                {"dataset": "refcoco", "path": "ref_seg/refcoco", "split": "train", "repeat": 2},
                {"dataset": "mevis", "path": "mevis", "split": "train", "repeat": 3},
                {"dataset": "custom", "path": "mine/train.jsonl", "options": {"source": "mine"}},
            ],
        },
    )
    mixed = load_mix(mix_file, cache_dir=tmp_path / "cache")
    assert collections.Counter(mixed["source"]) == {"refcoco": 3 * 2, "mevis": 3 * 3, "mine": 3}
    again = load_mix(mix_file, cache_dir=tmp_path / "cache")
    assert ids(again) == ids(mixed)
    assert ids(load_mix(mix_file, seed=6, cache_dir=tmp_path / "cache")) != ids(mixed)

    # data_root given explicitly (the YAML lives elsewhere)
    moved = tmp_path / "elsewhere.yaml"
    moved.write_text(mix_file.read_text())
    assert ids(load_mix(moved, data_root=root, cache_dir=tmp_path / "cache")) == ids(mixed)


def test_load_dataset_by_name_dispatches_every_name(tmp_path):
    cache = {"cache_dir": tmp_path / "cache"}
    for name in ("refcoco", "refcoco+", "refcocog"):
        write_refcoco(tmp_path / name, name)
        assert set(load_dataset_by_name(name, tmp_path / name, "train", **cache)["source"]) == {name}
    write_video_dataset(tmp_path / "mevis", "train", layout="mevis")
    write_video_dataset(tmp_path / "revos", "train", layout="revos")
    write_video_dataset(tmp_path / "ytvos", "train", layout="ytvos")
    write_video_dataset(tmp_path / "davis", "valid", layout="ytvos")
    for name, folder, split in (
        ("mevis", "mevis", "train"),
        ("revos", "revos", "train"),
        ("ref_ytvos", "ytvos", "train"),
        ("ref_davis", "davis", "valid"),
    ):
        loaded = load_dataset_by_name(name, tmp_path / folder, split, **cache)
        assert len(loaded) == 3 and set(loaded["source"]) == {name}
    write_gcg(tmp_path / "gcg")
    gcg = load_dataset_by_name(
        "gcg",
        tmp_path / "gcg" / "annotations" / "GranDf_HA_GCG_train.json",
        "train",
        image_dir=str(tmp_path / "gcg" / "images"),
        **cache,
    )
    assert set(gcg["source"]) == {"gcg"} and len(gcg) == 2
    write_osprey(tmp_path / "osprey")
    osprey = load_dataset_by_name(
        "osprey",
        tmp_path / "osprey" / "osprey_detail_description.json",
        "train",
        image_dirs=[str(tmp_path / "osprey" / "train2017")],
        **cache,
    )
    assert set(osprey["source"]) == {"osprey"} and len(osprey) == 2
    write_custom(tmp_path / "custom")
    custom = load_dataset_by_name("custom", tmp_path / "custom", "train", **cache)  # folder → <split>.jsonl
    assert len(custom) == 3
    synthetic = load_dataset_by_name("synthetic", None, "train", num_samples=2, check_train_samples=0)
    assert len(synthetic) == 2 and set(synthetic["source"]) == {"synthetic"}
    assert synthetic.features == RECORD_FEATURES
    with pytest.raises(UnknownDatasetError, match=r"unknown dataset 'coco'.*refcoco"):
        load_dataset_by_name("coco", tmp_path, "train")


def test_gcg_default_image_folder_is_next_to_the_json(tmp_path):
    write_gcg(tmp_path / "gcg")
    (tmp_path / "gcg" / "images").rename(tmp_path / "gcg" / "annotations" / "images")
    loaded = load_dataset_by_name(
        "gcg", tmp_path / "gcg" / "annotations" / "RefCOCOg_GCG_train.json", "train", cache_dir=tmp_path / "cache"
    )
    assert len(loaded) == 1


def test_mix_errors_name_the_file_and_entry(tmp_path):
    mix_file = tmp_path / "mix.yaml"
    cases = [
        (
            {"sources": [{"dataset": "cocoo", "path": "x"}]},
            UnknownDatasetError,
            r"mix\.yaml sources\[0\]: unknown dataset 'cocoo'",
        ),
        (
            {"sources": [{"dataset": "refcoco", "path": "x", "repeat": -1}]},
            DataFormatError,
            r"sources\[0\]: 'repeat' must be a positive",
        ),
        (
            {"sources": [{"dataset": "refcoco", "split": "train"}]},
            DataFormatError,
            r"sources\[0\]: dataset 'refcoco' needs a 'path'",
        ),
        (
            {"sources": [{"dataset": "refcoco", "path": "x", "weight": 2}]},
            DataFormatError,
            r"unknown key\(s\) \['weight'\]",
        ),
        ({"sources": []}, DataFormatError, r"non-empty 'sources' list"),
        ({"seed": "zero", "sources": [{"dataset": "synthetic"}]}, DataFormatError, r"'seed' must be an integer"),
    ]
    for content, error, pattern in cases:
        write_mix(mix_file, content)
        with pytest.raises(error, match=pattern):
            read_mix(mix_file)
    mix_file.write_text("sources: [ {dataset: refcoco\n")
    with pytest.raises(DataFormatError, match=r"mix\.yaml: malformed YAML"):
        read_mix(mix_file)
    with pytest.raises(FileNotFoundError, match="mix file not found"):
        read_mix(tmp_path / "absent.yaml")
    write_mix(mix_file, {"sources": [{"dataset": "mevis", "path": "no_such_folder", "split": "train"}]})
    with pytest.raises(FileNotFoundError, match=r"video dataset folder not found: .*no_such_folder"):
        load_mix(mix_file)


def test_seed_mix_is_the_paper_recipe():
    config = read_mix(SEED_MIX_PATH)
    repeats = collections.defaultdict(list)
    for source in config.sources:
        assert source.dataset in DATASET_NAMES
        repeats[source.dataset].append(source.repeat)
    assert repeats["refcoco"] == [4] and repeats["refcoco+"] == [4] and repeats["refcocog"] == [4]
    assert repeats["revos"] == [10] and repeats["mevis"] == [4]
    assert len(repeats["gcg"]) == 4 and repeats["osprey"] == [1]
    pseudo_video = [s for s in config.sources if s.dataset == "custom"]
    assert len(pseudo_video) == 1 and pseudo_video[0].options["source"] == "ref_sav"
    assert "ref_davis" not in repeats  # an evaluation set never enters the training mix
    json.dumps([s.options for s in config.sources])  # options are plain YAML values
