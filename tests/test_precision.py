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


# -- the warm-up factor: a non-persistent buffer updated in place --------------------------------------------------


def test_warmup_factor_is_a_non_persistent_buffer_filled_in_place():
    from transformers_maskcma.trainer.callbacks import set_warmup_factor

    model, tokenizer = build_tiny_model(seed=0)
    buffer = model.cma.warmup_factor_tensor
    assert dict(model.named_buffers())["cma.warmup_factor_tensor"] is buffer and buffer.shape == ()
    assert not any("warmup" in name for name in model.state_dict())  # not saved, never loaded
    pointer = buffer.data_ptr()
    set_warmup_factor(model, 0.25)
    assert model.cma.warmup_factor_tensor is buffer and buffer.data_ptr() == pointer and float(buffer) == 0.25
    assert model.cma.warmup_factor == 0.25
    with pytest.raises(ValueError, match=r"must lie in \[0, 1\], got 1.5"):
        model.cma.warmup_factor = 1.5
    # built from parts (meta device, then materialised): the buffer is real and 1
    parts = MaskCMAModel.from_pretrained_parts(model.vlm, model.sam2, tokenizer=tokenizer)
    assert parts.cma.warmup_factor_tensor.device.type == "cpu" and float(parts.cma.warmup_factor_tensor) == 1.0


def _cma_inputs(seed=0, num_objects=2, embed_dim=256, size=4, num_tokens=3):
    generator = torch.Generator().manual_seed(seed)
    return (
        torch.randn(num_objects, embed_dim, size, size, generator=generator),
        torch.randn(num_objects, num_tokens, embed_dim, generator=generator),
        torch.ones(num_objects, num_tokens, dtype=torch.bool),
        torch.randn(num_objects, embed_dim, generator=generator),
        torch.randn(num_objects, 1, size, size, generator=generator),
    )


@pytest.mark.parametrize("warmup_target", ["residual", "mask"])
def test_compiled_cma_reads_the_new_warmup_factor_without_recompiling(warmup_target):
    """torch.compile guards on Python constants: a float attribute that changes every step recompiles the CMA. The
    buffer is an input of the compiled graph, so a new factor reuses the graph and gives the eager result."""
    model, _ = build_tiny_model(seed=0, cma_config={"warmup_target": warmup_target})
    cma = model.cma.eval()
    with torch.no_grad():
        cma.gamma.fill_(0.7)
    inputs = _cma_inputs()
    graphs = []

    def counting_backend(graph_module, example_inputs):
        graphs.append(graph_module)
        return graph_module.forward

    torch._dynamo.reset()
    compiled = torch.compile(cma, backend=counting_backend)
    outputs = {}
    for step, factor in enumerate((0.1, 0.6, 1.0)):
        cma.warmup_factor = factor
        with torch.no_grad():
            outputs[factor] = compiled(*inputs).image_embeddings
            eager = cma(*inputs).image_embeddings
        torch.testing.assert_close(outputs[factor], eager, rtol=1e-5, atol=1e-5)
        if step == 0:
            first_graphs = len(graphs)
    assert first_graphs >= 1 and len(graphs) == first_graphs  # no recompilation for the new factors
    assert not torch.allclose(outputs[0.1], outputs[0.6])  # and the factor is applied
    torch._dynamo.reset()


# -- attention implementations: what the model claims is what runs -------------------------------------------------


def test_attention_implementation_claims_hold():
    from transformers_maskcma.modeling.cma import eager_attention_forward
    from transformers_maskcma.tiny import tiny_config

    # SAM2 video (transformers' Sam2VideoModel) has no flex attention: the model does not claim it
    assert MaskCMAModel._supports_flex_attn is False
    config = tiny_config()
    config._attn_implementation = "flex_attention"
    with pytest.raises(ValueError, match="flex"):
        MaskCMAModel(config)
    # the model's implementation reaches the CMA (by default, and when chosen), as it reaches the VLM and SAM2
    default, _ = build_tiny_model(seed=0)
    assert default.config._attn_implementation == "sdpa" == default.cma.config._attn_implementation
    inputs = _cma_inputs(seed=1)
    with torch.no_grad():
        default.cma.gamma.fill_(1.0)
        sdpa_output = default.cma(*inputs).image_embeddings
    assert default.cma.attention_function() is not eager_attention_forward
    default.set_attn_implementation("eager")
    assert default.cma.config._attn_implementation == "eager"
    assert default.cma.attention_function() is eager_attention_forward
    with torch.no_grad():
        eager_output = default.cma(*inputs).image_embeddings
    torch.testing.assert_close(sdpa_output, eager_output, rtol=1e-5, atol=1e-5)


