"""Mask-guided Cross-Modal Attention (CMA).

The CMA refines SAM2's image embedding ``F`` (``(num_objects, 256, h, w)``, 64×64 for released SAM2) with the
prompt's text tokens before the second mask-decoder pass:

    F' = F + scale · gate(G) ⊙ Attention(query = LayerNorm(F), key = value = top-K(T ∪ {s}))

``T`` are the projected hidden states of the prompt's text tokens, ``s`` the object's ``[SEG]`` embedding, ``G``
the mask prior (logits at the embedding's resolution, from a `MaskPrior` strategy) and ``scale`` the
zero-initialised residual scale γ times a warm-up factor. The attention direction is a class
([`VisualToTextAttention`], [`TextToVisualAttention`]) chosen once from `MaskCMAAttentionConfig.direction` by
[`resolve_cross_modal_attention`]; the gate position and the warm-up target are read from the same config at
construction.

This file imports only torch and transformers (it is copied flat into Hub repositories as remote code).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
from transformers.utils import ModelOutput, logging

from .configuration_maskcma import MaskCMAAttentionConfig, MaskCMAConfig

logger = logging.get_logger(__name__)


@dataclass
class CrossModalAttentionOutput(ModelOutput):
    """
    Args:
        image_embeddings (`torch.FloatTensor` of shape `(num_objects, embed_dim, height, width)`):
            The refined image embedding ``F'``.
        router_scores (`torch.FloatTensor` of shape `(num_objects, num_tokens)`):
            Router score of every candidate token (``-inf`` at padding).
        selected_token_indices (`torch.LongTensor` of shape `(num_objects, num_selected)`):
            Indices into the candidate tokens kept by top-K routing.
        selected_token_mask (`torch.BoolTensor` of shape `(num_objects, num_selected)`):
            `False` where fewer valid tokens than K existed and the slot holds padding.
        attention_probs (`torch.FloatTensor`, *optional*):
            Attention probabilities, `(num_objects, heads, height*width, num_selected)` for
            [`VisualToTextAttention`] (before the per-position attention gate), `(num_objects, heads,
            num_selected, height*width)` for [`TextToVisualAttention`] (after the gate). `None` when a fused kernel
            (SDPA) computed the attention.
    """

    image_embeddings: torch.Tensor
    router_scores: torch.Tensor | None = None
    selected_token_indices: torch.Tensor | None = None
    selected_token_mask: torch.Tensor | None = None
    attention_probs: torch.Tensor | None = None


def eager_attention_forward(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float,
    dropout: float = 0.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The reference attention, with the signature of transformers' attention functions.

    Args:
        module (`nn.Module`): the calling attention module (unused here; part of the shared signature).
        query (`(batch, heads, query_len, head_dim)`), key and value (`(batch, heads, key_len, head_dim)`).
        attention_mask (`torch.Tensor`, *optional*): boolean (`True` = may attend) or an additive float bias,
            broadcastable to `(batch, heads, query_len, key_len)`.
        scaling (`float`): factor on ``q·k``.
        dropout (`float`): dropout probability on the attention probabilities (pass 0.0 at evaluation).

    Returns:
        `(output (batch, query_len, heads, head_dim), probabilities (batch, heads, query_len, key_len))`. The
        logits and the softmax are computed in float32 (the probabilities are float32); the output has `value`'s
        dtype.
    """
    # logits and softmax in float32 whatever the activation dtype (bf16 logits lose the ranking of close keys)
    logits = (query.float() @ key.float().transpose(-1, -2)) * scaling
    if attention_mask is not None and attention_mask.dtype == torch.bool:
        logits = logits.masked_fill(~attention_mask, float("-inf"))
    elif attention_mask is not None:
        logits = logits + attention_mask.float()
    probs = logits.softmax(dim=-1)
    probs = nn.functional.dropout(probs, p=dropout, training=dropout > 0.0)
    return (probs.to(value.dtype) @ value).transpose(1, 2).contiguous(), probs


