"""FastV (Chen et al., 2024), the static KV-cache variant of pkunlp-icler/FastV.

Layers 0..K-1 see every token. After layer K-1, the attention of the *last prompt token* at layer
K-1 (head mean, image columns: the official code uses that one row, though the paper speaks of
attention from all tokens) ranks the visual tokens; the top N are kept in original order with
their original positions, the rest leave the hidden states entering layer K, once, at prefill.
(The paper's first version re-ranks at every decoding step without a KV cache; that variant speeds
nothing up and is not implemented.)

Budget: equal-token convention, N = (L*R - K*M) / (L - K) (K = 2 on LLaVA-1.5-7B gives N = 166 /
98 / 30 for R = 192 / 128 / 64). `convention: keep_r` instead keeps N = R after layer K-1, as some
later papers do; the measured equal-token average then exceeds R.
"""
from __future__ import annotations

import torch

from methods.base import LayerContext, Method, MethodError, ModelShape, register, tokens_after_layer, top_k_indices

CONVENTIONS = ("equal_token", "keep_r")


@register
class FastV(Method):
    name = "fastv"
    budgeted = True

    def __init__(self, budget=None, K: int = 2, convention: str = "equal_token"):
        super().__init__(budget)
        if isinstance(K, bool) or not isinstance(K, int) or K < 1:
            raise MethodError(f"fastv: K={K!r} is invalid; allowed: an integer layer count >= 1")
        if convention not in CONVENTIONS:
            raise MethodError(f"fastv: convention {convention!r} is unknown; allowed: {', '.join(CONVENTIONS)}")
        self.K, self.convention, self.keep_n = K, convention, None

    @classmethod
    def allowed_settings(cls):
        return ("K", "convention")

    def configure(self, shape: ModelShape) -> None:
        super().configure(shape)
        if self.K >= shape.num_layers:
            raise MethodError(f"fastv: K={self.K} must be below the model's {shape.num_layers} layers")
        r = self.budget.tokens(shape.num_visual)
        self.keep_n = r if self.convention == "keep_r" else tokens_after_layer(
            r, self.K, shape.num_layers, shape.num_visual, method="fastv")
        self.prune_layers = (self.K - 1,)

    def params(self) -> dict:
        return {**super().params(), "K": self.K, "convention": self.convention, "keep_after_K": self.keep_n}

    def select(self, ctx: LayerContext) -> torch.Tensor:
        last = torch.tensor([ctx.hidden.shape[1] - 1], device=ctx.hidden.device)
        scores = ctx.attention(last)[0, ctx.visual_rows]
        return top_k_indices(scores, self.keep_n)
