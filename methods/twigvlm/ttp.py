"""TwigVLM's twig-guided token pruning (TTP; Shao et al., 2025, MILVLG/twigvlm).

Prefill runs layers 0..K-1 on the whole prompt, then the twig's T layers on their output. The
last twig layer's attention of the *last prompt token* (head mean, image columns) ranks the visual
tokens; the top R stay in the backbone's hidden states entering layer K (layers 0..K-1 and the
twig keep everything, in their caches too). FinalWipe drops every remaining visual token entering
layer K_f. Pruning happens once, at prefill; kept tokens keep their position ids.

Budget: R = ceil((L * Rbar - K * M) / (K_f - K)), the paper's formula (227 / 134 / 41 for 192 /
128 / 64 on LLaVA-1.5-7B with K = 2, K_f = 24); without FinalWipe, K_f = L. The backbone's
equal-token average is then within one token of Rbar. The twig's own T layers also process all M
visual tokens; that cost is extra to the backbone's and is recorded as `twig_layers`.

Settings: `twig` (a directory from train_twig, or "embedded": the embedded model's twig),
`final_wipe` (K_f; default round(24 * L / 32); null: no FinalWipe), `K` (only for a released
twig without twig.json), `score_layer` (the paper's score-source ablation: null = the last twig
layer; an integer j >= K = backbone layer j's attention, computed by running layers K..j on the
unpruned sequence in a scratch pass, e.g. j = K or j = K + T - 1, the layer the last twig layer
was copied from).
"""
from __future__ import annotations

import json
import math
from pathlib import Path

import torch
from transformers import DynamicCache

from harness.contract import DraftPass, register_draft_source
from harness.files import safetensors_problem
from harness.layers import Rows, attention_rows, forward
from methods.base import Method, MethodError, ModelShape, register, top_k_indices

EMBEDDED_TWIG = Path(__file__).resolve().parents[2] / "harness" / "models" / "embedded" / "twigs" / "K1-T2"
_UNSET = object()


def resolve_twig(path: str) -> Path:
    """The twig directory `path` names, its weight files checked complete (headers only)."""
    allowed = "allowed: 'embedded' or a directory written by tools.train_twig"
    if not isinstance(path, str) or not path:
        raise MethodError(f"twigvlm: twig {path!r} is not a path; {allowed}")
    p = EMBEDDED_TWIG if path == "embedded" else Path(path).expanduser()
    if not p.is_dir() or not any(p.glob("*.safetensors")):
        raise MethodError(f"twigvlm: twig {path!r} is not a directory with a trained twig (.safetensors); {allowed}")
    for f in sorted(p.glob("*.safetensors")):
        problem = safetensors_problem(f)
        if problem:
            raise MethodError(f"twigvlm: twig file {str(f)!r}: {problem}; {allowed}")
    return p


class TwigSource:
    """Self-speculative decoding's draft models are twigs: a directory, or "embedded"."""

    def resolve(self, spec: str) -> Path:
        try:
            return resolve_twig(spec)
        except MethodError as e:
            raise MethodError(str(e).removeprefix("twigvlm: ")) from None

    def load(self, path: Path, model):
        from methods.twigvlm.twig import load_twig

        return load_twig(path, model)


register_draft_source(TwigSource())


