"""The CMA module against independent computations (hand-written formulas and torch's own multi-head attention)."""

import math

import pytest
import torch
from torch import nn

from transformers_maskcma.modeling.cma import (
    CROSS_MODAL_ATTENTION_CLASSES,
    MaskGuidedCrossModalAttention,
    TextTokenRouter,
)
from transformers_maskcma.modeling.configuration_maskcma import MaskCMAAttentionConfig
from transformers_maskcma.modeling.mask_prior import ConvMaskPriorHead

EMBED, HEADS, SIDE = 32, 4, 5


def make_cma(top_k=2, attn_implementation="eager", **switches) -> MaskGuidedCrossModalAttention:
    """A CMA of the class its `direction` resolves to; `switches` are `MaskCMAAttentionConfig` fields."""
    torch.manual_seed(0)
    config = MaskCMAAttentionConfig(num_heads=HEADS, attn_implementation=attn_implementation, **switches)
    cma = CROSS_MODAL_ATTENTION_CLASSES[config.direction](config, embed_dim=EMBED, top_k=top_k)
    for parameter in cma.parameters():
        nn.init.normal_(parameter, std=0.3)
    with torch.no_grad():
        cma.gamma.fill_(0.7)
    return cma


def make_inputs(num_objects=2, num_text=6, padding=(0, 2), seed=1):
    generator = torch.Generator().manual_seed(seed)
    image = torch.randn(num_objects, EMBED, SIDE, SIDE, generator=generator)
    text = torch.randn(num_objects, num_text, EMBED, generator=generator)
    mask = torch.ones(num_objects, num_text, dtype=torch.bool)
    for row, pad in enumerate(padding):
        if pad:
            mask[row, -pad:] = False
    seg = torch.randn(num_objects, EMBED, generator=generator)
    prior = torch.randn(num_objects, 1, SIDE, SIDE, generator=generator)
    return image, text, mask, seg, prior


def router_scores_by_hand(cma, tokens, seg):
    query = seg @ cma.router.query_proj.weight.T + cma.router.query_proj.bias
    keys = tokens @ cma.router.key_proj.weight.T + cma.router.key_proj.bias
    return (keys @ query.unsqueeze(-1)).squeeze(-1) / math.sqrt(EMBED)


def test_top1_equals_attention_over_the_best_token():
    cma = make_cma(top_k=1)
    image, text, mask, seg, prior = make_inputs()
    output = cma(image, text, mask, seg, prior)
    for row in range(image.shape[0]):
        tokens = torch.cat([text[row][mask[row]], seg[row : row + 1]])
        best = tokens[router_scores_by_hand(cma, tokens, seg[row]).argmax()]
        # a single key gets probability 1 at every position: the update is out_proj(v_proj(best)), gated
        value = cma.v_proj(best)
        update = cma.out_proj(value)  # (D,)
        gate = torch.sigmoid(prior[row, 0]).reshape(-1, 1)  # (hw, 1)
        visual = image[row].flatten(1).T
        expected = visual + 0.7 * gate * update
        got = output.image_embeddings[row].flatten(1).T
        torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


def test_topk_none_equals_full_multi_head_attention():
    cma = make_cma(top_k=None)
    image, text, mask, seg, prior = make_inputs()
    output = cma(image, text, mask, seg, prior)

    reference = nn.MultiheadAttention(EMBED, HEADS, batch_first=True)
    with torch.no_grad():
        reference.in_proj_weight.copy_(torch.cat([cma.q_proj.weight, cma.k_proj.weight, cma.v_proj.weight]))
        reference.in_proj_bias.copy_(torch.cat([cma.q_proj.bias, cma.k_proj.bias, cma.v_proj.bias]))
        reference.out_proj.weight.copy_(cma.out_proj.weight)
        reference.out_proj.bias.copy_(cma.out_proj.bias)
    visual = image.flatten(2).transpose(1, 2)
    tokens = torch.cat([text, seg.unsqueeze(1)], dim=1)
    padding = ~torch.cat([mask, torch.ones(2, 1, dtype=torch.bool)], dim=1)
    attended, _ = reference(cma.query_norm(visual), tokens, tokens, key_padding_mask=padding)
    gate = torch.sigmoid(prior.flatten(2).transpose(1, 2))
    expected = visual + 0.7 * gate * attended
    got = output.image_embeddings.flatten(2).transpose(1, 2)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("direction", ["visual_to_text", "text_to_visual"])
