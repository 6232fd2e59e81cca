"""Helpers shared by the methods (the contract itself is `harness.contract`, re-exported here):
the equal-token arithmetic for methods that prune after a layer, and a deterministic top-k."""
from __future__ import annotations

import torch

from harness.contract import (  # noqa: F401  (re-exported: the contract, as methods and tests name it)
    REGISTRY, Budget, LayerContext, Method, MethodError, ModelShape, Reduced, Selection, TowerState,
    VisionContext, build_method, register)


def tokens_after_layer(budget_tokens: int, first_pruned: int, num_layers: int, num_visual: int,
                       method: str = "") -> int:
    """Tokens N kept in layers first_pruned..L-1 so the layer average is R.

    Layers 0..first_pruned-1 see all M tokens: N = (L*R - K*M) / (L - K), rounded to the nearest
    integer.
    """
    spare = num_layers * budget_tokens - first_pruned * num_visual
    if spare <= 0:
        raise MethodError(
            f"{method}: budget {budget_tokens} tokens is impossible with K={first_pruned} on a "
            f"{num_layers}-layer model with {num_visual} visual tokens (layers 0..K-1 alone average "
            f"{first_pruned * num_visual / num_layers:.1f} tokens); allowed: a budget above that, "
            f"or a smaller K")
    n = round(spare / (num_layers - first_pruned))
    if n > num_visual:
        raise MethodError(f"{method}: budget {budget_tokens} tokens needs {n} > {num_visual} tokens "
                          f"after layer {first_pruned}; allowed: a smaller budget or a larger K")
    return max(1, n)


class LayerBudgetMethod(Method):
    """Keeps N visual tokens from layer K on: layers 0..K-1 see all M, so N follows the equal-token
    convention, N = (L*R - K*M) / (L - K). K = 0 (where allowed) prunes before the LLM and N = R."""
    budgeted = True
    min_k = 1

    def __init__(self, budget: Budget | None, K: int):
        super().__init__(budget)
        if isinstance(K, bool) or not isinstance(K, int) or K < self.min_k:
            raise MethodError(f"{self.name}: K={K!r} is invalid; allowed: an integer >= {self.min_k}"
                              + (" (0: before the LLM)" if self.min_k == 0 else ""))
        self.K, self.keep_n = K, None

    @classmethod
    def allowed_settings(cls):
        return ("K",)

    def tokens_kept(self, budget_tokens: int, shape: ModelShape) -> int:
        if self.K == 0:
            return budget_tokens
        return tokens_after_layer(budget_tokens, self.K, shape.num_layers, shape.num_visual, method=self.name)

    def configure(self, shape: ModelShape) -> None:
        super().configure(shape)
        if self.K >= shape.num_layers:
            raise MethodError(f"{self.name}: K={self.K} must be below the model's {shape.num_layers} layers")
        self.keep_n = self.tokens_kept(self.budget.tokens(shape.num_visual), shape)
        self.prune_layers = (self.K - 1,)

    def params(self) -> dict:
        return {**super().params(), "K": self.K, "keep_after_K": self.keep_n}


def top_k_indices(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Indices of the k largest scores, ties broken towards the lower index (deterministic)."""
    k = max(0, min(k, scores.numel()))
    order = torch.argsort(scores.float(), descending=True, stable=True)
    return order[:k]
