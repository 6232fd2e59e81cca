"""Controls that keep the other methods honest: random selection (the floor) and the oracle.

Both keep a fixed number of visual tokens, by default before the LLM (layer -1: every layer sees
R tokens, so the equal-token average is exactly R). With `K` >= 1 they instead act like FastV's
schedule: layers 0..K-1 see everything and N = (L*R - K*M) / (L - K) tokens go on, so they can be
compared with a layer-K method at the same layer.

The oracle keeps the patches that hold the objects the question is about (the dataset knows them:
the embedded benchmark annotates every sample), ranked by how many of their pixels each patch
covers, then patches of other objects, then background in index order. It is the ceiling for any
method that keeps that many tokens.
"""
from __future__ import annotations

import zlib

import torch

from methods.base import LayerContext, Method, MethodError, ModelShape, register, tokens_after_layer, top_k_indices


class _FixedCount(Method):
    budgeted = True

    def __init__(self, budget=None, K: int = 0, seed: int = 0):
        super().__init__(budget)
        if isinstance(K, bool) or not isinstance(K, int) or K < 0:
            raise MethodError(f"{self.name}: K={K!r} is invalid; allowed: 0 (before the LLM) or a layer count >= 1")
        self.K, self.seed, self.keep_n = K, seed, None

    @classmethod
    def allowed_settings(cls):
        return ("K", "seed")

    def configure(self, shape: ModelShape) -> None:
        super().configure(shape)
        if self.K >= shape.num_layers:
            raise MethodError(f"{self.name}: K={self.K} must be below the model's {shape.num_layers} layers")
        r = self.budget.tokens(shape.num_visual)
        self.keep_n = r if self.K == 0 else tokens_after_layer(
            r, self.K, shape.num_layers, shape.num_visual, method=self.name)
        self.prune_layers = (self.K - 1,)

    def params(self) -> dict:
        return {**super().params(), "K": self.K, "keep_after_K": self.keep_n}


@register
class RandomPrune(_FixedCount):
    name = "random"

    def params(self) -> dict:
        return {**super().params(), "seed": self.seed}

    def select(self, ctx: LayerContext) -> torch.Tensor:
        uid = getattr(ctx.sample, "uid", "")
        g = torch.Generator().manual_seed(zlib.crc32(f"{self.seed}:{uid}".encode()))
        return torch.randperm(len(ctx.visual_rows), generator=g)[: self.keep_n]


@register
class Oracle(_FixedCount):
    name = "oracle"

    def select(self, ctx: LayerContext) -> torch.Tensor:
        if ctx.sample is None or not hasattr(ctx.sample, "patch_relevance"):
            raise MethodError("oracle needs a dataset that annotates which patches each question is "
                              "about (the embedded 'shapes' benchmark does)")
        relevance = torch.as_tensor(ctx.sample.patch_relevance())
        objectness = torch.as_tensor(ctx.sample.patch_objectness())
        score = relevance * 1e4 + objectness  # relevant pixels first, then any object's pixels
        patch = ctx.patch_ids.cpu()
        return top_k_indices(score[patch], self.keep_n)

