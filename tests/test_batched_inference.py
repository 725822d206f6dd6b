"""Batched image inference equals one image at a time: the processor with several images and `segment`, the
`ModelPredictor` of `maskcma evaluate` (`predict_batch`), `evaluate_dataset(batch_size=...)` and the pipeline's
`batch_size`.

The stated tolerance (docs/evaluation.md): answers identical, masks IoU >= 0.999 per sample and object. Prompts of
different lengths make the batch left-padded, and images of different aspect ratios give different tile counts and
original sizes. The tiny model has random weights, its VLM and SAM2's heads re-drawn at a trained scale (so that
answers depend on the prompt and image); a negative control
(the padding attended to) shows that the answers compared here do depend on the padding being handled.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

import datasets

from transformers_maskcma.data.records import make_record
from transformers_maskcma.data.schema import RECORD_FEATURES, encode_rle
from transformers_maskcma.evaluation.model_predict import ModelPredictor, model_predict_fn
from transformers_maskcma.evaluation.predictions import PredictionStore
from transformers_maskcma.evaluation.runner import evaluate_dataset
from transformers_maskcma.processing import save_model_folder
from transformers_maskcma.tiny import build_tiny_model, build_tiny_processor

from test_video_segmentation import perturb_sam2_heads

#: prompts of different token lengths, so that a batch is left-padded
PROMPTS = [
    "the red circle",
    "Please segment the large red circle in the upper left part of this picture.",
    "square",
    "Segment the blue square next to the circle, please.",
    "the thing on the right side",
]
#: (width, height): different aspect ratios, so different tile counts and original sizes
SIZES = [(96, 64), (64, 96), (80, 80), (120, 48), (72, 56)]
MAX_TILES = 4
IOU_TOLERANCE = 0.999


def _images() -> list[Image.Image]:
    rng = np.random.default_rng(0)
    images = []
    for width, height in SIZES:
        array = rng.integers(0, 255, size=(height, width, 3), dtype=np.uint8)
        array[height // 4 : height // 2, width // 4 : width // 2] = (220, 40, 40)
        images.append(Image.fromarray(array))
    return images


def _image_dataset(folder, images=None, prompts=PROMPTS) -> datasets.Dataset:
    """The images saved as PNG files, one record each (ground truth: the red rectangle drawn in `_images`)."""
    records = []
    for k, (image, prompt) in enumerate(zip(images or _images(), prompts)):
        truth = np.zeros((image.height, image.width), bool)
        truth[image.height // 4 : image.height // 2, image.width // 4 : image.width // 2] = True
        path = folder / f"image{k}.png"
        image.save(path)
        records.append(
            make_record(
                sample_id=f"batch/{k}", source="batch", media_type="image", media_id=path.name, frames=[path],
                prompt=prompt, answer="", masks=[[encode_rle(truth)]], meta={}, where=f"batch/{k}",
            )
        )
    return datasets.Dataset.from_list(records, features=RECORD_FEATURES)


def perturb_vlm(model, seed: int) -> None:
    """Re-draw every linear layer and embedding of the VLM at the scale of a standard initialisation (std
    1/sqrt(fan_in), embeddings std 1): the fresh tiny model's std-0.02 weights answer the same token whatever the
    input, so a comparison of answers would hold trivially. Random, not chosen for any outcome."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in model.vlm.modules():
            if isinstance(module, torch.nn.Linear):
                module.weight.copy_(torch.randn(module.weight.shape, generator=generator) / module.in_features**0.5)
            elif isinstance(module, torch.nn.Embedding):
                module.weight.copy_(torch.randn(module.weight.shape, generator=generator))


def _iou(first: np.ndarray, second: np.ndarray) -> float:
    union = np.count_nonzero(first | second)
    return 1.0 if union == 0 else np.count_nonzero(first & second) / union


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    model, tokenizer = build_tiny_model(seed=1)
    perturb_sam2_heads(model, 1)
    perturb_vlm(model, 2)
    model.eval()
    processor = build_tiny_processor(tokenizer, max_image_tiles=MAX_TILES)
    folder = save_model_folder(model, processor, tmp_path_factory.mktemp("batched") / "model")
    seg_id, eos_id = tokenizer.convert_tokens_to_ids("[SEG]"), tokenizer.eos_token_id
    # answers "[SEG]" then stops, so every sample has a mask to compare
    seg_bias = {"sequence_bias": {(seg_id,): 50.0, (seg_id, eos_id): 200.0}}
    return model, processor, folder, seg_bias


