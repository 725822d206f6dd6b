"""MaskCMAModel end to end on images with the tiny default."""

import json
import subprocess
import sys
import textwrap

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoModel

from model_inputs import chat_text, make_batch
from transformers_maskcma import MaskCMAModel
from transformers_maskcma.tiny import build_tiny_model, build_tiny_processor

PROMPTS = ["Please segment the red circle.", "Segment the blue square on the left."]
ANSWERS = ["Sure, [SEG].", "It is [SEG] and [SEG]."]


def masks_of(model, batch):
    model.eval()
    with torch.no_grad():
        return model(**batch).pred_masks


def test_zero_gamma_and_use_cma_false_give_exactly_the_cma_free_masks(tiny_tokenizer):
    batch = make_batch(tiny_tokenizer, PROMPTS, ANSWERS)
    with_cma, _ = build_tiny_model(seed=3)
    without_cma, _ = build_tiny_model(seed=3, use_cma=False)
    without_cma.load_state_dict(with_cma.state_dict())
    assert with_cma.cma.gamma.item() == 0.0  # zero-initialised
    reference = masks_of(without_cma, batch)
    assert torch.equal(masks_of(with_cma, batch), reference)
    with torch.no_grad():
        with_cma.cma.gamma.fill_(0.5)
    assert not torch.allclose(masks_of(with_cma, batch), reference)


@pytest.mark.parametrize(
    "overrides",
    [
        {},
        {"mask_source": "conv"},
        {"mask_source": "gt"},
        {"cma_direction": "text_to_visual"},
        {"cma_topk_tokens": None},
        {"cma_topk_tokens": 1},
        {"cma_gate": "attention"},
        {"cma_warmup_target": "mask"},
        {"use_cma": False},
        {"prior_loss_weight": 0.5},
    ],
)
def test_every_switch_runs_forward_and_backward(tiny_tokenizer, overrides):
    model, _ = build_tiny_model(seed=0, **overrides)
    with torch.no_grad():
        model.cma.gamma.fill_(0.3)
    model.train()
    output = model(**make_batch(tiny_tokenizer, PROMPTS, ANSWERS))
    assert torch.isfinite(output.loss)
    expected = (
        output.lm_loss
        + 2.0 * output.mask_bce
        + 0.5 * output.mask_dice
        + 1.0 * output.iou_loss
        + 1.0 * output.object_score_loss
    )
    if output.prior_loss is not None:
        expected = expected + model.config.prior_loss_weight * output.prior_loss
    torch.testing.assert_close(output.mask_loss, expected - output.lm_loss)
    # every loss term comes from the forward, the contrastive one included (CLIP's return_loss)
    torch.testing.assert_close(output.loss, expected + model.config.tmc_weight * output.tmc_loss)
    output.loss.backward()
    assert output.pred_masks.shape == (3, 32, 32)
    if overrides.get("use_cma", True):
        assert model.cma.gamma.grad is not None and model.cma.gamma.grad.abs() > 0
    if overrides.get("mask_source") in ("pred", "conv", None) and overrides.get("use_cma", True):
        assert output.prior_masks.shape == (3, 32, 32)
    if overrides.get("mask_source") == "conv":
        assert model.prior_head.conv1.weight.grad.abs().sum() > 0


def test_losses_match_an_independent_computation(tiny_tokenizer):
    model, _ = build_tiny_model(seed=1)
    batch = make_batch(tiny_tokenizer, PROMPTS, ANSWERS)
    model.eval()
    with torch.no_grad():
        output = model(**batch)
    gt = torch.nn.functional.interpolate(batch["gt_masks"][:, None], size=(32, 32), mode="nearest")[:, 0]
    probs = output.pred_masks.sigmoid()
    bce = -(gt * probs.log() + (1 - gt) * (1 - probs).log()).mean()
    dice = torch.stack(
        [1 - (2 * (p * g).sum() + 1) / (p.sum() + g.sum() + 1) for p, g in zip(probs, gt)]
    ).mean()
    torch.testing.assert_close(output.mask_bce, bce, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(output.mask_dice, dice, atol=1e-5, rtol=1e-4)
    # the LM loss covers the answer tokens only
    logits = output.logits[:, :-1]
    labels = batch["labels"][:, 1:]
    lm = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1), ignore_index=-100)
    torch.testing.assert_close(output.lm_loss, lm, atol=1e-5, rtol=1e-4)


