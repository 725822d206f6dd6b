"""The mask-prior strategies: each against an independent computation, and the strategy each config resolves to."""

import pytest
import torch
import torch.nn.functional as F

from transformers_maskcma.modeling.mask_prior import (
    ConvHeadMaskPrior,
    GroundTruthMaskPrior,
    PredictedMaskPrior,
    PreviousFrameMaskPrior,
    antialiased_resize,
    logits_at_embedding,
)
from transformers_maskcma.tiny import TINY_SAM2_IMAGE_SIZE, build_tiny_model

NUM_OBJECTS = 2


def frame_inputs(model, seed=0):
    generator = torch.Generator().manual_seed(seed)
    pixels = torch.randn(NUM_OBJECTS, 3, TINY_SAM2_IMAGE_SIZE, TINY_SAM2_IMAGE_SIZE, generator=generator)
    features = model.encode_frames(pixels)
    seg = torch.randn(NUM_OBJECTS, model.config.seg_embed_dim, generator=generator)
    return features, seg


@torch.no_grad()
def test_each_mask_source_resolves_to_its_strategy_and_the_predicted_one_is_pass_one():
    model, _ = build_tiny_model(seed=0)
    assert type(model.mask_prior) is PredictedMaskPrior
    assert type(model.propagation_mask_prior) is PreviousFrameMaskPrior
    features, seg = frame_inputs(model)
    embeddings, high_res = features.image_embeddings, features.high_res_features
    prior = model.mask_prior(embeddings, seg, high_res_features=high_res)
    pass_one = model._decoder_pass(embeddings, high_res, seg).mask_logits
    assert torch.equal(prior.mask_logits, pass_one)
    expected = F.interpolate(pass_one, size=embeddings.shape[-2:], mode="bilinear", antialias=True)
    # the resize runs as two matrix products with torch's anti-aliased weights: equal up to float32 rounding
    torch.testing.assert_close(prior.embedding_logits, expected, rtol=0, atol=1e-6)
    with pytest.raises(ValueError, match="high-resolution features"):
        model.mask_prior(embeddings, seg)


@torch.no_grad()
def test_conv_head_prior_is_the_head_and_follows_a_replaced_head():
    model, _ = build_tiny_model(seed=0, mask_source="conv")
    assert type(model.mask_prior) is ConvHeadMaskPrior and type(model.propagation_mask_prior) is ConvHeadMaskPrior
    features, seg = frame_inputs(model)
    embeddings = features.image_embeddings
    prior = model.mask_prior(embeddings, seg)
    head_logits = model.prior_head(embeddings, seg)
    assert torch.equal(prior.embedding_logits, head_logits)
    size = tuple(4 * side for side in embeddings.shape[-2:])
    assert torch.equal(prior.mask_logits, F.interpolate(head_logits, size=size, mode="bilinear"))
    # the head is looked up at each call (peft wraps `prior_head` in a modules-to-save copy)
    replacement = type(model.prior_head)(model.config.seg_embed_dim)
    model.prior_head = replacement
    assert torch.equal(model.mask_prior(embeddings, seg).embedding_logits, replacement(embeddings, seg))


@torch.no_grad()
def test_ground_truth_prior_in_training_and_the_predicted_one_without_ground_truth():
    model, _ = build_tiny_model(seed=0, mask_source="gt")
    assert type(model.mask_prior) is GroundTruthMaskPrior
    features, seg = frame_inputs(model)
    embeddings, high_res = features.image_embeddings, features.high_res_features
    side = embeddings.shape[-1]
    gt = torch.zeros(NUM_OBJECTS, 4 * side, 4 * side)
    gt[0, :4, :6] = 1.0  # 4×4 pixels a cell; object 0: the top-left cell full, the next half covered; 1: empty
    prior = model.mask_prior(embeddings, seg, high_res_features=high_res, gt_masks=gt)
    assert prior.mask_logits is None
    logits = prior.embedding_logits[:, 0]
    assert logits[0, 0, 0] == pytest.approx(torch.logit(torch.tensor(1 - 1e-6)).item(), rel=1e-4)
    assert logits[0, 0, 1] == pytest.approx(0.0, abs=1e-6)  # half covered: logit(0.5)
    assert (logits[1] == logits[1, 0, 0]).all() and logits[1, 0, 0] < -13.0  # empty: logit(1e-6)
    without = model.mask_prior(embeddings, seg, high_res_features=high_res)
    pass_one = model._decoder_pass(embeddings, high_res, seg).mask_logits
    assert torch.equal(without.mask_logits, pass_one)


@torch.no_grad()
def test_previous_frame_prior_resizes_the_previous_logits_and_needs_them():
    prior = PreviousFrameMaskPrior()
    embeddings = torch.randn(NUM_OBJECTS, 16, 8, 8)
    previous = torch.randn(NUM_OBJECTS, 1, 32, 32)
    output = prior(embeddings, torch.randn(NUM_OBJECTS, 16), previous_mask_logits=previous)
    expected = F.interpolate(previous, size=(8, 8), mode="bilinear", antialias=True)
    torch.testing.assert_close(output.embedding_logits, expected, rtol=0, atol=1e-5)
    assert output.mask_logits is None
    with pytest.raises(ValueError, match="previous_mask_logits"):
        prior(embeddings, torch.randn(NUM_OBJECTS, 16))


