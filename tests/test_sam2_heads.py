"""SAM2's IoU and object-score heads are trained with SAM2's own losses for them (compared with the official `sam2`
package's training code), and the object-presence rule of the image path."""

from __future__ import annotations

import importlib
import sys
import types

import pytest
import torch

from transformers_maskcma.modeling.mask_decoding import (
    apply_object_presence,
    binary_mask_iou,
    iou_prediction_loss,
    object_presence_targets,
    object_score_loss,
    upsample_mask_logits,
)
from transformers_maskcma.modeling.modeling_maskcma import forced_answer_generate_kwargs
from transformers_maskcma.tiny import build_tiny_model
from transformers.models.sam2_video.modeling_sam2_video import NO_OBJ_SCORE

from transformers_maskcma.tiny import TINY_SAM2_IMAGE_SIZE, TINY_VLM_IMAGE_SIZE

from model_inputs import chat_text, make_batch
from test_model import ANSWERS, PROMPTS
from test_video_segmentation import perturb_sam2_heads


@pytest.fixture
def sam2_training_losses(monkeypatch):
    """`training.loss_fns` of the official `sam2` package. Its module imports `CORE_LOSS_KEY` from the training
    loop (`training.trainer`, which needs the whole training stack); that one constant is provided instead."""
    import training  # installed with the `sam2` package by `make setup`

    trainer_stub = types.ModuleType("training.trainer")
    trainer_stub.CORE_LOSS_KEY = "core_loss"
    monkeypatch.setitem(sys.modules, "training.trainer", trainer_stub)
    monkeypatch.delitem(sys.modules, "training.loss_fns", raising=False)
    assert training.__file__.endswith("training/__init__.py")
    return importlib.import_module("training.loss_fns")


def test_head_losses_equal_sam2s_training_losses(sam2_training_losses):
    generator = torch.Generator().manual_seed(0)
    num_targets, num_masks, size = 5, 3, 16
    multimask_logits = torch.randn(num_targets, num_masks, size, size, generator=generator) * 3
    predicted_ious = torch.rand(num_targets, num_masks, generator=generator)
    object_scores = torch.randn(num_targets, generator=generator)
    gt = (torch.rand(num_targets, size, size, generator=generator) > 0.6).float()
    gt[1] = 0.0  # an empty target (the object is absent), as in MeViS and ReVOS
    present = object_presence_targets(gt)
    assert present.tolist() == [True, False, True, True, True]

    # SAM2's released training recipe (sam2.1_hiera_b+_MOSE_finetune.yaml), with only the two head losses weighted
    reference = sam2_training_losses.MultiStepMultiMasksAndIous(
        weight_dict={"loss_mask": 0.0, "loss_dice": 0.0, "loss_iou": 1.0, "loss_class": 1.0},
        supervise_all_iou=True,
        iou_use_l1_loss=True,
        pred_obj_scores=True,
        focal_gamma_obj_score=0.0,
        focal_alpha_obj_score=-1.0,
    )
    outputs = {
        "multistep_pred_multimasks_high_res": [multimask_logits],
        "multistep_pred_ious": [predicted_ious],
        "multistep_object_score_logits": [object_scores[:, None]],
    }
    losses = reference([outputs], gt[None])
    torch.testing.assert_close(
        iou_prediction_loss(multimask_logits, predicted_ious, gt, present), losses["loss_iou"], rtol=1e-6, atol=1e-7
    )
    torch.testing.assert_close(object_score_loss(object_scores, present), losses["loss_class"], rtol=1e-6, atol=1e-7)


def test_binary_mask_iou_counts_pixels():
    logits = torch.tensor([[[1.0, 1.0], [-1.0, -1.0]], [[-1.0, -1.0], [-1.0, -1.0]]])
    gt = torch.tensor([[[1.0, 0.0], [1.0, 0.0]], [[0.0, 0.0], [0.0, 0.0]]])
    torch.testing.assert_close(binary_mask_iou(logits, gt), torch.tensor([1 / 3, 0.0]))


