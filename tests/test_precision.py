"""One dtype and explicit device boundaries (docs/precision.md): building from parts in bfloat16, no second copy of
the VLM while building, bfloat16 `segment` on CPU without autocast, and the VLM/heads/SAM2 boundaries."""

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from model_inputs import chat_text, make_batch
from transformers_maskcma.modeling import MaskCMAModel
from transformers_maskcma.tiny import build_tiny_model

PROMPTS_FOR_PRECISION = ["Please segment the red circle.", "Segment the blue square on the left."]
HEADS = ("seg_proj", "text_proj", "cma", "prior_head")


def _head_parameters(model):
    return {name: p for name, p in model.named_parameters() if name.split(".")[0] in HEADS}


def test_bf16_build_from_loaded_parts_is_one_dtype_and_reuses_the_vlm():
    source, tokenizer = build_tiny_model(seed=3)
    vlm_pointers = [p.data_ptr() for p in source.vlm.parameters()]
    model = MaskCMAModel.from_pretrained_parts(source.vlm, source.sam2, tokenizer=tokenizer, dtype=torch.bfloat16)
    assert model.dtype == torch.bfloat16
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    assert all(b.dtype == torch.bfloat16 for b in model.buffers() if b.is_floating_point())
    # the given VLM is the submodule itself (cast in place), not a copy
    assert model.vlm is source.vlm
    assert len(vlm_pointers) == len(list(model.vlm.parameters()))
    # the new heads are initialised as post_init would (γ = 0, zero biases, LayerNorm at identity, std 0.02)
    assert float(model.cma.gamma.detach()) == 0.0
    assert torch.all(model.text_proj.bias == 0)
    assert torch.all(model.cma.query_norm.weight == 1) and torch.all(model.cma.query_norm.bias == 0)
    weight = model.seg_proj[0].weight.float()
    assert torch.isfinite(weight).all() and 0.015 < float(weight.detach().std()) < 0.025
    # freezing is the same as for a model built from its config
    reference = MaskCMAModel(model.config)
    expected = {n: p.requires_grad for n, p in reference.named_parameters()}
    assert {n: p.requires_grad for n, p in model.named_parameters()} == expected


def test_bf16_build_from_checkpoints_honours_dtype_and_torch_dtype(tmp_path):
    source, tokenizer = build_tiny_model(seed=5)
    source.vlm.save_pretrained(tmp_path / "vlm")
    source.sam2.save_pretrained(tmp_path / "sam2")
    for keyword in ("dtype", "torch_dtype"):
        model = MaskCMAModel.from_pretrained_parts(
            tmp_path / "vlm", tmp_path / "sam2", tokenizer=tokenizer, **{keyword: torch.bfloat16}
        )
        assert model.dtype == torch.bfloat16 and {p.dtype for p in model.parameters()} == {torch.bfloat16}
        # the weights are the checkpoint's, rounded to bfloat16
        expected = source.sam2.mask_decoder.conv_s0.weight.to(torch.bfloat16)
        assert torch.equal(model.sam2.mask_decoder.conv_s0.weight, expected)
    default = MaskCMAModel.from_pretrained_parts(tmp_path / "vlm", tmp_path / "sam2", tokenizer=tokenizer)
    assert {p.dtype for p in default.parameters()} == {torch.float32}
    with pytest.raises(ValueError, match="unknown dtype 'bf17'"):
        MaskCMAModel.from_pretrained_parts(tmp_path / "vlm", tmp_path / "sam2", tokenizer=tokenizer, dtype="bf17")


def test_from_pretrained_loads_in_the_requested_dtype(tmp_path):
    source, _ = build_tiny_model(seed=6)
    source.save_pretrained(tmp_path / "model")
    model = MaskCMAModel.from_pretrained(tmp_path / "model", dtype=torch.bfloat16)
    assert model.dtype == torch.bfloat16 and {p.dtype for p in model.parameters()} == {torch.bfloat16}


class _AllocationCounter(TorchDispatchMode):
    """Sums the bytes of every new tensor that factory operations create on a real (non-meta) device."""

    FACTORIES = (
        "empty", "empty_like", "empty_strided", "zeros", "zeros_like", "ones", "ones_like", "full", "rand", "randn",
        "normal", "clone", "_to_copy", "copy",
    )

    def __init__(self):
        super().__init__()
        self.bytes = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        name = func.overloadpacket.__name__
        if name in self.FACTORIES and isinstance(out, torch.Tensor) and out.device.type != "meta":
            self.bytes += out.numel() * out.element_size()
        return out