@dataclass
class RoutedTokens(ModelOutput):
    """
    The candidate tokens the [`TextTokenRouter`] keeps for each object (K slots).

    Args:
        tokens (`torch.FloatTensor` of shape `(num_objects, num_selected, embed_dim)`):
            The kept tokens, best router score first (in candidate order when all are kept).
        token_mask (`torch.BoolTensor` of shape `(num_objects, num_selected)`):
            `False` where fewer valid tokens than K existed and the slot holds padding.
        routing_weights (`torch.FloatTensor` of shape `(num_objects, num_selected)`):
            Exactly 1 on valid slots and 0 on padding in the forward pass; their gradient trains the router.
        indices (`torch.LongTensor` of shape `(num_objects, num_selected)`):
            Indices of the kept tokens among the candidates.
        scores (`torch.FloatTensor` of shape `(num_objects, num_tokens)`):
            Router score of every candidate token (``-inf`` at padding).
    """

    tokens: torch.Tensor
    token_mask: torch.Tensor | None = None
    routing_weights: torch.Tensor | None = None
    indices: torch.Tensor | None = None
    scores: torch.Tensor | None = None


class TextTokenRouter(nn.Module):
    """Scores candidate text tokens against the object's ``[SEG]`` embedding and keeps the top K.

    The score of token ``t_j`` is ``<W_q s, W_k t_j> / sqrt(d)``. Top-K selection itself has no gradient, so each
    kept token carries a routing weight ``p_j / stop_gradient(p_j)``, with ``p`` the softmax of the scores over the
    valid tokens: the weight is exactly 1 in the forward pass (the attention equals attention over the kept
    tokens) while its gradient, ``∇ log p_j``, trains the router.

    The scores and their log-softmax are computed in float32 whatever the activation dtype: in bfloat16 (8 bits of
    mantissa) close scores tie and top-K keeps other tokens than in float32.
    """

    def __init__(self, embed_dim: int):
        super().__init__()
        self.query_proj = nn.Linear(embed_dim, embed_dim)
        self.key_proj = nn.Linear(embed_dim, embed_dim)
        self.scale = embed_dim**-0.5

    def forward(
        self, tokens: torch.Tensor, token_mask: torch.Tensor, seg_embeds: torch.Tensor, top_k: int | None
    ) -> RoutedTokens:
        """
        Args:
            tokens (`(num_objects, num_tokens, embed_dim)`): candidate tokens (text tokens and the ``[SEG]`` one).
            token_mask (`(num_objects, num_tokens)` bool): `True` for real tokens, `False` for padding.
            seg_embeds (`(num_objects, embed_dim)`): the objects' ``[SEG]`` embeddings.
            top_k (`int` or `None`): number of tokens to keep, `None` for all.

        Returns:
            [`RoutedTokens`] with `K = min(top_k, num_tokens)` slots per object.
        """
        queries, keys = self.query_proj(seg_embeds).float(), self.key_proj(tokens).float()
        scores = torch.einsum("nd,ntd->nt", queries, keys) * self.scale  # float32
        scores = scores.masked_fill(~token_mask, float("-inf"))
        num_tokens = tokens.shape[1]
        keep = num_tokens if top_k is None else min(top_k, num_tokens)
        if keep == num_tokens:
            indices = torch.arange(num_tokens, device=tokens.device).expand(tokens.shape[0], num_tokens)
        else:
            indices = scores.topk(keep, dim=-1).indices
        selected_mask = token_mask.gather(1, indices)
        # log-softmax over the valid tokens; an object with no valid token at all cannot occur (its [SEG] always is).
        # p / stop_gradient(p) is computed as exp(log p - stop_gradient(log p)): the same value (exactly 1) and the
        # same gradient, without the 1/p factor that overflows to inf (and then NaN) when a token's p underflows.
        log_probs = scores.log_softmax(dim=-1).gather(1, indices)
        log_probs = torch.where(selected_mask, log_probs, torch.zeros_like(log_probs))
        routing_weights = torch.exp(log_probs - log_probs.detach()) * selected_mask
        selected = tokens.gather(1, indices.unsqueeze(-1).expand(-1, -1, tokens.shape[-1]))
        return RoutedTokens(
            tokens=selected, token_mask=selected_mask, routing_weights=routing_weights, indices=indices, scores=scores
        )