@pytest.mark.parametrize("top_k", [None, 2, 10])
def test_padding_never_gets_weight(direction, top_k):
    cma = make_cma(top_k=top_k, direction=direction)
    image, text, mask, seg, prior = make_inputs(padding=(3, 1))
    output = cma(image, text, mask, seg, prior)
    # changing what sits in the padding slots changes nothing
    scrambled = text.clone()
    scrambled[~mask] = torch.randn(int((~mask).sum()), EMBED) * 100
    again = cma(image, scrambled, mask, seg, prior)
    torch.testing.assert_close(again.image_embeddings, output.image_embeddings, atol=0, rtol=0)
    # padding is never selected as a valid token, and selected padding slots get no probability
    full_mask = torch.cat([mask, torch.ones(2, 1, dtype=torch.bool)], dim=1)
    picked_valid = full_mask.gather(1, output.selected_token_indices)
    assert torch.equal(picked_valid, output.selected_token_mask)
    assert torch.isinf(output.router_scores[~full_mask]).all()
    token_axis = -1 if direction == "visual_to_text" else -2
    probs = output.attention_probs.movedim(token_axis, -1)
    assert (probs[..., ~output.selected_token_mask[0]][0] == 0).all()


@pytest.mark.parametrize("top_k", [1, 2, None])
def test_router_scores_receive_gradient(top_k):
    cma = make_cma(top_k=top_k)
    image, text, mask, seg, prior = make_inputs()
    cma(image, text, mask, seg, prior).image_embeddings.square().sum().backward()
    for parameter in (cma.router.query_proj.weight, cma.router.key_proj.weight):
        assert parameter.grad is not None and parameter.grad.abs().sum() > 0


def test_routing_weights_are_one_with_the_gradient_of_log_p_even_when_p_underflows():
    torch.manual_seed(0)
    router = TextTokenRouter(EMBED)
    tokens = torch.randn(2, 5, EMBED)
    mask = torch.tensor([[True] * 5, [True, True, True, False, False]])
    seg = torch.randn(2, EMBED)
    with torch.no_grad():  # token 3 of object 0 points against the object's query: its softmax weight underflows
        direction = router.key_proj.weight.T @ router.query_proj(seg)[0]
        tokens[0, 3] = -400.0 * direction / direction.norm()
    routed = router(tokens, mask, seg, top_k=None)
    selected_mask, weights, scores = routed.token_mask, routed.routing_weights, routed.scores
    # p underflows to 0 in float32: p / stop_gradient(p) is NaN there (or weighted 0 when special-cased)
    assert scores.softmax(-1)[0, 3] == 0.0
    torch.testing.assert_close(weights, selected_mask.float(), rtol=0, atol=0)  # exactly 1 on valid tokens
    upstream = torch.randn(weights.shape)
    (weights * upstream).sum().backward()
    grads = [p.grad.clone() for p in (router.query_proj.weight, router.key_proj.weight)]
    assert all(torch.isfinite(g).all() for g in grads)
    # independent computation: the gradient of sum(upstream · log p) over the valid tokens
    router.zero_grad()
    query = router.query_proj(seg)
    keys = router.key_proj(tokens)
    log_p = (torch.einsum("nd,ntd->nt", query, keys) / math.sqrt(EMBED)).masked_fill(~mask, float("-inf"))
    log_p = log_p.log_softmax(-1).masked_fill(~mask, 0.0)
    (log_p * upstream * mask).sum().backward()
    for expected, parameter in zip(grads, (router.query_proj.weight, router.key_proj.weight)):
        torch.testing.assert_close(expected, parameter.grad)


def test_gate_positions_differ_as_the_formulas_say():
    """Output gate: F + γ σ(G) (W a + b). Attention gate (queries visual): F + γ (W (σ(G) a) + b).
    Their difference is exactly γ (σ(G) − 1) b."""
    output_gate = make_cma(top_k=None, gate="output")
    attention_gate = make_cma(top_k=None, gate="attention")
    attention_gate.load_state_dict(output_gate.state_dict())
    image, text, mask, seg, prior = make_inputs()
    by_output = output_gate(image, text, mask, seg, prior).image_embeddings
    by_attention = attention_gate(image, text, mask, seg, prior).image_embeddings
    gate = torch.sigmoid(prior)  # (N, 1, h, w)
    bias = output_gate.out_proj.bias.view(1, EMBED, 1, 1)
    torch.testing.assert_close(by_output - by_attention, 0.7 * (gate - 1.0) * bias, atol=1e-5, rtol=1e-4)


