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
the target's deep prefill (prompt rows and drafts in one forward) unless the method prunes after
layer K with scores that read the prompt's last rows (SparseVLM's later stages), where the deep
prefill runs alone first.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch
from transformers import DynamicCache

from harness.engine.generate import Record, additive_causal_mask, causal_mask, run_layers, start_prompt, sync
from harness.models.adapter import ModelAdapter
from methods.base import Method


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


def shallow_step(adapter, tokens: list[int], start_pos: int, cache, K: int) -> torch.Tensor:
    """New tokens through layers 0..K-1 (appending to their caches): their layer-K inputs."""
    device = adapter.device
    hidden = adapter.embed(torch.tensor([tokens], device=device))
    pos = torch.arange(start_pos, start_pos + len(tokens), device=device)[None]
    cos, sin = adapter.rotary(hidden, pos)
    for i in range(K):
        q = hidden.shape[1]
        mask = causal_mask(adapter, q, cache.get_seq_length(i) + q, hidden.dtype, device)
        hidden = adapter.layers[i](hidden, attention_mask=mask, position_ids=pos,
                                   position_embeddings=(cos, sin), cache=cache)
    return hidden


def twig_step(adapter, twig, hidden: torch.Tensor, positions: torch.Tensor, cache) -> torch.Tensor:
    """Rows through the twig (appending to its cache); the twig's logits at the last row."""
    cos, sin = adapter.rotary(hidden, positions[None])
    q = hidden.shape[1]
    past = cache.get_seq_length(0) if len(cache.layers) else 0
    mask = None if q == 1 else additive_causal_mask(q, past + q, hidden.dtype, hidden.device)
    for layer in twig.layers:
        hidden = layer(hidden, attention_mask=mask, position_ids=positions[None],
                       position_embeddings=(cos, sin), cache=cache)
    return twig.logits(hidden[:, -1:])[0, -1]


def _crop(cache, layers, n: int) -> None:
    if n > 0:
        for i in layers:
            cache.layers[i].crop(-n)


