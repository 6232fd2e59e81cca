"""The `graphs` engine regime: static per-layer KV caches, and on CUDA every pass replayed from a
CUDA graph captured once per shape.

The `eager` regime (`DynamicCache`, the model's modules called layer by layer from Python) is what
the papers' code runs; on a GPU at 7B size its Python and kernel launches, not the method, set the
time: a decode step launches ~1,000 kernels, and after a pruning method picks its tokens the GPU
waits for Python to launch the remaining layers. This regime runs the same modules, weights and
attention maths with the launch cost taken out:

- `StaticCache`: each layer's keys and values live in a preallocated buffer sized for what that
  layer keeps (its prompt rows after pruning + the decode reserve, rounded up to 64), taken from a
  pool so that samples of the same shape reuse the same buffers; lengths are kept on the host,
  write offsets (`starts`) on the device, so a pass never reads back to the host.
- `Graphs.run`: a segment of layers (between two pruning points of a prefill, a decode step, an SSD
  draft step, a verification of n rows) over rows whose count the host knows. On CUDA the first
  call of a shape warms up and captures a graph; every later call copies its inputs into the
  graph's static buffers and replays it. Prompt segments are padded to a multiple of 16 rows
  (pad rows come after the real ones, which causality hides them from; their cache entries lie
  past the layer's length and are overwritten or masked).

Two modes per pass: `fresh` (the layer's cache is empty: prefill segments, the fused first SSD
round; attention over exactly the new rows, causal, so SDPA may use its fastest kernel) and
`prefix` (new rows after `starts[layer]` cached entries: decode, drafts, verification; attention
over the whole buffer with a mask built on the device from `starts`). On a CPU nothing is captured
and the same code runs eagerly, which is how its tokens are checked against the `eager` regime.
"""
from __future__ import annotations

import os
import sys
from contextlib import contextmanager
from dataclasses import dataclass

import torch

from harness.layers import additive_causal_mask

REGIMES = ("eager", "graphs")
ROUND_CAPACITY = 64  # cache buffers are sized in multiples of this (fewer distinct graph shapes)
ROUND_ROWS = 16  # fresh (prompt) segments are padded to a multiple of this
FUSE_ENV = "TWIGBENCH_GRAPHS_FUSE"  # "0": capture the modules' own forwards uncompiled


