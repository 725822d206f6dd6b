"""MaskCMADataCollator: padding and index remapping of a mixed batch (images and videos, 0–2 objects, 1–3 frames),
checked by hand and by a forward pass of the tiny model."""

import numpy as np
import pytest
import torch

from transformers_maskcma.tiny import build_tiny_model, build_tiny_processor
from transformers_maskcma.processing.samples import draw_sample_shapes
from transformers_maskcma.trainer.collator import MaskCMADataCollator


@pytest.fixture(scope="module")
def processor(tiny_tokenizer):
    return build_tiny_processor(tiny_tokenizer)


@pytest.fixture(scope="module")
def features(processor):
    """image (2 objects) · video (1 object, 3 key frames) · image (0 objects) · video (2 objects, 2 key frames)."""
    image, masks = draw_sample_shapes("shapes")
    rng = np.random.default_rng(0)
    frames = [rng.integers(0, 255, (40, 60, 3), dtype=np.uint8) for _ in range(5)]
    object_a = [rng.random((40, 60)) > 0.5 for _ in range(5)]
    object_b = [rng.random((40, 60)) > 0.7 for _ in range(5)]
    return [
        processor(
            images=image, text="the red circle and the blue square", masks=[masks["red circle"], masks["blue square"]]
        ),
        processor(videos=frames, text="the moving thing", masks=[object_a], num_key_frames=3),
        processor(images=image, text="the purple star", answer=""),
        processor(videos=frames, text="both things", masks=[object_a, object_b], key_frame_indices=[1, 4]),
    ]


def test_mixed_batch_indices_are_shifted_by_the_previous_samples(features, processor):
    batch = MaskCMADataCollator(processor)(features)
    # [SEG] counts 2, 1, 0, 2 -> offsets 0, 2, 3, 3; frame counts 1, 3, 1, 2 -> offsets 0, 1, 4, 5
    assert batch["target_seg_index"].tolist() == [0, 1] + [2, 2, 2] + [] + [3, 3, 4, 4]
    assert batch["target_frame_index"].tolist() == [0, 0] + [1, 2, 3] + [] + [5, 6, 5, 6]
    assert batch["frame_sample_index"].tolist() == [0, 1, 1, 1, 2, 3, 3]
    assert batch["seg_object_ids"].tolist() == [0, 1, 0, 0, 1]
    assert batch["sam_pixel_values"].shape == (7, 3, 128, 128)
    assert batch["pixel_values"].shape == (1 + 3 + 1 + 2, 3, 64, 64)
    assert batch["gt_masks"].shape == (9, 32, 32)
    assert torch.equal(batch["gt_masks"][2:5], features[1]["gt_masks"])
    assert torch.equal(batch["sam_pixel_values"][5:7], features[3]["sam_pixel_values"])
    assert batch["original_sizes"].tolist() == [[128, 192], [40, 60], [128, 192], [40, 60]]
    # every target's [SEG] and frame belong to the same sample
    seg_sample = (batch["input_ids"] == processor.seg_token_id).nonzero()[:, 0]
    assert torch.equal(seg_sample[batch["target_seg_index"]], batch["frame_sample_index"][batch["target_frame_index"]])


def test_sequences_are_right_padded_without_labels_or_text_on_padding(features, processor):
    batch = MaskCMADataCollator(processor, pad_to_multiple_of=8)(features)
    lengths = [f["input_ids"].shape[1] for f in features]
    assert batch["input_ids"].shape == (4, (max(lengths) + 7) // 8 * 8)
    for row, (feature, length) in enumerate(zip(features, lengths)):
        assert torch.equal(batch["input_ids"][row, :length], feature["input_ids"][0])
        assert torch.equal(batch["labels"][row, :length], feature["labels"][0])
        assert torch.equal(batch["text_token_mask"][row, :length], feature["text_token_mask"][0])
        assert (batch["input_ids"][row, length:] == processor.tokenizer.pad_token_id).all()
        assert (batch["labels"][row, length:] == -100).all()
        assert batch["attention_mask"][row].sum() == length
        assert not batch["text_token_mask"][row, length:].any()


def test_the_tiny_model_trains_on_the_collated_batch(features, processor):
    model, _ = build_tiny_model(seed=0)
    batch = MaskCMADataCollator(processor)(features)
    batch.pop("original_sizes")
    output = model(**batch)
    assert torch.isfinite(output.loss) and torch.isfinite(output.lm_loss) and torch.isfinite(output.mask_bce)
    assert output.pred_masks.shape == (9, 32, 32)
    assert torch.equal(output.target_seg_index, batch["target_seg_index"])
    assert torch.equal(output.target_frame_index, batch["target_frame_index"])
    assert output.seg_sample_index.tolist() == [0, 0, 1, 3, 3]
    output.loss.backward()
    assert model.seg_proj[0].weight.grad is not None and torch.isfinite(model.seg_proj[0].weight.grad).all()


def test_inconsistent_samples_are_rejected(features, processor):
    collator = MaskCMADataCollator(processor)
    odd = dict(features[0])
    odd["gt_masks"] = torch.zeros(2, 16, 16)
    with pytest.raises(ValueError, match=r"sample 1: gt_masks .* shape \(16, 16\) but sample 0 has \(32, 32\)"):
        collator([features[1], odd])
    missing = {k: v for k, v in features[0].items() if k != "labels"}
    with pytest.raises(ValueError, match=r"sample 0 lacks \['labels'\]"):
        collator([missing])
    wrong = dict(features[0])
    wrong["seg_object_ids"] = torch.tensor([0])
    with pytest.raises(ValueError, match=r"sample 0: input_ids hold 2 \[SEG\] tokens but seg_object_ids has 1"):
        collator([wrong])