def test_seg_to_mask_count_mismatch_is_an_error(tiny_tokenizer):
    model, _ = build_tiny_model()
    batch = make_batch(tiny_tokenizer, PROMPTS, ANSWERS, num_masks=2)
    with pytest.raises(ValueError, match=r"3 \[SEG\] tokens \(per sample: \[1, 2\]\) but 2 ground-truth masks"):
        model(**batch)


def test_sample_without_objects_and_explicit_mapping(tiny_tokenizer):
    model, _ = build_tiny_model()
    batch = make_batch(tiny_tokenizer, ["Segment the cat.", "Segment the dog."], ["There is none.", "Sure, [SEG]."])
    output = model(**batch)
    assert output.pred_masks.shape[0] == 1 and output.seg_sample_index.tolist() == [1]
    output.loss.backward()
    # an explicit mapping that sends sample 1's [SEG] to sample 0's frame is rejected
    bad = dict(batch, target_seg_index=torch.tensor([0]), target_frame_index=torch.tensor([0]))
    with pytest.raises(ValueError, match="decodes \\[SEG\\] 0 of sample 1 on frame 0 of sample 0"):
        model(**bad)


def test_frozen_parts_get_no_gradient_and_trained_parts_do(tiny_tokenizer):
    model, _ = build_tiny_model()
    with torch.no_grad():
        model.cma.gamma.fill_(0.5)
    model.train()
    model(**make_batch(tiny_tokenizer, PROMPTS, ANSWERS)).loss.backward()
    frozen = [model.sam2.vision_encoder, model.sam2.memory_attention, model.sam2.memory_encoder, model.vision_tower()]
    for module in frozen:
        assert all(not p.requires_grad and p.grad is None for p in module.parameters())
    assert not model.sam2.no_memory_embedding.requires_grad
    for module in (model.sam2.mask_decoder, model.seg_proj, model.text_proj, model.cma):
        grads = [p.grad for p in module.parameters() if p.requires_grad]
        assert grads and all(g is not None for g in grads)
    assert model.cma.router.query_proj.weight.grad.abs().sum() > 0
    assert model.vlm.get_input_embeddings().weight.grad.abs().sum() > 0


def test_gradient_checkpointing_reaches_the_vlm(tiny_tokenizer):
    model, _ = build_tiny_model()
    model.activation_checkpointing_enable()
    assert model.is_activation_checkpointing
    language_model = model.vlm.model.language_model
    assert language_model.gradient_checkpointing
    model.train()
    batch = make_batch(tiny_tokenizer, PROMPTS, ANSWERS)
    model(**batch).loss.backward()


def test_save_load_round_trip_is_bit_exact(tmp_path, tiny_tokenizer):
    model, tokenizer = build_tiny_model(seed=5, mask_source="conv")
    with torch.no_grad():
        model.cma.gamma.fill_(0.25)
    model.save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    loaded = AutoModel.from_pretrained(tmp_path)
    assert isinstance(loaded, MaskCMAModel)
    original, restored = model.state_dict(), loaded.state_dict()
    assert original.keys() == restored.keys()
    assert all(torch.equal(original[k], restored[k]) for k in original)
    batch = make_batch(tiny_tokenizer, PROMPTS, ANSWERS)
    assert torch.equal(masks_of(model, batch), masks_of(loaded, batch))
    assert loaded.config.mask_source == "conv" and not hasattr(loaded, "tokenizer")  # text belongs to the processor


def test_forward_names_an_unknown_argument(tiny_tokenizer):
    model, _ = build_tiny_model(seed=0)
    batch = make_batch(tiny_tokenizer, PROMPTS, ANSWERS)
    with pytest.raises(TypeError, match="gt_mask"):
        model(**{**batch, "gt_mask": batch["gt_masks"]})  # a typo is not swallowed


@pytest.mark.parametrize("tamper", ["missing", "unexpected"])
def test_strict_loading_names_the_keys(tmp_path, tamper):
    model, _ = build_tiny_model()
    model.save_pretrained(tmp_path)
    weights = load_file(tmp_path / "model.safetensors")
    if tamper == "missing":
        del weights["cma.gamma"]
        del weights["seg_proj.0.weight"]
        pattern = r"missing keys \(2\): cma.gamma, seg_proj.0.weight"
    else:
        weights["cma.extra_scale"] = torch.zeros(1)
        pattern = r"unexpected keys \(1\): cma.extra_scale"
    save_file(weights, tmp_path / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ValueError, match=pattern):
        MaskCMAModel.from_pretrained(tmp_path)


