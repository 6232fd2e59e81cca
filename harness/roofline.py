"""The physical bound of a cell's work on a device: `roofline_fraction = bound / measured`.

Peaks. `measure_peaks(device)` times, once per (device, dtype), a square matmul in the model dtype
(8192^3 on CUDA, 512^3 on CPU) and a device-to-device copy (1 GiB on CUDA, 64 MiB on CPU; bytes
counted read + written), each after a warm-up, as the median of several runs (CUDA events on CUDA,
time.perf_counter on CPU). These are achieved peaks, not datasheet numbers, so a fraction near 1
is reachable.

Cost of one Llama decoder layer for a forward of q new rows over a cache of kv prior entries
(shape dict as `harness.measure.text_shape`; Q = heads * head_dim, KV = kv_heads * head_dim,
H = hidden, F = ffn, b = bytes per value):
    FLOPs = 2 q (H (Q + 2 KV) + Q H + 3 H F)            linear: qkv, o, gate/up/down
          + 2 * 2 * Q * q * (kv + (q + 1) / 2)          QK^T and AV, causal within the q rows
    bytes = b (H (Q + 2 KV) + Q H + 3 H F + 2 H)         the layer's weights once (2 RMSNorms)
          + b 2 KV (kv + q)                              reading keys and values, new rows included
          + b 2 KV q                                     writing the q new entries
          + b 2 q H                                      activations in and out
With kv = 0 the FLOPs are exactly `measure.layer_flops(q, s)` (same linear terms, and
2 * 2 * Q * q * (q + 1) / 2 = 2 Q q (q + 1)); `measure.py` counts no bytes.

LM head over r projected rows: FLOPs = 2 r H V, bytes = b (H V + H) (the weights and the final
norm) + b r (H + V) (hidden in, logits out). The embedding lookup reads r rows of H values and is
left out (a few KB against GBs of weights).

Bound of a layer = max(FLOPs / peak_flops, bytes / peak_bandwidth); a pass runs its layers one
after another, so its bound is the SUM of its layers' bounds (never the max of summed FLOPs and
summed bytes, which would let one layer's compute hide another's memory traffic).
"""
from __future__ import annotations

import math
import platform
import statistics
import time
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Peaks:
    """Achieved peaks of a device: FLOP/s of a matmul in `dtype`, bytes/s of a copy (read + write)."""
    flops: float
    bandwidth: float
    device_name: str
    dtype: str
    method: str = "given"
    matmul_n: int = 0
    copy_bytes: int = 0
    repeats: int = 0


_PEAKS: dict[tuple[str, torch.dtype], Peaks] = {}


# ---- peaks ----------------------------------------------------------------------------------
def _device_key(device) -> torch.device:
    d = torch.device(device)
    if d.type == "cuda" and d.index is None:
        d = torch.device("cuda", torch.cuda.current_device())
    return d


def _time_cuda(fn, warmup: int, repeats: int) -> float:
    """Median seconds of `fn` over `repeats` runs timed by CUDA events, after `warmup` runs."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    return statistics.median(times)


def _time_cpu(fn, warmup: int, repeats: int) -> float:
    """Median seconds of `fn` over `repeats` runs timed by time.perf_counter, after `warmup` runs."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def _matmul_seconds(n: int, dtype: torch.dtype, d: torch.device, timer, warmup: int, repeats: int) -> float:
    a, b = torch.randn(n, n, dtype=dtype, device=d), torch.randn(n, n, dtype=dtype, device=d)
    out = torch.empty(n, n, dtype=dtype, device=d)
    return timer(lambda: torch.matmul(a, b, out=out), warmup, repeats)


