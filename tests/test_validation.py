"""The one validation pass (`transformers_maskcma.data.validation`) and the RLE checks it relies on."""

from __future__ import annotations

import json

import datasets
import numpy as np
import pytest
from fixtures_data import compressed_rle, rect, uncompressed_rle, write_custom, write_image

from transformers_maskcma.data import load_custom
from transformers_maskcma.data.errors import DataFormatError, DataValidationError, MaskSizeError
from transformers_maskcma.data.records import make_record
from transformers_maskcma.data.schema import RECORD_FEATURES, check_rle, decode_rle, rle_run_lengths
from transformers_maskcma.data.validation import (
    RecordProblem,
    ValidationReport,
    drop_invalid,
    record_where,
    validate_records,
)

# ----------------------------------------------------------------------------------------------------------------
# RLE run lengths and checks


@pytest.mark.parametrize("seed", range(4))
def test_run_lengths_of_compressed_rle_equal_the_hand_computed_runs(seed):
    mask = np.random.default_rng(seed).random((23, 17)) > 0.6
    mask[:3] = True  # long runs need several 5-bit groups and the difference coding of later runs
    expected = uncompressed_rle(mask)["counts"]
    assert rle_run_lengths(compressed_rle(mask)["counts"]).tolist() == expected
    assert check_rle(compressed_rle(mask), (23, 17)) == (23, 17)


def test_run_lengths_of_a_large_mask():
    mask = np.zeros((480, 640), dtype=bool)
    mask[100:300, 200:500] = True  # runs of 200 and 280 and a first run of 200 * 480 + 100 zeros
    runs = rle_run_lengths(compressed_rle(mask)["counts"])
    assert runs.tolist() == uncompressed_rle(mask)["counts"]
    assert int(runs.sum()) == 480 * 640


def test_negative_run_in_compressed_counts_is_named():
    # "0" is a run of 0; "M" is code 29 = 0b11101: value bits 11101 with the sign bit 0x10 set -> 29 - 32 = -3
    assert rle_run_lengths("0M").tolist() == [0, -3]
    with pytest.raises(DataFormatError, match=r"masks\.jsonl:7: invalid RLE counts: run 1 has the negative length -3"):
        check_rle({"size": [1, 1], "counts": "0M"}, where="masks.jsonl:7")


def test_negative_run_in_uncompressed_counts_is_an_error_not_an_overflow():
    with pytest.raises(DataFormatError, match=r"train\.jsonl:3 .*negative length -2"):
        decode_rle({"size": [2, 2], "counts": [6, -2]}, where="train.jsonl:3 masks[0]")


def test_counts_summing_to_less_than_the_mask_are_refused():
    rle = compressed_rle(rect(4, 4, 0, 0, 2, 2))
    short = {"size": [4, 5], "counts": rle["counts"]}  # 16 pixels of runs for a 20-pixel mask
    with pytest.raises(DataFormatError, match=r"sum to 16 but a 4x5 mask has 20 pixels"):
        check_rle(short, where="x")
    with pytest.raises(DataFormatError, match=r"sum to 3 but a 2x2 mask has 4 pixels"):
        decode_rle({"size": [2, 2], "counts": [1, 2]})
    with pytest.raises(DataFormatError, match=r"sum to 5"):
        decode_rle({"size": [2, 2], "counts": [1, 2, 2]})


def test_bad_characters_and_truncated_strings_are_refused():
    with pytest.raises(DataFormatError, match="outside the COCO alphabet"):
        check_rle({"size": [1, 1], "counts": "1~"}, where="f:1")
    with pytest.raises(DataFormatError, match="truncated"):
        check_rle({"size": [1, 1], "counts": "1P"}, where="f:1")  # "P" = code 32: the 'more' bit, then nothing
    with pytest.raises(MaskSizeError, match=r"f:2: mask RLE has size \(4, 4\).*is \(5, 5\)"):
        check_rle(compressed_rle(rect(4, 4, 0, 0, 1, 1)), (5, 5), where="f:2")


