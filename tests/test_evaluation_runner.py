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
    with pytest.raises(ValueError, match="one entry for the one sample"):
        segment_output_masks({"masks": [torch.zeros(1, 4, 5), torch.zeros(1, 4, 5)]})


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

    assert main(base) == 1
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
