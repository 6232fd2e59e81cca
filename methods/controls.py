"""Controls that keep the other methods honest: random selection (the floor), the oracle (the
ceiling) and blind (no visual token at all: what the language prior alone answers).

Both keep a fixed number of visual tokens, by default before the LLM (layer -1: every layer sees
R tokens, so the equal-token average is exactly R). With `K` >= 1 they instead act like FastV's
schedule: layers 0..K-1 see everything and N = (L*R - K*M) / (L - K) tokens go on, so they can be
compared with a layer-K method at the same layer.

The oracle keeps the patches that hold the objects the question is about (the dataset knows them:
the embedded benchmark annotates every sample), then patches of other objects, then background
in index order. Within each group the objects take turns, best-covered patch first (the
dataset's `patch_priority`), so that at a small budget a count or description question still
sees every object it is about. It is the ceiling for any method that keeps that many tokens.
"""
from __future__ import annotations

import math
import zlib

import torch

from methods.base import LayerBudgetMethod, LayerContext, Method, MethodError, register, top_k_indices


class _FixedCount(LayerBudgetMethod):
    min_k = 0

    def __init__(self, budget=None, K: int = 0):
        super().__init__(budget, K)


@register
class RandomPrune(_FixedCount):
    name = "random"

    def __init__(self, budget=None, K: int = 0, seed: int = 0):
        super().__init__(budget, K)
        self.seed = seed

    @classmethod
    def allowed_settings(cls):
        return ("K", "seed")

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
        if ctx.sample is None or not hasattr(ctx.sample, "patch_priority"):
            raise MethodError("oracle needs a dataset that annotates which patches each question is "
                              "about (the embedded 'shapes' benchmark does)")
        annotated = torch.as_tensor(ctx.sample.patch_priority(), dtype=torch.float)
        grids = ctx.grids or [torch.arange(ctx.shape.num_visual).view(math.isqrt(ctx.shape.num_visual), -1)]
        score = torch.full((ctx.shape.num_visual,), -1.0)  # tokens outside every grid: never first
        for g in grids:
            score[g.flatten()] = annotated[to_annotation_grid(g.shape, annotated.numel())]
        return top_k_indices(score[ctx.patch_ids.cpu()], self.keep_n)


def to_annotation_grid(grid: tuple[int, int] | int, num_annotated: int) -> torch.Tensor:
    """For each token of a rows x cols grid covering the image (row-major), the annotated patch
    that covers its centre, so a 12x12 annotation serves a 24x24 model (LLaVA-1.5 at 336 px), a
    LLaVA-NeXT crop grid or a video frame too. An int is the token count of a square grid."""
    rows, cols = (math.isqrt(grid), math.isqrt(grid)) if isinstance(grid, int) else tuple(grid)
    ann = math.isqrt(num_annotated)
    if rows * cols == 0 or ann * ann != num_annotated or (isinstance(grid, int) and rows * cols != grid):
        raise MethodError(f"oracle: needs a square annotation and a grid of visual tokens, got {grid} "
                          f"visual tokens and {num_annotated} annotated patches")
    r = (torch.arange(rows) * 2 + 1) * ann // (2 * rows)
    c = (torch.arange(cols) * 2 + 1) * ann // (2 * cols)
    return (r[:, None] * ann + c[None, :]).flatten()


@register
class Blind(Method):
    """Drops every visual token before the LLM: the answer comes from the language prior alone."""
    name = "blind"
    prune_layers = (-1,)

    def select(self, ctx: LayerContext) -> torch.Tensor:
        return torch.zeros(0, dtype=torch.long)