def test_gt_model_in_eval_decodes_exactly_like_the_pred_model():
    """`mask_source="gt"` without ground truth (inference) is the predicted prior: same weights, same masks."""
    from model_inputs import make_batch

    gt_model, tokenizer = build_tiny_model(seed=0, mask_source="gt")
    pred_model, _ = build_tiny_model(seed=0, mask_source="pred")
    for model in (gt_model, pred_model):
        model.eval()
        with torch.no_grad():
            model.cma.gamma.fill_(0.5)
    batch = make_batch(tokenizer, ["Segment the red circle."], ["Sure, [SEG]."])
    with torch.no_grad():
        by_gt, by_pred = gt_model(**batch), pred_model(**batch)
    assert torch.equal(by_gt.pred_masks, by_pred.pred_masks)
    assert torch.equal(by_gt.prior_masks, by_pred.prior_masks)


@pytest.mark.parametrize(("in_size", "out_size"), [((32, 32), (8, 8)), ((20, 36), (7, 11)), ((8, 8), (24, 40))])
def test_antialiased_resize_equals_torch_forward_and_backward(in_size, out_size):
    """The matrix-product resize is torch's anti-aliased bilinear resize: the same values and the same gradient."""
    generator = torch.Generator().manual_seed(1)
    logits = (4 * torch.randn(3, 1, *in_size, generator=generator)).requires_grad_()
    upstream = torch.randn(3, 1, *out_size, generator=generator)
    ours = antialiased_resize(logits, out_size)
    (ours_grad,) = torch.autograd.grad((ours * upstream).sum(), logits)
    reference = F.interpolate(logits, size=out_size, mode="bilinear", antialias=True)
    (reference_grad,) = torch.autograd.grad((reference * upstream).sum(), logits)
    torch.testing.assert_close(ours, reference, rtol=0, atol=1e-5)
    torch.testing.assert_close(ours_grad, reference_grad, rtol=0, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_logits_resize_on_cpu_in_float32(dtype):
    """torch has no half-precision anti-aliased kernel on CPU; the prior resizes in float32 and returns float32 (the
    CMA's gate dtype): the value is the float32 resize of the half-precision logits."""
    logits = torch.randn(2, 1, 32, 32, generator=torch.Generator().manual_seed(2)).to(dtype)
    with pytest.raises(RuntimeError, match="not implemented"):
        F.interpolate(logits, size=(8, 8), mode="bilinear", antialias=True)  # the hazard this avoids
    embeddings = torch.zeros(2, 16, 8, 8, dtype=dtype)
    resized = logits_at_embedding(logits, embeddings)
    assert resized.dtype == torch.float32
    expected = F.interpolate(logits.float(), size=(8, 8), mode="bilinear", antialias=True)
    torch.testing.assert_close(resized, expected, rtol=0, atol=1e-6)


def test_resize_runs_under_deterministic_algorithms():
    """`full_determinism` turns on torch's deterministic mode; the prior's resize and its backward use only
    deterministic operations (matrix products; the anti-aliased kernel's CUDA backward is flagged nondeterministic),
    so they run and give bit-identical gradients twice."""
    previous = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        logits = torch.randn(2, 1, 32, 32, generator=torch.Generator().manual_seed(3), requires_grad=True)
        grads = [torch.autograd.grad(antialiased_resize(logits, (8, 8)).square().sum(), logits)[0] for _ in range(2)]
    finally:
        torch.use_deterministic_algorithms(previous)
    assert torch.equal(grads[0], grads[1])
    # no anti-aliased upsampling node in the backward graph (the one whose CUDA kernel is nondeterministic)
    nodes, stack = set(), [antialiased_resize(logits, (8, 8)).grad_fn]
    while stack:
        node = stack.pop()
        if node is not None and type(node).__name__ not in nodes:
            nodes.add(type(node).__name__)
            stack.extend(next_node for next_node, _ in node.next_functions)
    reference = F.interpolate(logits, size=(8, 8), mode="bilinear", antialias=True).grad_fn
    assert "Aa" in type(reference).__name__ and not any("Aa" in name for name in nodes), nodes


def test_resize_weights_are_cached_and_usable_in_training_after_inference_mode():
    """The weight matrices are built once per size and device (no copy to the accelerator per call), and a matrix
    first built under `torch.inference_mode` is a plain tensor that a later training step can save for backward."""
    with torch.inference_mode():
        antialiased_resize(torch.randn(1, 1, 40, 24), (10, 6))
    logits = torch.randn(1, 1, 40, 24, requires_grad=True)
    (grad,) = torch.autograd.grad(antialiased_resize(logits, (10, 6)).sum(), logits)
    reference = torch.randn(1, 1, 40, 24).requires_grad_()
    reference_grad = torch.autograd.grad(F.interpolate(reference, size=(10, 6), mode="bilinear", antialias=True).sum(), reference)[0]
    torch.testing.assert_close(grad, reference_grad, rtol=0, atol=1e-6)  # the sum's gradient does not depend on the input
    from transformers_maskcma.modeling.mask_prior import _antialias_weights

    assert _antialias_weights(40, 10, torch.device("cpu")) is _antialias_weights(40, 10, torch.device("cpu"))