def test_processor_batch_pads_left_and_keeps_tiles_and_sizes_per_sample(tiny):
    _, processor, _, _ = tiny
    images = _images()
    batch = processor(images=images, text=PROMPTS, return_tensors="pt")
    singles = [processor(images=image, text=prompt, return_tensors="pt") for image, prompt in zip(images, PROMPTS)]
    lengths = [single["input_ids"].shape[1] for single in singles]
    assert len(set(lengths)) > 1  # the batch needs padding
    assert batch["input_ids"].shape == (len(images), max(lengths))
    for row, single in enumerate(singles):
        pad = max(lengths) - lengths[row]
        # left padding: the prompt ends at the last column, the padding is masked out
        assert torch.equal(batch["input_ids"][row, pad:], single["input_ids"][0])
        assert batch["attention_mask"][row, :pad].sum() == 0 and batch["attention_mask"][row, pad:].all()
        assert torch.equal(batch["text_token_mask"][row, pad:], single["text_token_mask"][0])
        assert not batch["text_token_mask"][row, :pad].any()
        assert torch.equal(batch["original_sizes"][row], single["original_sizes"][0])
        assert torch.equal(batch["sam_pixel_values"][row], single["sam_pixel_values"][0])
    # each image keeps its own tiles, in order
    tiles = [single["pixel_values"].shape[0] for single in singles]
    assert len(set(tiles)) > 1
    assert torch.equal(batch["pixel_values"], torch.cat([single["pixel_values"] for single in singles]))
    assert [tuple(size) for size in batch["original_sizes"].tolist()] == [(h, w) for w, h in SIZES]


def test_segment_on_a_batch_equals_one_image_at_a_time(tiny):
    model, processor, _, seg_bias = tiny
    images = _images()
    with torch.inference_mode():
        # free answers of the random model: the generated tokens depend on every prompt token and position
        free_batch = model.segment(**processor(images=images, text=PROMPTS), max_new_tokens=6)
        free_singles = [
            model.segment(**processor(images=image, text=prompt), max_new_tokens=6)
            for image, prompt in zip(images, PROMPTS)
        ]
        batch = model.segment(**processor(images=images, text=PROMPTS), max_new_tokens=4, **seg_bias)
        singles = [
            model.segment(**processor(images=image, text=prompt), max_new_tokens=4, **seg_bias)
            for image, prompt in zip(images, PROMPTS)
        ]
    for row, single in enumerate(free_singles):
        assert torch.equal(free_batch.answer_ids[row], single.answer_ids[0]), row
    assert len({tuple(ids.tolist()) for ids in free_batch.answer_ids}) > 1  # the answers differ between samples
    for row, single in enumerate(singles):
        assert torch.equal(batch.answer_ids[row], single.answer_ids[0])
        assert batch.masks[row].shape == single.masks[0].shape == (1, SIZES[row][1], SIZES[row][0])
        for first, second in zip(batch.masks[row].numpy(), single.masks[0].numpy()):
            assert first.any() and _iou(first, second) >= IOU_TOLERANCE
        torch.testing.assert_close(batch.scores[row], single.scores[0], rtol=1e-4, atol=1e-5)

    # negative control: with the padding attended to, the free answers of the padded samples change
    inputs = processor(images=images, text=PROMPTS)
    inputs["attention_mask"] = torch.ones_like(inputs["attention_mask"])
    with torch.inference_mode():
        attended = model.segment(**inputs, max_new_tokens=6)
    changed = [
        row for row, single in enumerate(free_singles) if not torch.equal(attended.answer_ids[row], single.answer_ids[0])
    ]
    assert changed, "the answers do not depend on the padding: the comparison above could not fail"


def test_model_predictor_batches_equal_single_records(tiny, tmp_path):
    _, _, folder, seg_bias = tiny
    predictor = model_predict_fn(folder, device="cpu", generate_kwargs={"max_new_tokens": 4, **seg_bias})
    assert isinstance(predictor, ModelPredictor)
    dataset = _image_dataset(tmp_path)
    records = [dataset[k] for k in range(len(dataset))]
    batched = predictor.predict_batch(records)
    assert len(batched) == len(records)
    for record, masks in zip(records, batched):
        single = predictor(record)
        assert len(masks) == len(single) == 1
        assert masks[0].shape == (record["frames"][0].height, record["frames"][0].width)
        assert _iou(masks[0], single[0]) >= IOU_TOLERANCE