def test_building_from_parts_allocates_only_the_new_heads():
    source, tokenizer = build_tiny_model(seed=3)
    vlm_bytes = sum(p.numel() * p.element_size() for p in source.vlm.parameters())
    sam2_bytes = sum(t.numel() * t.element_size() for t in source.sam2.state_dict().values())
    counter = _AllocationCounter()
    with counter:
        model = MaskCMAModel.from_pretrained_parts(source.vlm, source.sam2, tokenizer=tokenizer)
    heads_bytes = sum(p.numel() * p.element_size() for p in _head_parameters(model).values())
    # the heads are allocated once; neither the VLM nor SAM2 is copied (the former build allocated both again)
    assert heads_bytes <= counter.bytes < heads_bytes + min(vlm_bytes, sam2_bytes) // 4


def _forced_segment(model, tokenizer, dtype, answer="Sure, [SEG] and [SEG]."):
    model.eval()
    model.vlm.generation_config.eos_token_id = tokenizer.eos_token_id
    prompt = tokenizer([chat_text(PROMPTS_FOR_PRECISION[0], None)], return_tensors="pt")
    forced = tokenizer(answer, add_special_tokens=False).input_ids + [tokenizer.eos_token_id]
    prompt_len = prompt.input_ids.shape[1]

    def allowed(batch_id, generated):
        return [forced[min(len(generated) - prompt_len, len(forced) - 1)]]

    images = make_batch(tokenizer, PROMPTS_FOR_PRECISION[:1], [None], with_labels=False)
    return model.segment(
        input_ids=prompt.input_ids,
        attention_mask=prompt.attention_mask,
        pixel_values=images["pixel_values"].to(dtype),
        sam_pixel_values=images["sam_pixel_values"].to(dtype),
        original_sizes=torch.tensor([(40, 56)]),
        prefix_allowed_tokens_fn=allowed,
    )


@pytest.mark.parametrize("config", [{"use_cma": False}, {"use_cma": True, "mask_source": "conv"}])
def test_bf16_segment_on_cpu_without_autocast_matches_float32(config):
    source, tokenizer = build_tiny_model(seed=8, **config)
    reference = _forced_segment(source, tokenizer, torch.float32)
    model = MaskCMAModel.from_pretrained_parts(
        source.vlm, source.sam2, tokenizer=tokenizer, dtype=torch.bfloat16, **config
    )
    # same heads as the float32 model (rounded), so only the activation dtype differs
    model.load_state_dict({k: v.to(torch.bfloat16) for k, v in source.state_dict().items()})
    out = _forced_segment(model, tokenizer, torch.bfloat16)
    assert out.mask_logits[0].dtype == torch.bfloat16
    assert out.masks[0].shape == reference.masks[0].shape == (2, 40, 56)
    ref_logits = reference.mask_logits[0]
    assert (out.mask_logits[0].float() - ref_logits).abs().max() < 0.1 * ref_logits.abs().max() + 0.1
    # thresholded masks agree except where the float32 logit is near the threshold
    confident = (ref_logits - 0.0).abs() > 0.25
    low_res = out.mask_logits[0].float() > 0
    assert torch.equal(low_res[confident], (ref_logits > 0)[confident])


def test_boundaries_move_tensors_between_the_vlm_and_the_heads_and_sam2():
    """The VLM on the CPU, the heads and SAM2 on the meta device: every tensor that crosses from the VLM to the
    heads, or from the heads to SAM2, must be moved explicitly (mixing CPU and meta tensors raises). A single CPU
    cannot prove more (no numbers flow on meta, and no second real device exists here); the GPU script runs the
    real split (VLM on the GPU, SAM2 on the CPU)."""
    model, tokenizer = build_tiny_model(seed=9)
    for name in ("sam2", *HEADS):
        module = getattr(model, name)
        if module is not None:
            module.to("meta")
    batch = make_batch(tokenizer, PROMPTS_FOR_PRECISION, ["It is [SEG].", "Here: [SEG] and [SEG]."])
    model.eval()
    out = model(**{k: v for k, v in batch.items() if k != "gt_masks"})
    assert out.logits.device.type == "cpu"
    assert out.seg_embeds.device.type == "meta" and out.seg_embeds.shape[0] == 3
    assert out.pred_masks.device.type == "meta" and out.pred_masks.shape[0] == 3
    assert out.target_seg_index.tolist() == [0, 1, 2]


def test_bf16_model_from_parts_saves_and_reloads_in_bf16(tmp_path):
    source, tokenizer = build_tiny_model(seed=3)
    model = MaskCMAModel.from_pretrained_parts(source.vlm, source.sam2, tokenizer=tokenizer, dtype="bfloat16")
    model.save_pretrained(tmp_path)
    reloaded = MaskCMAModel.from_pretrained(tmp_path)
    assert reloaded.dtype == torch.bfloat16 and {p.dtype for p in reloaded.parameters()} == {torch.bfloat16}
    expected = model.state_dict()
    for name, value in reloaded.state_dict().items():
        assert torch.equal(value, expected[name]), name