class MaskGuidedCrossModalAttention(nn.Module):
    """Base of the two CMA directions: the router, the projections, the mask gate and the gated residual update.
    A subclass implements `attend`, the multi-head attention between image positions and routed tokens.

    Args:
        config ([`MaskCMAAttentionConfig`]): gate position, warm-up target, heads, dropout; its
            `_attn_implementation` (set by the model) selects the attention function.
        embed_dim (`int`): width of SAM2's image embedding and of the projected tokens (256).
        top_k (`int` or `None`): tokens kept by the router (`None`: all).

    The residual scale `gamma` is a learnable scalar initialised to 0, so a freshly added CMA leaves SAM2's masks
    unchanged. The warm-up factor lives in `warmup_factor_tensor`, a 0-d non-persistent buffer (not saved, 1.0
    unless `GammaWarmupCallback` ramps it in training) that is updated in place: a compiled or traced forward reads
    the buffer and sees no new Python constant when the factor changes every step. `warmup_factor` reads it as a
    Python float (a host synchronisation: for logging) and assigning it fills the buffer in place.

    Numerics: the gate (sigmoid of the prior), the residual scale and the residual ``F + scale · update`` are
    computed in float32 and cast back to the activation dtype once; the router and the attention softmax run in
    float32 as well (see [`TextTokenRouter`] and `eager_attention_forward`).
    """

    def __init__(self, config: MaskCMAAttentionConfig, embed_dim: int = 256, top_k: int | None = 2):
        super().__init__()
        if type(self) is MaskGuidedCrossModalAttention:
            raise TypeError(
                "MaskGuidedCrossModalAttention is the base of the two directions; build VisualToTextAttention or "
                "TextToVisualAttention, or resolve_cross_modal_attention(config)"
            )
        if embed_dim % config.num_heads != 0:
            raise ValueError(f"num_heads={config.num_heads} must divide embed_dim={embed_dim}")
        self.config = config
        self.embed_dim = embed_dim
        self.num_heads = config.num_heads
        self.head_dim = embed_dim // config.num_heads
        self.scaling = self.head_dim**-0.5
        self.is_causal = False
        self.top_k = top_k
        self.gate_on_attention = config.gate == "attention"
        self.warmup_on_gate = config.warmup_target == "mask"
        self.router = TextTokenRouter(embed_dim)
        self.query_norm = nn.LayerNorm(embed_dim)
        self.q_proj = nn.Linear(embed_dim, embed_dim)
        self.k_proj = nn.Linear(embed_dim, embed_dim)
        self.v_proj = nn.Linear(embed_dim, embed_dim)
        self.out_proj = nn.Linear(embed_dim, embed_dim)
        self.gamma = nn.Parameter(torch.zeros(1))
        self.register_buffer("warmup_factor_tensor", torch.ones(()), persistent=False)

    @property
    def warmup_factor(self) -> float:
        """The warm-up factor as a Python float (reads the buffer: a host synchronisation on an accelerator)."""
        return float(self.warmup_factor_tensor)

    @warmup_factor.setter
    def warmup_factor(self, factor: float) -> None:
        factor = float(factor)
        if not 0.0 <= factor <= 1.0:
            raise ValueError(f"the CMA warm-up factor must lie in [0, 1], got {factor}")
        with torch.no_grad():
            self.warmup_factor_tensor.fill_(factor)  # in place: the same tensor object, no new constant

    def _split_heads(self, states: torch.Tensor) -> torch.Tensor:
        batch, length, _ = states.shape
        return states.view(batch, length, self.num_heads, self.head_dim).transpose(1, 2)

    @property
    def attention_dropout(self) -> float:
        """Dropout probability for the attention function: the configured one in training, 0 at evaluation."""
        return float(self.config.dropout) if self.training else 0.0

    def gate_values(self, mask_prior_logits: torch.Tensor) -> torch.Tensor:
        """Gate per image position from the prior logits `(N, 1, h, w)` → `(N, h*w, 1)` in float32, with the
        warm-up applied when it targets the mask."""
        gate = torch.sigmoid(mask_prior_logits.float().flatten(2).transpose(1, 2))
        if self.warmup_on_gate:
            gate = 1.0 + self.warmup_factor_tensor.float() * (gate - 1.0)
        return gate

    def residual_scale(self) -> torch.Tensor:
        """γ times the warm-up factor when the warm-up targets the residual, else γ; shape `(1,)`, float32."""
        if self.warmup_on_gate:
            return self.gamma.float()
        return self.gamma.float() * self.warmup_factor_tensor.float()

    def attend(
        self, visual: torch.Tensor, routed: RoutedTokens, gate: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Attention between the image positions `visual (N, h*w, D)` and the routed tokens, with the gate
        `(N, h*w, 1)` applied when it sits on the attention. Returns `(attended (N, h*w, D)` before the output
        projection, `attention_probs` or `None`)."""
        raise NotImplementedError(f"{type(self).__name__} must implement attend()")

    def forward(
        self,
        image_embeddings: torch.Tensor,
        text_tokens: torch.Tensor,
        text_token_mask: torch.Tensor,
        seg_embeds: torch.Tensor,
        mask_prior_logits: torch.Tensor,
    ) -> CrossModalAttentionOutput:
        """
        Args:
            image_embeddings (`torch.FloatTensor` of shape `(num_objects, embed_dim, height, width)`):
                SAM2's image embedding ``F``, one row per object (an image with two objects appears twice).
            text_tokens (`torch.FloatTensor` of shape `(num_objects, num_text_tokens, embed_dim)`):
                Projected hidden states of the prompt's text tokens (padded).
            text_token_mask (`torch.BoolTensor` of shape `(num_objects, num_text_tokens)`):
                `True` for real text tokens; padding never gets attention weight.
            seg_embeds (`torch.FloatTensor` of shape `(num_objects, embed_dim)`):
                The objects' ``[SEG]`` embeddings ``s``; always a candidate token.
            mask_prior_logits (`torch.FloatTensor` of shape `(num_objects, 1, height, width)`):
                The mask prior ``G`` as logits at the embedding's resolution.

        Returns:
            [`CrossModalAttentionOutput`] with the refined embedding of shape `(num_objects, embed_dim, height, width)`.
        """
        num_objects, embed_dim, height, width = image_embeddings.shape
        tokens = torch.cat([text_tokens, seg_embeds.unsqueeze(1)], dim=1)
        seg_valid = torch.ones(num_objects, 1, dtype=torch.bool, device=text_token_mask.device)
        token_mask = torch.cat([text_token_mask.bool(), seg_valid], dim=1)
        routed = self.router(tokens, token_mask, seg_embeds, self.top_k)

        visual = image_embeddings.flatten(2).transpose(1, 2)  # (N, h*w, D)
        gate = self.gate_values(mask_prior_logits)  # (N, h*w, 1), float32
        attended, probs = self.attend(visual, routed, gate)
        update = self.out_proj(attended).float()
        if not self.gate_on_attention:
            update = update * gate
        # the residual in float32: a small γ·update added to F in bf16 would round away
        refined = (visual.float() + self.residual_scale() * update).to(visual.dtype)
        refined = refined.transpose(1, 2).reshape(num_objects, embed_dim, height, width)
        return CrossModalAttentionOutput(
            image_embeddings=refined,
            router_scores=routed.scores,
            selected_token_indices=routed.indices,
            selected_token_mask=routed.token_mask,
            attention_probs=probs,
        )


class VisualToTextAttention(MaskGuidedCrossModalAttention):
    """CMA with image positions as queries and the routed tokens as keys and values (the research code's variant).

    The attention runs through transformers' attention functions: `eager_attention_forward` under
    `attn_implementation="eager"`, `ALL_ATTENTION_FUNCTIONS["sdpa"]` otherwise (flash and flex kernels take no
    broadcast key mask, so the CMA uses SDPA under them, as SAM2 does for its biased attention). The attention
    gate scales each query position's output by its gate value, which equals scaling its row of probabilities.
    """

    def attention_function(self):
        implementation = self.config._attn_implementation or "eager"  # standalone module: the reference
        if implementation == "eager":
            return eager_attention_forward
        if implementation != "sdpa":
            logger.warning_once(f"the CMA uses SDPA under attn_implementation={implementation!r} (it takes a key mask)")
        return ALL_ATTENTION_FUNCTIONS["sdpa"]

    def attend(
        self, visual: torch.Tensor, routed: RoutedTokens, gate: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        num_objects, num_positions, _ = visual.shape
        weighted = routed.tokens * routed.routing_weights.unsqueeze(-1).to(routed.tokens.dtype)
        query = self._split_heads(self.q_proj(self.query_norm(visual)))  # (N, H, hw, d)
        key = self._split_heads(self.k_proj(routed.tokens))  # (N, H, K, d)
        value = self._split_heads(self.v_proj(weighted))
        attended, probs = self.attention_function()(
            self,
            query,
            key,
            value,
            attention_mask=routed.token_mask[:, None, None, :],
            scaling=self.scaling,
            dropout=self.attention_dropout,
        )
        attended = attended.reshape(num_objects, num_positions, self.embed_dim)
        if self.gate_on_attention:
            attended = (attended.float() * gate).to(attended.dtype)
        return attended, probs


class TextToVisualAttention(MaskGuidedCrossModalAttention):
    """CMA with the routed tokens as queries and image positions as keys and values (the paper's variant). The
    attended token features return to the image through the same attention map: each position receives the
    tokens' features in proportion to the attention it got from each token.

    Returning the features reads the attention probabilities, which fused kernels do not expose, so this direction
    always uses `eager_attention_forward`. The attention gate adds ``log gate`` to the logits over image positions,
    which re-weights the probabilities by the gate and renormalises them.
    """

    def attend(
        self, visual: torch.Tensor, routed: RoutedTokens, gate: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        num_objects, num_positions, _ = visual.shape
        query = self._split_heads(self.q_proj(self.query_norm(routed.tokens)))  # (N, H, K, d)
        key = self._split_heads(self.k_proj(visual))  # (N, H, hw, d)
        value = self._split_heads(self.v_proj(visual))
        bias = None
        if self.gate_on_attention:
            bias = gate.clamp_min(torch.finfo(gate.dtype).tiny).log().transpose(1, 2).unsqueeze(1)  # (N, 1, 1, hw)
        token_features, probs = eager_attention_forward(  # probs in float32
            self, query, key, value, attention_mask=bias, scaling=self.scaling, dropout=self.attention_dropout
        )
        probs = probs * routed.token_mask[:, None, :, None]  # padding slots attend nowhere
        token_features = token_features.transpose(1, 2).float() * routed.routing_weights[:, None, :, None].float()
        received = probs.transpose(-1, -2)  # (N, H, hw, K)
        received = received / received.sum(dim=-1, keepdim=True).clamp_min(torch.finfo(received.dtype).tiny)
        attended = (received @ token_features).transpose(1, 2).reshape(num_objects, num_positions, self.embed_dim)
        return attended.to(value.dtype), probs


CROSS_MODAL_ATTENTION_CLASSES = {"visual_to_text": VisualToTextAttention, "text_to_visual": TextToVisualAttention}


def resolve_cross_modal_attention(config: MaskCMAConfig) -> MaskGuidedCrossModalAttention:
    """The CMA of a model: the class of `config.cma_config.direction`, at SAM2's width, with `cma_topk_tokens`."""
    attention_class = CROSS_MODAL_ATTENTION_CLASSES[config.cma_config.direction]
    if config.cma_config._attn_implementation is None and config._attn_implementation is not None:
        # the model's resolved implementation (e.g. "sdpa" by default) reaches the CMA, as it reaches the VLM and SAM2
        config.cma_config._attn_implementation = config._attn_implementation
    return attention_class(config.cma_config, embed_dim=config.seg_embed_dim, top_k=config.cma_topk_tokens)