def test_decode_rle_still_decodes_valid_masks():
    mask = rect(9, 7, 2, 1, 6, 5)
    assert np.array_equal(decode_rle(compressed_rle(mask)), mask)
    assert np.array_equal(decode_rle(uncompressed_rle(mask)), mask)


# ----------------------------------------------------------------------------------------------------------------
# validate_records


def _records(tmp_path):
    """Records: a valid image, a missing frame, a wrong-size mask, a truncated RLE, a video, a long prompt."""
    image = write_image(tmp_path / "a.png", 6, 8, seed=1)
    good_mask = compressed_rle(rect(6, 8, 1, 1, 4, 4))

    def record(line, **overrides):
        fields = dict(
            sample_id=f"s{line}",
            source="custom",
            media_type="image",
            media_id="a",
            frames=[image],
            prompt="the square",
            answer="",
            masks=[[good_mask]],
            meta={"file": "eval.jsonl", "line": line},
            where="test",
        )
        fields.update(overrides)
        return make_record(**fields)

    video_frames = [write_image(tmp_path / "v" / f"{t}.png", 6, 8, seed=2 + t) for t in range(2)]
    rows = [
        record(1),
        record(2, frames=[tmp_path / "missing.png"]),
        record(3, masks=[[compressed_rle(rect(5, 8, 0, 0, 1, 1))]]),
        record(4, masks=[[{"size": [6, 8], "counts": "1"}]]),
        record(5, media_type="video", frames=video_frames, masks=[[good_mask, good_mask]]),
        record(6, prompt="word " * 40),
        record(7),
    ]
    return datasets.Dataset.from_list(rows, features=RECORD_FEATURES)


def test_validate_records_reports_every_problem_with_file_and_line(tmp_path):
    dataset = _records(tmp_path)
    report = validate_records(
        dataset,
        expected_media="image",
        prompt_length=lambda record: len(record["prompt"].split()),
        max_prompt_tokens=16,
        progress=False,
    )
    assert report.num_records == 7
    assert report.media_types == {"image": 6, "video": 1}
    by_where = {problem.where: problem.message for problem in report.problems}
    assert sorted(by_where) == ["eval.jsonl:2", "eval.jsonl:3", "eval.jsonl:4", "eval.jsonl:5", "eval.jsonl:6"]
    assert "frame not found" in by_where["eval.jsonl:2"] and "missing.png" in by_where["eval.jsonl:2"]
    assert "mask RLE has size (5, 8)" in by_where["eval.jsonl:3"] and "(6, 8)" in by_where["eval.jsonl:3"]
    assert "invalid RLE counts" in by_where["eval.jsonl:4"] and "sum to 1" in by_where["eval.jsonl:4"]
    assert "media type 'video'" in by_where["eval.jsonl:5"]
    assert "40 tokens" in by_where["eval.jsonl:6"] and "16" in by_where["eval.jsonl:6"]
    assert [problem.index for problem in report.problems] == [1, 2, 3, 4, 5]
    assert [problem.record_id for problem in report.problems] == ["s2", "s3", "s4", "s5", "s6"]
    assert report.invalid_records == 5


def test_raise_if_problems_lists_the_first_problems_and_the_counts(tmp_path):
    report = validate_records(_records(tmp_path), expected_media="image", progress=False)
    with pytest.raises(DataValidationError) as caught:
        report.raise_if_problems(limit=2)
    message = str(caught.value)
    assert message.startswith("4 of 7 records have problems (4 problems:")
    assert "eval.jsonl:2: frame 0: frame not found" in message
    assert "eval.jsonl:3:" in message and "eval.jsonl:4" not in message
    assert "... and 2 more" in message
    assert isinstance(caught.value, DataFormatError)
    ValidationReport(num_records=3, problems=[]).raise_if_problems()  # no problems: returns


