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

from methods.base import LayerBudgetMethod, LayerContext, MethodError, ModelShape, register, top_k_indices

CONVENTIONS = ("equal_token", "keep_r")


@register
class FastV(LayerBudgetMethod):
    name = "fastv"

    def __init__(self, budget=None, K: int = 2, convention: str = "equal_token"):
        super().__init__(budget, K)
        if convention not in CONVENTIONS:
            raise MethodError(f"fastv: convention {convention!r} is unknown; allowed: {', '.join(CONVENTIONS)}")
        self.convention = convention

    @classmethod
    def allowed_settings(cls):
        return ("K", "convention")

    def tokens_kept(self, budget_tokens: int, shape: ModelShape) -> int:
        return budget_tokens if self.convention == "keep_r" else super().tokens_kept(budget_tokens, shape)

    def params(self) -> dict:
        return {**super().params(), "convention": self.convention}

    def select(self, ctx: LayerContext) -> torch.Tensor:
        last = torch.full((1,), ctx.hidden.shape[1] - 1, device=ctx.hidden.device)  # no host-to-device copy
        scores = ctx.attention(last)[0, ctx.visual_rows]
        return top_k_indices(scores, self.keep_n)
