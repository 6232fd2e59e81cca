"""SparseVLM (Zhang et al., 2024; Gumpest/SparseVLMs, the ICML "v1.5" algorithm).

- Text raters, once, on the input embeddings: with V the visual embeddings and T every token after
  the image, r = softmax(V T^T over the text).mean(over the visual tokens); raters are the text
  tokens with r > mean(r).
- At each pruning layer (official: 2, 6, 15 of 32) that layer's own attention, rows = raters,
  columns = the current visual tokens, head mean then rater mean, ranks the visual tokens; the
  top k = min(schedule, n_visual - 1) stay, and the layer's *output* is pruned (the layer itself
  ran on everything).
- Recycling: of the dropped tokens the top 30 % by score (int(0.3 n) + 1) are clustered into
  int(m / 10) + 1 groups by DPC-KNN on that layer's output (density from the k nearest neighbours
  of L2 distance / sqrt(D), delta = distance to the nearest denser token, centres = top
  density * delta; members join the nearest centre) and each group is averaged. The merged
  tokens follow the kept visual tokens and count as visual tokens from then on.
- Positions: kept tokens keep their original position ids and decoding continues from the
  unpruned length (the v2.0 convention, shared by every method here); a merged token takes its
  cluster centre's position. v1.5 instead compacts positions to 0..N-1; recorded as `positions`.
- Density ties: the official code breaks them with 1e-6 uniform noise; here the lower index
  counts as denser, so runs are deterministic.

Scaling the official settings (32 layers, 576 tokens) to L layers and M tokens: pruning layers
round(l * L / 32) (made strictly increasing); the schedule of the official budget at the same
pruning ratio (192 / 128 / 64 for 66.7 / 77.8 / 88.9 %; linear in between, proportional to the
nearest one outside that range), times M / 576, rounded half up. On the embedded model (16 layers, 144 tokens): layers 1, 3, 8 and
75/50/28, 76/28/9, 17/8/4 for 48, 32, 16 tokens.

Token accounting: SparseVLM's own tables count a pruning layer at its *output* size (this gives
~192.0 for the 192 schedule). The engine measures what every layer processed, so a pruning layer
counts at its input size and the measured equal-token average is higher (about 206.5 for the 192
schedule on LLaVA-1.5-7B). Both are recorded: `official_equal_token_average` as a param, the
measured one as the cell's metric. A budget of all M tokens prunes nothing (the official top-k
always drops at least one token per stage).
"""
from __future__ import annotations

import math

import torch

from methods.base import Method, MethodError, ModelShape, Selection, register, top_k_indices

OFFICIAL_LAYERS = (2, 6, 15)  # of 32
OFFICIAL_SCHEDULES = {192: (300, 200, 110), 128: (303, 110, 36), 64: (66, 30, 17)}  # of 576
RECYCLE_FRACTION = 0.3


def scaled_layers(num_layers: int) -> tuple[int, ...]:
    out = []
    for p in OFFICIAL_LAYERS:
        q = math.floor(p * num_layers / 32 + 0.5)
        out.append(max(q, out[-1] + 1) if out else q)
    if out[-1] >= num_layers:
        raise MethodError(f"sparsevlm: a {num_layers}-layer model is too shallow for three pruning layers")
    return tuple(out)


def scaled_schedule(budget_tokens: int, num_visual: int) -> tuple[int, ...]:
    """The official schedule at the same pruning ratio, scaled to M: linear between the official
    budgets, proportional to the nearest one outside them (capped at M)."""
    r = budget_tokens * 576 / num_visual
    lo_b, mid_b, hi_b = sorted(OFFICIAL_SCHEDULES)
    if r < lo_b or r > hi_b:
        ref = lo_b if r < lo_b else hi_b
        counts = [min(576.0, c * r / ref) for c in OFFICIAL_SCHEDULES[ref]]
    else:
        lo, hi = (lo_b, mid_b) if r <= mid_b else (mid_b, hi_b)
        t = (r - lo) / (hi - lo)
        counts = [a + t * (b - a) for a, b in zip(OFFICIAL_SCHEDULES[lo], OFFICIAL_SCHEDULES[hi])]
    return tuple(max(1, math.floor(c * num_visual / 576 + 0.5)) for c in counts)


def recycled_count(dropped: int) -> tuple[int, int]:
    """(tokens recycled, clusters) for a stage that drops `dropped` visual tokens."""
    if dropped <= 0:
        return 0, 0
    m = int(dropped * RECYCLE_FRACTION) + 1
    return m, int(m / 10) + 1