def _round_up(n: int, m: int) -> int:
    return -(-n // m) * m


class StaticLayer:
    """One layer's cache: fixed buffers (1, H_kv, capacity, d) and the number of valid entries."""

    def __init__(self, keys: torch.Tensor, values: torch.Tensor):
        self.buffers = (keys, values)
        self.length = 0

    @property
    def capacity(self) -> int:
        return self.buffers[0].shape[2]

    @property
    def keys(self) -> torch.Tensor:
        return self.buffers[0][:, :, :self.length]

    @property
    def values(self) -> torch.Tensor:
        return self.buffers[1][:, :, :self.length]

    def get_seq_length(self) -> int:
        return self.length

    def crop(self, n: int) -> None:
        """crop(-n) drops the last n entries (host side; StaticCache.crop_all moves the device
        offsets with it)."""
        if n >= 0:
            raise ValueError(f"crop({n}): a static layer only drops entries (crop(-n)); use StaticCache.crop_all")
        self.length += n


class StaticCache:
    """The KV cache of one model part (`name`: "backbone", "twig") for one generation.

    Quacks like the part of `DynamicCache` the engine and the methods use (`update`,
    `get_seq_length`, `layers[i].keys/values/crop`). Buffers come from the regime's pool; a new
    cache of the same name reuses them, so only one generation per name may be in flight."""

    def __init__(self, engine: "Graphs", name: str, num_layers: int, reserve: int, rotary=None):
        self.engine, self.name, self.reserve, self.rotary = engine, name, reserve, rotary
        self.layers: list[StaticLayer | None] = [None] * num_layers
        self.starts = engine.starts(name, num_layers)  # device: where the next rows of each layer go
        self.starts.zero_()
        self.fresh = True  # set by Graphs.run for the pass being traced

    def get_seq_length(self, layer_idx: int = 0) -> int:
        layer = self.layers[layer_idx]
        return layer.length if layer is not None else 0

    def forward(self, layers, rows, implicit_causal: bool, after=None):
        """harness.layers.forward over this cache: one pass through the regime; `after` sees the
        last layer only (with its input), the one point a pass can be looked into."""
        h, last_in, _ = self.engine.run(layers, self, self.rotary, implicit_causal, hidden=rows.hidden,
                                        positions=rows.positions, want_last_input=after is not None)
        rows.hidden = h
        if after is not None:
            after(layers[-1], last_in)
        return rows

    def crop_all(self, n: int, first: int = 0, last: int | None = None) -> None:
        """Drop the last n entries of layers first..last-1 (all: SSD rollback), host and device together."""
        last = len(self.layers) if last is None else last
        if n <= 0:
            return
        for layer in self.layers[first:last]:
            layer.crop(-n)
        self.starts[first:last].sub_(n)

    def load(self, cache, modules) -> None:
        """Take over the entries of another cache (a DynamicCache a method's own pass filled)."""
        for i, module in enumerate(modules):
            keys, values = cache.layers[i].keys, cache.layers[i].values
            n = keys.shape[2]
            self.ensure(i, module, n)
            kb, vb = self.layers[i].buffers
            kb[:, :, :n].copy_(keys)
            vb[:, :, :n].copy_(values)
            self.layers[i].length = n
            self.starts[i:i + 1].fill_(n)

    def update(self, key: torch.Tensor, value: torch.Tensor, layer_idx: int, **_) -> tuple[torch.Tensor, torch.Tensor]:
        """Write the new rows' keys/values; return what attention reads (fresh: the new rows only;
        prefix: the whole buffer, masked by Graphs.run)."""
        kb, vb = self.layers[layer_idx].buffers
        q = key.shape[2]
        if self.fresh:
            kb[:, :, :q].copy_(key)
            vb[:, :, :q].copy_(value)
            return kb[:, :, :q], vb[:, :, :q]
        idx = self.starts[layer_idx] + self.engine.arange[:q]
        kb.index_copy_(2, idx, key)
        vb.index_copy_(2, idx, value)
        return kb, vb

    def ensure(self, layer_idx: int, module, need: int) -> None:
        """The layer has a buffer for `need` entries: allocated at its first write (need + the
        reserve), moved to a larger one when it would overflow."""
        layer = self.layers[layer_idx]
        if layer is not None and need <= layer.capacity:
            return
        cap = _round_up(need + self.reserve, ROUND_CAPACITY)
        k, v = self.engine.buffer(self.name, layer_idx, cap, module)
        new = StaticLayer(k, v)
        if layer is not None:  # grow: keep what is cached
            new.length = layer.length
            k[:, :, :layer.length].copy_(layer.keys)
            v[:, :, :layer.length].copy_(layer.values)
        self.layers[layer_idx] = new


@dataclass
class _Graph:
    graph: object  # torch.cuda.CUDAGraph, or None on CPU (eager replay)
    hidden: torch.Tensor | None  # static inputs: hidden rows (1, q, D) or token ids (1, q)
    tokens: torch.Tensor | None
    positions: torch.Tensor
    out: tuple | None = None  # static outputs of the captured body
    pins: tuple = ()  # the modules and functions the body baked in, kept alive with the graph


class Graphs:
    """The regime's state for one model: the KV buffer pool, the device write offsets, the
    captured graphs, and counters (captures, replays) for the record."""
    name = "graphs"

    def __init__(self, device: torch.device, capture: bool | None = None, fuse: bool | None = None):
        self.device = torch.device(device)
        self.capture = self.device.type == "cuda" if capture is None else capture
        self.fuse = (self.capture and os.environ.get(FUSE_ENV, "1") != "0") if fuse is None else fuse
        self.fuse_error: str | None = None  # why fusion was switched off, if it failed
        self._compiled: dict = {}
        self.arange = torch.arange(1 << 16, device=self.device)
        self._pool: dict = {}
        self._starts: dict = {}
        self._graphs: dict = {}
        self.captures = 0
        self.replays = 0

    # ---- state
    def starts(self, name: str, n: int) -> torch.Tensor:
        if (name, n) not in self._starts:
            self._starts[(name, n)] = torch.zeros(n, dtype=torch.long, device=self.device)
        return self._starts[(name, n)]

    def buffer(self, name: str, layer_idx: int, cap: int, module) -> tuple[torch.Tensor, torch.Tensor]:
        key = (name, layer_idx, cap)
        if key not in self._pool:
            attn = module.self_attn
            kv_heads = attn.k_proj.out_features // attn.head_dim
            w = attn.k_proj.weight
            shape = (1, kv_heads, cap, attn.head_dim)
            # zeros: entries past a layer's length are masked, and must be finite for the mask to hold
            self._pool[key] = (torch.zeros(shape, dtype=w.dtype, device=w.device),
                               torch.zeros(shape, dtype=w.dtype, device=w.device))
        return self._pool[key]

    def new_cache(self, name: str, num_layers: int, reserve: int, rotary=None) -> StaticCache:
        return StaticCache(self, name, num_layers, reserve, rotary)

    # ---- passes
    def run(self, layers, cache: StaticCache, rotary, implicit_causal: bool, *, hidden: torch.Tensor | None = None,
            tokens: list[int] | None = None, embed=None, positions: torch.Tensor | None = None,
            first_position: int | None = None, head=None, want_last_input: bool = False):
        """`layers` (consecutive, one model part) over new rows: hidden rows (1, n, D) or `tokens`
        (embedded by `embed`), at `positions` (device, (n,)) or first_position.. consecutive.
        Returns (output hidden (1, n, D), the last layer's input or None, head(last row) or None);
        the cache's lengths and device offsets advance by n."""
        n = hidden.shape[1] if hidden is not None else len(tokens)
        idxs = [layer.self_attn.layer_idx for layer in layers]
        fresh = cache.get_seq_length(idxs[0]) == 0
        q = _round_up(n, ROUND_ROWS) if fresh and n > 1 else n
        for i, layer in zip(idxs, layers):
            cache.ensure(i, layer, cache.get_seq_length(i) + q)
        # which modules run (a twig is one of many of the same shape) and every value the body reads
        # from Python while it is traced
        parts = (tuple(id(m) for m in layers), id(getattr(head, "__self__", head)), id(getattr(embed, "__self__", embed)))
        key = (cache.name, parts, idxs[0], idxs[-1], fresh, q, tokens is not None, want_last_input,
               n if head is not None else None, tuple(cache.layers[i].capacity for i in idxs))
        # layers whose cache holds as many entries in a buffer of the same size share one mask
        # (their offsets advance together for as long as this graph is replayed: part of its key)
        groups = {}
        mask_of = [groups.setdefault((cache.layers[i].capacity, cache.get_seq_length(i)), i) for i in idxs]
        key = key + (tuple(mask_of),)

        g = self._graphs.get(key)
        if g is None:
            dev = self.device
            g = _Graph(None, None if tokens is not None else torch.zeros_like(hidden[:, :1]).expand(1, q, -1).clone(),
                       torch.zeros(1, q, dtype=torch.long, device=dev) if tokens is not None else None,
                       torch.zeros(q, dtype=torch.long, device=dev), pins=(list(layers), head, embed))
        # inputs into the static buffers (device-side copies and scalar fills: no host sync)
        if tokens is not None:
            if n == 1:
                g.tokens.fill_(tokens[0])
            else:
                g.tokens[0, :n].copy_(torch.tensor(tokens), non_blocking=True)
        else:
            g.hidden[:, :n].copy_(hidden)
        if positions is not None:
            g.positions[:n].copy_(positions)
            if q > n:
                g.positions[n:].copy_(positions[-1:].expand(q - n))
        elif n == 1:
            g.positions.fill_(first_position)
        else:
            torch.add(self.arange[:q], first_position, out=g.positions)

        def body():
            cache.fresh = fresh
            h = embed(g.tokens) if tokens is not None else g.hidden
            cos, sin = rotary(h, g.positions[None])
            last_in, masks = None, {}
            for i, layer, m in zip(idxs, layers, mask_of):
                if fresh:
                    mask = None if implicit_causal else masks.get(0)
                    if mask is None and not implicit_causal:
                        mask = masks[0] = additive_causal_mask(q, q, h.dtype, h.device)
                elif m in masks:
                    mask = masks[m]
                else:
                    cap = cache.layers[m].capacity
                    allowed = self.arange[None, :cap] <= (cache.starts[m] + self.arange[:q])[:, None]
                    mask = masks[m] = torch.zeros(allowed.shape, dtype=h.dtype, device=h.device).masked_fill(
                        ~allowed, torch.finfo(h.dtype).min)[None, None]
                last_in = h
                h = layer(h, attention_mask=mask, position_ids=g.positions[None], position_embeddings=(cos, sin),
                          cache=cache)
            return h, (last_in if want_last_input else None), (head(h[:, n - 1:n]) if head is not None else None)

        if not self.capture:
            out = body()
        else:
            if g.graph is None:
                self._capture(g, body, layers)
                self._graphs[key] = g
            g.graph.replay()
            self.replays += 1
            out = g.out
        h, last_in, logits = out
        h = h[:, :n].clone()
        last_in = last_in[:, :n].clone() if last_in is not None else None
        logits = logits.clone() if logits is not None else None
        # bookkeeping: host lengths and device offsets (scalar kernels, no sync)
        for i in idxs:
            cache.layers[i].length += n
        if fresh:
            cache.starts[idxs[0]:idxs[-1] + 1].fill_(n)
        else:
            cache.starts[idxs[0]:idxs[-1] + 1].add_(n)
        return h, last_in, logits

    def _capture(self, g: _Graph, body, layers) -> None:
        """Warm up on a side stream (the body is idempotent: it writes the same cache entries it
        would write anyway), then capture it; with fusion, the layers' elementwise modules run
        compiled while this happens (replays then run the fused kernels), and a failure to compile
        switches fusion off for good (`fuse_error` says why) and captures the plain modules."""
        for attempt in ("fused", "plain") if self.fuse else ("plain",):
            try:
                with self.fused(layers) if attempt == "fused" else _nothing():
                    stream = torch.cuda.Stream(self.device)
                    stream.wait_stream(torch.cuda.current_stream(self.device))
                    with torch.cuda.stream(stream):
                        body()
                    torch.cuda.current_stream(self.device).wait_stream(stream)
                    g.graph = torch.cuda.CUDAGraph()
                    with torch.cuda.graph(g.graph):
                        g.out = body()
                break
            except Exception as e:  # noqa: BLE001 (compilation can fail in many ways; plain capture still works)
                if attempt == "plain":
                    raise
                self.fuse, self.fuse_error = False, f"{type(e).__name__}: {e}".splitlines()[0]
                print(f"graphs regime: fusion switched off ({self.fuse_error}); capturing the plain modules",
                      file=sys.stderr)
        self.captures += 1

    def _compile(self, fn):
        if fn not in self._compiled:
            self._compiled[fn] = torch.compile(fn, dynamic=None)
        return self._compiled[fn]

    @contextmanager
    def fused(self, layers):
        """While a pass is captured: each layer's RMS norms and MLP run their own forward compiled
        (torch.compile: the same operations, the elementwise ones fused into a few kernels), and so
        does the family's rotary function; the attention core, projections and weights are the
        model's. Restored afterwards (the eager regime never sees it)."""
        patched, modules = [], []
        for layer in layers:
            for name in ("input_layernorm", "post_attention_layernorm", "mlp"):
                mod = getattr(layer, name, None)
                if mod is not None:
                    fn = self._compile(type(mod).forward)
                    mod.forward = (lambda f, m: lambda *a, **k: f(m, *a, **k))(fn, mod)
                    modules.append(mod)
            family = sys.modules[type(layer.self_attn).__module__]
            if hasattr(family, "apply_rotary_pos_emb") and family not in [p[0] for p in patched]:
                patched.append((family, family.apply_rotary_pos_emb))
                family.apply_rotary_pos_emb = self._compile(family.apply_rotary_pos_emb)
        try:
            yield
        finally:
            for mod in modules:
                del mod.forward
            for family, fn in patched:
                family.apply_rotary_pos_emb = fn


@contextmanager
def _nothing():
    yield


def regime(adapter):
    """The adapter's engine regime: None for `eager`, its `Graphs` state for `graphs`."""
    return getattr(adapter, "engine", None)


def set_regime(adapter, name: str) -> None:
    """Choose the engine regime of an adapter ('eager' | 'graphs'). The graphs state (buffers,
    captured graphs) stays with the model across switches: cells of either regime can alternate."""
    if name not in REGIMES:
        raise ValueError(f"engine {name!r} is not a regime; allowed: {', '.join(REGIMES)}")
    if name == "eager":
        adapter.engine = None
        return
    if not isinstance(getattr(adapter, "graphs_state", None), Graphs):
        adapter.graphs_state = Graphs(adapter.device)
    adapter.engine = adapter.graphs_state
