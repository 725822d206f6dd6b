"""Mask-guided Cross-Modal Attention (CMA) and the convolutional mask-prior head.

The CMA refines SAM2's image embedding ``F`` (``(num_objects, 256, h, w)``, 64×64 for released SAM2) with the
prompt's text tokens before the second mask-decoder pass:

    F' = F + scale · gate(G) ⊙ Attention(query = LayerNorm(F), key = value = top-K(T ∪ {s}))

``T`` are the projected hidden states of the prompt's text tokens, ``s`` the object's ``[SEG]`` embedding, ``G``
the mask prior (logits at the embedding's resolution) and ``scale`` the zero-initialised residual scale γ times a
warm-up factor. See `MaskCMAConfig` for the switches (direction, gate position, warm-up target, top-K).

This file imports only torch (it is copied flat into Hub repositories as remote code).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn


@dataclass
class CrossModalAttentionOutput:
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
        attention_probs (`torch.FloatTensor`):
            Attention probabilities, `(num_objects, heads, height*width, num_selected)` for `"visual_to_text"`,
            `(num_objects, heads, num_selected, height*width)` for `"text_to_visual"`, after gating.
    """

    image_embeddings: torch.Tensor
    router_scores: torch.Tensor
    selected_token_indices: torch.Tensor
    selected_token_mask: torch.Tensor
    attention_probs: torch.Tensor