def visual_counts(layers, schedule, num_layers: int, num_visual: int) -> tuple[list[int], list[int]]:
    """Visual tokens per layer: (as processed by each layer, as SparseVLM's tables count them)."""
    processed, official, n = [], [], num_visual
    stages = dict(zip(layers, schedule))
    for i in range(num_layers):
        processed.append(n)
        if i in stages:
            k = min(stages[i], n - 1)
            n = k + recycled_count(n - k)[1]
        official.append(n)
    return processed, official


def dpc_knn_merge(x: torch.Tensor, clusters: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """DPC-KNN clustering of (n, D) tokens into `clusters` groups, each averaged.

    Returns (merged (clusters, D), centre index per cluster, cluster of every token)."""
    n, d = x.shape
    x = x.float()
    dist = torch.cdist(x[None], x[None])[0] / math.sqrt(d)
    nearest = dist.topk(clusters, dim=-1, largest=False).values
    density = (-(nearest**2).mean(-1)).exp()
    idx = torch.arange(n, device=x.device)
    denser = (density[None, :] > density[:, None]) | (
        (density[None, :] == density[:, None]) & (idx[None, :] < idx[:, None]))  # [i, j]: j denser than i
    delta = torch.where(denser, dist, dist.max()).min(-1).values
    centres = (delta * density).topk(clusters).indices
    assign = dist[centres].argmin(0)
    assign[centres] = torch.arange(clusters, device=x.device)
    sums = torch.zeros(clusters, d, device=x.device).index_add_(0, assign, x)
    counts = torch.bincount(assign, minlength=clusters).float()
    return sums / (counts[:, None] + 1e-6), centres, assign


@register
class SparseVLM(Method):
    name = "sparsevlm"
    budgeted = True

    def __init__(self, budget=None, layers: list[int] | None = None, schedule: list[int] | None = None,
                 recycle: bool = True):
        super().__init__(budget)
        self.requested_layers, self.requested_schedule, self.recycle = layers, schedule, recycle
        self._rater_offsets = None

    @classmethod
    def allowed_settings(cls):
        return ("layers", "schedule", "recycle")

    def configure(self, shape: ModelShape) -> None:
        super().configure(shape)
        r = self.budget.tokens(shape.num_visual)
        layers = tuple(self.requested_layers) if self.requested_layers else scaled_layers(shape.num_layers)
        schedule = tuple(self.requested_schedule) if self.requested_schedule else scaled_schedule(r, shape.num_visual)
        if len(layers) != len(schedule) or list(layers) != sorted(set(layers)) or layers[0] < 0 \
                or layers[-1] >= shape.num_layers:
            raise MethodError(f"sparsevlm: layers {list(layers)} and schedule {list(schedule)} must be "
                              f"as long as each other, with increasing layers in 0..{shape.num_layers - 1}")
        self.schedule, self._stage = schedule, dict(zip(layers, schedule))
        self.prune_layers = () if r >= shape.num_visual else layers  # keep everything: prune nothing

    def params(self) -> dict:
        p = {**super().params(), "layers": ",".join(map(str, self.prune_layers)),
             "schedule": ",".join(map(str, self.schedule)), "recycle": self.recycle,
             "positions": "original (merged tokens at their centre's position)"}
        if self.recycle and self.prune_layers:
            _, official = visual_counts(self.prune_layers, self.schedule, self.shape.num_layers,
                                        self.shape.num_visual)
            p["official_equal_token_average"] = round(sum(official) / len(official), 2)
        return p

    def prepare(self, ctx) -> None:
        v = ctx.hidden[0, ctx.visual_rows].float()
        text = ctx.text_after
        t = ctx.hidden[0, text].float()
        r = (v @ t.T).softmax(-1).mean(0)
        self._rater_offsets = len(text) - (r > r.mean()).nonzero().flatten()  # rows from the end

    def select(self, ctx) -> Selection:
        rows = ctx.hidden.shape[1] - self._rater_offsets.to(ctx.hidden.device)
        score = ctx.attention(rows)[:, ctx.visual_rows].mean(0)
        n = len(ctx.visual_rows)
        keep = top_k_indices(score, min(self._stage[ctx.layer], n - 1))
        if not self.recycle:
            return Selection(keep)
        is_kept = torch.zeros(n, dtype=torch.bool, device=score.device)
        is_kept[keep] = True
        dropped = (~is_kept).nonzero().flatten()
        m, clusters = recycled_count(len(dropped))
        if m == 0:
            return Selection(keep)
        chosen = dropped[torch.topk(score[dropped], m).indices]
        merged, centres, assign = dpc_knn_merge(ctx.hidden[0, ctx.visual_rows[chosen]], clusters)
        centre_ids = ctx.patch_ids[chosen[centres]]
        sources = {int(centre_ids[c]): ctx.patch_ids[chosen[assign == c]].tolist() for c in range(clusters)}
        return Selection(keep, merged, ctx.positions[ctx.visual_rows[chosen[centres]]], centre_ids, sources)