@register
class TwigTTP(Method):
    name = "twigvlm"
    budgeted = True

    def __init__(self, budget=None, twig: str = "embedded", final_wipe=_UNSET, K: int | None = None,
                 score_layer: int | None = None):
        super().__init__(budget)
        self.twig_dir = resolve_twig(twig)
        self.twig_name = twig
        meta_file = self.twig_dir / "twig.json"
        meta = json.loads(meta_file.read_text()) if meta_file.exists() else {}
        self.K = meta.get("K", K)
        if self.K is None:
            raise MethodError(f"twigvlm: twig {twig!r} has no twig.json saying its K; set `K`")
        self.T = meta.get("T")
        self.final_wipe_setting = final_wipe
        self.score_layer = score_layer
        self.twig = None
        self._bound_to = None
        self.backbone_layers = None
        self._draft_pass: DraftPass | None = None  # the twig's pass over the last prompt

    @classmethod
    def allowed_settings(cls):
        return ("twig", "final_wipe", "K", "score_layer")

    def bind(self, adapter) -> None:
        from methods.twigvlm.twig import load_twig

        if self.twig is None or self._bound_to is not adapter.model:
            self.twig = load_twig(self.twig_dir, adapter.model, self.K)
            self._bound_to = adapter.model
        self.T = self.twig.T
        self.backbone_layers = adapter.layers

    def configure(self, shape: ModelShape) -> None:
        super().configure(shape)
        L, M = shape.num_layers, shape.num_visual
        kf = self.final_wipe_setting
        if kf is _UNSET:
            kf = math.floor(24 * L / 32 + 0.5)
        if kf is not None and (isinstance(kf, bool) or not isinstance(kf, int) or not self.K < kf <= L):
            raise MethodError(f"twigvlm: final_wipe {kf!r}; allowed: an integer in {self.K + 1}..{L}, or null")
        self.final_wipe = kf
        end = kf if kf is not None else L
        rbar = self.budget.tokens(M)
        spare = L * rbar - self.K * M
        if spare <= 0:
            raise MethodError(f"twigvlm: budget {rbar} tokens is impossible with K={self.K} on {L} layers "
                              f"and {M} visual tokens; allowed: above {self.K * M / L:.1f}")
        self.keep_n = math.ceil(spare / (end - self.K))
        if self.keep_n > M:
            raise MethodError(f"twigvlm: budget {rbar} tokens needs {self.keep_n} > {M} tokens after layer "
                              f"{self.K} with final_wipe {kf}; allowed: a smaller budget or no FinalWipe")
        self.prune_layers = (self.K - 1,) + ((kf - 1,) if kf is not None and kf < L else ())
        sl = self.score_layer
        if sl is not None and (isinstance(sl, bool) or not isinstance(sl, int) or not self.K <= sl < L):
            raise MethodError(f"twigvlm: score_layer {sl!r}; allowed: null (the twig) or an integer in "
                              f"{self.K}..{L - 1}")

    def params(self) -> dict:
        return {**super().params(), "K": self.K, "twig_layers": self.T, "twig": self.twig_name,
                "twig_init": getattr(self.twig, "init", None), "keep_after_K": self.keep_n,
                "final_wipe": self.final_wipe,
                "score_source": "twig" if self.score_layer is None else f"backbone layer {self.score_layer}"}

    @property
    def extra_prefill_layers(self) -> int:
        return self.T if self.twig is not None else 0

    def last_row_scores(self, layers, ctx, cache) -> tuple[torch.Tensor, Rows]:
        """`layers` over the whole unpruned sequence at ctx's layer (a fresh `cache`); the last
        layer's attention of the last row, and the rows it output."""
        cos, sin = ctx.position_embeddings
        rows = Rows(ctx.hidden, ctx.positions, cos, sin)
        seen = {}
        forward(layers, rows, cache, implicit_causal=False, after=lambda layer, x: seen.update(layer=layer, x=x))
        last = torch.full((1,), ctx.hidden.shape[1] - 1, device=ctx.hidden.device)  # no host-to-device copy
        keys = cache.layers[seen["layer"].self_attn.layer_idx].keys
        return attention_rows(seen["layer"], seen["x"], last, cos, sin, keys)[0], rows

    def select(self, ctx) -> torch.Tensor:
        if ctx.layer == self.K - 1:
            twig_cache = ctx.new_cache("twig", len(self.twig.layers)) if ctx.new_cache else DynamicCache()
            scores, out = self.last_row_scores(self.twig.layers, ctx, twig_cache)
            self._draft_pass = DraftPass(twig_cache, out.hidden)
            if self.score_layer is not None:  # ablation: backbone layer j's attention, layers K..j
                scores, _ = self.last_row_scores(self.backbone_layers[self.K:self.score_layer + 1], ctx,
                                                 DynamicCache())
            return top_k_indices(scores[ctx.visual_rows], self.keep_n)
        return torch.zeros(0, dtype=torch.long)  # FinalWipe

    # ---- self-speculative decoding over a TTP-pruned model
    def own_draft(self, path: Path):
        return self.twig if self.twig is not None and self.twig_dir == Path(path) else None

    def take_draft_pass(self, draft) -> DraftPass | None:
        if draft is not self.twig:
            return None
        shared, self._draft_pass = self._draft_pass, None
        return shared

    def fuses_first_round(self, K: int) -> bool:
        return True  # FinalWipe reads no scores: the deep prefill may run with the first drafts