def speculative_generate(adapter: ModelAdapter, input_ids: torch.Tensor, pixel_values: torch.Tensor,
                         method: Method, twig, max_new_tokens: int = 64, delta: int = 5, theta: float = 0.6,
                         sample=None, on_round=None) -> tuple[Record, SpecStats]:
    """Greedy output of the target (the backbone with `method`'s pruning) drafted by `twig`.
    `on_round(out, cache, twig_cache)` is called after every verification round."""
    K, L, device, eos = twig.K, adapter.num_layers, adapter.device, adapter.eos_token_id
    stats = SpecStats()
    seq, vision_ms, t1 = start_prompt(adapter, input_ids, pixel_values, method, sample)
    with torch.no_grad():
        P = seq.hidden.shape[1]
        cache = DynamicCache(config=adapter.model.config.text_config)
        twig_cache = DynamicCache()
        shallow_out = {}

        def keep_shallow(i, s):
            if i == K - 1:
                shallow_out["h"], shallow_out["pos"] = s.hidden, s.positions

        run_layers(adapter, seq, method, cache, 0, K, before_prune=keep_shallow)
        if getattr(method, "twig", None) is twig and getattr(method, "twig_cache", None) is not None:
            twig_cache, logits = method.twig_cache, twig.logits(method.twig_hidden[:, -1:])[0, -1]  # TTP's pass
            method.twig_cache = None
        else:
            logits = twig_step(adapter, twig, shallow_out["h"], shallow_out["pos"], twig_cache)
        fuse = not any(i >= K for i in method.prune_layers) or getattr(method, "fusable", False)
        out: list[int] = []
        correction = None  # the target's last token: not cached yet, the next round's input
        if not fuse:  # deep prefill alone: its last row gives the first token
            run_layers(adapter, seq, method, cache, K, L)
            stats.target_forwards += 1
            correction = int(adapter.logits(seq.hidden[:, -1:])[0, -1].argmax())
            out.append(correction)
        first_token_at = time.perf_counter() if out else None
        stats.first_tokens = len(out)
        no_prune = Method()  # later rounds only verify: pruning happened at prefill
        while len(out) < max_new_tokens and eos not in out:
            # ---- draft
            pos = P + len(out) - (1 if correction is not None else 0)  # position of the next new row
            rows_h = []  # layer-K inputs of the rows the target will verify (after the prompt in round 1)
            if correction is not None:
                h = shallow_step(adapter, [correction], pos, cache, K)
                rows_h.append(h)
                logits = twig_step(adapter, twig, h, torch.tensor([pos], device=device), twig_cache)
                pos += 1
            drafts = []
            limit = max(1, min(delta, max_new_tokens - len(out)))
            while True:
                probs = logits.float().softmax(-1)
                d = int(probs.argmax())
                drafts.append(d)
                if len(drafts) >= limit or d == eos or float(probs[d]) < theta:
                    break
                h = shallow_step(adapter, [d], pos + len(drafts) - 1, cache, K)
                rows_h.append(h)
                logits = twig_step(adapter, twig, h, torch.tensor([pos + len(drafts) - 1], device=device), twig_cache)
            last_pos = pos + len(drafts) - 1
            h_last = shallow_step(adapter, [drafts[-1]], last_pos, cache, K)
            rows_h.append(h_last)
            stats.drafted += len(drafts)
            # ---- verify: layers K..L-1 over [prompt rows (round 1, fused)] + the new rows
            new = torch.cat(rows_h, dim=1)
            first_new = P + len(out) - (1 if correction is not None else 0)
            new_pos = torch.arange(first_new, first_new + new.shape[1], device=device)
            if fuse and not out:
                seq.hidden = torch.cat([seq.hidden, new], dim=1)
                seq.positions = torch.cat([seq.positions, new_pos])
                seq.cos, seq.sin = adapter.rotary(seq.hidden, seq.positions[None])
                n_new = new.shape[1] + 1  # the prompt's last row predicts the first draft
            else:
                seq.hidden, seq.positions = new, new_pos
                seq.cos, seq.sin = adapter.rotary(new, new_pos[None])
                seq.visual_rows = seq.visual_rows[:0]
                n_new = new.shape[1]
            run_layers(adapter, seq, method if (fuse and not out) else no_prune, cache, K, L)
            stats.target_forwards += 1
            target = adapter.logits(seq.hidden[:, -n_new:])[0].argmax(-1).tolist()
            # target[j] is the target's token after the j-th verified row; drafts[j] claims it
            m = 0
            while m < len(drafts) and drafts[m] == target[m]:
                m += 1
            emitted = drafts[:m] + [target[m]]
            if eos in emitted:
                emitted = emitted[:emitted.index(eos) + 1]
            stats.accepted += m
            stats.rounds.append(len(emitted))
            # ---- caches: drop the rejected drafts' entries (the correction is not cached)
            rejected = len(drafts) - m
            _crop(cache, range(L), rejected)
            twig_has = len(drafts) - 1  # drafts the twig processed (all but the last)
            if m > twig_has:  # every draft accepted: the twig also takes the last one
                twig_step(adapter, twig, h_last, torch.tensor([last_pos], device=device), twig_cache)
            else:
                _crop(twig_cache, range(len(twig.layers)), twig_has - m)
            out += emitted
            correction = emitted[-1]
            if on_round is not None:
                on_round(list(out), cache, twig_cache)
            if first_token_at is None:
                sync(device)
                first_token_at = time.perf_counter()
                stats.first_tokens = min(len(out), max_new_tokens)
        out = out[:max_new_tokens]
    sync(device)
    t2 = time.perf_counter()
    prefill_ms = (first_token_at - t1) * 1e3  # time to the first token (round 1 when fused)
    decode_ms = (t2 - first_token_at) * 1e3
    rec = Record(out, adapter.decode(out), vision_ms, prefill_ms, seq.select_s * 1e3, decode_ms,
                 seq.visual_per_layer[:L], seq.keep, seq.merged)
    return rec, stats