def test_evaluate_dataset_in_batches_stores_the_same_predictions(tiny, tmp_path):
    _, _, folder, seg_bias = tiny
    predictor = model_predict_fn(folder, device="cpu", generate_kwargs={"max_new_tokens": 4, **seg_bias})
    dataset = _image_dataset(tmp_path)
    one = evaluate_dataset(dataset, predictor, tmp_path / "one", show_progress=False)
    three = evaluate_dataset(dataset, predictor, tmp_path / "three", show_progress=False, batch_size=3)
    assert three["run"] == {"already_predicted": 0, "predicted_now": 5, "processes": 1, "batch_size": 3}
    store_one, store_three = PredictionStore(tmp_path / "one"), PredictionStore(tmp_path / "three")
    assert store_three.sample_ids() == store_one.sample_ids() == list(dataset["sample_id"])
    for sample_id in dataset["sample_id"]:
        assert _iou(store_three.masks(sample_id), store_one.masks(sample_id)) >= IOU_TOLERANCE
    assert three["metrics"] == pytest.approx(one["metrics"], abs=1e-3)


def test_batch_size_needs_a_batch_predict_function(tmp_path):
    dataset = _image_dataset(tmp_path, images=[Image.new("RGB", (8, 6))], prompts=["x"])
    with pytest.raises(ValueError, match=r"batch_size=2 needs predict_fn.predict_batch"):
        evaluate_dataset(dataset, lambda record: [], tmp_path / "run", batch_size=2, show_progress=False)
    with pytest.raises(ValueError, match=r"batch_size=0 must be a positive integer"):
        evaluate_dataset(dataset, lambda record: [], tmp_path / "run", batch_size=0, show_progress=False)


def test_a_failing_batch_is_predicted_one_record_at_a_time(tmp_path):
    """A batch that raises is retried record by record, so only the failing sample is missing and it is named."""
    images = [Image.new("RGB", (8, 6), (k, 0, 0)) for k in range(5)]
    dataset = _image_dataset(tmp_path, images=images, prompts=[f"p{k}" for k in range(5)])
    sample_ids = list(dataset["sample_id"])

    class Predictor:
        def __init__(self):
            self.batches, self.singles = [], []

        def __call__(self, record):
            self.singles.append(record["sample_id"])
            if record["sample_id"] == sample_ids[3]:
                raise RuntimeError("broken sample")
            return np.ones((6, 8), bool)

        def predict_batch(self, records):
            self.batches.append([record["sample_id"] for record in records])
            return [self(record) for record in records]

    predictor = Predictor()
    result = evaluate_dataset(dataset, predictor, tmp_path / "run", missing="zero", batch_size=2, show_progress=False)
    assert predictor.batches == [sample_ids[0:2], sample_ids[2:4], sample_ids[4:5]]
    # the failed batch's samples went again one at a time
    assert predictor.singles == sample_ids[0:4] + sample_ids[2:5]
    assert result["missing_sample_ids"] == [sample_ids[3]] and "broken sample" in result["failures"][sample_ids[3]]
    assert PredictionStore(tmp_path / "run").sample_ids() == sample_ids[:3] + sample_ids[4:]
    with pytest.raises(RuntimeError, match=r"predicting sample 'batch/3' failed \(RuntimeError: broken sample\)"):
        evaluate_dataset(dataset, Predictor(), tmp_path / "again", batch_size=2, show_progress=False)


def test_pipeline_batches_images_and_keeps_videos_and_order(tiny, tmp_path):
    from transformers import pipeline

    _, _, folder, seg_bias = tiny
    segmenter = pipeline("referring-segmentation", model=str(folder), trust_remote_code=True, device="cpu")
    images = _images()
    clip = [np.asarray(images[0].resize((64, 48)))] * 3
    inputs = [images[0], {"video": clip}, *images[1:]]
    prompts = [PROMPTS[0], "the moving thing", *PROMPTS[1:]]
    options = {"max_new_tokens": 4, "generate_kwargs": seg_bias}
    one = segmenter(inputs, text=prompts, **options)
    batched = segmenter(inputs, text=prompts, batch_size=4, **options)
    assert len(batched) == len(one) == len(inputs)
    for first, second in zip(one, batched):
        assert first["answer"] == second["answer"]
        assert len(first["masks"]) == len(second["masks"]) == 1
        assert first["masks"][0].shape == second["masks"][0].shape
        assert _iou(first["masks"][0], second["masks"][0]) >= IOU_TOLERANCE
    assert batched[1]["masks"][0].shape == (3, 48, 64)  # the video, one at a time, in its place
    assert [result["masks"][0].shape for k, result in enumerate(batched) if k != 1] == [(h, w) for w, h in SIZES]
    # the pipeline's batch_size at construction is used too
    built = pipeline(
        "referring-segmentation", model=str(folder), trust_remote_code=True, device="cpu", batch_size=3
    )
    again = built(inputs, text=prompts, **options)
    assert [result["answer"] for result in again] == [result["answer"] for result in one]
    with pytest.raises(ValueError, match=r"batch_size=0 must be a positive integer"):
        segmenter(inputs, text=prompts, batch_size=0)