def test_warmup_targets_follow_their_formulas():
    residual = make_cma(top_k=None, warmup_target="residual")
    mask_target = make_cma(top_k=None, warmup_target="mask")
    mask_target.load_state_dict(residual.state_dict())
    image, text, mask, seg, prior = make_inputs()

    residual.warmup_factor = 1.0
    full = residual(image, text, mask, seg, prior).image_embeddings
    update = (full - image) / 0.7  # σ(G) ⊙ u, the gated update
    gate = torch.sigmoid(prior)
    ungated = update / gate

    for factor in (0.0, 0.25, 1.0):
        residual.warmup_factor = factor
        mask_target.warmup_factor = factor
        got_residual = residual(image, text, mask, seg, prior).image_embeddings
        got_mask = mask_target(image, text, mask, seg, prior).image_embeddings
        torch.testing.assert_close(got_residual, image + factor * 0.7 * gate * ungated, atol=1e-5, rtol=1e-4)
        warmed_gate = 1.0 + factor * (gate - 1.0)
        torch.testing.assert_close(got_mask, image + 0.7 * warmed_gate * ungated, atol=1e-5, rtol=1e-4)
    residual.warmup_factor = 0.0
    assert torch.equal(residual(image, text, mask, seg, prior).image_embeddings, image)


def test_text_to_visual_attention_gate_renormalises_over_image_positions():
    cma = make_cma(top_k=None, direction="text_to_visual", gate="attention")
    image, text, mask, seg, prior = make_inputs()
    output = cma(image, text, mask, seg, prior)
    probs = output.attention_probs  # (N, heads, tokens, hw)
    valid = output.selected_token_mask[:, None, :].expand(-1, HEADS, -1)
    torch.testing.assert_close(probs.sum(-1)[valid], torch.ones(int(valid.sum())), atol=1e-5, rtol=0)
    # a position with a much lower prior receives relatively less attention than without the gate
    ungated = make_cma(top_k=None, direction="text_to_visual", gate="output")
    ungated.load_state_dict(cma.state_dict())
    plain = ungated(image, text, mask, seg, prior).attention_probs
    ratio = (probs / plain)[0, 0, 0]
    expected = torch.sigmoid(prior[0, 0]).flatten()
    torch.testing.assert_close(ratio / ratio.sum(), expected / expected.sum(), atol=1e-5, rtol=1e-4)


def test_zero_gamma_is_identity_for_every_switch():
    image, text, mask, seg, prior = make_inputs()
    for direction in ("visual_to_text", "text_to_visual"):
        for gate in ("output", "attention"):
            cma = make_cma(direction=direction, gate=gate)
            with torch.no_grad():
                cma.gamma.zero_()
            assert torch.equal(cma(image, text, mask, seg, prior).image_embeddings, image)


def test_conv_prior_head_shape_and_conditioning():
    torch.manual_seed(0)
    head = ConvMaskPriorHead(EMBED)
    image, _, _, seg, _ = make_inputs()
    logits = head(image, seg)
    assert logits.shape == (2, 1, SIDE, SIDE)
    assert not torch.allclose(head(image, seg + 1.0), logits)


SWITCHES = [
    {"gate": gate, "warmup_target": target} for gate in ("output", "attention") for target in ("residual", "mask")
]


@pytest.mark.parametrize("switches", SWITCHES)
@pytest.mark.parametrize("top_k", [1, 3, None])
def test_sdpa_equals_the_eager_reference_with_the_same_router_gradient(switches, top_k):
    """Visual→text runs through `ALL_ATTENTION_FUNCTIONS["sdpa"]`: same refined embedding and the same gradients
    (router included: its `exp(log p − sg(log p))` weights reach SDPA through the values) as the eager reference."""
    eager = make_cma(top_k=top_k, attn_implementation="eager", **switches)
    sdpa = make_cma(top_k=top_k, attn_implementation="sdpa", **switches)
    sdpa.load_state_dict(eager.state_dict())
    eager.warmup_factor = sdpa.warmup_factor = 0.6
    image, text, mask, seg, prior = make_inputs(padding=(3, 1))
    by_eager, by_sdpa = eager(image, text, mask, seg, prior), sdpa(image, text, mask, seg, prior)
    assert by_eager.attention_probs is not None and by_sdpa.attention_probs is None
    torch.testing.assert_close(by_sdpa.image_embeddings, by_eager.image_embeddings, atol=1e-5, rtol=1e-5)
    upstream = torch.randn(by_eager.image_embeddings.shape, generator=torch.Generator().manual_seed(3))
    (by_eager.image_embeddings * upstream).sum().backward()
    (by_sdpa.image_embeddings * upstream).sum().backward()
    for (name, expected), got in zip(eager.named_parameters(), sdpa.parameters()):
        assert expected.grad is not None, name
        torch.testing.assert_close(got.grad, expected.grad, atol=1e-4, rtol=1e-4, msg=name)
    assert eager.router.key_proj.weight.grad.abs().sum() > 0


