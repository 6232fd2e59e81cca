"""The engine: prefill and greedy decoding over a transformers LLaVA's own decoder layers.

Stages are plain functions with their state passed explicitly (gpt-fast style):

    encode_vision -> prefill (layer loop; methods may drop visual tokens after named layers)
                  -> decode_step ... (greedy)            == generate()

The layers are the model's own modules (its weights, its SDPA or eager attention); nothing is
patched. After pruning, later layers see fewer rows: the engine slices hidden states, position ids
and rotary cos/sin with the keep index, so kept tokens keep their original positions, and each
layer caches only what it saw. Decode positions continue from the *unpruned* prompt length.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch
from transformers import DynamicCache

from harness.contract import LayerContext, Method, ModelShape, Reduced, Selection, VisionContext
from harness.engine.graphs import StaticCache, regime
from harness.layers import Rows, attention_rows, forward
from harness.models.adapter import ModelAdapter


# ------------------------------------------------------------------------------ helpers

def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def mark(device: torch.device):
    """A CUDA event recorded now on the current stream (None off CUDA): stage times on the GPU's
    own clock, read once the stream has been synchronised (gpu_ms)."""
    if device.type != "cuda":
        return None
    event = torch.cuda.Event(enable_timing=True)
    event.record()
    return event


def gpu_ms(start, end) -> float | None:
    return start.elapsed_time(end) if start is not None and end is not None else None


def new_cache(adapter: ModelAdapter, name: str = "backbone", num_layers: int | None = None, reserve: int = 64):
    """A KV cache for a model part ("backbone", "twig") in the adapter's regime: a DynamicCache
    (eager), or a static one with `reserve` entries per layer beyond the prompt (graphs)."""
    eng = regime(adapter)
    if eng is None:
        return DynamicCache(config=adapter.model.config.text_config) if name == "backbone" else DynamicCache()
    return eng.new_cache(name, num_layers or adapter.num_layers, reserve, adapter.rotary)


def method_caches(adapter: ModelAdapter, reserve: int):
    """LayerContext.new_cache for a prefill: static caches in the graphs regime, else None. Their
    names are the method's own ("method:<name>"), apart from the engine's (backbone, SSD's twig)."""
    if regime(adapter) is None:
        return None
    return lambda name, num_layers: new_cache(adapter, f"method:{name}", num_layers, reserve)


def host_keep(keep: dict) -> dict:
    """Kept indices as lists (prefill keeps them on the device until its clock stops)."""
    return {k: v.tolist() if isinstance(v, torch.Tensor) else v for k, v in keep.items()}


# ------------------------------------------------------------------------------ records

@dataclass
class Prefill:
    """State that prefill hands to decoding."""
    cache: DynamicCache
    logits: torch.Tensor  # (vocab,) at the last prompt token
    prompt_len: int  # unpruned prompt length: decode positions continue from here
    visual_per_layer: list[int]  # visual tokens each layer processed
    keep: dict[int, list[int]]  # after-layer -> original visual indices kept (-1: before the LLM)
    merged: dict[int, dict[int, list[int]]]  # after-layer -> {merged token's patch id: its patches}
    vision_ms: float = 0.0
    prefill_ms: float = 0.0
    select_ms: float = 0.0  # time spent in methods' selection (pruning overhead), inside prefill
    gpu: dict = field(default_factory=dict)  # CUDA-event stage times (vision_ms, prefill_ms) on a GPU


@dataclass
class Record:
    tokens: list[int]
    text: str
    vision_ms: float
    prefill_ms: float
    select_ms: float
    decode_ms: float
    visual_per_layer: list[int]
    keep: dict[int, list[int]] = field(default_factory=dict)
    merged: dict[int, dict[int, list[int]]] = field(default_factory=dict)
    gpu: dict = field(default_factory=dict)  # CUDA-event stage times: vision_ms, prefill_ms, decode_ms

    @property
    def equal_token_average(self) -> float:
        return sum(self.visual_per_layer) / len(self.visual_per_layer)


# ------------------------------------------------------------------------------ stages

def encode_vision(adapter: ModelAdapter, pixel_values: torch.Tensor, method: Method, sample=None) -> Reduced:
    """The visual tokens the LLM sees: the model's own, or what the method's vision stage makes."""
    states = adapter.vision_hidden_states(pixel_values)
    memo: dict = {}

    def once(key, fn):
        return lambda: memo[key] if key in memo else memo.setdefault(key, fn())

    default = once("default", lambda: adapter.default_features(states))
    ctx = VisionContext(default, once("tower", lambda: adapter.tower_state(states)), adapter.project,
                        ModelShape(adapter.num_layers, adapter.num_visual), sample, adapter.grids)
    reduced = method.vision(ctx)
    if reduced is None:
        feats = default()
        return Reduced(feats, torch.arange(feats.shape[0], device=feats.device))
    return reduced


@dataclass
class Sequence(Rows):
    """The (possibly pruned) rows entering the next layer, and what prefill has logged so far."""
    visual_rows: torch.Tensor  # one contiguous block starting at `start`
    patch_ids: torch.Tensor
    start: int  # rows before the image (never pruned)
    shape: ModelShape
    sample: object = None
    keep: dict = field(default_factory=dict)
    merged: dict = field(default_factory=dict)
    visual_per_layer: list = field(default_factory=list)
    select_s: float = 0.0
    grids: list | None = None
    events: list = field(default_factory=list)  # CUDA events at the stage boundaries so far
    new_cache: object = None  # caches for the method's own passes (graphs regime), see LayerContext

    def context(self, layer_idx, attention) -> LayerContext:
        return LayerContext(layer_idx, self.hidden, self.visual_rows, self.patch_ids, attention, self.shape,
                            self.sample, self.positions, (self.cos, self.sin), self.grids, self.new_cache)


def embed_prompt(adapter: ModelAdapter, input_ids: torch.Tensor, vis: Reduced, sample=None) -> Sequence:
    """Token embeddings with the visual tokens in place (a shorter prompt if the vision stage
    changed their number)."""
    device = adapter.device
    ids = input_ids[0]
    image_slots = (ids == adapter.image_token_id).nonzero().flatten()
    m = adapter.num_visual
    if len(image_slots) != m:
        raise ValueError(f"prompt has {len(image_slots)} image tokens, the model expects {m}")
    feats, patch_ids = vis.features, vis.patch_ids.to(device)
    start = int(image_slots[0])
    if feats.shape[0] != m:  # a contiguous shorter prompt
        ids = torch.cat([ids[:start], ids[image_slots[:1]].expand(feats.shape[0]), ids[image_slots[-1] + 1:]])
    hidden = adapter.embed(ids[None])
    hidden[0, start:start + feats.shape[0]] = feats.to(hidden.dtype)
    positions = torch.arange(hidden.shape[1], device=device)
    cos, sin = adapter.rotary(hidden, positions[None])
    seq = Sequence(hidden, positions, cos, sin, torch.arange(start, start + feats.shape[0], device=device),
                   patch_ids, start, ModelShape(adapter.num_layers, m), sample, grids=adapter.grids())
    if feats.shape[0] != m or vis.merged:
        seq.keep[-1] = patch_ids.tolist()
    if vis.merged:
        seq.merged[-1] = vis.merged
    return seq


def prune(adapter: ModelAdapter, seq: Sequence, method: Method, layer_idx: int, attention) -> None:
    """Let the method choose the visual tokens that go on after `layer_idx`; update `seq` in place
    (labelled "twigbench.prune" in profiles: shape_check --gaps names the host work a GPU waits for)."""
    with torch.profiler.record_function("twigbench.prune"):
        _prune(adapter, seq, method, layer_idx, attention)


def _prune(adapter: ModelAdapter, seq: Sequence, method: Method, layer_idx: int, attention) -> None:
    ts = time.perf_counter()
    sel = method.select(seq.context(layer_idx, attention))
    if not isinstance(sel, Selection):
        sel = Selection(sel)
    device, start = seq.hidden.device, seq.start
    keep = torch.sort(sel.keep.to(device)).values
    end = start + len(seq.visual_rows)
    pieces = [seq.hidden[:, :start], seq.hidden[:, start + keep]]
    pos = [seq.positions[:start], seq.positions[start + keep]]
    ids = [seq.patch_ids[keep]]
    if sel.added_hidden is not None and len(sel.added_hidden):
        pieces.append(sel.added_hidden.to(seq.hidden.dtype).view(1, -1, seq.hidden.shape[2]))
        pos.append(sel.added_positions.to(device))
        ids.append(sel.added_patch_ids.to(device))
    pieces.append(seq.hidden[:, end:])
    pos.append(seq.positions[end:])
    seq.hidden, seq.positions, seq.patch_ids = torch.cat(pieces, dim=1), torch.cat(pos), torch.cat(ids)
    seq.visual_rows = torch.arange(start, start + len(seq.patch_ids), device=device)
    seq.cos, seq.sin = adapter.rotary(seq.hidden, seq.positions[None])
    seq.keep[layer_idx] = seq.patch_ids  # read back to the host after the timed prefill (host_keep)
    if sel.merged:
        seq.merged[layer_idx] = sel.merged
    seq.select_s += time.perf_counter() - ts


def run_layers(adapter: ModelAdapter, seq: Sequence, method: Method, cache, first: int, last: int,
               before_prune=None) -> Sequence:
    """Backbone layers first..last-1 over `seq` (appending to their caches), pruning after the
    method's layers; `before_prune(i, seq)` sees layer i's output before any pruning (every layer
    in the eager regime; in the graphs regime only at pruning points and at last - 1).
    first == 0 also runs the method's prepare hook and its pruning on the input embeddings."""
    if first == 0:
        ts = time.perf_counter()
        method.prepare(seq.context(-1, None))
        seq.select_s += time.perf_counter() - ts
        if before_prune is not None:
            before_prune(-1, seq)
        if -1 in method.prune_layers:
            prune(adapter, seq, method, -1, None)
    if isinstance(cache, StaticCache):
        return _run_segments(adapter, seq, method, cache, first, last, before_prune)

    def after(layer, layer_input):
        i = layer.self_attn.layer_idx
        seq.visual_per_layer.append(len(seq.visual_rows))  # what layer i processed (pruning follows)
        if before_prune is not None:
            before_prune(i, seq)
        if i in method.prune_layers:
            keys, c, s = cache.layers[i].keys, seq.cos, seq.sin
            prune(adapter, seq, method, i, lambda rows: attention_rows(layer, layer_input, rows, c, s, keys))

    return forward(adapter.layers[first:last], seq, cache, adapter.implicit_causal, after)


def _run_segments(adapter: ModelAdapter, seq: Sequence, method: Method, cache: StaticCache, first: int, last: int,
                  before_prune=None) -> Sequence:
    """The graphs regime's run_layers: one captured pass per run of layers between pruning points."""
    if first >= last:
        return seq
    stops = sorted({i for i in method.prune_layers if first <= i < last - 1} | {last - 1})
    a = first
    for b in stops:
        want = b in method.prune_layers
        hidden, layer_input, _ = regime(adapter).run(adapter.layers[a:b + 1], cache, adapter.rotary,
                                                     adapter.implicit_causal, hidden=seq.hidden,
                                                     positions=seq.positions, want_last_input=want)
        seq.hidden = hidden
        seq.visual_per_layer += [len(seq.visual_rows)] * (b + 1 - a)
        if before_prune is not None:
            before_prune(b, seq)
        if want:
            layer, keys, c, s = adapter.layers[b], cache.layers[b].keys, seq.cos, seq.sin
            prune(adapter, seq, method, b, lambda rows: attention_rows(layer, layer_input, rows, c, s, keys))
        a = b + 1
    return seq


def start_prompt(adapter: ModelAdapter, input_ids: torch.Tensor, pixel_values: torch.Tensor, method: Method,
                 sample=None) -> tuple[Sequence, float, float]:
    """The timed vision stage, then the embedded prompt: (sequence, vision ms, clock after vision)."""
    sync(adapter.device)
    t0 = time.perf_counter()
    e0 = mark(adapter.device)
    with torch.no_grad():
        vis = encode_vision(adapter, pixel_values, method, sample)
    e1 = mark(adapter.device)
    sync(adapter.device)
    t1 = time.perf_counter()
    with torch.no_grad():
        seq = embed_prompt(adapter, input_ids, vis, sample)
    seq.events = [e0, e1]
    return seq, (t1 - t0) * 1e3, t1


def prefill(adapter: ModelAdapter, input_ids: torch.Tensor, pixel_values: torch.Tensor, method: Method,
            sample=None, reserve: int = 64) -> Prefill:
    """Run the prompt through every layer, letting the method drop visual tokens after its layers.
    `reserve`: cache entries per layer for the tokens decoding will add (graphs regime)."""
    device = adapter.device
    seq, vision_ms, t1 = start_prompt(adapter, input_ids, pixel_values, method, sample)
    with torch.no_grad():
        prompt_len = seq.hidden.shape[1]  # decode positions continue from here, whatever is pruned later
        cache = new_cache(adapter, reserve=reserve)
        seq.new_cache = method_caches(adapter, reserve)
        run_layers(adapter, seq, method, cache, 0, adapter.num_layers)
        logits = adapter.logits(seq.hidden[:, -1:])[0, -1]
    e2 = mark(device)
    sync(device)
    t2 = time.perf_counter()
    e0, e1 = seq.events
    gpu = {"vision_ms": gpu_ms(e0, e1), "prefill_ms": gpu_ms(e1, e2)} if e0 is not None else {}
    return Prefill(cache, logits, prompt_len, seq.visual_per_layer, host_keep(seq.keep), seq.merged,
                   vision_ms=vision_ms, prefill_ms=(t2 - t1) * 1e3, select_ms=seq.select_s * 1e3, gpu=gpu)


def decode_step(adapter: ModelAdapter, token: int, position: int, cache) -> torch.Tensor:
    """One token through every layer; each layer attends to everything it cached."""
    with torch.no_grad():
        if isinstance(cache, StaticCache):
            return regime(adapter).run(adapter.layers, cache, adapter.rotary, adapter.implicit_causal,
                                       tokens=[token], embed=adapter.embed, first_position=position,
                                       head=adapter.logits)[2][0, -1]
        rows = adapter.rows([token], position)
        forward(adapter.layers, rows, cache, adapter.implicit_causal)
        return adapter.logits(rows.hidden)[0, -1]


def generate(adapter: ModelAdapter, input_ids: torch.Tensor, pixel_values: torch.Tensor, method: Method,
             max_new_tokens: int = 64, sample=None) -> Record:
    """Greedy decoding after a (possibly pruned) prefill; stops after EOS or max_new_tokens."""
    pre = prefill(adapter, input_ids, pixel_values, method, sample, reserve=max_new_tokens)
    eos = adapter.eos_token_id
    tokens = [int(pre.logits.argmax())]
    sync(adapter.device)
    t0 = time.perf_counter()
    e0 = mark(adapter.device)
    position = pre.prompt_len
    while len(tokens) < max_new_tokens and tokens[-1] != eos:
        logits = decode_step(adapter, tokens[-1], position, pre.cache)
        position += 1
        tokens.append(int(logits.argmax()))
    e1 = mark(adapter.device)
    sync(adapter.device)
    decode_ms = (time.perf_counter() - t0) * 1e3
    gpu = {**pre.gpu, "decode_ms": gpu_ms(e0, e1)} if e0 is not None else {}
    return Record(tokens, adapter.decode(tokens), pre.vision_ms, pre.prefill_ms, pre.select_ms,
                  decode_ms, pre.visual_per_layer, pre.keep, pre.merged, gpu)
