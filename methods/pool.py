"""Spatial average pooling: the honest "no cleverness" baseline before the LLM.

The M visual tokens (a square grid, row-major) are average-pooled to an h x w grid, the LLM
sees h*w tokens in every layer. Pooling acts on the projected tokens, the ones the LLM reads.

Budget: R tokens -> the grid h x w (h <= w <= 2h) with the largest h*w <= R, ties to the squarer
grid: 64 -> 8x8, 128 -> 8x16, 192 -> 12x16 on 24x24; 16 -> 4x4, 32 -> 4x8, 48 -> 6x8 on 12x12.
For these budgets h*w = R exactly; for others the measured equal-token average can fall short of
R by the gap to the nearest such grid (recorded as `grid`). Cells that do not divide evenly use
adaptive pooling (each output cell averages the patches its span covers, spans may overlap).

Several grids (LLaVA-NeXT: the base view and the unpadded crop grid; Video-LLaVA: one per frame):
the budget is shared in proportion to their sizes and each is pooled on its own; tokens outside
every grid (LLaVA-NeXT's newlines, Video-LLaVA's per-frame CLS) are dropped.
"""
from __future__ import annotations

import math

import torch

from methods.base import Method, ModelShape, Reduced, VisionContext, register


def pool_grid(budget_tokens: int, side: int, cols: int | None = None) -> tuple[int, int]:
    """The largest h x w <= budget (h <= w <= 2h on a square grid, ties to the squarer); on a
    rows x cols grid (side x cols) the shape follows its aspect ratio the same way."""
    rows, cols = side, cols or side
    if rows != cols:
        best = (1, 1)
        for h in range(1, rows + 1):
            for w in range(1, cols + 1):
                skew = abs(math.log((w / h) / (cols / rows)))
                if h * w <= budget_tokens and skew <= math.log(2) and \
                        (h * w, -skew) > (best[0] * best[1], -abs(math.log((best[1] / best[0]) / (cols / rows)))):
                    best = (h, w)
        return best
    best = (1, 1)
    for h in range(1, side + 1):
        for w in range(h, min(2 * h, side) + 1):
            if h * w <= budget_tokens and (h * w, -(w - h)) > (best[0] * best[1], -(best[1] - best[0])):
                best = (h, w)
    return best


def shares(total: int, sizes: list[int]) -> list[int]:
    """`total` split over parts in proportion to `sizes` (largest remainders; every part >= 1)."""
    raw = [total * s / sum(sizes) for s in sizes]
    out = [max(1, int(r)) for r in raw]
    for i in sorted(range(len(sizes)), key=lambda i: int(raw[i]) - raw[i])[: max(0, total - sum(out))]:
        out[i] += 1
    return out


def spans(n_in: int, n_out: int) -> list[range]:
    """Adaptive pooling spans: output i covers inputs floor(i*n/k) .. ceil((i+1)*n/k) - 1."""
    return [range(i * n_in // n_out, -(-(i + 1) * n_in // n_out)) for i in range(n_out)]


@register
class Pool(Method):
    name = "pool"
    budgeted = True

    def configure(self, shape: ModelShape) -> None:
        super().configure(shape)
        self.tokens = self.budget.tokens(shape.num_visual)

    def params(self) -> dict:
        side = math.isqrt(self.shape.num_visual)
        square = side * side == self.shape.num_visual
        grid = pool_grid(self.tokens, side) if square else None
        return {**super().params(), "grid": f"{grid[0]}x{grid[1]}" if grid else "per grid (see docstring)"}

    def vision(self, ctx: VisionContext) -> Reduced | None:
        if self.tokens >= self.shape.num_visual:  # nothing to pool: the model's own tokens
            return None
        feats = ctx.default_features()  # (M, D)
        grids = ctx.grids() if ctx.grids is not None else [torch.arange(feats.shape[0]).view(
            math.isqrt(feats.shape[0]), -1)]
        budgets = shares(self.tokens, [g.numel() for g in grids])
        out, ids, merged = [], [], {}
        for g, r in zip(grids, budgets):
            rows, cols = g.shape
            h, w = pool_grid(r, rows, cols)
            cells = feats[g.flatten().to(feats.device)].T.reshape(1, -1, rows, cols)
            out.append(torch.nn.functional.adaptive_avg_pool2d(cells, (h, w))[0].flatten(1).T)  # (h*w, D)
            for rr in spans(rows, h):
                for cc in spans(cols, w):
                    members = [int(g[r_, c_]) for r_ in rr for c_ in cc]
                    ids.append(members[0])
                    if len(members) > 1:
                        merged[members[0]] = members
        return Reduced(torch.cat(out), torch.tensor(ids, device=feats.device), merged)
