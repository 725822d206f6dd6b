"""The evaluation runner, the prediction store, the submission zips and `maskcma evaluate`, on tiny datasets."""

from __future__ import annotations

import io
import json
import logging
import zipfile
from pathlib import Path

import datasets
import numpy as np
import pytest
import torch
from PIL import Image

from transformers_maskcma.data.errors import DataFormatError, DataValidationError, MalformedJSONError, MaskSizeError
from transformers_maskcma.data.records import make_record
from transformers_maskcma.data.schema import RECORD_FEATURES, encode_rle
from transformers_maskcma.evaluation import (
    PredictionStore,
    aggregate_video,
    evaluate_dataset,
    image_referring_metrics,
    prediction_to_frames,
    revos_scores,
    score_predictions,
    video_expression_scores,
    write_submission_zip,
)
from transformers_maskcma.evaluation.model_predict import segment_output_masks

H, W = 12, 16


def rect(top, left, bottom, right, height=H, width=W):
    mask = np.zeros((height, width), dtype=bool)
    mask[top:bottom, left:right] = True
    return mask


def write_frame(path: Path, height=H, width=W, seed=0) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    pixels = np.random.default_rng(seed).integers(0, 256, size=(height, width, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(path)
    return path


def to_dataset(records: list[dict]) -> datasets.Dataset:
    return datasets.Dataset.from_list(records, features=RECORD_FEATURES)


# ---------------------------------------------------------------------------------------------------------------
# fixtures: an image benchmark and a video benchmark, with the predictions a fake model makes


@pytest.fixture
def image_case(tmp_path):
    truths = {
        "img/0": [rect(2, 2, 6, 8)],
        "img/1": [rect(0, 0, 4, 4), rect(8, 10, 12, 16)],  # two objects: OR-ed
        "img/2": [],  # no object ("no target")
        "img/3": [rect(5, 5, 9, 12)],
    }
    predictions = {
        "img/0": rect(3, 2, 7, 8),  # one mask (H, W)
        "img/1": [rect(0, 0, 4, 2), rect(8, 12, 12, 16)],  # two masks: OR-ed
        "img/2": [],  # answer without mask
        "img/3": np.stack([rect(5, 5, 9, 8), rect(5, 8, 9, 12)]).astype(np.uint8),  # (N, H, W) 0/1
    }
    records = []
    for index, (sample_id, objects) in enumerate(truths.items()):
        frame = write_frame(tmp_path / "images" / f"{index}.png", seed=index)
        records.append(
            make_record(
                sample_id=sample_id, source="refcoco", media_type="image", media_id=f"{index}.png", frames=[frame],
                prompt=f"object {index}", answer="", masks=[[encode_rle(mask)] for mask in objects], meta={},
                where=sample_id,
            )
        )
    return to_dataset(records), truths, predictions


def _video_records(tmp_path, source="mevis", with_type=False, with_masks=True):
    frame_names = ["00000", "00005", "00010"]
    videos = {"vidA": 0, "vidB": 10}
    objects = {  # anno_id -> masks per frame
        "1": [rect(2, 2, 6, 6), rect(2, 4, 6, 8), rect(2, 6, 6, 10)],
        "2": [rect(7, 9, 11, 14), rect(7, 9, 11, 14), np.zeros((H, W), bool)],
        "3": [rect(0, 0, 12, 16), rect(1, 1, 11, 15), rect(3, 3, 9, 9)],
    }
    expressions = [("vidA", "0", ["1"], 0), ("vidA", "1", ["1", "2"], 1), ("vidB", "0", ["3"], 0), ("vidB", "1", ["3"], 1)]
    foreground = {
        "vidA": [objects["1"][t] | objects["2"][t] for t in range(3)],
        "vidB": [objects["3"][t] for t in range(3)],
    }
    records, truths, types = [], {}, {}
    for video, exp_id, anno_ids, type_id in expressions:
        frames = [write_frame(tmp_path / "JPEGImages" / video / f"{name}.jpg", seed=videos[video] + t) for t, name in enumerate(frame_names)]
        union = [np.any([objects[a][t] for a in anno_ids], axis=0) for t in range(3)]
        sample_id = f"{source}/valid/{video}/{exp_id}"
        meta = {"video": video, "exp_id": exp_id, "frame_names": frame_names, "has_masks": with_masks}
        if with_type:
            meta["type_id"] = type_id
            meta["foreground"] = [encode_rle(mask) for mask in foreground[video]]
        records.append(
            make_record(
                sample_id=sample_id, source=source, media_type="video", media_id=video, frames=frames,
                prompt=f"expression {exp_id}", answer="",
                masks=[[encode_rle(mask) for mask in union]] if with_masks else [], meta=meta, where=sample_id,
            )
        )
        truths[sample_id] = np.stack(union)
        types[sample_id] = type_id
    return records, truths, types, {video: np.stack(masks) for video, masks in foreground.items()}


def _video_predictions(truths):
    predictions = {}
    for index, (sample_id, truth) in enumerate(truths.items()):
        shifted = np.roll(truth, index, axis=2)  # a different error per expression
        if index == 1:
            predictions[sample_id] = [shifted, np.zeros_like(shifted)]  # per object (T, H, W): OR-ed
        elif index == 3:
            predictions[sample_id] = list(np.zeros_like(shifted))  # per frame, all empty
        else:
            predictions[sample_id] = shifted  # (T, H, W)
    return predictions


@pytest.fixture
def video_case(tmp_path):
    records, truths, _, _ = _video_records(tmp_path)
    return to_dataset(records), truths, _video_predictions(truths)


class FakeModel:
    """predict_fn that looks predictions up by sample id and records which samples it was called on."""

    def __init__(self, predictions, fail_after=None, fail_on=()):
        self.predictions = predictions
        self.calls: list[str] = []
        self.fail_after = fail_after
        self.fail_on = set(fail_on)

    def __call__(self, record):
        sample_id = record["sample_id"]
        assert isinstance(record["frames"][0], Image.Image)  # the runner hands decoded records to the model
        if self.fail_after is not None and len(self.calls) >= self.fail_after:
            raise RuntimeError("simulated crash")
        if sample_id in self.fail_on:
            raise OSError("corrupted frame")
        self.calls.append(sample_id)
        return self.predictions[sample_id]


def _frames(prediction, num_frames):
    """The union per frame of a FakeModel prediction, computed here independently of prediction_to_frames."""
    if isinstance(prediction, list) and len(prediction) == 0:
        return None
    array = np.asarray(prediction).astype(bool)
    if num_frames == 1:  # image: (H, W) or (N, H, W)
        return array if array.ndim == 2 else array.any(axis=0)
    return array.any(axis=0) if array.ndim == 4 else array


# ---------------------------------------------------------------------------------------------------------------
# scoring equals the numpy metrics


def test_image_evaluation_equals_numpy_metrics(image_case, tmp_path):
    dataset, truths, predictions = image_case
    result = evaluate_dataset(dataset, FakeModel(predictions), tmp_path / "run", show_progress=False)
    expected = image_referring_metrics(
        [_frames(predictions[s], 1) for s in truths],
        [np.stack(objects) if objects else np.zeros((0, H, W), bool) for objects in truths.values()],
    )
    assert result["kind"] == "image"
    assert result["metrics"] == {"gIoU": pytest.approx(expected.giou, rel=1e-12), "cIoU": pytest.approx(expected.ciou, rel=1e-12)}
    assert (result["n_samples"], result["n_missing"], result["n_unused_predictions"]) == (4, 0, 0)
    assert json.loads((tmp_path / "run" / "metrics.json").read_text()) == result
    scores = [json.loads(line) for line in (tmp_path / "run" / "scores.jsonl").read_text().splitlines()]
    assert [(s["intersection"], s["union"]) for s in scores] == list(zip(expected.intersections, expected.unions))
    assert scores[2]["iou"] == 1.0  # no object, no prediction


def test_video_evaluation_equals_numpy_metrics(video_case, tmp_path):
    dataset, truths, predictions = video_case
    result = evaluate_dataset(dataset, FakeModel(predictions), tmp_path / "run", show_progress=False)
    expected = aggregate_video([video_expression_scores(_frames(predictions[s], 3), truths[s]) for s in truths])
    assert result["kind"] == "video"
    assert result["metrics"]["J"] == pytest.approx(expected.j, rel=1e-12)
    assert result["metrics"]["F"] == pytest.approx(expected.f, rel=1e-12)
    assert result["metrics"]["J&F"] == pytest.approx(expected.jf, rel=1e-12)
    assert result["metrics"]["n_expressions"] == 4


def test_revos_evaluation_equals_numpy_metrics(tmp_path):
    records, truths, types, foreground = _video_records(tmp_path, source="revos", with_type=True)
    predictions = _video_predictions(truths)
    result = evaluate_dataset(to_dataset(records), FakeModel(predictions), tmp_path / "run", show_progress=False)
    scores = [
        video_expression_scores(_frames(predictions[s], 3), truths[s], foreground_frames=foreground[s.split("/")[2]])
        for s in truths
    ]
    expected = revos_scores(scores, [types[s] for s in truths]).to_dict()
    assert result["kind"] == "revos"
    for subset in ("referring", "reasoning", "overall"):
        for name in ("J", "F", "J&F", "A", "R"):
            assert result["metrics"][subset][name] == pytest.approx(expected[subset][name], rel=1e-12)
    assert result["metrics"]["overall"]["n_expressions"] == 4


# ---------------------------------------------------------------------------------------------------------------
# resuming


def test_interrupted_evaluation_resumes(video_case, tmp_path):
    dataset, truths, predictions = video_case
    crashing = FakeModel(predictions, fail_after=2)
    with pytest.raises(RuntimeError, match=r"predicting sample 'mevis/valid/vidB/0' failed \(RuntimeError: simulated crash\).*re-run resumes"):
        evaluate_dataset(dataset, crashing, tmp_path / "run", show_progress=False)
    assert len(PredictionStore(tmp_path / "run")) == 2

    resumed = FakeModel(predictions)
    result = evaluate_dataset(dataset, resumed, tmp_path / "run", show_progress=False)
    assert resumed.calls == list(truths)[2:]  # only what was not done

    uninterrupted = evaluate_dataset(dataset, FakeModel(predictions), tmp_path / "once", show_progress=False)
    assert result["metrics"] == uninterrupted["metrics"]


def test_truncated_last_line_is_predicted_again(video_case, tmp_path, caplog):
    dataset, truths, predictions = video_case
    first = evaluate_dataset(dataset, FakeModel(predictions), tmp_path / "run", show_progress=False)
    path = tmp_path / "run" / "predictions.jsonl"
    content = path.read_bytes()
    last_start = content.rstrip(b"\n").rfind(b"\n") + 1
    path.write_bytes(content[: last_start + (len(content) - last_start) // 2])  # the write was cut mid-line

    again = FakeModel(predictions)
    with caplog.at_level(logging.WARNING):
        second = evaluate_dataset(dataset, again, tmp_path / "run", show_progress=False)
    assert "last line is incomplete" in caplog.text
    assert again.calls == [list(truths)[-1]]
    assert second["metrics"] == first["metrics"]
    assert path.read_bytes() == content  # the file is whole again


def test_malformed_line_in_the_middle_is_an_error(video_case, tmp_path):
    dataset, _, predictions = video_case
    evaluate_dataset(dataset, FakeModel(predictions), tmp_path / "run", show_progress=False)
    path = tmp_path / "run" / "predictions.jsonl"
    lines = path.read_text().splitlines()
    lines[1] = lines[1][:20]
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(MalformedJSONError, match=r"predictions\.jsonl line 2: malformed JSON"):
        score_predictions(dataset, tmp_path / "run", show_progress=False)


# ---------------------------------------------------------------------------------------------------------------
# missing predictions


def test_missing_prediction_is_an_error_or_a_counted_empty_mask(video_case, tmp_path, caplog):
    dataset, truths, predictions = video_case
    skipped = list(truths)[1]
    with PredictionStore(tmp_path / "preds", writable=True) as store:
        for sample_id in truths:
            if sample_id != skipped:
                store.add(sample_id, _frames(predictions[sample_id], 3))

    with pytest.raises(KeyError, match=rf"no prediction for sample '{skipped}' \(and 0 more\) in .*preds"):
        score_predictions(dataset, tmp_path / "preds", show_progress=False)

    with caplog.at_level(logging.WARNING):
        result = score_predictions(dataset, tmp_path / "preds", missing="empty", show_progress=False)
    assert skipped in caplog.text
    assert result["n_missing"] == 1 and result["missing_sample_ids"] == [skipped]
    expected = aggregate_video(
        [
            video_expression_scores(np.zeros_like(truths[s]) if s == skipped else _frames(predictions[s], 3), truths[s])
            for s in truths
        ]
    )
    assert result["metrics"]["J"] == pytest.approx(expected.j, rel=1e-12)
    assert result["metrics"]["F"] == pytest.approx(expected.f, rel=1e-12)


def test_missing_predictions_folder_is_named(video_case, tmp_path):
    dataset, _, _ = video_case
    with pytest.raises(FileNotFoundError, match="predictions folder not found: .*nowhere"):
        score_predictions(dataset, tmp_path / "nowhere", show_progress=False)
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match=r"no predictions\.jsonl in the predictions folder .*empty"):
        score_predictions(dataset, tmp_path / "empty", show_progress=False)


def test_model_failure_with_missing_empty_is_counted_and_retried_later(video_case, tmp_path):
    dataset, truths, predictions = video_case
    failing = list(truths)[2]
    result = evaluate_dataset(
        dataset, FakeModel(predictions, fail_on=[failing]), tmp_path / "run", missing="empty", show_progress=False
    )
    assert result["n_missing"] == 1 and result["missing_sample_ids"] == [failing]
    assert result["failures"] == {failing: "OSError: corrupted frame"}
    assert json.loads((tmp_path / "run" / "metrics.json").read_text())["failures"] == {failing: "OSError: corrupted frame"}

    retry = FakeModel(predictions)
    complete = evaluate_dataset(dataset, retry, tmp_path / "run", show_progress=False)
    assert retry.calls == [failing] and complete["n_missing"] == 0


def test_unused_predictions_are_counted(video_case, tmp_path):
    dataset, truths, predictions = video_case
    evaluate_dataset(dataset, FakeModel(predictions), tmp_path / "run", show_progress=False)
    subset = dataset.select(range(2))
    result = score_predictions(subset, tmp_path / "run", show_progress=False)
    assert result["n_samples"] == 2 and result["n_unused_predictions"] == 2


# ---------------------------------------------------------------------------------------------------------------
# bad sizes and shapes


def test_ground_truth_rle_of_wrong_size(tmp_path):
    frame = write_frame(tmp_path / "a.png")
    record = make_record(
        sample_id="img/bad", source="refcoco", media_type="image", media_id="a.png", frames=[frame], prompt="x",
        answer="", masks=[[encode_rle(np.ones((H + 1, W), bool))]], meta={}, where="test",
    )
    dataset = to_dataset([record])
    with pytest.raises(DataValidationError, match=r"(?s)1 of 1 records have problems.*sample 'img/bad': object 0 frame 0: mask RLE has size \(13, 16\)"):
        evaluate_dataset(dataset, lambda r: np.zeros((H, W), bool), tmp_path / "run", show_progress=False)


def test_prediction_of_wrong_size(image_case, tmp_path):
    dataset, _, _ = image_case
    with pytest.raises(MaskSizeError, match=r"sample 'img/0': predicted masks are \(6, 8\).*original frame size"):
        evaluate_dataset(dataset, lambda r: np.zeros((6, 8), bool), tmp_path / "run", show_progress=False)
    # a stored prediction of the wrong size
    with PredictionStore(tmp_path / "preds", writable=True) as store:
        for sample_id in dataset["sample_id"]:
            store.add(sample_id, np.zeros((1, H, W + 2), bool))
    with pytest.raises(MaskSizeError, match=r"prediction for sample 'img/0' frame 0 has size \(12, 18\)"):
        score_predictions(dataset, tmp_path / "preds", show_progress=False)


def test_prediction_forms():
    frames = np.zeros((3, 4, 5), bool)
    frames[1, 1, 1] = True
    objects = np.stack([frames, np.roll(frames, 1, axis=2)])
    union = frames | np.roll(frames, 1, axis=2)
    np.testing.assert_array_equal(prediction_to_frames(frames, 3, (4, 5), "video"), frames)
    np.testing.assert_array_equal(prediction_to_frames(list(frames), 3, (4, 5), "video"), frames)
    np.testing.assert_array_equal(prediction_to_frames(objects, 3, (4, 5), "video"), union)
    np.testing.assert_array_equal(prediction_to_frames(list(objects), 3, (4, 5), "video"), union)
    np.testing.assert_array_equal(prediction_to_frames(torch.from_numpy(objects).float(), 3, (4, 5), "video"), union)
    assert not prediction_to_frames([], 3, (4, 5), "video").any()
    np.testing.assert_array_equal(prediction_to_frames(frames[1], 1, (4, 5), "image"), frames[1:2])
    np.testing.assert_array_equal(prediction_to_frames(objects[:, 1], 1, (4, 5), "image"), union[1:2])
    np.testing.assert_array_equal(prediction_to_frames(objects[:, 1:2], 1, (4, 5), "image"), union[1:2])
    with pytest.raises(ValueError, match="sample 's': masks must be binary.*threshold logits"):
        prediction_to_frames(np.full((3, 4, 5), 0.7), 3, (4, 5), "video", "s")
    with pytest.raises(TypeError, match="returned None; return an empty list"):
        prediction_to_frames(None, 3, (4, 5), "video", "s")
    with pytest.raises(ValueError, match="the prediction has 2 frames but the sample has 3"):
        prediction_to_frames(frames[:2], 3, (4, 5), "video", "s")
    with pytest.raises(ValueError, match=r"a video prediction must be \(T, H, W\)"):
        prediction_to_frames(frames[0], 3, (4, 5), "video", "s")


def test_segment_output_masks_reads_one_sample():
    class Output:
        masks = [torch.zeros(2, 3, 4, 5, dtype=torch.bool)]

    masks = segment_output_masks(Output())
    assert len(masks) == 2 and masks[0].shape == (3, 4, 5) and masks[0].dtype == bool
    assert segment_output_masks({"masks": [torch.zeros(0, 4, 5, dtype=torch.bool)]}) == []
    with pytest.raises(ValueError, match=r"one entry per sample \(1\), got list of length 2"):
        segment_output_masks({"masks": [torch.zeros(1, 4, 5), torch.zeros(1, 4, 5)]})
    two = segment_output_masks({"masks": [torch.zeros(1, 4, 5), torch.ones(0, 4, 5)]}, num_samples=2)
    assert len(two) == 2 and two[0][0].shape == (4, 5) and two[1] == []


def test_model_predict_fn_plumbing(monkeypatch, image_case, video_case, tmp_path):
    """model_predict_fn with stand-ins for the Auto classes: routing of images and videos, device and dtype, and
    the conversion of MaskCMASegmentationOutput-style masks (the real processor is tested in its own area)."""
    import transformers

    from transformers_maskcma.evaluation.model_predict import model_predict_fn

    calls = []

    class Inputs(dict):
        def to(self, device=None, dtype=None):
            calls.append(("to", device, dtype))
            return self

    class Processor:
        def __call__(self, images=None, videos=None, text=None, return_tensors=None):
            media = [images] if images is not None else videos
            assert all(frame.mode == "RGB" for frame in media) and return_tensors == "pt"
            calls.append(("image" if images is not None else "video", len(media), text))
            return Inputs(num_frames=len(media), height=media[0].height, width=media[0].width)

    class Model:
        dtype = torch.bfloat16

        def to(self, device):
            calls.append(("model.to", device))
            return self

        def eval(self):
            return self

        def segment(self, num_frames, height, width):
            mask = torch.zeros(num_frames, height, width, dtype=torch.bool)
            mask[:, :2, :3] = True
            return {"masks": [mask[None] if num_frames > 1 else mask[0][None]]}  # one object

    monkeypatch.setattr(transformers.AutoModel, "from_pretrained", lambda path, **kwargs: Model())
    monkeypatch.setattr(transformers.AutoProcessor, "from_pretrained", lambda path, **kwargs: Processor())
    predict = model_predict_fn("some/model", device="cpu")
    for dataset, kind in ((image_case[0], "image"), (video_case[0], "video")):
        result = evaluate_dataset(dataset, predict, tmp_path / kind, show_progress=False)
        store = PredictionStore(tmp_path / kind)
        for sample_id in dataset["sample_id"]:
            masks = store.masks(sample_id)
            assert masks[:, :2, :3].all() and masks.sum() == 6 * masks.shape[0]
        assert result["n_samples"] == 4
    assert ("model.to", "cpu") in calls and ("to", "cpu", torch.bfloat16) in calls
    assert ("image", 1, "object 0") in calls and ("video", 3, "expression 0") in calls


# ---------------------------------------------------------------------------------------------------------------
# splits without ground truth and submission zips


def _read_png(archive: zipfile.ZipFile, name: str) -> Image.Image:
    return Image.open(io.BytesIO(archive.read(name)))


@pytest.mark.parametrize("layout, prefix", [("mevis", ""), ("ref_ytvos", "Annotations/")])
def test_submission_zip_layout(video_case, tmp_path, layout, prefix):
    dataset, truths, predictions = video_case
    evaluate_dataset(dataset, FakeModel(predictions), tmp_path / "run", show_progress=False)
    summary = write_submission_zip(dataset, tmp_path / "run", tmp_path / "out.zip", layout=layout, show_progress=False)
    assert (summary.n_expressions, summary.n_frames, summary.n_missing) == (4, 12, 0)
    with zipfile.ZipFile(tmp_path / "out.zip") as archive:
        names = sorted(archive.namelist())
        assert names == sorted(
            f"{prefix}{video}/{exp}/{frame}.png"
            for video, exp in [("vidA", "0"), ("vidA", "1"), ("vidB", "0"), ("vidB", "1")]
            for frame in ("00000", "00005", "00010")
        )
        for sample_id in truths:
            video, exp = sample_id.split("/")[2:]
            expected = _frames(predictions[sample_id], 3)
            for t, frame in enumerate(("00000", "00005", "00010")):
                image = _read_png(archive, f"{prefix}{video}/{exp}/{frame}.png")
                assert image.mode == "L" and image.size == (W, H)
                pixels = np.asarray(image)
                assert set(np.unique(pixels)) <= {0, 255}
                np.testing.assert_array_equal(pixels == 255, expected[t])


def test_submission_zip_missing_predictions(video_case, tmp_path):
    dataset, truths, predictions = video_case
    with PredictionStore(tmp_path / "preds", writable=True) as store:
        store.add(list(truths)[0], _frames(predictions[list(truths)[0]], 3))
    with pytest.raises(KeyError, match=r"no prediction for sample 'mevis/valid/vidA/1' \(and 2 more\)"):
        write_submission_zip(dataset, tmp_path / "preds", tmp_path / "out.zip", show_progress=False)
    assert not (tmp_path / "out.zip").exists()
    summary = write_submission_zip(dataset, tmp_path / "preds", tmp_path / "out.zip", skip_missing=True, show_progress=False)
    assert summary.layout == "mevis" and summary.n_missing == 3
    with zipfile.ZipFile(tmp_path / "out.zip") as archive:
        assert not np.asarray(_read_png(archive, "vidB/0/00005.png")).any()


def test_split_without_ground_truth(tmp_path):
    records, truths, _, _ = _video_records(tmp_path, with_masks=False)
    dataset = to_dataset(records)
    predictions = _video_predictions(truths)
    result = evaluate_dataset(dataset, FakeModel(predictions), tmp_path / "run", show_progress=False)
    assert result["metrics"] is None and result["n_samples"] == 4 and "evaluation server" in result["note"]
    with pytest.raises(DataFormatError, match="has no ground-truth masks.*submission zip"):
        score_predictions(dataset, tmp_path / "run", show_progress=False)
    summary = write_submission_zip(dataset, tmp_path / "run", tmp_path / "valid.zip", show_progress=False)
    assert summary.n_frames == 12


# ---------------------------------------------------------------------------------------------------------------
# the command line, on a MeViS-layout folder read by the real loader


def _write_mevis_folder(root: Path) -> dict[str, np.ndarray]:
    from pycocotools import mask as coco_mask

    split = root / "valid_u"
    frames = ["00000", "00001"]
    masks = {"10": [rect(1, 1, 5, 5), rect(2, 2, 6, 6)], "11": [rect(6, 8, 10, 14), None]}
    for t, name in enumerate(frames):
        write_frame(split / "JPEGImages" / "v1" / f"{name}.jpg", seed=t)
    mask_dict = {}
    for anno_id, per_frame in masks.items():
        entries = []
        for mask in per_frame:
            if mask is None:
                entries.append(None)
            else:
                rle = coco_mask.encode(np.asfortranarray(mask.astype(np.uint8)))
                entries.append({"size": rle["size"], "counts": rle["counts"].decode("ascii")})
        mask_dict[anno_id] = entries
    meta = {"videos": {"v1": {"frames": frames, "expressions": {
        "0": {"exp": "the left box", "obj_id": [0], "anno_id": [10]},
        "1": {"exp": "both boxes", "obj_id": [0, 1], "anno_id": [10, 11]},
    }}}}
    (split / "meta_expressions.json").write_text(json.dumps(meta))
    (split / "mask_dict.json").write_text(json.dumps(mask_dict))
    empty = np.zeros((H, W), bool)
    return {
        "mevis/valid_u/v1/0": np.stack(masks["10"]),
        "mevis/valid_u/v1/1": np.stack([masks["10"][0] | masks["11"][0], masks["10"][1] | empty]),
    }


def test_cli_scores_saved_predictions(tmp_path, capsys):
    from transformers_maskcma.cli import main

    truths = _write_mevis_folder(tmp_path / "mevis")
    predictions = {sample_id: np.roll(truth, 1, axis=1) for sample_id, truth in truths.items()}
    preds_dir = tmp_path / "preds"
    with PredictionStore(preds_dir, writable=True) as store:
        store.add("mevis/valid_u/v1/0", predictions["mevis/valid_u/v1/0"])
    base = ["evaluate", "--predictions", str(preds_dir), "--dataset", "mevis", "--split", "valid_u",
            "--data-root", str(tmp_path / "mevis"), "--no-progress"]

    assert main(base) == 2
    assert "no prediction for sample 'mevis/valid_u/v1/1'" in capsys.readouterr().err

    with PredictionStore(preds_dir, writable=True) as store:
        store.add("mevis/valid_u/v1/1", predictions["mevis/valid_u/v1/1"])
    output = tmp_path / "metrics.json"
    assert main(base + ["--output", str(output), "--submission-zip", str(tmp_path / "sub.zip")]) == 0
    printed = capsys.readouterr().out
    expected = aggregate_video([video_expression_scores(predictions[s], truths[s]) for s in truths])
    saved = json.loads(output.read_text())
    assert saved["metrics"]["J"] == pytest.approx(expected.j, rel=1e-12)
    assert saved["metrics"]["J&F"] == pytest.approx(expected.jf, rel=1e-12)
    assert f"J&F {100 * expected.jf:.2f}" in printed
    with zipfile.ZipFile(tmp_path / "sub.zip") as archive:
        assert sorted(archive.namelist()) == ["v1/0/00000.png", "v1/0/00001.png", "v1/1/00000.png", "v1/1/00001.png"]


def test_cli_needs_predictions_or_model(capsys):
    from transformers_maskcma.cli import main

    assert main(["evaluate", "--dataset", "mevis", "--split", "valid_u", "--data-root", "x"]) == 2
    assert "give --predictions DIR" in capsys.readouterr().err


def test_revos_folder_through_the_real_loader(tmp_path):
    """ReVOS layout on disk -> load_dataset_by_name -> score: type_id and the foreground of
    mask_dict_foreground.json reach the metrics."""
    from pycocotools import mask as coco_mask

    from transformers_maskcma.data import load_dataset_by_name

    def rle(mask):
        encoded = coco_mask.encode(np.asfortranarray(mask.astype(np.uint8)))
        return {"size": encoded["size"], "counts": encoded["counts"].decode("ascii")}

    root = tmp_path / "revos"
    frames = ["00000", "00001"]
    for t, name in enumerate(frames):
        write_frame(root / "JPEGImages" / "v1" / f"{name}.jpg", seed=t)
    referred = [rect(1, 1, 5, 5), rect(2, 2, 6, 6)]
    other = [rect(8, 8, 12, 16), rect(8, 8, 12, 16)]  # annotated but never referred: only in the foreground
    foreground = [referred[t] | other[t] for t in range(2)]
    meta = {"videos": {"v1": {"frames": frames, "expressions": {
        "0": {"exp": "the box", "obj_id": [0], "anno_id": [7], "type_id": 0},
        "1": {"exp": "what moves?", "obj_id": [0], "anno_id": [7], "type_id": 1},
    }}}}
    (root / "meta_expressions_valid_.json").write_text(json.dumps(meta))
    (root / "mask_dict.json").write_text(json.dumps({"7": [rle(m) for m in referred]}))
    (root / "mask_dict_foreground.json").write_text(json.dumps({"v1": {"masks_rle": [rle(m) for m in foreground]}}))
    dataset = load_dataset_by_name("revos", root, "valid")

    truth = np.stack(referred)
    predictions = {
        "revos/valid/v1/0": truth,
        "revos/valid/v1/1": truth | np.stack([rect(0, 10, 4, 16)] * 2),  # 24 false-positive pixels per frame
    }
    result = evaluate_dataset(dataset, FakeModel(predictions), tmp_path / "run", show_progress=False)
    metrics = result["metrics"]
    assert metrics["referring"]["J"] == 1.0 and metrics["referring"]["R"] == 1.0
    # R of the reasoning expression: |fg| = 16 + 32 = 48 pixels, 24 false positives in each frame
    assert metrics["reasoning"]["R"] == pytest.approx(1 - 24 / (48 + 1e-6))
    assert metrics["reasoning"]["A"] == pytest.approx(1 - 24 / (H * W))
    assert metrics["reasoning"]["J"] == pytest.approx(16 / 40)
    assert metrics["overall"]["R"] == pytest.approx((1 + 1 - 24 / (48 + 1e-6)) / 2)


# ---------------------------------------------------------------------------------------------------------------
# one predictions folder = one run


def _fingerprint(model: str) -> dict:
    return {"model": {"name_or_path": model, "config_sha256": model * 2}, "dataset": "mevis", "split": "valid"}


def test_second_model_is_refused_naming_what_differs(video_case, tmp_path):
    from transformers_maskcma.run_folder import RunFolderError

    dataset, truths, predictions = video_case
    first = evaluate_dataset(dataset, FakeModel(predictions), tmp_path / "run", show_progress=False,
                             fingerprint=_fingerprint("model-a"))
    other = FakeModel({sample_id: np.zeros_like(truth) for sample_id, truth in truths.items()})
    with pytest.raises(RunFolderError) as caught:
        evaluate_dataset(dataset, other, tmp_path / "run", show_progress=False, fingerprint=_fingerprint("model-b"))
    message = str(caught.value)
    assert 'model.name_or_path: "model-a" vs "model-b"' in message and "model.config_sha256" in message
    assert "--overwrite" in message and "another output folder" in message
    assert other.calls == []  # refused before predicting anything
    # the same run resumes: nothing is predicted again
    again = FakeModel(predictions)
    resumed = evaluate_dataset(dataset, again, tmp_path / "run", show_progress=False, fingerprint=_fingerprint("model-a"))
    assert again.calls == [] and resumed["metrics"] == first["metrics"]
    # --overwrite: the second model predicts every sample itself
    replaced = evaluate_dataset(dataset, other, tmp_path / "run", show_progress=False,
                                fingerprint=_fingerprint("model-b"), overwrite=True)
    assert other.calls == list(truths)
    assert replaced["metrics"]["J"] < first["metrics"]["J"]
    manifest = json.loads((tmp_path / "run" / "maskcma_run.json").read_text())
    assert manifest["fingerprint"] == _fingerprint("model-b")
    assert set(manifest["files"]) == {"predictions.jsonl", "metrics.json", "scores.jsonl"}


def test_folder_with_predictions_of_unknown_origin_is_refused(video_case, tmp_path):
    from transformers_maskcma.run_folder import RunFolderError

    dataset, truths, predictions = video_case
    with PredictionStore(tmp_path / "run", writable=True) as store:
        store.add(list(truths)[0], _frames(predictions[list(truths)[0]], 3))
    with pytest.raises(RunFolderError, match="holds no maskcma_run.json"):
        evaluate_dataset(dataset, FakeModel(predictions), tmp_path / "run", show_progress=False)
    with pytest.raises(RunFolderError, match="holds a predictions.jsonl that no recorded run wrote"):
        evaluate_dataset(dataset, FakeModel(predictions), tmp_path / "run", show_progress=False, overwrite=True)


def test_metrics_json_records_the_run_and_export_reads_it(video_case, tmp_path):
    from transformers_maskcma.hub_cards.model_card import load_benchmark_results

    dataset, truths, predictions = video_case
    skipped = list(truths)[3]
    result = evaluate_dataset(dataset, FakeModel(predictions, fail_on=[skipped]), tmp_path / "run",
                              show_progress=False, fingerprint=_fingerprint("model-a"), missing="drop")
    saved = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert saved == result
    assert saved["fingerprint"] == _fingerprint("model-a") and (saved["dataset"], saved["split"]) == ("mevis", "valid")
    assert saved["counts"] == {"samples": 4, "scored": 3, "excluded": 0, "missing": 1}
    assert saved["missing_policy"] == "drop" and saved["metrics"]["n_expressions"] == 3
    (benchmark,) = load_benchmark_results(tmp_path / "run" / "metrics.json")
    assert (benchmark.dataset, benchmark.split, benchmark.num_samples) == ("mevis", "valid", 3)
    assert benchmark.metrics["J&F"] == pytest.approx(saved["metrics"]["J&F"])


# ---------------------------------------------------------------------------------------------------------------
# --missing error | zero | empty | drop


def _iou(prediction, truth):
    union = np.count_nonzero(prediction | truth)
    return 1.0 if union == 0 else np.count_nonzero(prediction & truth) / union


def test_missing_rules_on_images(image_case, tmp_path):
    dataset, truths, predictions = image_case
    absent = "img/2"  # no object in the ground truth: an empty mask would score IoU 1
    with PredictionStore(tmp_path / "preds", writable=True) as store:
        for sample_id in truths:
            if sample_id != absent:
                store.add(sample_id, _frames(predictions[sample_id], 1)[None])
    union = {s: np.any(objects, axis=0) if objects else np.zeros((H, W), bool) for s, objects in truths.items()}
    ious = {s: _iou(_frames(predictions[s], 1), union[s]) for s in truths if s != absent}
    results = {
        rule: score_predictions(dataset, tmp_path / "preds", missing=rule, show_progress=False)
        for rule in ("zero", "empty", "drop")
    }
    assert results["empty"]["metrics"]["gIoU"] == pytest.approx((sum(ious.values()) + 1.0) / 4)
    assert results["zero"]["metrics"]["gIoU"] == pytest.approx(sum(ious.values()) / 4)
    assert results["drop"]["metrics"]["gIoU"] == pytest.approx(sum(ious.values()) / 3)
    assert [results[r]["counts"]["scored"] for r in ("zero", "empty", "drop")] == [4, 4, 3]
    assert all(results[r]["counts"]["missing"] == 1 for r in results)
    with pytest.raises(KeyError, match=r"no prediction for sample 'img/2'.*--missing zero\|empty\|drop"):
        score_predictions(dataset, tmp_path / "preds", show_progress=False)


def test_missing_rules_on_videos(video_case, tmp_path):
    dataset, truths, predictions = video_case
    absent = list(truths)[0]
    with PredictionStore(tmp_path / "preds", writable=True) as store:
        for sample_id in truths:
            if sample_id != absent:
                store.add(sample_id, _frames(predictions[sample_id], 3))
    present = [video_expression_scores(_frames(predictions[s], 3), truths[s]) for s in truths if s != absent]
    zero = score_predictions(dataset, tmp_path / "preds", missing="zero", show_progress=False)["metrics"]
    drop = score_predictions(dataset, tmp_path / "preds", missing="drop", show_progress=False)["metrics"]
    assert zero["J"] == pytest.approx(sum(s.j for s in present) / 4) and zero["n_expressions"] == 4
    assert drop["J"] == pytest.approx(sum(s.j for s in present) / 3) and drop["n_expressions"] == 3
    assert drop["F"] == pytest.approx(sum(s.f for s in present) / 3)


# ---------------------------------------------------------------------------------------------------------------
# the official ReVOS rules, through the real loader


def _write_revos_overlap(root: Path) -> None:
    """ReVOS folder: 5 frames of 8x8; objects 1 and 2 (2x2 pixels each) share pixel (3, 3) in frames 0-3, not in
    frame 4. Expression "0" (referring) refers to both, "1" (reasoning) to object 1, "2" has type_id 2."""
    from pycocotools import mask as coco_mask

    def rle(mask):
        encoded = coco_mask.encode(np.asfortranarray(mask.astype(np.uint8)))
        return {"size": encoded["size"], "counts": encoded["counts"].decode("ascii")}

    frames = [f"{t:05d}" for t in range(5)]
    for t, name in enumerate(frames):
        write_frame(root / "JPEGImages" / "v1" / f"{name}.jpg", height=8, width=8, seed=t)
    one = [rect(2, 2, 4, 4, 8, 8)] * 4 + [rect(0, 0, 2, 2, 8, 8)]
    two = [rect(3, 3, 5, 5, 8, 8)] * 4 + [rect(5, 5, 7, 7, 8, 8)]
    meta = {"videos": {"v1": {"frames": frames, "expressions": {
        "0": {"exp": "both squares", "obj_id": ["1", "2"], "anno_id": [1, 2], "type_id": 0},
        "1": {"exp": "which square is on top?", "obj_id": [1], "anno_id": [1], "type_id": 1},
        "2": {"exp": "an excluded expression", "obj_id": [2], "anno_id": [2], "type_id": 2},
    }}}}
    (root / "meta_expressions_valid_.json").write_text(json.dumps(meta))
    (root / "mask_dict.json").write_text(json.dumps({"1": [rle(m) for m in one], "2": [rle(m) for m in two]}))
    foreground = [rle(one[t] | two[t]) for t in range(5)]
    (root / "mask_dict_foreground.json").write_text(json.dumps({"v1": {"masks_rle": foreground}}))


def test_revos_official_rules_on_overlapping_objects(tmp_path):
    from transformers_maskcma.data import load_dataset_by_name

    _write_revos_overlap(tmp_path / "revos")
    dataset = load_dataset_by_name("revos", tmp_path / "revos", "valid")
    one = np.stack([rect(2, 2, 4, 4, 8, 8)] * 4 + [rect(0, 0, 2, 2, 8, 8)])
    two = np.stack([rect(3, 3, 5, 5, 8, 8)] * 4 + [rect(5, 5, 7, 7, 8, 8)])
    predictions = {"revos/valid/v1/0": one | two, "revos/valid/v1/1": one, "revos/valid/v1/2": two}
    model = FakeModel(predictions)
    official = evaluate_dataset(dataset, model, tmp_path / "run", show_progress=False)
    metrics = official["metrics"]
    # expression 0, by hand: A = (4 * 63/64 + 1) / 5 = 0.9875 (the shared pixel is 2 in the ground truth, 1 in the
    # prediction); R = (4 * max(1 - 255 / 7, 0) + 1) / 5 = 0.2 (1 - 2 wraps to 255 false positives; |fg| = 7)
    assert metrics["referring"]["A"] == pytest.approx(0.9875)
    assert metrics["referring"]["R"] == pytest.approx(0.2)
    assert metrics["referring"]["J"] == 1.0 and metrics["referring"]["F"] == 1.0
    assert metrics["reasoning"]["A"] == 1.0 and metrics["reasoning"]["R"] == pytest.approx(1.0)
    assert metrics["overall"]["A"] == pytest.approx((0.9875 + 1.0) / 2)
    assert metrics["overall"]["R"] == pytest.approx((0.2 + 1.0) / 2)
    assert metrics["n_excluded"] == 1 and official["excluded_sample_ids"] == ["revos/valid/v1/2"]
    assert official["counts"] == {"samples": 3, "scored": 2, "excluded": 1, "missing": 0}
    assert official["revos_ground_truth"] == "official"
    union = score_predictions(dataset, tmp_path / "run", revos_ground_truth="union", show_progress=False)["metrics"]
    assert union["referring"]["A"] == 1.0 and union["referring"]["R"] == pytest.approx(1.0)
    assert union["referring"]["J"] == metrics["referring"]["J"] and union["referring"]["F"] == metrics["referring"]["F"]


# ---------------------------------------------------------------------------------------------------------------
# the whole split is checked before the first prediction


def test_mixed_images_and_videos_are_refused_before_predicting(tmp_path):
    from fixtures_data import write_custom

    from transformers_maskcma.data import load_custom

    write_custom(tmp_path / "data")  # line 1 an image, lines 2 and 3 videos
    dataset = load_custom(tmp_path / "data" / "train.jsonl", cache_dir=tmp_path / "cache")
    model = FakeModel({})
    with pytest.raises(DataValidationError) as caught:
        evaluate_dataset(dataset, model, tmp_path / "run", show_progress=False)
    message = str(caught.value)
    assert message.startswith("1 of 3 records have problems (1 problems: 1 wrong media types)")
    assert "train.jsonl:1: media type 'image' but this data holds video records" in message
    assert model.calls == [] and not (tmp_path / "run" / "predictions.jsonl").exists()


def test_missing_frame_is_found_before_predicting(video_case, tmp_path, capsys):
    dataset, truths, predictions = video_case
    Path(dataset[0]["frames"][2].filename).unlink()  # vidA frame 00010, used by two expressions
    model = FakeModel(predictions)
    with pytest.raises(DataValidationError, match=r"2 of 4 records have problems \(2 problems: 2 missing files\)"):
        evaluate_dataset(dataset, model, tmp_path / "run", show_progress=True)
    assert model.calls == []
    assert "Checking the evaluation set" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------------------------
# the command line: fingerprints, refusal, default folder


def _fake_models(tmp_path: Path, monkeypatch, predictions) -> tuple[Path, Path]:
    import transformers_maskcma.evaluation.model_predict as model_predict

    folders = []
    for name, hidden in (("model-a", 8), ("model-b", 16)):
        folder = tmp_path / name
        folder.mkdir()
        (folder / "config.json").write_text(json.dumps({"model_type": "maskcma", "hidden_size": hidden}))
        folders.append(folder)
    monkeypatch.setattr(model_predict, "model_predict_fn", lambda *args, **kwargs: FakeModel(predictions))
    return folders[0], folders[1]


def test_cli_refuses_a_second_model_in_the_same_folder(tmp_path, monkeypatch, capsys):
    from transformers_maskcma.cli import main

    truths = _write_mevis_folder(tmp_path / "mevis")
    model_a, model_b = _fake_models(tmp_path, monkeypatch, truths)
    base = ["evaluate", "--dataset", "mevis", "--split", "valid_u", "--data-root", str(tmp_path / "mevis"),
            "--predictions", str(tmp_path / "eval"), "--no-progress"]
    assert main(base + ["--model", str(model_a)]) == 0
    out = capsys.readouterr().out
    assert "J&F 100.00" in out and f"model: {model_a}" in out
    assert main(base + ["--model", str(model_b)]) == 2
    error = capsys.readouterr().err
    assert f"output folder {tmp_path / 'eval'} holds another run" in error
    assert "model.name_or_path:" in error and "model.config_sha256" in error
    assert f"Its predictions were made by model {model_a}; this run evaluates {model_b}." in error
    assert "pass --overwrite to replace it, or choose another output folder" in error
    # other generation settings are another run too
    assert main(base + ["--model", str(model_a), "--max-new-tokens", "64"]) == 2
    assert "generation.max_new_tokens: 32 vs 64" in capsys.readouterr().err
    assert main(base + ["--model", str(model_b), "--overwrite"]) == 0
    capsys.readouterr()
    # scoring the folder without --model reads the recorded run
    assert main(["evaluate", "--dataset", "mevis", "--split", "valid_u", "--data-root", str(tmp_path / "mevis"),
                 "--predictions", str(tmp_path / "eval"), "--no-progress"]) == 0
    assert f"model: {model_b}" in capsys.readouterr().out
    saved = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    assert saved["fingerprint"]["model"]["name_or_path"] == str(model_b)
    assert saved["fingerprint"]["generation"] == {"mask_threshold": None, "max_new_tokens": 32}
    assert saved["fingerprint"]["data_root"] == str((tmp_path / "mevis").resolve())
    assert (saved["dataset"], saved["split"], saved["counts"]["scored"]) == ("mevis", "valid_u", 2)
    # ... and refuses scoring it as another split
    assert main(["evaluate", "--dataset", "mevis", "--split", "valid", "--data-root", str(tmp_path / "mevis"),
                 "--predictions", str(tmp_path / "eval"), "--no-progress"]) == 2
    assert "were made on split 'valid_u', not 'valid'" in capsys.readouterr().err


def test_cli_default_folder_names_the_model(tmp_path, monkeypatch, capsys):
    from transformers_maskcma.cli import main

    truths = _write_mevis_folder(tmp_path / "mevis")
    model_a, model_b = _fake_models(tmp_path, monkeypatch, truths)
    monkeypatch.chdir(tmp_path)
    for model in (model_a, model_b):
        assert main(["evaluate", "--model", str(model), "--dataset", "mevis", "--split", "valid_u",
                     "--data-root", str(tmp_path / "mevis"), "--no-progress"]) == 0
    assert sorted(p.name for p in (tmp_path / "maskcma-eval").iterdir()) == [
        "model-a-mevis-valid_u", "model-b-mevis-valid_u"
    ]
    capsys.readouterr()
    with pytest.raises(SystemExit):
        main(["evaluate", "--help"])
    help_text = " ".join(capsys.readouterr().out.split())
    assert "--missing {error,zero,empty,drop}" in help_text and "--skip-missing" not in help_text
    assert "--revos-ground-truth {official,union}" in help_text and "--overwrite" in help_text


def test_processor_fingerprint_of_a_saved_folder(tmp_path):
    from transformers_maskcma.evaluation.fingerprint import evaluation_fingerprint, model_display_name
    from transformers_maskcma.processing import save_model_folder
    from transformers_maskcma.tiny import build_tiny_model, build_tiny_processor

    model, tokenizer = build_tiny_model(seed=0)
    save_model_folder(model, build_tiny_processor(tokenizer), tmp_path / "tiny")
    fingerprint = evaluation_fingerprint(tmp_path / "tiny", dataset="refcoco", split="val", data_root=None)
    processor = fingerprint["processor"]
    assert processor["num_key_frames"] == 5 and processor["key_frame_sampling"] == "first"
    assert "max_image_tiles" in processor and "processor_config.json" in processor["files"]
    assert "modeling_maskcma.py" in processor["remote_code"]
    assert set(fingerprint["model"]["weights"]) == {"model.safetensors"}
    assert model_display_name("OpenGVLab/Sa2VA-1B") == "OpenGVLab--Sa2VA-1B"
    assert evaluation_fingerprint("OpenGVLab/Sa2VA-1B", dataset="d", split="s", data_root=None)["model"] == {
        "name_or_path": "OpenGVLab/Sa2VA-1B", "repo": "OpenGVLab/Sa2VA-1B"
    }


# ---------------------------------------------------------------------------------------------------------------
# shards of a multi-process run (the processes themselves: tests/test_evaluate_distributed.py)


def test_shards_of_an_interrupted_run_are_merged_and_only_the_rest_predicted(video_case, tmp_path):
    from transformers_maskcma.evaluation.predictions import merge_prediction_shards, shard_filename
    from transformers_maskcma.run_folder import RunFolder

    dataset, truths, predictions = video_case
    once = tmp_path / "once"
    evaluate_dataset(dataset, FakeModel(predictions), once, show_progress=False)
    reference = PredictionStore(once)
    sample_ids = list(truths)

    # a two-process run killed mid-way: process 1 wrote sample 3, process 0 wrote sample 0 and was cut off while
    # writing sample 2 (the interleaved shares: 0, 2 and 1, 3)
    run = tmp_path / "run"
    folder = RunFolder.claim(run, command="evaluate", fingerprint={})
    folder.record("predictions.jsonl", shard_filename(0, 2), shard_filename(1, 2))
    for rank, ids in ((0, [sample_ids[0], sample_ids[2]]), (1, [sample_ids[3]])):
        with PredictionStore(run, writable=True, filename=shard_filename(rank, 2)) as shard:
            for sample_id in ids:
                shard.add_entry(reference.entry(sample_id))
    cut = run / shard_filename(0, 2)
    content = cut.read_bytes()
    cut.write_bytes(content[: len(content) - 40])  # the last line is incomplete

    resumed = FakeModel(predictions)
    result = evaluate_dataset(dataset, resumed, run, show_progress=False)
    assert resumed.calls == [sample_ids[1], sample_ids[2]]  # the missing one and the one cut off
    assert result["run"] == {"already_predicted": 2, "predicted_now": 2, "processes": 1, "batch_size": 1}
    assert not list(run.glob("predictions.shard-*"))
    assert result["metrics"] == json.loads((once / "metrics.json").read_text())["metrics"]
    # merged in the dataset's order first, then what this run predicted
    assert PredictionStore(run).sample_ids() == [sample_ids[0], sample_ids[3], sample_ids[1], sample_ids[2]]
    assert merge_prediction_shards(run, sample_ids) == 0  # nothing left to merge


def test_merge_keeps_what_is_merged_and_orders_by_the_dataset(video_case, tmp_path):
    from transformers_maskcma.evaluation.predictions import merge_prediction_shards, shard_filename

    dataset, truths, predictions = video_case
    evaluate_dataset(dataset, FakeModel(predictions), tmp_path / "once", show_progress=False)
    reference = PredictionStore(tmp_path / "once")
    sample_ids = list(truths)
    run = tmp_path / "run"
    with PredictionStore(run, writable=True) as merged:
        merged.add_entry(reference.entry(sample_ids[2]))
    for rank, ids in ((0, [sample_ids[3], sample_ids[0]]), (1, [sample_ids[1], sample_ids[2]])):
        with PredictionStore(run, writable=True, filename=shard_filename(rank, 2)) as shard:
            for sample_id in ids:
                shard.add_entry(reference.entry(sample_id))
    assert merge_prediction_shards(run, sample_ids) == 3
    store = PredictionStore(run)
    assert store.sample_ids() == [sample_ids[2], sample_ids[0], sample_ids[1], sample_ids[3]]
    for sample_id in sample_ids:
        assert np.array_equal(store.masks(sample_id), reference.masks(sample_id))


def test_evaluation_processes_from_the_launcher_environment(monkeypatch):
    from transformers_maskcma.evaluation.distributed import EvaluationProcesses

    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(name, raising=False)
    single = EvaluationProcesses.from_environment()
    assert (single.rank, single.world_size, single.is_main, single.distributed) == (0, 1, True, False)
    assert single.share(list(range(5))) == [0, 1, 2, 3, 4]
    assert single.gather("x") == ["x"]
    with pytest.raises(OSError, match="disk full"):
        single.run_on_main("writing", lambda: (_ for _ in ()).throw(OSError("disk full")))
    monkeypatch.setenv("WORLD_SIZE", "1")
    assert EvaluationProcesses.from_environment().world_size == 1
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(ValueError, match="WORLD_SIZE is set but RANK is not"):
        EvaluationProcesses.from_environment()
    monkeypatch.setenv("RANK", "two")
    with pytest.raises(ValueError, match="RANK='two' is not an integer"):
        EvaluationProcesses.from_environment()
    with pytest.raises(ValueError, match="rank 2 of world size 2 is not valid"):
        EvaluationProcesses(rank=2, world_size=2, group=object())
    # the shares of two processes: interleaved, together every item once
    first, second = (EvaluationProcesses(rank=r, world_size=2, group=object()) for r in (0, 1))
    assert first.share(list(range(5))) == [0, 2, 4] and second.share(list(range(5))) == [1, 3]
