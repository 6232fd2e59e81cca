"""Self-speculative decoding (TwigVLM's SSD) over any pruned or unpruned target.

The draft model is backbone layers 0..K-1 + the twig; the target is the whole (pruned) backbone.
One round: the draft proposes up to `delta` tokens greedily (stopping early at EOS or when the
draft's probability of its token is below `theta`, that token still proposed); the target checks
them in one forward of layers K..L-1; the longest matching prefix is accepted plus the target's own
next token, so every round emits m + 1 tokens and the output equals plain greedy decoding of the
target (up to floating-point ties).

Caches: layers 0..K-1 have one cache shared by draft and target; the twig has its own; the layer-K
inputs the draft computed for its tokens are reused by the verification instead of recomputed.
After a round with P the unpruned prompt length and o the tokens output so far, layers 0..K-1 and
the twig hold P + o - 1 entries, the deeper layers what they kept of the prompt plus o - 1: the
last (correction) token is not cached, it is the next round's input. The first round is fused with
the target's deep prefill (prompt rows and drafts in one forward) unless the method says it cannot
be (`Method.fuses_first_round`: it prunes after layer K with scores that read the prompt's last
rows, as SparseVLM's later stages do), where the deep prefill runs alone first.

Stages, each a plain function: shallow_prefill (layers 0..K-1 and the twig over the prompt, or the
method's own twig pass) -> [deep prefill] -> rounds of propose (draft) -> verify (one deep forward)
-> accept (longest agreeing prefix) -> rollback (crop the caches).
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch

from harness.contract import DraftModel, Method
from harness.engine.generate import (Record, Sequence, gpu_ms, host_keep, mark, method_caches, new_cache, run_layers,
                                     start_prompt, sync)
from harness.engine.graphs import StaticCache, regime
from harness.layers import Rows, forward
from harness.models.adapter import ModelAdapter


@dataclass
class SpecStats:
    target_forwards: int = 0  # deep (layers K..L-1) forwards, the prefill included
    drafted: int = 0
    accepted: int = 0
    rounds: list = field(default_factory=list)  # tokens emitted per round
    first_tokens: int = 0  # tokens known at the time to first token (decode speed counts the rest)

    @property
    def acceptance_rate(self) -> float:
        return self.accepted / self.drafted if self.drafted else 0.0

    @property
    def mean_accepted_length(self) -> float:
        """Tokens emitted per verification round (accepted drafts + the target's token)."""
        return sum(self.rounds) / len(self.rounds) if self.rounds else 0.0


@dataclass
class Draft:
    """One round's proposal: the drafted tokens and the layer-K inputs of the rows the target
    verifies (the previous round's correction, if any, then every draft)."""
    tokens: list[int]
    rows: list[torch.Tensor]
    first_position: int  # position of the first verified row


# ------------------------------------------------------------------------------ stages

def shallow_step(adapter: ModelAdapter, tokens: list[int], start_pos: int, cache, K: int) -> torch.Tensor:
    """New tokens through layers 0..K-1 (appending to their caches): their layer-K inputs."""
    if isinstance(cache, StaticCache):
        return regime(adapter).run(adapter.layers[:K], cache, adapter.rotary, adapter.implicit_causal,
                                   tokens=tokens, embed=adapter.embed, first_position=start_pos)[0]
    return forward(adapter.layers[:K], adapter.rows(tokens, start_pos), cache, adapter.implicit_causal).hidden


def twig_step(adapter: ModelAdapter, twig: DraftModel, hidden: torch.Tensor, positions: torch.Tensor | int,
              cache) -> torch.Tensor:
    """Rows through the twig (appending to its cache), at `positions` (a tensor, or the first of
    consecutive positions); the twig's logits at the last row."""
    if isinstance(cache, StaticCache):
        at = dict(positions=positions) if isinstance(positions, torch.Tensor) else dict(first_position=positions)
        if cache.get_seq_length(0) == 0:  # the prompt: a fresh pass, the head on its last row outside it
            h = regime(adapter).run(twig.layers, cache, adapter.rotary, False, hidden=hidden, **at)[0]
            return twig.logits(h[:, -1:])[0, -1]
        return regime(adapter).run(twig.layers, cache, adapter.rotary, False, hidden=hidden, head=twig.logits,
                                   **at)[2][0, -1]
    if not isinstance(positions, torch.Tensor):
        positions = torch.arange(positions, positions + hidden.shape[1], device=hidden.device)
    cos, sin = adapter.rotary(hidden, positions[None])
    rows = forward(twig.layers, Rows(hidden, positions, cos, sin), cache, implicit_causal=False)
    return twig.logits(rows.hidden[:, -1:])[0, -1]


def crop(cache, n: int, first: int = 0, last: int | None = None) -> None:
    """Drop the last n entries of layers first..last-1 (default: every layer) of a cache."""
    if isinstance(cache, StaticCache):
        cache.crop_all(n, first, last)
    else:
        for layer in cache.layers[first:last]:
            layer.crop(-n)


def shallow_prefill(adapter: ModelAdapter, seq: Sequence, method: Method, cache, twig: DraftModel, reserve: int = 64):
    """Layers 0..K-1 over the prompt (with the method's pruning there), then the twig over layer
    K-1's unpruned output, unless the method already ran that pass: (twig cache, twig logits)."""
    shallow = {}

    def keep_shallow(i, s):
        if i == twig.K - 1:
            shallow["rows"] = Rows(s.hidden, s.positions, s.cos, s.sin)

    run_layers(adapter, seq, method, cache, 0, twig.K, before_prune=keep_shallow)
    shared = method.take_draft_pass(twig)
    if shared is not None:
        twig_cache = shared.cache
        if regime(adapter) is not None and not isinstance(twig_cache, StaticCache):  # a pass of its own cache
            twig_cache = new_cache(adapter, "twig", len(twig.layers), reserve)
            twig_cache.load(shared.cache, twig.layers)
        return twig_cache, twig.logits(shared.hidden[:, -1:])[0, -1]
    twig_cache = new_cache(adapter, "twig", len(twig.layers), reserve)
    return twig_cache, twig_step(adapter, twig, shallow["rows"].hidden, shallow["rows"].positions, twig_cache)


def propose(adapter: ModelAdapter, twig: DraftModel, cache, twig_cache, logits: torch.Tensor,
            correction: int | None, position: int, limit: int, theta: float) -> Draft:
    """Draft up to `limit` tokens greedily from `logits` (the twig's prediction after the last
    token it saw), stopping early at EOS or below probability `theta`. The correction token of the
    previous round goes through layers 0..K-1 and the twig first; every draft goes through layers
    0..K-1 (its layer-K input is what the target verifies) and all but the last through the twig."""
    K, eos = twig.K, adapter.eos_token_id
    draft = Draft([], [], position)
    if correction is not None:
        h = shallow_step(adapter, [correction], position, cache, K)
        draft.rows.append(h)
        logits = twig_step(adapter, twig, h, position, twig_cache)
        position += 1
    while True:
        p, d = logits.float().softmax(-1).max(-1)
        p, d = p.item(), int(d.item())  # the host decides whether to go on: one read per draft
        draft.tokens.append(d)
        h = shallow_step(adapter, [d], position, cache, K)
        draft.rows.append(h)
        if len(draft.tokens) >= limit or d == eos or p < theta:
            return draft
        logits = twig_step(adapter, twig, h, position, twig_cache)
        position += 1


def verify(adapter: ModelAdapter, seq: Sequence, method: Method, cache, draft: Draft, K: int,
           with_prompt: bool) -> list[int]:
    """Layers K..L-1 over the draft's rows in one forward (after the prompt's rows, with the
    method's pruning, when `with_prompt`: the fused first round). The target's greedy token after
    each verified row, the prompt's last row first when fused."""
    new = torch.cat(draft.rows, dim=1)
    new_pos = torch.arange(draft.first_position, draft.first_position + new.shape[1], device=adapter.device)
    if with_prompt:
        seq.hidden, seq.positions = torch.cat([seq.hidden, new], dim=1), torch.cat([seq.positions, new_pos])
        n_new = new.shape[1] + 1  # the prompt's last row predicts the first draft
    else:  # later rounds only verify: pruning happened at prefill
        seq.hidden, seq.positions, seq.visual_rows = new, new_pos, seq.visual_rows[:0]
        n_new, method = new.shape[1], Method()
    seq.cos, seq.sin = adapter.rotary(seq.hidden, seq.positions[None])
    run_layers(adapter, seq, method, cache, K, adapter.num_layers)
    return adapter.logits(seq.hidden[:, -n_new:])[0].argmax(-1).tolist()


def accept(drafts: list[int], target: list[int], eos: int) -> tuple[int, list[int]]:
    """(m, emitted): the longest prefix of drafts the target agrees with (target[j] is its token
    after the j-th verified row, which drafts[j] claims), then the target's own next token; cut
    after EOS."""
    m = 0
    while m < len(drafts) and drafts[m] == target[m]:
        m += 1
    emitted = drafts[:m] + [target[m]]
    return m, emitted[:emitted.index(eos) + 1] if eos in emitted else emitted


def rollback(adapter: ModelAdapter, twig: DraftModel, cache, twig_cache, draft: Draft, m: int) -> None:
    """Drop the rejected drafts' cache entries (the correction is not cached: it is the next
    round's input); when every draft was accepted the twig also takes the last one."""
    rejected = len(draft.tokens) - m
    if rejected:
        crop(cache, rejected)
    twig_has = len(draft.tokens) - 1  # drafts the twig processed (all but the last)
    if m > twig_has:
        last_pos = draft.first_position + len(draft.rows) - 1
        twig_step(adapter, twig, draft.rows[-1], last_pos, twig_cache)
    elif twig_has - m:
        crop(twig_cache, twig_has - m)


def speculative_generate(adapter: ModelAdapter, input_ids: torch.Tensor, pixel_values: torch.Tensor,
                         method: Method, twig: DraftModel, max_new_tokens: int = 64, delta: int = 5,
                         theta: float = 0.6, sample=None, on_round=None) -> tuple[Record, SpecStats]:
    """Greedy output of the target (the backbone with `method`'s pruning) drafted by `twig`.
    `on_round(out, cache, twig_cache)` is called after every verification round."""
    K, L, device, eos = twig.K, adapter.num_layers, adapter.device, adapter.eos_token_id
    stats = SpecStats()
    seq, vision_ms, t1 = start_prompt(adapter, input_ids, pixel_values, method, sample)
    with torch.no_grad():
        P = seq.hidden.shape[1]
        reserve = max_new_tokens + delta + 1
        cache = new_cache(adapter, reserve=reserve)
        seq.new_cache = method_caches(adapter, reserve)
        twig_cache, logits = shallow_prefill(adapter, seq, method, cache, twig, reserve)
        fuse = method.fuses_first_round(K)
        out: list[int] = []
        correction = None  # the target's last token: not cached yet, the next round's input
        if not fuse:  # deep prefill alone: its last row gives the first token
            run_layers(adapter, seq, method, cache, K, L)
            stats.target_forwards += 1
            correction = int(adapter.logits(seq.hidden[:, -1:])[0, -1].argmax())
            out.append(correction)
        first_token_at = time.perf_counter() if out else None
        first_event = mark(device) if out else None
        stats.first_tokens = len(out)
        while len(out) < max_new_tokens and eos not in out:
            position = P + len(out) - (1 if correction is not None else 0)  # of the next new row
            draft = propose(adapter, twig, cache, twig_cache, logits, correction, position,
                            max(1, min(delta, max_new_tokens - len(out))), theta)
            stats.drafted += len(draft.tokens)
            target = verify(adapter, seq, method, cache, draft, K, with_prompt=fuse and not out)
            stats.target_forwards += 1
            m, emitted = accept(draft.tokens, target, eos)
            stats.accepted += m
            stats.rounds.append(len(emitted))
            rollback(adapter, twig, cache, twig_cache, draft, m)
            out += emitted
            correction = emitted[-1]
            if on_round is not None:
                on_round(list(out), cache, twig_cache)
            if first_token_at is None:
                first_event = mark(device)
                sync(device)
                first_token_at = time.perf_counter()
                stats.first_tokens = min(len(out), max_new_tokens)
        out = out[:max_new_tokens]
    end_event = mark(device)
    sync(device)
    t2 = time.perf_counter()
    e0, e1 = seq.events
    gpu = {"vision_ms": gpu_ms(e0, e1), "prefill_ms": gpu_ms(e1, first_event),
           "decode_ms": gpu_ms(first_event, end_event)} if e0 is not None else {}
    prefill_ms = (first_token_at - t1) * 1e3  # time to the first token (round 1 when fused)
    decode_ms = (t2 - first_token_at) * 1e3
    rec = Record(out, adapter.decode(out), vision_ms, prefill_ms, seq.select_s * 1e3, decode_ms,
                 seq.visual_per_layer[:L], host_keep(seq.keep), seq.merged, gpu)
    return rec, stats