def test_text_to_visual_reads_the_attention_map_under_every_implementation():
    eager = make_cma(top_k=None, direction="text_to_visual", gate="attention", attn_implementation="eager")
    sdpa = make_cma(top_k=None, direction="text_to_visual", gate="attention", attn_implementation="sdpa")
    sdpa.load_state_dict(eager.state_dict())
    image, text, mask, seg, prior = make_inputs()
    by_eager, by_sdpa = eager(image, text, mask, seg, prior), sdpa(image, text, mask, seg, prior)
    assert torch.equal(by_sdpa.image_embeddings, by_eager.image_embeddings)
    assert by_sdpa.attention_probs is not None


def test_text_to_visual_matches_a_hand_written_scatter_back():
    """Independent computation of the paper's direction, one head at a time, without the shared helpers."""
    cma = make_cma(top_k=None, direction="text_to_visual")
    image, text, mask, seg, prior = make_inputs(padding=(0, 2))
    got = cma(image, text, mask, seg, prior).image_embeddings
    head_dim = EMBED // HEADS
    for row in range(image.shape[0]):
        tokens = torch.cat([text[row][mask[row]], seg[row : row + 1]])  # valid tokens only
        visual = image[row].flatten(1).T  # (hw, D)
        query, key, value = cma.q_proj(cma.query_norm(tokens)), cma.k_proj(visual), cma.v_proj(visual)
        heads = []
        for h in range(HEADS):
            part = slice(h * head_dim, (h + 1) * head_dim)
            probs = (query[:, part] @ key[:, part].T / math.sqrt(head_dim)).softmax(-1)  # (T, hw)
            token_features = probs @ value[:, part]  # (T, d)
            received = probs.T / probs.T.sum(-1, keepdim=True)  # (hw, T)
            heads.append(received @ token_features)
        update = cma.out_proj(torch.cat(heads, dim=-1)) * torch.sigmoid(prior[row, 0]).reshape(-1, 1)
        expected = visual + 0.7 * update
        torch.testing.assert_close(got[row].flatten(1).T, expected, atol=1e-5, rtol=1e-5)


def test_attention_dropout_acts_in_training_only():
    cma = make_cma(top_k=None, dropout=0.5)
    image, text, mask, seg, prior = make_inputs()
    cma.eval()
    first, second = cma(image, text, mask, seg, prior), cma(image, text, mask, seg, prior)
    assert torch.equal(first.image_embeddings, second.image_embeddings)
    without = make_cma(top_k=None, dropout=0.0).eval()
    assert torch.equal(without(image, text, mask, seg, prior).image_embeddings, first.image_embeddings)
    cma.train()
    torch.manual_seed(1)
    trained = cma(image, text, mask, seg, prior)
    assert not torch.allclose(trained.image_embeddings, first.image_embeddings)
    assert (trained.attention_probs == 0).any()  # dropped probabilities


def test_the_direction_is_resolved_once_into_a_class():
    from transformers_maskcma.modeling.cma import resolve_cross_modal_attention
    from transformers_maskcma.tiny import tiny_config

    for direction, cls in CROSS_MODAL_ATTENTION_CLASSES.items():
        config = tiny_config(cma_config={"direction": direction, "num_heads": 4}, cma_topk_tokens=3)
        cma = resolve_cross_modal_attention(config)
        assert type(cma) is cls and isinstance(cma, MaskGuidedCrossModalAttention)
        assert (cma.num_heads, cma.top_k, cma.embed_dim) == (4, 3, config.seg_embed_dim)
        assert cma.config is config.cma_config