# -- float32 numerics in a half-precision model --------------------------------------------------------------------


def test_cma_numerics_run_in_float32_in_a_bfloat16_model():
    """Router scores, the attention softmax, the gate and the residual F + γ·update are float32 in a bfloat16 CMA:
    the residual added to F equals the float32 sum rounded once (a bf16 sum would round γ·update away)."""
    model, _ = build_tiny_model(seed=0)
    cma = model.cma.to(torch.bfloat16).eval()
    with torch.no_grad():
        cma.gamma.fill_(1e-3)  # a small early-training γ: the update is below bf16 resolution of F
    image, tokens, mask, seg, prior = _cma_inputs(seed=2)
    image = (image * 50).to(torch.bfloat16)
    with torch.no_grad():
        output = cma(image, tokens.bfloat16(), mask, seg.bfloat16(), prior)
    assert output.router_scores.dtype == torch.float32 and output.image_embeddings.dtype == torch.bfloat16
    # the update the CMA adds, recomputed from its parts in float32
    captured = {}
    hook = cma.out_proj.register_forward_hook(lambda module, args, out: captured.update(update=out))
    with torch.no_grad():
        cma(image, tokens.bfloat16(), mask, seg.bfloat16(), prior)
    hook.remove()
    gate = torch.sigmoid(prior.flatten(2).transpose(1, 2))
    update = captured["update"].float() * gate
    expected = (image.flatten(2).transpose(1, 2).float() + 1e-3 * update).to(torch.bfloat16)
    assert torch.equal(output.image_embeddings.flatten(2).transpose(1, 2), expected)
    assert not torch.equal(output.image_embeddings, image)  # γ·update survived the rounding somewhere


def test_iou_head_scores_are_float32_in_a_bfloat16_model():
    """The IoU head picks the candidate mask; in a bfloat16 model it computes in float32 (weights upcast), so bf16
    rounding cannot tie two candidates."""
    from transformers_maskcma.modeling.precision import Float32Forward

    model, _ = build_tiny_model(seed=0)
    model.to(torch.bfloat16)
    head = model.sam2.mask_decoder.iou_prediction_head
    assert sum(isinstance(hook, Float32Forward) for hook in head._forward_hooks.values()) == 1
    tokens = torch.randn(2, 1, head.proj_in.in_features, generator=torch.Generator().manual_seed(0)).bfloat16()
    scores = head(tokens)
    assert scores.dtype == torch.float32
    reference = torch.func.functional_call(head, {n: p.float() for n, p in head.named_parameters()}, (tokens.float(),))
    assert torch.equal(scores, reference)
    # and in the decoder pass the model uses
    features = model.encode_frames(torch.randn(2, 3, 128, 128).bfloat16())
    decoded = model._decoder_pass(features.image_embeddings, features.high_res_features, torch.randn(2, 256).bfloat16())
    assert decoded.multimask_iou_scores.dtype == torch.float32
    assert torch.equal(decoded.iou_scores, decoded.multimask_iou_scores.max(dim=-1).values)


# -- float32 master weights under mixed precision ------------------------------------------------------------------


