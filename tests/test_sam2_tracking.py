"""`MaskCMASam2VideoModel`, our subclass of transformers' `Sam2VideoModel`: the private SAM2 methods it calls keep
their signatures, its checkpoint keys are SAM2's, its tracking step with `object_presence="blank"` is SAM2's own step
bit for bit, and `"keep"` keeps the masks SAM2 would blank while the pointer and memory still follow the score."""

from __future__ import annotations

import inspect

import pytest
import torch
from transformers import Sam2VideoModel
from transformers.models.sam2_video.modeling_sam2_video import NO_OBJ_SCORE

from transformers_maskcma.modeling.sam2_tracking import SAM2_PRIVATE_METHODS, MaskCMASam2VideoModel
from transformers_maskcma.modeling.video_segmentation import VideoMaskPropagation
from transformers_maskcma.tiny import build_tiny_model

from test_video_segmentation import KEY_FRAMES, NUM_FRAMES, object_prompts, perturb_sam2_heads, random_video

# frames in the order VideoMaskPropagation segments them: backwards from the first key frame, then forwards
TRACKING_ORDER = [(f, True) for f in range(KEY_FRAMES[0] - 1, -1, -1)] + [
    (f, False) for f in range(KEY_FRAMES[0] + 1, NUM_FRAMES) if f not in KEY_FRAMES
]


@pytest.mark.parametrize("name", sorted(SAM2_PRIVATE_METHODS))
def test_private_sam2_methods_we_call_keep_their_signature(name):
    """Fails when a transformers release renames, removes or reorders a private SAM2 method's parameters: update
    `sam2_tracking.py`, `SAM2_PRIVATE_METHODS` and docs/architecture.md together."""
    method = getattr(Sam2VideoModel, name, None)
    assert method is not None, f"transformers' Sam2VideoModel no longer has {name}"
    assert tuple(inspect.signature(method).parameters) == SAM2_PRIVATE_METHODS[name]
    # the subclass overrides none of them: it calls SAM2's own
    assert getattr(MaskCMASam2VideoModel, name) is method


def test_the_subclass_adds_no_weight_and_loads_sam2_checkpoints_strictly():
    model, _ = build_tiny_model(seed=0)
    assert isinstance(model.sam2, MaskCMASam2VideoModel)
    native = Sam2VideoModel(model.config.sam2_config)
    assert set(native.state_dict()) == set(model.sam2.state_dict())
    native.load_state_dict(model.sam2.state_dict(), strict=True)


def test_a_loaded_sam2_becomes_the_subclass_sharing_its_tensors():
    model, _ = build_tiny_model(seed=0)
    native = Sam2VideoModel(model.config.sam2_config).eval()
    native.load_state_dict(model.sam2.state_dict(), strict=True)
    native.vision_encoder.requires_grad_(False)
    tracking = MaskCMASam2VideoModel.from_sam2_video_model(native)
    assert type(tracking) is MaskCMASam2VideoModel and not tracking.training
    shared = dict(native.named_parameters()) | dict(native.named_buffers())
    for name, tensor in list(tracking.named_parameters()) + list(tracking.named_buffers()):
        assert tensor.data_ptr() == shared[name].data_ptr(), name  # the same storage: nothing copied, nothing on meta
    assert all(p.requires_grad == native.get_parameter(n).requires_grad for n, p in tracking.named_parameters())
    assert MaskCMASam2VideoModel.from_sam2_video_model(tracking) is tracking
    pixels = torch.randn(1, 3, model.config.sam2_config.image_size, model.config.sam2_config.image_size)
    with torch.no_grad():
        torch.testing.assert_close(
            tracking.get_image_features(pixels)[0][-1], native.get_image_features(pixels)[0][-1], rtol=0, atol=0
        )


def tracked_models(seed: int, **overrides):
    model, tokenizer = build_tiny_model(seed=seed, cma_on_propagation=False, **overrides)
    model.eval()
    perturb_sam2_heads(model, seed)
    return model, tokenizer