def test_drop_invalid_keeps_the_valid_rows_in_order(tmp_path):
    dataset = _records(tmp_path)
    report = validate_records(dataset, expected_media="image", progress=False)
    clean = drop_invalid(dataset, report)
    assert clean["sample_id"] == ["s1", "s6", "s7"]
    assert report.dropped == 4
    assert validate_records(clean, expected_media="image", progress=False).ok
    with pytest.raises(ValueError, match="validate this dataset first"):
        drop_invalid(clean, report)


def test_duplicate_ids_are_problems_when_required(tmp_path):
    dataset = _records(tmp_path).select([0, 0])
    assert validate_records(dataset, progress=False).ok
    report = validate_records(dataset, progress=False, require_unique_ids=True)
    assert [p.message for p in report.problems] == ["sample_id 's1' was already used by eval.jsonl:1; sample ids must be unique"]


def test_check_files_false_reads_only_the_first_frame(tmp_path):
    frames = [write_image(tmp_path / "v" / f"{t}.png", 6, 8, seed=t) for t in range(3)]
    record = make_record(
        sample_id="v", source="s", media_type="video", media_id="v", frames=frames, prompt="p", answer="",
        masks=[], meta={}, where="t",
    )
    dataset = datasets.Dataset.from_list([record], features=RECORD_FEATURES)
    frames[2].unlink()
    assert validate_records(dataset, check_files=False, progress=False).ok
    report = validate_records(dataset, progress=False)
    assert len(report.problems) == 1 and report.problems[0].message.startswith("frame 2: frame not found")
    assert report.problems[0].where == "sample 'v'"


def test_frames_of_different_sizes_and_foreground_are_checked(tmp_path):
    frames = [write_image(tmp_path / "f0.png", 6, 8, seed=0), write_image(tmp_path / "f1.png", 7, 8, seed=1)]
    record = make_record(
        sample_id="revos/valid/vid/3", source="revos", media_type="video", media_id="vid", frames=frames,
        prompt="p", answer="", masks=[],
        meta={"dataset": "revos", "split": "valid", "video": "vid", "exp_id": "3",
              "foreground": [compressed_rle(rect(6, 8, 0, 0, 1, 1)), {"size": [6, 8], "counts": [47]}]},
        where="t",
    )
    report = validate_records(datasets.Dataset.from_list([record], features=RECORD_FEATURES), progress=False)
    assert report.problems[0].where == "revos valid video 'vid' expression '3'"
    messages = [p.message for p in report.problems]
    assert messages[0] == "the frames have different sizes [(6, 8), (7, 8)]; every frame of a clip has one size"
    assert messages[1].startswith("meta['foreground'] frame 1: invalid RLE counts: the run lengths sum to 47")


def test_a_custom_jsonl_mixing_images_and_videos_is_named_per_line(tmp_path):
    write_custom(tmp_path)  # line 1 an image, lines 2 and 3 videos
    dataset = load_custom(tmp_path / "train.jsonl", cache_dir=tmp_path / "cache")
    report = validate_records(dataset, expected_media="image", progress=False)
    assert [p.where for p in report.problems] == ["train.jsonl:2", "train.jsonl:3"]
    assert report.media_types == {"image": 1, "video": 2}


def test_progress_bar_is_shown(tmp_path, capsys):
    validate_records(_records(tmp_path), description="checking eval set", progress=True)
    assert "checking eval set" in capsys.readouterr().err


def test_record_where_forms():
    assert record_where({"sample_id": "x", "meta": json.dumps({"file": "a.jsonl", "line": 4})}) == "a.jsonl:4"
    meta = {"dataset": "refcoco", "split": "val", "ref_id": 4711, "sent_id": 9}
    assert record_where({"sample_id": "x", "meta": json.dumps(meta)}) == "refcoco val ref 4711 sentence 9"
    assert record_where({"sample_id": "x", "meta": ""}) == "sample 'x'"
    assert str(RecordProblem("x", "a.jsonl:4", "bad")) == "a.jsonl:4: bad"


def test_arguments_are_checked(tmp_path):
    with pytest.raises(ValueError, match="expected_media"):
        validate_records([], expected_media="audio")
    with pytest.raises(ValueError, match="together"):
        validate_records([], max_prompt_tokens=3)