def _copy_seconds(nbytes: int, d: torch.device, timer, warmup: int, repeats: int) -> float:
    src = torch.ones(nbytes // 4, dtype=torch.float32, device=d)  # a copy moves bytes: dtype is moot
    dst = torch.empty_like(src)
    return timer(lambda: dst.copy_(src), warmup, repeats)


def measure_peaks(device, dtype: torch.dtype | None = None) -> Peaks:
    """Achieved matmul FLOP/s (2 n^3 per n x n x n product) and copy bandwidth (2 * nbytes per
    copy: read + write) on `device` in `dtype` (default float16 on CUDA, float32 on CPU).
    Measured once per (device, dtype) and cached: a second call returns the same object."""
    d = _device_key(device)
    cuda = d.type == "cuda"
    dtype = dtype or (torch.float16 if cuda else torch.float32)
    key = (str(d), dtype)
    if key in _PEAKS:
        return _PEAKS[key]
    n, copy_bytes, warmup, repeats = (8192, 2 ** 30, 3, 10) if cuda else (512, 2 ** 26, 1, 5)
    timer = _time_cuda if cuda else _time_cpu
    mm_s = _matmul_seconds(n, dtype, d, timer, warmup, repeats)
    copy_s = _copy_seconds(copy_bytes, d, timer, warmup, repeats)
    name = torch.cuda.get_device_name(d) if cuda else (platform.processor() or platform.machine() or "cpu")
    timing = "CUDA events" if cuda else "time.perf_counter"
    peaks = Peaks(flops=2 * n ** 3 / mm_s, bandwidth=2 * copy_bytes / copy_s, device_name=name,
                  dtype=str(dtype).removeprefix("torch."),
                  method=f"matmul {n}^3 and copy of {copy_bytes} B, {timing}, median of {repeats} after {warmup} warm-up",
                  matmul_n=n, copy_bytes=copy_bytes, repeats=repeats)
    _PEAKS[key] = peaks
    return peaks


# ---- analytic costs -------------------------------------------------------------------------
def _dims(s: dict) -> tuple[int, int, int, int]:
    """(H, Q, KV, F): hidden, query width heads*head_dim, key/value width kv_heads*head_dim, ffn."""
    return s["hidden"], s["heads"] * s["head_dim"], s["kv_heads"] * s["head_dim"], s["ffn"]


def layer_params(s: dict) -> int:
    """Weights of one decoder layer: H (Q + 2 KV) + Q H + 3 H F + 2 H (two RMSNorms); with
    Q = KV = H this is 4 H^2 + 3 H F + 2 H."""
    h, q, kv, f = _dims(s)
    return h * (q + 2 * kv) + q * h + 3 * h * f + 2 * h


def lm_head_params(s: dict) -> int:
    """Weights read by the LM head: H V (the projection) + H (the final norm)."""
    return s["hidden"] * s["vocab"] + s["hidden"]


def layer_cost(q: int, kv: int, s: dict, dtype_bytes: int) -> tuple[float, float]:
    """(FLOPs, bytes) of one decoder layer over q new rows and kv cached entries:
    FLOPs = 2 q (H (Q + 2 KV) + Q H + 3 H F) + 4 Q q (kv + (q + 1) / 2);
    bytes = b (layer_params + 2 KV (kv + q) + 2 KV q + 2 q H)."""
    h, qd, kvd, f = _dims(s)
    flops = 2 * q * (h * (qd + 2 * kvd) + qd * h + 3 * h * f) + 2 * 2 * qd * q * (kv + (q + 1) / 2)
    values = layer_params(s) + 2 * kvd * (kv + q) + 2 * kvd * q + 2 * q * h
    return float(flops), float(values * dtype_bytes)


def lm_head_cost(rows: int, s: dict, dtype_bytes: int) -> tuple[float, float]:
    """(FLOPs, bytes) of the LM head over `rows` projected rows: 2 r H V; b (H V + H + r (H + V))."""
    h, v = s["hidden"], s["vocab"]
    return float(2 * rows * h * v), float((lm_head_params(s) + rows * (h + v)) * dtype_bytes)


def bound_s(cost: tuple[float, float], peaks: Peaks) -> float:
    """Roofline time of one kernel-sequential unit: max(FLOPs / peak_flops, bytes / bandwidth)."""
    flops, nbytes = cost
    return max(flops / peaks.flops, nbytes / peaks.bandwidth)


def layers_bound_s(rows: list[tuple[int, int]], s: dict, peaks: Peaks, dtype_bytes: int) -> float:
    """Sum over layers of each layer's bound; `rows` holds one (q, kv) per layer."""
    return sum(bound_s(layer_cost(q, kv, s, dtype_bytes), peaks) for q, kv in rows)


# ---- passes ---------------------------------------------------------------------------------
def prefill_bound_s(visual_per_layer: list[float], text_tokens: int, s: dict, peaks: Peaks, dtype_bytes: int,
                    extra_full_layers: int = 0, num_visual: int = 0) -> float:
    """The prompt pass (inputs as `measure.prefill_gflops`): backbone layer i at
    q_i = round(visual_per_layer[i]) + text_tokens rows and kv = 0, `extra_full_layers` (a twig)
    at q = num_visual + text_tokens, and the LM head on one row:
    sum_i max(F_i / P, B_i / W) + extra * max(F_full / P, B_full / W) + max(F_head / P, B_head / W)."""
    rows = [(int(round(v)) + text_tokens, 0) for v in visual_per_layer]
    rows += [(num_visual + text_tokens, 0)] * extra_full_layers
    return layers_bound_s(rows, s, peaks, dtype_bytes) + bound_s(lm_head_cost(1, s, dtype_bytes), peaks)


def decode_step_bound_s(kv_per_layer: list[int], s: dict, peaks: Peaks, dtype_bytes: int) -> float:
    """One greedy token: layer i at q = 1 over kv_per_layer[i] cached entries, plus the LM head
    on one row: sum_i max(F(1, kv_i) / P, B(1, kv_i) / W) + max(F_head(1) / P, B_head(1) / W)."""
    rows = [(1, kv) for kv in kv_per_layer]
    return layers_bound_s(rows, s, peaks, dtype_bytes) + bound_s(lm_head_cost(1, s, dtype_bytes), peaks)


def decode_bound_s(prompt_kv_per_layer: list[int], new_tokens: int, s: dict, peaks: Peaks, dtype_bytes: int) -> float:
    """Greedy decode of `new_tokens` steps after a prefill that left prompt_kv_per_layer[i] entries
    in layer i: sum_{j=0}^{new_tokens-1} decode_step_bound_s([kv_i + j for i])."""
    return sum(decode_step_bound_s([kv + j for kv in prompt_kv_per_layer], s, peaks, dtype_bytes)
               for j in range(new_tokens))


def ssd_round_bounds(kv_per_layer: list[int], draft_layers: int, twig_layers: int, verify_rows: int, s: dict,
                     peaks: Peaks, dtype_bytes: int, twig_kv: int | None = None) -> tuple[float, float, float]:
    """(draft_step_s, verify_s, full_step_s) of self-speculative decoding with the draft =
    backbone layers 0..K-1 (K = draft_layers) + T = twig_layers twig layers of the backbone's
    shape, with layer i holding kv_per_layer[i] entries at the start of the round:
    - draft step: layers 0..K-1 at q = 1 over kv_i, T twig layers at q = 1 over twig_kv
      (default kv_per_layer[0]: the twig caches the unpruned prompt like the shallow layers),
      plus the LM head on one row;
    - verification of n = verify_rows rows: layers K..L-1 at q = n over kv_i, plus the LM head
      on n rows (layers 0..K-1 are not rerun: their outputs for the drafts are reused);
    - full step: `decode_step_bound_s(kv_per_layer)`.
    Every term is a sum of per-layer bounds, as in `decode_step_bound_s`."""
    twig_kv = kv_per_layer[0] if twig_kv is None else twig_kv
    head_1 = bound_s(lm_head_cost(1, s, dtype_bytes), peaks)
    draft_rows = [(1, kv) for kv in kv_per_layer[:draft_layers]] + [(1, twig_kv)] * twig_layers
    draft = layers_bound_s(draft_rows, s, peaks, dtype_bytes) + head_1
    verify_layers = [(verify_rows, kv) for kv in kv_per_layer[draft_layers:]]
    verify = layers_bound_s(verify_layers, s, peaks, dtype_bytes) + bound_s(lm_head_cost(verify_rows, s, dtype_bytes), peaks)
    return draft, verify, decode_step_bound_s(kv_per_layer, s, peaks, dtype_bytes)


def expected_tokens_per_round(acceptance: float, delta: int) -> float:
    """E = (1 - alpha^(delta+1)) / (1 - alpha) for alpha < 1, delta + 1 for alpha = 1: the accepted
    drafts (a prefix, each accepted with probability alpha given the previous one was) plus the
    target's own token."""
    if not 0.0 <= acceptance <= 1.0:
        raise ValueError(f"acceptance must lie in [0, 1], got {acceptance}")
    if acceptance == 1.0:
        return float(delta + 1)
    return (1 - acceptance ** (delta + 1)) / (1 - acceptance)


def ssd_speedup_bound(acceptance: float, delta: int, draft_step_s: float, verify_s: float, full_step_s: float) -> float:
    """Analytic SSD decode speedup over greedy: E * full_step_s / (delta * draft_step_s + verify_s),
    E = expected_tokens_per_round(alpha, delta). Assumes every draft is accepted independently with
    the same probability alpha (given its predecessors were), every round drafts the full delta
    tokens (no early stop at EOS or at the confidence threshold), and `verify_s` is the
    verification of delta + 1 rows (the previous correction + delta drafts)."""
    return expected_tokens_per_round(acceptance, delta) * full_step_s / (delta * draft_step_s + verify_s)


def fraction(bound_s: float, measured_s: float | None) -> float:
    """roofline_fraction = bound_s / measured_s; nan when measured is 0, missing or nan."""
    if measured_s is None or not measured_s or math.isnan(measured_s):
        return float("nan")
    return bound_s / measured_s
