"""`maskcma evaluate --model`'s predict function end to end: a saved tiny model run over synthetic records."""

import json

import numpy as np

from transformers_maskcma.data.synthetic import SyntheticConfig, generate_synthetic
from transformers_maskcma.evaluation.model_predict import model_predict_fn
from transformers_maskcma.evaluation.runner import evaluate_dataset, score_predictions
from transformers_maskcma.processing import save_model_folder
from transformers_maskcma.tiny import build_tiny_model, build_tiny_processor

from test_video_segmentation import perturb_sam2_heads


def test_saved_model_predicts_and_scores_images_and_videos(tmp_path):
    model, tokenizer = build_tiny_model(seed=1)
    # SAM2's heads at a trained scale: the object score is negative, and the masks must still come out ("keep")
    perturb_sam2_heads(model, 1)
    save_model_folder(model, build_tiny_processor(tokenizer), tmp_path / "model")
    seg_id, eos_id = tokenizer.convert_tokens_to_ids("[SEG]"), tokenizer.eos_token_id
    # bias generation so that the random model answers "[SEG]" and stops: masks are then always decoded
    predict = model_predict_fn(
        tmp_path / "model", device="cpu", generate_kwargs={"sequence_bias": {(seg_id,): 50.0, (seg_id, eos_id): 200.0}}
    )

    config = SyntheticConfig(image_size=96, num_frames=4, video_fraction=0.5, seed=3)
    records = generate_synthetic(4, config, split="test", show_progress=False)
    for record in records:
        masks = predict(record)
        width, height = record["frames"][0].size
        assert len(masks) == 1
        for mask in masks:
            expected = (height, width) if record["media_type"] == "image" else (len(record["frames"]), height, width)
            assert mask.shape == expected and mask.dtype == bool
            # a mask wherever the target is present (every frame of a clip, key frame or propagated)
            target_frames = [t for t in range(len(record["frames"])) if any(obj[t] for obj in record["masks"])]
            assert target_frames
            frames = mask[None] if record["media_type"] == "image" else mask
            assert all(frames[t].any() for t in target_frames)

    images = records.filter(lambda r: r["media_type"] == "image")
    metrics = evaluate_dataset(images, predict, tmp_path / "predictions", show_progress=False)
    assert metrics["n_samples"] == len(images)
    rescored = score_predictions(images, tmp_path / "predictions")
    assert rescored["metrics"] == metrics["metrics"]
    saved = json.loads((tmp_path / "predictions" / "metrics.json").read_text())
    assert np.isclose(saved["metrics"]["cIoU"], metrics["metrics"]["cIoU"])