class TextTokenRouter(nn.Module):
    """Scores candidate text tokens against the object's ``[SEG]`` embedding and keeps the top K.

    The score of token ``t_j`` is ``<W_q s, W_k t_j> / sqrt(d)``. Top-K selection itself has no gradient, so each
    kept token carries a routing weight ``p_j / stop_gradient(p_j)``, with ``p`` the softmax of the scores over the
    valid tokens: the weight is exactly 1 in the forward pass (the attention equals attention over the kept
    tokens) while its gradient, ``∇ log p_j``, trains the router.
    """

    def __init__(self, embed_dim: int):
        super().__init__()
        self.query_proj = nn.Linear(embed_dim, embed_dim)
        self.key_proj = nn.Linear(embed_dim, embed_dim)
        self.scale = 1.0 / math.sqrt(embed_dim)

    def forward(
        self, tokens: torch.Tensor, token_mask: torch.Tensor, seg_embeds: torch.Tensor, top_k: int | None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """
        Args:
            tokens (`(num_objects, num_tokens, embed_dim)`): candidate tokens (text tokens and the ``[SEG]`` one).
            token_mask (`(num_objects, num_tokens)` bool): `True` for real tokens, `False` for padding.
            seg_embeds (`(num_objects, embed_dim)`): the objects' ``[SEG]`` embeddings.
            top_k (`int` or `None`): number of tokens to keep, `None` for all.

        Returns:
            `(selected_tokens (N, K, D), selected_mask (N, K), routing_weights (N, K), selected_indices (N, K),
            scores (N, T))`.
        """
        scores = torch.einsum("nd,ntd->nt", self.query_proj(seg_embeds), self.key_proj(tokens)) * self.scale
        scores = scores.masked_fill(~token_mask, float("-inf"))
        num_tokens = tokens.shape[1]
        keep = num_tokens if top_k is None else min(top_k, num_tokens)
        if keep == num_tokens:
            selected_indices = torch.arange(num_tokens, device=tokens.device).expand(tokens.shape[0], num_tokens)
        else:
            selected_indices = scores.topk(keep, dim=-1).indices
        selected_mask = token_mask.gather(1, selected_indices)
        # log-softmax over the valid tokens; an object with no valid token at all cannot occur (its [SEG] always is).
        # p / stop_gradient(p) is computed as exp(log p - stop_gradient(log p)): the same value (exactly 1) and the
        # same gradient, without the 1/p factor that overflows to inf (and then NaN) when a token's p underflows.
        log_probs = scores.log_softmax(dim=-1).gather(1, selected_indices)
        log_probs = torch.where(selected_mask, log_probs, torch.zeros_like(log_probs))
        routing_weights = torch.exp(log_probs - log_probs.detach()) * selected_mask
        selected_tokens = tokens.gather(1, selected_indices.unsqueeze(-1).expand(-1, -1, tokens.shape[-1]))
        return selected_tokens, selected_mask, routing_weights, selected_indices, scores


class MaskGuidedCrossModalAttention(nn.Module):
    """Multi-head cross-attention between SAM2's image embedding and routed text tokens, gated by a mask prior.

    Args:
        embed_dim (`int`): width of SAM2's image embedding and of the projected tokens (256).
        num_heads (`int`): attention heads; must divide `embed_dim`.
        direction (`str`): `"visual_to_text"` (queries are image positions) or `"text_to_visual"` (queries are
            tokens; their attended features return to the image through the same attention map, each position
            receiving the tokens' features weighted by the attention it got from each token).
        gate (`str`): `"output"` multiplies the projected attention output by the gate; `"attention"` re-weights the
            attention probabilities (per query position when the queries are visual, and renormalised over image
            positions when the keys are visual).
        warmup_target (`str`): `"residual"` scales γ by the warm-up factor; `"mask"` warms the gate up instead:
            ``gate = 1 + ω (sigmoid(G) − 1)``.
        top_k (`int` or `None`): tokens kept by the router (`None`: all).
        dropout (`float`): dropout on the attention probabilities.

    The residual scale `gamma` is a learnable scalar initialised to 0, so a freshly added CMA leaves SAM2's masks
    unchanged. `warmup_factor` is a plain attribute (not saved), set by `GammaWarmupCallback` during training and
    1.0 otherwise.
    """

    def __init__(
        self,
        embed_dim: int = 256,
        num_heads: int = 8,
        direction: str = "visual_to_text",
        gate: str = "output",
        warmup_target: str = "residual",
        top_k: int | None = 2,
        dropout: float = 0.0,
    ):
        super().__init__()
        if embed_dim % num_heads != 0:
            raise ValueError(f"num_heads={num_heads} must divide embed_dim={embed_dim}")
        self.embed_dim = embed_dim
        self.num_heads = num_heads
        self.head_dim = embed_dim // num_heads
        self.direction = direction
        self.gate = gate
        self.warmup_target = warmup_target
        self.top_k = top_k
        self.router = TextTokenRouter(embed_dim)
        self.query_norm = nn.LayerNorm(embed_dim)
        self.q_proj = nn.Linear(embed_dim, embed_dim)
        self.k_proj = nn.Linear(embed_dim, embed_dim)
        self.v_proj = nn.Linear(embed_dim, embed_dim)
        self.out_proj = nn.Linear(embed_dim, embed_dim)
        self.attention_dropout = nn.Dropout(dropout)
        self.gamma = nn.Parameter(torch.zeros(1))
        self.warmup_factor = 1.0

    def _split_heads(self, states: torch.Tensor) -> torch.Tensor:
        batch, length, _ = states.shape
        return states.view(batch, length, self.num_heads, self.head_dim).transpose(1, 2)

    def _merge_heads(self, states: torch.Tensor) -> torch.Tensor:
        batch, _, length, _ = states.shape
        return states.transpose(1, 2).reshape(batch, length, self.embed_dim)

    def gate_values(self, mask_prior_logits: torch.Tensor) -> torch.Tensor:
        """Gate per image position from the prior logits `(N, 1, h, w)` → `(N, h*w, 1)`, with the warm-up applied
        when it targets the mask."""
        gate = torch.sigmoid(mask_prior_logits.flatten(2).transpose(1, 2))
        if self.warmup_target == "mask":
            gate = 1.0 + self.warmup_factor * (gate - 1.0)
        return gate

    def residual_scale(self) -> torch.Tensor:
        """γ times the warm-up factor when the warm-up targets the residual, else γ."""
        if self.warmup_target == "residual":
            return self.gamma * self.warmup_factor
        return self.gamma

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
        selected, selected_mask, routing_weights, selected_indices, scores = self.router(
            tokens, token_mask, seg_embeds, self.top_k
        )

        visual = image_embeddings.flatten(2).transpose(1, 2)  # (N, h*w, D)
        gate = self.gate_values(mask_prior_logits.to(visual.dtype))  # (N, h*w, 1)
        weighted_values = selected * routing_weights.unsqueeze(-1).to(selected.dtype)

        if self.direction == "visual_to_text":
            query = self._split_heads(self.q_proj(self.query_norm(visual)))  # (N, H, hw, d)
            key = self._split_heads(self.k_proj(selected))  # (N, H, K, d)
            value = self._split_heads(self.v_proj(weighted_values))
            logits = query @ key.transpose(-1, -2) / math.sqrt(self.head_dim)  # (N, H, hw, K)
            logits = logits.masked_fill(~selected_mask[:, None, None, :], float("-inf"))
            probs = logits.softmax(dim=-1)
            if self.gate == "attention":
                probs = probs * gate.unsqueeze(1)
            probs = self.attention_dropout(probs)
            attended = self._merge_heads(probs @ value)  # (N, hw, D)
        else:
            query = self._split_heads(self.q_proj(self.query_norm(selected)))  # (N, H, K, d)
            key = self._split_heads(self.k_proj(visual))  # (N, H, hw, d)
            value = self._split_heads(self.v_proj(visual))
            logits = query @ key.transpose(-1, -2) / math.sqrt(self.head_dim)  # (N, H, K, hw)
            probs = logits.softmax(dim=-1)
            if self.gate == "attention":
                probs = probs * gate.transpose(1, 2).unsqueeze(1)
                probs = probs / probs.sum(dim=-1, keepdim=True).clamp_min(torch.finfo(probs.dtype).tiny)
            probs = probs * selected_mask[:, None, :, None]
            probs = self.attention_dropout(probs)
            token_features = (probs @ value) * routing_weights[:, None, :, None].to(value.dtype)  # (N, H, K, d)
            # each image position receives the tokens' features in proportion to the attention it got from them
            received = probs.transpose(-1, -2)  # (N, H, hw, K)
            received = received / received.sum(dim=-1, keepdim=True).clamp_min(torch.finfo(received.dtype).tiny)
            attended = self._merge_heads(received @ token_features)
        update = self.out_proj(attended)
        if self.gate == "output":
            update = update * gate
        refined = visual + self.residual_scale().to(visual.dtype) * update
        refined = refined.transpose(1, 2).reshape(num_objects, embed_dim, height, width)
        return CrossModalAttentionOutput(
            image_embeddings=refined,
            router_scores=scores,
            selected_token_indices=selected_indices,
            selected_token_mask=selected_mask,
            attention_probs=probs,
        )


class ConvMaskPriorHead(nn.Module):
    """The paper's mask prior: two 1×1 convolutions over SAM2's image embedding concatenated with the object's
    ``[SEG]`` embedding broadcast to every position.

    Input `(num_objects, embed_dim, h, w)` and `(num_objects, embed_dim)`; output prior logits `(num_objects, 1, h, w)`.
    """

    def __init__(self, embed_dim: int = 256):
        super().__init__()
        self.conv1 = nn.Conv2d(2 * embed_dim, embed_dim, kernel_size=1)
        self.activation = nn.ReLU()
        self.conv2 = nn.Conv2d(embed_dim, 1, kernel_size=1)

    def forward(self, image_embeddings: torch.Tensor, seg_embeds: torch.Tensor) -> torch.Tensor:
        height, width = image_embeddings.shape[-2:]
        seg_map = seg_embeds[:, :, None, None].expand(-1, -1, height, width)
        hidden = self.activation(self.conv1(torch.cat([image_embeddings, seg_map.to(image_embeddings.dtype)], dim=1)))
        return self.conv2(hidden)
