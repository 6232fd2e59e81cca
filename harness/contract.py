"""The method contract: what the engine, the model adapters and the methods agree on.

It sits at the bottom of the project: the engine, the adapters and every method import it, and it
imports none of them. A method acts at up to two stages of the engine:
- the vision stage (`vision`): projected visual features in, fewer features out, before the LLM;
- the layer stage (`select`): after each layer named in `prune_layers` has run in prefill, given
  that layer's output and an attention-row probe, return which of the current visual tokens the
  next layers keep. Layer -1 means "on the input embeddings, before layer 0".
Decoding (greedy or self-speculative) is chosen by the experiment, not by the pruning method; what
self-speculative decoding asks of a method (its own draft model, a draft pass it already ran over
the prompt, whether the first round may be fused with the deep prefill) is declared here too.

Budgets follow the equal-token convention of the TwigVLM, SparseVLM and VisionZip tables: the
budget R is the number of visual tokens retained *averaged over all L layers*. Each method turns
R into its own settings in `configure` and reports them in `params()`.

Methods (and decodings) register themselves by name; importing the `methods` package registers
them all. Nothing outside `methods/` names a method.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Protocol

import torch


class MethodError(ValueError):
    """A method name, setting or budget that cannot be used."""


@dataclass(frozen=True)
class Budget:
    """Retained visual tokens (int >= 1) or pruning ratio (0 <= float < 1); resolved against M."""
    value: float | int

    @staticmethod
    def parse(value) -> "Budget":
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise MethodError(f"budget {value!r} is not a number; allowed: a token count (int >= 1) "
                              f"or a pruning ratio (float in [0, 1))")
        if isinstance(value, float) and not 0.0 <= value < 1.0:
            raise MethodError(f"budget ratio {value!r} is out of range; allowed: a pruning ratio in "
                              f"[0, 1) or an integer token count")
        if isinstance(value, int) and value < 1:
            raise MethodError(f"budget {value!r} tokens is out of range; allowed: at least 1 token")
        return Budget(value)

    def tokens(self, num_visual: int) -> int:
        """R: retained visual tokens averaged over layers."""
        if isinstance(self.value, float):
            return max(1, round(num_visual * (1.0 - self.value)))
        if self.value > num_visual:
            raise MethodError(f"budget {self.value} tokens exceeds the model's {num_visual} visual "
                              f"tokens; allowed: 1..{num_visual}")
        return int(self.value)

    def label(self, num_visual: int) -> str:
        r = self.tokens(num_visual)
        return f"{r} tokens ({100 * (1 - r / num_visual):.1f}% pruned)"


@dataclass
class ModelShape:
    num_layers: int
    num_visual: int


@dataclass
class LayerContext:
    """What a method sees after a prefill layer: the state of the pruned sequence.

    The visual tokens always form one contiguous block of rows (text before and after the image is
    never pruned; recycled or merged tokens sit at the end of the block)."""
    layer: int  # the layer that just ran (-1: input embeddings)
    hidden: torch.Tensor  # (1, S, D) that layer's output
    visual_rows: torch.Tensor  # (V,) rows of `hidden` that are visual tokens, ascending
    patch_ids: torch.Tensor  # (V,) original visual index (0..M-1) each of those rows stands for
    attention: Callable[[torch.Tensor], torch.Tensor] | None  # rows -> (n, S) head-mean probs
    shape: ModelShape
    sample: object = None  # the dataset sample (the oracle reads its patch annotations)
    positions: torch.Tensor | None = None  # (S,) position ids of the rows
    position_embeddings: tuple[torch.Tensor, torch.Tensor] | None = None  # rotary (cos, sin) of the rows
    grids: list[torch.Tensor] | None = None  # the visual tokens' spatial grids (ModelAdapter.grids)
    # a KV cache for a pass the method runs itself (name, layer count) in the engine's regime
    # (graphs: static and captured); None: the method makes a DynamicCache
    new_cache: Callable[[str, int], object] | None = None

    @property
    def text_after(self) -> torch.Tensor:
        """Rows after the image (the question and the assistant prefix)."""
        start = int(self.visual_rows[-1]) + 1 if len(self.visual_rows) else self.hidden.shape[1]
        return torch.arange(start, self.hidden.shape[1], device=self.hidden.device)


@dataclass
class Selection:
    """A layer-stage answer richer than a keep index: new tokens (e.g. recycled clusters) placed
    after the kept visual tokens, with their position ids and the patches each one merges."""
    keep: torch.Tensor  # indices into ctx.visual_rows
    added_hidden: torch.Tensor | None = None  # (n, D)
    added_positions: torch.Tensor | None = None  # (n,)
    added_patch_ids: torch.Tensor | None = None  # (n,) the patch each new token stands for
    merged: dict[int, list[int]] = field(default_factory=dict)  # patch id -> patches merged into it


@dataclass
class TowerState:
    """Vision-tower internals at the layer whose output the model feeds to the projector, for each
    of the P images the tower encodes for a sample (LLaVA: 1; LLaVA-NeXT: base + crops; video: frames)."""
    hidden: torch.Tensor  # (P, N+1, Dv) that layer's output, CLS first
    cls_attention: torch.Tensor  # (P, H, N+1) that layer's softmax attention of the CLS query, per head
    keys: torch.Tensor  # (P, N+1, Dv/H) that layer's key vectors, averaged over heads
    token_index: torch.Tensor  # (P, N+1) each tower token's index among the M visual tokens (-1: none)


@dataclass
class VisionContext:
    """What a method sees at the vision stage; each part is computed on first use."""
    default_features: Callable[[], torch.Tensor]  # (M, D) the visual tokens the model would use
    tower_state: Callable[[], TowerState]
    project: Callable[[torch.Tensor], torch.Tensor]  # (n, Dv) tower features -> (n, D) LLM tokens
    shape: ModelShape
    sample: object = None
    grids: Callable[[], list[torch.Tensor]] | None = None  # the visual tokens' spatial grids


@dataclass
class Reduced:
    """A vision-stage answer: the tokens the LLM sees instead of the M visual tokens."""
    features: torch.Tensor  # (M', D)
    patch_ids: torch.Tensor  # (M',) the patch each token stands for (-1: the CLS token)
    merged: dict[int, list[int]] = field(default_factory=dict)  # patch id -> patches merged into it


class DraftModel(Protocol):
    """What self-speculative decoding drafts with beside backbone layers 0..K-1 (TwigVLM's twig)."""
    K: int  # grows after backbone layer K - 1
    T: int
    layers: torch.nn.ModuleList  # T decoder layers, numbered 0..T-1 in their own cache

    def logits(self, hidden: torch.Tensor) -> torch.Tensor: ...


@dataclass
class DraftPass:
    """A draft model's pass over the whole prompt, run by a method during prefill (TwigVLM TTP
    scores with it): self-speculative decoding starts from it instead of running it again."""
    cache: object  # the draft layers' KV cache over the prompt
    hidden: torch.Tensor  # (1, S, D) the last draft layer's output


class DraftSource(Protocol):
    """How self-speculative decoding finds its draft models (registered by the plug-in that
    provides them: TwigVLM's twigs)."""
    def resolve(self, spec: str) -> Path:
        """The directory `spec` names; MethodError naming what is allowed if there is none."""

    def load(self, path: Path, model) -> DraftModel: ...


class Method:
    """Keeps every token (the baseline). Subclasses override the stages they use."""
    name = "baseline"
    budgeted = False  # whether the method takes a budget
    prune_layers: tuple[int, ...] = ()
    extra_prefill_layers = 0  # decoder layers run over the whole prompt beside the backbone (prefill FLOPs)

    def __init__(self, budget: Budget | None = None):
        if self.budgeted and budget is None:
            raise MethodError(f"{self.name} needs a budget (tokens or pruning ratio)")
        if not self.budgeted and budget is not None:
            raise MethodError(f"{self.name} takes no budget (got {budget.value!r})")
        self.budget = budget
        self.shape: ModelShape | None = None

    @classmethod
    def allowed_settings(cls) -> tuple[str, ...]:
        return ()

    def bind(self, adapter) -> None:
        """Load what the method needs from the model (e.g. TwigVLM's twig); called before configure."""

    def configure(self, shape: ModelShape) -> None:
        """Turn the budget into this method's settings for a model; raise MethodError if impossible."""
        self.shape = shape

    def params(self) -> dict:
        """Settings as logged: the requested budget and what the method made of it."""
        p = {"method": self.name}
        if self.budget is not None and self.shape is not None:
            p["budget_tokens"] = self.budget.tokens(self.shape.num_visual)
            p["budget_ratio"] = round(1 - p["budget_tokens"] / self.shape.num_visual, 4)
        return p

    def vision(self, ctx: VisionContext) -> Reduced | None:
        """Optionally replace the M visual tokens before the LLM; None keeps them."""
        return None

    def prepare(self, ctx: LayerContext) -> None:
        """Called once per prompt on the input embeddings (layer -1), before any layer runs."""

    def select(self, ctx: LayerContext) -> torch.Tensor | Selection:
        """Indices into ctx.visual_rows of the visual tokens to keep (any order), or a Selection."""
        return torch.arange(len(ctx.visual_rows))

    # ---- what self-speculative decoding asks of the method whose pruned model it decodes
    def own_draft(self, path: Path) -> DraftModel | None:
        """The draft model loaded from `path` if the method already holds it (then SSD drafts with
        the very module and may take its draft pass)."""
        return None

    def take_draft_pass(self, draft: DraftModel) -> DraftPass | None:
        """The pass of `draft` over the prompt that this method ran during the last prefill, if
        any; handed over once."""
        return None

    def fuses_first_round(self, K: int) -> bool:
        """Whether SSD may run the target's deep prefill (layers K..L-1) in one forward with the
        first drafts: not when the method prunes at or after layer K with scores read from the
        prompt's last rows, which the drafts would join."""
        return not any(i >= K for i in self.prune_layers)


REGISTRY: dict[str, type[Method]] = {}


def register(cls: type[Method]) -> type[Method]:
    REGISTRY[cls.name] = cls
    return cls


register(Method)


def build_method(name: str, budget=None, **settings) -> Method:
    if name not in REGISTRY:
        raise MethodError(f"unknown method {name!r}; allowed: {', '.join(sorted(REGISTRY))}")
    cls = REGISTRY[name]
    unknown = sorted(set(settings) - set(cls.allowed_settings()))
    if unknown:
        raise MethodError(f"{name}: unknown setting(s) {', '.join(map(repr, unknown))}; "
                          f"allowed: {', '.join(cls.allowed_settings()) or 'none'}")
    return REGISTRY[name](Budget.parse(budget) if budget is not None else None, **settings)


_DRAFT_SOURCES: list[DraftSource] = []


def register_draft_source(source: DraftSource) -> DraftSource:
    _DRAFT_SOURCES[:] = [source]
    return source


def draft_source() -> DraftSource:
    if not _DRAFT_SOURCES:
        raise MethodError("self-speculative decoding: no draft models are registered; import the methods package")
    return _DRAFT_SOURCES[0]