def test_training_refuses_half_precision_trainable_weights(tmp_path):
    from types import SimpleNamespace

    from transformers import TrainingArguments

    from transformers_maskcma.trainer import MaskCMATrainer
    from transformers_maskcma.trainer.callbacks import check_float32_master_weights

    model, _ = build_tiny_model(seed=0)
    check_float32_master_weights(model, SimpleNamespace(deepspeed=None))  # float32: fine
    model.to(torch.bfloat16)
    with pytest.raises(ValueError, match=r"half precision: .*cma\.gamma.*bf16=True"):
        check_float32_master_weights(model, SimpleNamespace(deepspeed=None))
    check_float32_master_weights(model, SimpleNamespace(deepspeed="ds.json"))  # DeepSpeed keeps float32 masters
    args = TrainingArguments(output_dir=str(tmp_path), report_to=[], use_cpu=True)
    with pytest.raises(ValueError, match="trainable parameters are in half precision"):
        MaskCMATrainer(model=model, args=args)


def test_autocast_step_keeps_float32_master_weights_that_take_small_updates():
    """The Trainer's `bf16=True` step: float32 weights, bfloat16 compute under autocast. Gradients and weights stay
    float32 and AdamW moves γ by about its learning rate, an update that a bfloat16 γ of the same value loses."""
    model, tokenizer = build_tiny_model(seed=0)
    model.train()
    with torch.no_grad():
        model.cma.gamma.fill_(1.0)
    batch = make_batch(tokenizer, PROMPTS_FOR_PRECISION, ["It is [SEG].", "Here: [SEG] and [SEG]."])
    reference = model(**batch).loss.detach()
    model.zero_grad()
    optimizer = torch.optim.AdamW([model.cma.gamma], lr=1e-4)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        output = model(**batch)
    output.loss.backward()
    assert abs(float(output.loss) - float(reference)) <= 0.02 * abs(float(reference))
    assert all(p.dtype == torch.float32 for p in model.parameters())
    assert model.cma.gamma.grad.dtype == torch.float32 and float(model.cma.gamma.grad.abs()) > 0
    optimizer.step()
    assert model.cma.gamma.dtype == torch.float32 and 0 < abs(float(model.cma.gamma) - 1.0) <= 2e-4
    # the same AdamW step on a bfloat16 γ = 1: the update (≈ 1e-4) is below bf16's spacing at 1 (2^-7) and is lost
    half_gamma = torch.nn.Parameter(torch.ones(1, dtype=torch.bfloat16))
    half_gamma.grad = model.cma.gamma.grad.to(torch.bfloat16)
    torch.optim.AdamW([half_gamma], lr=1e-4).step()
    assert float(half_gamma) == 1.0


def test_no_split_modules_keep_sam2_and_the_cma_whole():
    """Under `device_map`, accelerate never splits a module whose class is listed: SAM2 (its decoder, memory and
    prompt encoder exchange tensors every frame), the CMA, and the VLM's own blocks."""
    model, _ = build_tiny_model(seed=0)
    no_split = set(model._no_split_modules)  # post_init gathers the submodels' lists into the model's
    assert {"MaskCMASam2VideoModel", "VisualToTextAttention", "TextToVisualAttention"} <= no_split
    assert type(model.sam2).__name__ in no_split and type(model.cma).__name__ in no_split
    vlm_blocks = set(model.vlm._no_split_modules)
    assert vlm_blocks and vlm_blocks <= no_split


def test_training_step_with_the_predicted_prior_under_full_determinism():
    """`full_determinism` (`torch.use_deterministic_algorithms(True)`): a training step with the predicted prior
    runs and gives bit-identical gradients twice (on CUDA: `benchmarks/gpu/check_determinism.py`)."""
    model, tokenizer = build_tiny_model(seed=0, mask_source="pred")
    model.train()
    with torch.no_grad():
        model.cma.gamma.fill_(0.5)
    batch = make_batch(tokenizer, PROMPTS_FOR_PRECISION, ["It is [SEG].", "Here: [SEG] and [SEG]."])
    previous = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        gradients = []
        for _ in range(2):
            model.zero_grad(set_to_none=True)
            model(**batch).loss.backward()
            gradients.append({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
    finally:
        torch.use_deterministic_algorithms(previous)
    assert gradients[0].keys() == gradients[1].keys() and "cma.gamma" in gradients[0]
    assert all(torch.equal(gradients[0][name], gradients[1][name]) for name in gradients[0])