@pytest.mark.parametrize(("seed", "present"), [(4, True), (1, False)])
def test_blank_tracking_is_sam2s_own_step_bit_for_bit(seed, present):
    """With `object_presence="blank"` (and no CMA on propagation), `track_frame` stores and returns exactly what
    transformers' `Sam2VideoModel.forward` does on the same session, whether SAM2 sees the objects or not."""
    model, tokenizer = tracked_models(seed, object_presence="blank")
    seg_embeds, text_tokens, text_mask = object_prompts(model, tokenizer)
    frames = random_video(NUM_FRAMES)[0]
    ours = VideoMaskPropagation(model, frames, KEY_FRAMES, seg_embeds, text_tokens, text_mask, bounded_memory=False)
    native = VideoMaskPropagation(model, frames, KEY_FRAMES, seg_embeds, text_tokens, text_mask, bounded_memory=False)
    for key in KEY_FRAMES:
        ours._condition_on_key_frame(key)
        native._condition_on_key_frame(key)
    with torch.no_grad():
        for frame, reverse in TRACKING_ORDER:
            tracked = ours._propagate(frame, reverse)
            reference = Sam2VideoModel.forward(
                model.sam2, inference_session=native.inference_session, frame_idx=frame, reverse=reverse
            )
            assert torch.equal(tracked.mask_logits, reference.pred_masks.reshape(tracked.mask_logits.shape))
            assert torch.equal(tracked.object_score_logits, reference.object_score_logits.reshape(-1))
            assert bool((tracked.object_score_logits > 0).all()) is present
            for obj in range(2):
                entry = ours.inference_session.output_dict_per_obj[obj]["non_cond_frame_outputs"][frame]
                expected = native.inference_session.output_dict_per_obj[obj]["non_cond_frame_outputs"][frame]
                assert entry.keys() == expected.keys()
                for name in expected:
                    assert torch.equal(entry[name], expected[name]), name
    assert present or (tracked.mask_logits == NO_OBJ_SCORE).all()


def test_keep_shows_the_masks_sam2_would_blank_and_the_score_still_drives_pointer_and_memory():
    """A model whose object score is negative on every frame (as the demo's trained model was): `"keep"` returns the
    decoded masks, non-empty on every frame, `"blank"` returns empty masks; both store the no-object pointer."""
    results = {}
    for rule in ("keep", "blank"):
        model, tokenizer = tracked_models(1, object_presence=rule)
        seg_embeds, text_tokens, text_mask = object_prompts(model, tokenizer)
        propagation = VideoMaskPropagation(
            model, random_video(NUM_FRAMES)[0], KEY_FRAMES, seg_embeds, text_tokens, text_mask, bounded_memory=False
        )
        frames = list(propagation)
        pointers = [
            propagation.inference_session.output_dict_per_obj[obj][storage][frame.frame_index]["object_pointer"]
            for frame in frames
            for obj in range(2)
            for storage in ("cond_frame_outputs", "non_cond_frame_outputs")
            if frame.frame_index in propagation.inference_session.output_dict_per_obj[obj][storage]
        ]
        results[rule] = (frames, pointers, model.sam2.no_object_pointer)

    keep_frames, keep_pointers, no_object = results["keep"]
    blank_frames, blank_pointers, _ = results["blank"]
    assert all((frame.object_score_logits < 0).all() for frame in keep_frames)
    for kept, blanked in zip(keep_frames, blank_frames):
        assert (kept.mask_logits > 0).flatten(1).any(dim=1).all()  # a mask on every frame, for every object
        assert (blanked.mask_logits == NO_OBJ_SCORE).all()
    # key frames: identical decoding, only the presence rule differs
    for key in KEY_FRAMES:
        assert torch.equal(results["keep"][0][key].object_score_logits, results["blank"][0][key].object_score_logits)
    # the object pointer is SAM2's no-object pointer on every frame under both rules
    for pointer in keep_pointers + blank_pointers:
        assert torch.equal(pointer.reshape(-1), no_object.reshape(-1))