def test_remote_code_load_without_the_package(tmp_path, tiny_tokenizer):
    model, tokenizer = build_tiny_model(seed=2)
    with torch.no_grad():
        model.cma.gamma.fill_(0.5)
    model.save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["auto_map"] == {
        "AutoConfig": "configuration_maskcma.MaskCMAConfig",
        "AutoModel": "modeling_maskcma.MaskCMAModel",
    }
    batch = make_batch(tiny_tokenizer, PROMPTS, ANSWERS)
    torch.save(batch, tmp_path / "batch.pt")
    torch.save(masks_of(model, batch), tmp_path / "expected.pt")
    script = textwrap.dedent(
        f"""
        import sys
        sys.modules["transformers_maskcma"] = None  # the package cannot be imported
        import torch
        from transformers import AutoModel
        torch.set_num_threads(1)  # same arithmetic as the test process
        model = AutoModel.from_pretrained({str(tmp_path)!r}, trust_remote_code=True).eval()
        assert type(model).__module__.startswith("transformers_modules"), type(model).__module__
        batch = torch.load({str(tmp_path / "batch.pt")!r})
        with torch.no_grad():
            masks = model(**batch).pred_masks
        assert torch.equal(masks, torch.load({str(tmp_path / "expected.pt")!r}))
        print("REMOTE-OK")
        """
    )
    result = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, cwd=tmp_path, timeout=300, stdin=subprocess.DEVNULL
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "REMOTE-OK" in result.stdout


def segment_with_forced_answer(answer: str, original_size: tuple[int, int]):
    """Run `segment` on the tiny model with generation forced (through `prefix_allowed_tokens_fn`, a regular
    generation argument) to emit `answer` and then end-of-sequence."""
    model, tokenizer = build_tiny_model(seed=4)
    model.eval()
    prompt = tokenizer([chat_text(PROMPTS[0], None)], return_tensors="pt")
    forced = tokenizer(answer, add_special_tokens=False).input_ids + [tokenizer.eos_token_id]
    prompt_len = prompt.input_ids.shape[1]

    def allowed(batch_id, generated):
        return [forced[min(len(generated) - prompt_len, len(forced) - 1)]]

    images = make_batch(tokenizer, PROMPTS[:1], [None], with_labels=False)
    return model.segment(
        input_ids=prompt.input_ids,
        attention_mask=prompt.attention_mask,
        pixel_values=images["pixel_values"],
        sam_pixel_values=images["sam_pixel_values"],
        original_sizes=torch.tensor([original_size]),
        prefix_allowed_tokens_fn=allowed,
    )


def test_segment_returns_masks_at_the_original_size():
    out = segment_with_forced_answer("Sure, [SEG] and [SEG].", (90, 170))
    assert build_tiny_processor().decode_answers(out.answer_ids) == ["Sure, [SEG] and [SEG]."]
    assert out.masks[0].shape == (2, 90, 170) and out.masks[0].dtype == torch.bool
    assert out.scores[0].shape == (2,)
    # the masks equal the upsampled, thresholded logits
    upsampled = torch.nn.functional.interpolate(out.mask_logits[0][:, None], size=(90, 170), mode="bilinear")[:, 0]
    assert torch.equal(out.masks[0], upsampled > 0)


def test_segment_without_seg_returns_no_masks():
    out = segment_with_forced_answer("There is no such object.", (40, 50))
    assert build_tiny_processor().decode_answers(out.answer_ids) == ["There is no such object."]
    assert out.masks[0].shape == (0, 40, 50)


def test_from_pretrained_parts_builds_from_local_folders(tmp_path, tiny_tokenizer):
    source, tokenizer = build_tiny_model(seed=7)
    source.vlm.save_pretrained(tmp_path / "vlm")
    source.sam2.save_pretrained(tmp_path / "sam2")
    model = MaskCMAModel.from_pretrained_parts(
        vlm=tmp_path / "vlm", sam2=tmp_path / "sam2", tokenizer=tokenizer, cma_topk_tokens=3
    )
    assert model.config.seg_token_id == tokenizer.convert_tokens_to_ids("[SEG]")
    assert model.config.cma_topk_tokens == 3
    for name, tensor in source.vlm.state_dict().items():
        assert torch.equal(model.vlm.state_dict()[name], tensor)
    batch = make_batch(tiny_tokenizer, PROMPTS, ANSWERS)
    # γ = 0 at construction: the masks equal the CMA-free path of the same weights
    with_cma = masks_of(model, batch)
    model.config.use_cma = False
    assert torch.equal(with_cma, masks_of(model, batch))
