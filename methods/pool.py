"""Spatial average pooling: the honest "no cleverness" baseline before the LLM.

The M visual tokens (a square grid, row-major) are average-pooled to an h x w grid, the LLM
sees h*w tokens in every layer. Pooling acts on the projected tokens, the ones the LLM reads.

Budget: R tokens -> the grid h x w (h <= w <= 2h) with the largest h*w <= R, ties to the squarer
grid: 64 -> 8x8, 128 -> 8x16, 192 -> 12x16 on 24x24; 16 -> 4x4, 32 -> 4x8, 48 -> 6x8 on 12x12.
For these budgets h*w = R exactly; for others the measured equal-token average can fall short of
R by the gap to the nearest such grid (recorded as `grid`). Cells that do not divide evenly use
adaptive pooling (each output cell averages the patches its span covers, spans may overlap).
"""
from __future__ import annotations

import math

import torch

from methods.base import Method, MethodError, ModelShape, Reduced, VisionContext, register


def pool_grid(budget_tokens: int, side: int) -> tuple[int, int]:
    best = (1, 1)
    for h in range(1, side + 1):
        for w in range(h, min(2 * h, side) + 1):
            if h * w <= budget_tokens and (h * w, -(w - h)) > (best[0] * best[1], -(best[1] - best[0])):
                best = (h, w)
    return best


def spans(n_in: int, n_out: int) -> list[range]:
    """Adaptive pooling spans: output i covers inputs floor(i*n/k) .. ceil((i+1)*n/k) - 1."""
    return [range(i * n_in // n_out, -(-(i + 1) * n_in // n_out)) for i in range(n_out)]


@register
class Pool(Method):
    name = "pool"
    budgeted = True

    def configure(self, shape: ModelShape) -> None:
        super().configure(shape)
        side = math.isqrt(shape.num_visual)
        if side * side != shape.num_visual:
            raise MethodError(f"pool: needs a square grid of visual tokens, the model has {shape.num_visual}")
        self.side = side
        self.grid = pool_grid(self.budget.tokens(shape.num_visual), side)

    def params(self) -> dict:
        return {**super().params(), "grid": f"{self.grid[0]}x{self.grid[1]}"}

    def vision(self, ctx: VisionContext) -> Reduced:
        feats = ctx.default_features()  # (M, D)
        h, w = self.grid
        grid = feats.T.reshape(1, -1, self.side, self.side)
        pooled = torch.nn.functional.adaptive_avg_pool2d(grid, (h, w))[0].flatten(1).T  # (h*w, D)
        ids, merged = [], {}
        for rows in spans(self.side, h):
            for cols in spans(self.side, w):
                members = [r * self.side + c for r in rows for c in cols]
                ids.append(members[0])
                if len(members) > 1:
                    merged[members[0]] = members
        return Reduced(pooled, torch.tensor(ids, device=feats.device), merged)
