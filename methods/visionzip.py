"""VisionZip (Yang et al., 2024; dvlab-research/VisionZip), in the vision tower.

At the tower layer the model takes its features from (index -2 for LLaVA), using that layer's
attention, its output hidden states *including CLS* and its head-averaged keys:
- dominant: the CLS query's attention to the patches, summed over heads; the top (dominant - 1)
  patches plus the CLS token itself, in original order (CLS first);
- contextual: of the remaining tokens, `contextual` targets at a uniform stride in index order
  (step = max(1, remaining // contextual)); every other remaining token joins its most
  cosine-similar target (normalised keys); a contextual token = target + mean of its members
  (the target alone when it has none).
The LLM then sees dominant + contextual tokens (projected) as a shorter contiguous sequence with
plain positions: R tokens in every layer, so the equal-token average is exactly R.

Budget -> split: contextual = max(1, round(R * 10 / 64)), dominant = R - contextual. This
reproduces the official 54 + 10 for R = 64 and the common 108 + 20 and 162 + 30 for 128 and 192,
and gives 14 + 2, 27 + 5 and 40 + 8 for 16, 32 and 48 tokens. `dominant` and `contextual` may be
set explicitly instead. At R >= M there is nothing to compress and the model's own M tokens
(without CLS) are used unchanged.

Several tower images per sample (LLaVA-NeXT's base view + crops, Video-LLaVA's frames): each image
is compressed on its own with an equal share of dominant and contextual tokens, and the LLM sees
them image after image (dominant then contextual of each), without LLaVA-NeXT's newline tokens
(the official VisionZip for LLaVA-NeXT also drops them; it re-sorts the crops' dominant tokens into
the crop grid, which only changes their order).
"""
from __future__ import annotations

import torch

from methods.base import Method, MethodError, ModelShape, Reduced, VisionContext, register


def visionzip_split(budget_tokens: int) -> tuple[int, int]:
    contextual = max(1, round(budget_tokens * 10 / 64))
    return budget_tokens - contextual, contextual


@register
class VisionZip(Method):
    name = "visionzip"
    budgeted = True

    def __init__(self, budget=None, dominant: int | None = None, contextual: int | None = None):
        super().__init__(budget)
        if (dominant is None) != (contextual is None):
            raise MethodError("visionzip: set both `dominant` and `contextual`, or neither")
        self.requested = (dominant, contextual)

    @classmethod
    def allowed_settings(cls):
        return ("dominant", "contextual")

    def configure(self, shape: ModelShape) -> None:
        super().configure(shape)
        r = self.budget.tokens(shape.num_visual)
        self.identity = r >= shape.num_visual
        if self.requested[0] is not None:
            self.dominant, self.contextual = self.requested
            if self.dominant < 1 or self.contextual < 0 or self.dominant + self.contextual != r:
                raise MethodError(f"visionzip: dominant {self.dominant} + contextual {self.contextual} "
                                  f"must be the budget's {r} tokens, with dominant >= 1")
        else:
            self.dominant, self.contextual = visionzip_split(r)

    def params(self) -> dict:
        return {**super().params(), "dominant": self.dominant, "contextual": self.contextual}

    def vision(self, ctx: VisionContext) -> Reduced | None:
        if self.identity:
            return None
        tower = ctx.tower_state()
        p = tower.hidden.shape[0]
        feats, ids, merged = [], [], {}
        for i, (dom, ctxn) in enumerate(per_image_split(self.dominant, self.contextual, p)):
            f, d, m = self.compress(tower.hidden[i], tower.cls_attention[i], tower.keys[i], tower.token_index[i],
                                    dom, ctxn)
            feats.append(f), ids.append(d), merged.update(m)
        return Reduced(ctx.project(torch.cat(feats)), torch.cat(ids), merged)

    @staticmethod
    def compress(hidden, cls_attention, keys, index, dominant: int, contextual: int):
        """One tower image: (tokens, their visual-token ids, merge map). `index` maps tower tokens
        to visual-token ids (-1 for CLS where the model drops it)."""
        n = hidden.shape[0]  # patches + CLS
        top = torch.topk(cls_attention.sum(0)[1:], dominant - 1).indices + 1
        is_dominant = torch.zeros(n, dtype=torch.bool, device=hidden.device)
        is_dominant[0] = True
        is_dominant[top] = True
        dominant_idx = is_dominant.nonzero().flatten()
        rest = (~is_dominant).nonzero().flatten()
        tokens, ids, merged = [hidden[dominant_idx]], [index[dominant_idx]], {}
        if contextual and len(rest):
            step = max(1, len(rest) // contextual)
            is_target = torch.zeros(len(rest), dtype=torch.bool, device=hidden.device)
            is_target[torch.arange(0, len(rest), step, device=hidden.device)[:contextual]] = True
            targets, others = rest[is_target], rest[~is_target]
            k = keys / keys.norm(dim=-1, keepdim=True)
            owner = (k[others] @ k[targets].T).argmax(-1)  # (others,) -> target slot
            sums = torch.zeros(len(targets), hidden.shape[1], dtype=hidden.dtype, device=hidden.device)
            sums.index_add_(0, owner, hidden[others])
            counts = torch.bincount(owner, minlength=len(targets)).clamp(min=1).to(hidden.dtype)
            tokens.append(hidden[targets] + sums / counts[:, None])
            ids.append(index[targets])
            for j, t in enumerate(targets.tolist()):
                merged[int(index[t])] = [int(index[t])] + index[others[owner == j]].tolist()
        return torch.cat(tokens), torch.cat(ids), merged


def per_image_split(dominant: int, contextual: int, images: int) -> list[tuple[int, int]]:
    """The budget over the tower's images (LLaVA-NeXT's base view and crops, video frames): equal
    shares, the remainder to the first images; one image keeps the split as it is."""
    out = []
    for i in range(images):
        d = dominant // images + (i < dominant % images)
        c = contextual // images + (i < contextual % images)
        out.append((max(1, d), c))
    return out
