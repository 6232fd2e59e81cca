"""Running decoder layers: the one loop every pass of the project goes through.

Prefill, greedy decode steps, SSD's drafting (shallow layers, twig) and verification, and TTP's
scoring passes all call `forward` on a range of decoder layers (the model's own modules, or a
twig's) over some rows, with their position ids, rotary embeddings and a KV cache. A change to how
a layer is called (a static cache, CUDA graphs, another family) is made here once.

Also here, because methods need them as much as the engine: the additive causal mask and the
attention-row probe (`attention_rows`). This module imports nothing from the rest of the project.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch


@dataclass
class Rows:
    """Rows entering the next layer: hidden states, their position ids and rotary (cos, sin)."""
    hidden: torch.Tensor  # (1, S, D)
    positions: torch.Tensor  # (S,)
    cos: torch.Tensor
    sin: torch.Tensor


def additive_causal_mask(q_len: int, kv_len: int, dtype, device) -> torch.Tensor:
    """(1, 1, q, kv) additive mask, causal and aligned bottom-right (query i sees keys <= kv_len - q_len + i)."""
    allowed = torch.ones(q_len, kv_len, dtype=torch.bool, device=device).tril(kv_len - q_len)
    mask = torch.zeros(q_len, kv_len, dtype=dtype, device=device)
    return mask.masked_fill(~allowed, torch.finfo(dtype).min)[None, None]


def causal_mask(q_len: int, kv_len: int, like: torch.Tensor, implicit_causal: bool) -> torch.Tensor | None:
    """The additive causal mask, or None where the kernel needs none: a single query sees its whole
    cache, and with `implicit_causal` (SDPA) the kernel masks by itself when queries equal keys."""
    if q_len == 1 or (implicit_causal and q_len == kv_len):
        return None
    return additive_causal_mask(q_len, kv_len, like.dtype, like.device)


def forward(layers, rows: Rows, cache, implicit_causal: bool,
            after: Callable[[torch.nn.Module, torch.Tensor], None] | None = None) -> Rows:
    """Run `layers` in order over `rows`, appending to `cache` (each layer at its own `layer_idx`).

    `after(layer, layer_input)` runs after each layer with `rows.hidden` already that layer's
    output; it may replace the fields of `rows` (pruning) before the next layer. A cache that runs
    passes itself (the graphs regime's static cache: `cache.forward`) takes the whole pass, and
    `after` then sees the last layer only.
    """
    if hasattr(cache, "forward"):
        return cache.forward(layers, rows, implicit_causal, after)
    for layer in layers:
        q = rows.hidden.shape[1]
        mask = causal_mask(q, cache.get_seq_length(layer.self_attn.layer_idx) + q, rows.hidden, implicit_causal)
        layer_input = rows.hidden
        rows.hidden = layer(rows.hidden, attention_mask=mask, position_ids=rows.positions[None],
                            position_embeddings=(rows.cos, rows.sin), cache=cache)
        if after is not None:
            after(layer, layer_input)
    return rows


def attention_rows(layer, layer_input: torch.Tensor, rows: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                   keys: torch.Tensor) -> torch.Tensor:
    """Head-averaged softmax attention of `rows` at a layer, without eager attention.

    softmax(q_rows . K^T / sqrt(d)) from the layer's own q projection (after its input norm and
    RoPE) and its cached keys (already rotated; GQA groups repeated), with the causal mask: row r of
    the current sequence sees keys 0..r + (cache length - sequence length). Returns (n_rows, S).
    """
    attn = layer.self_attn
    rows = rows.to(layer_input.device)
    x = layer.input_layernorm(layer_input[:, rows])
    q = attn.q_proj(x).view(1, len(rows), -1, attn.head_dim).transpose(1, 2)  # (1, H, n, d)
    c, s = cos[:, rows].unsqueeze(1), sin[:, rows].unsqueeze(1)
    half = q.shape[-1] // 2
    q = q * c + torch.cat((-q[..., half:], q[..., :half]), dim=-1) * s
    k = keys.repeat_interleave(q.shape[1] // keys.shape[1], dim=1)  # (1, H, S, d)
    scores = (q.float() @ k.float().transpose(-1, -2)) * attn.scaling  # (1, H, n, S)
    offset = k.shape[2] - layer_input.shape[1]
    key_pos = torch.arange(k.shape[2], device=k.device)
    scores = scores.masked_fill(key_pos[None, :] > (rows[:, None] + offset), float("-inf"))
    return scores.softmax(-1).mean(dim=1)[0]