def test_forward_returns_the_head_losses_and_they_train_the_heads(tiny_tokenizer):
    model, _ = build_tiny_model(seed=0)
    decoder = model.sam2.mask_decoder
    assert all(p.requires_grad for p in decoder.iou_prediction_head.parameters())
    assert all(p.requires_grad for p in decoder.pred_obj_score_head.parameters())
    batch = make_batch(tiny_tokenizer, PROMPTS, ANSWERS)
    batch["gt_masks"][1] = 0.0  # one target whose object is absent
    model.train()
    output = model(**batch)
    gt_low_res = torch.nn.functional.interpolate(batch["gt_masks"][:, None], size=(32, 32), mode="nearest")[:, 0]
    assert output.object_score_logits.shape == (3,)
    present = torch.tensor([True, False, True])
    torch.testing.assert_close(
        output.object_score_loss,
        torch.nn.functional.binary_cross_entropy_with_logits(output.object_score_logits, present.float()),
    )
    # the IoU loss is zero for the absent target and SAM2's L1 over the three candidates for the others: with the
    # chosen candidate's predicted IoU it is bounded below by its own share
    chosen_error = (output.iou_scores - binary_mask_iou(output.pred_masks, gt_low_res)).abs()
    assert output.iou_loss >= (chosen_error * present).sum() / 3 / 3 - 1e-6
    output.loss.backward()
    assert decoder.iou_prediction_head.layers[-1].weight.grad.abs().sum() > 0
    assert decoder.pred_obj_score_head.layers[-1].weight.grad.abs().sum() > 0


def test_a_head_with_zero_loss_weight_stays_frozen():
    model, _ = build_tiny_model(seed=0, iou_loss_weight=0.0, object_score_loss_weight=0.0)
    decoder = model.sam2.mask_decoder
    assert not any(p.requires_grad for p in decoder.iou_prediction_head.parameters())
    assert not any(p.requires_grad for p in decoder.pred_obj_score_head.parameters())
    assert all(p.requires_grad for p in decoder.output_hypernetworks_mlps.parameters())


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("object_presence", "hide", r"object_presence='hide' is not valid; allowed values are \['keep', 'blank'\]"),
        ("iou_loss_weight", -1.0, r"iou_loss_weight=-1.0 is not valid; it must be >= 0"),
        ("object_score_loss_weight", -0.5, r"object_score_loss_weight=-0.5 is not valid"),
    ],
)
def test_bad_head_settings_are_named(field, value, message):
    with pytest.raises(ValueError, match=message):
        build_tiny_model(seed=0, **{field: value})


def test_apply_object_presence_blanks_only_absent_objects_and_only_when_asked():
    logits = torch.randn(3, 4, 4)
    scores = torch.tensor([0.5, -0.1, 0.0])
    assert apply_object_presence(logits, scores, "keep") is logits
    blanked = apply_object_presence(logits, scores, "blank")
    assert torch.equal(blanked[0], logits[0])
    assert (blanked[1:] == NO_OBJ_SCORE).all()  # a score of 0 counts as absent, as in SAM2
    with pytest.raises(ValueError, match="object_presence='maybe' is not valid"):
        apply_object_presence(logits, scores, "maybe")


@pytest.mark.parametrize("rule", ["keep", "blank"])
def test_image_path_follows_the_object_presence_rule(tiny_tokenizer, rule):
    """The image path applies the same rule as the video path: with SAM2's object score negative (heads at a
    trained scale, `perturb_sam2_heads`), `"keep"` returns the decoded masks, non-empty, and `"blank"` empties them."""
    model, tokenizer = build_tiny_model(seed=1, object_presence=rule)
    model.eval()
    perturb_sam2_heads(model, 1)
    generator = torch.Generator().manual_seed(0)
    pixel_values = torch.randn(1, 3, TINY_VLM_IMAGE_SIZE, TINY_VLM_IMAGE_SIZE, generator=generator)
    sam_pixel_values = torch.randn(1, 3, TINY_SAM2_IMAGE_SIZE, TINY_SAM2_IMAGE_SIZE, generator=generator)
    encoded = tokenizer([chat_text(PROMPTS[0], None)], return_tensors="pt")
    answer = tokenizer("Sure, [SEG].", add_special_tokens=False).input_ids

    def forced():
        return forced_answer_generate_kwargs([answer], encoded.input_ids.shape[1], tokenizer.eos_token_id)

    inputs = {"input_ids": encoded.input_ids, "attention_mask": encoded.attention_mask, "pixel_values": pixel_values}
    out = model.segment(**inputs, sam_pixel_values=sam_pixel_values, **forced())
    with torch.no_grad():
        features = model.encode_frames(sam_pixel_values)
        forced_answer = forced()
        max_new_tokens = forced_answer.pop("max_new_tokens")
        seg = model.generate_answer(**inputs, text_token_mask=None, max_new_tokens=max_new_tokens, **forced_answer)
        decoded = model.decode_masks(features, seg["seg_embeds"], seg["text_tokens"], seg["text_token_mask"])
    assert (decoded["object_score_logits"] < 0).all()
    masks = out.masks[0]
    if rule == "keep":
        assert torch.equal(out.mask_logits[0], decoded["mask_logits"][:, 0])
        assert masks.any()
        assert torch.equal(masks, upsample_mask_logits(decoded["mask_logits"][:, 0], masks.shape[-2:]) > 0)
    else:
        assert (out.mask_logits[0] == NO_OBJ_SCORE).all() and not masks.any()
