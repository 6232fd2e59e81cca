"""The measurement protocol: what a cell's numbers are and how they are computed from its records.

Timing (batch 1, greedy, device synchronised on GPU, warm-up samples not counted). Every sample is
timed `repeats` times (with `timing.subset: N`, the first N samples of the cell only: the others run
once for their answers, and every timing figure and speedup below reads the timed ones); a per-repeat statistic is computed over the samples and the cell reports
its median over the repeats plus `<name>_spread` (max - min over the repeats; 0 with one repeat):
- vision_ms: vision encoding (tower + projector), median over samples;
- select_ms: pruning overhead (the methods' own selection code inside prefill), median;
- prefill_ms: the LLM's prompt pass, pruning included, vision excluded (for SSD cells: up to the
  first token, so the fused first round counts here), median;
- ttft_ms: vision + prefill (time to first token), median;
- e2e_ms: the whole generation of one sample, median;
- decode_tokens_per_s_pooled: sum of decode tokens / sum of decode time (ratio of sums);
- decode_tokens_per_s_mean: mean over samples of each sample's decode tokens / decode time
  (mean of ratios; samples with no decode token left out). The two differ when answers differ in
  length; papers use either, so both are named.
- peak_gpu_allocated_mb (CUDA max allocated during the cell) or peak_rss_mb (the process's peak
  resident memory so far, on CPU: monotonic over the sweep).

Clock-free proxies: equal_token_average (visual tokens per layer, averaged over layers and
samples, as measured), prefill_gflops (analytic: decoder layers at the measured tokens per layer,
plus the twig's layers for TTP; vision tower excluded), kv_cache_mb (backbone KV cache after the
prompt), target_forwards_per_token (full-model forwards per output token: 1 for greedy).

With `timing.paired`, every sample of a cell is also timed with the baseline method right before
the cell's own pass (same repeats), and the speedups use those paired timings: a slow drift of the
machine over the sweep then hits both sides of each ratio alike (the sweep's baseline cell still
gives the accuracy references). It doubles the timing cost of every cell.

Relative figures, against the baseline cell of the same model and dataset in the same sweep:
relative_accuracy, agreement_with_baseline (same answer text), accuracy_diff with a paired
bootstrap 95 % interval over samples, and speedups (prefill, ttft, e2e: ratio of medians; decode:
ratio of pooled tokens/s) with a 95 % interval from a bootstrap that resamples the samples (paired
by id) and, for each sample, one of its repeats on each side.
"""
from __future__ import annotations

import statistics

import numpy as np

from harness.records import GPU_TIMES, TIMES, SampleRecord

BOOTSTRAP = 2000


# ---- clock-free proxies ---------------------------------------------------------------------
def text_shape(config) -> dict:
    t = config.text_config
    heads = t.num_attention_heads
    head_dim = getattr(t, "head_dim", None) or t.hidden_size // heads
    return {"hidden": t.hidden_size, "heads": heads, "kv_heads": getattr(t, "num_key_value_heads", heads) or heads,
            "head_dim": head_dim, "ffn": t.intermediate_size, "vocab": t.vocab_size}


def layer_flops(n: int, s: dict) -> float:
    """Multiply-adds x 2 of one Llama decoder layer over an n-token prompt (causal attention)."""
    q, kv = s["heads"] * s["head_dim"], s["kv_heads"] * s["head_dim"]
    linear = 2 * n * (s["hidden"] * (q + 2 * kv) + q * s["hidden"] + 3 * s["hidden"] * s["ffn"])
    attention = 2 * q * n * (n + 1)  # QK^T and AV over the causal half, both 2 flops per multiply-add
    return float(linear + attention)


def prefill_gflops(visual_per_layer: list[float], text_tokens: int, s: dict, extra_full_layers: int = 0,
                   num_visual: int = 0) -> float:
    """Decoder layers at their measured visual tokens, `extra_full_layers` (a twig) at the full
    prompt, and the LM head on the last position."""
    total = sum(layer_flops(int(round(v)) + text_tokens, s) for v in visual_per_layer)
    total += extra_full_layers * layer_flops(num_visual + text_tokens, s)
    total += 2 * s["hidden"] * s["vocab"]
    return total / 1e9


def kv_cache_mb(visual_per_layer: list[float], text_tokens: int, s: dict, bytes_per_value: int) -> float:
    per_token = 2 * s["kv_heads"] * s["head_dim"] * bytes_per_value
    return sum((v + text_tokens) * per_token for v in visual_per_layer) / 2 ** 20


# ---- statistics -----------------------------------------------------------------------------
def _median(xs):
    return statistics.median(xs) if xs else float("nan")


def timed(records: list[SampleRecord]) -> list[SampleRecord]:
    """The records whose timings count (timing.subset: the first N samples of a cell)."""
    return [r for r in records if r.timed]


def repeat_stats(records: list[SampleRecord]) -> list[dict]:
    """One dict of cell-level timing statistics per repeat (timed records only)."""
    records = timed(records)
    n = len(records[0].timings)
    out = []
    for j in range(n):
        t = [r.timings[j] for r in records]
        tok = [r.decode_tokens for r in records]
        dec_s = sum(x["decode_ms"] for x in t) / 1e3
        ratios = [k / (x["decode_ms"] / 1e3) for k, x in zip(tok, t) if k > 0 and x["decode_ms"] > 0]
        stats = {k: _median([x[k] for x in t]) for k in TIMES}
        stats.update({k: _median([x[k] for x in t]) for k in GPU_TIMES if all(x.get(k) is not None for x in t)})
        stats["decode_tokens_per_s_pooled"] = sum(tok) / dec_s if dec_s > 0 else float("nan")
        stats["decode_tokens_per_s_mean"] = statistics.fmean(ratios) if ratios else float("nan")
        out.append(stats)
    return out


def timing_metrics(records: list[SampleRecord]) -> dict:
    per = repeat_stats(records)
    m = {}
    for k in per[0]:
        vals = [p[k] for p in per if p[k] == p[k]]
        m[k] = _median(vals)
        m[f"{k}_spread"] = (max(vals) - min(vals)) if vals else float("nan")
    m["repeats"] = len(per)
    return m


def align(records: list[SampleRecord], baseline: list[SampleRecord]) -> tuple[list[SampleRecord], list[SampleRecord]]:
    base = {r.uid: r for r in baseline}
    common = [r for r in records if r.uid in base]
    return common, [base[r.uid] for r in common]


def _timing_arrays(recs: list[SampleRecord], key: str) -> np.ndarray:
    return np.array([[t[key] for t in r.timings] for r in recs], dtype=float)  # (samples, repeats)


def _speedup_stat(key: str):
    """The speedup statistic over (..., samples) arrays of baseline / cell times (and decode tokens)."""
    if key == "decode":
        def stat(bt, bk, ct, ck):  # pooled tokens/s ratio: (ck / ct) / (bk / bt)
            cs, bs = ct.sum(-1), bt.sum(-1)
            with np.errstate(divide="ignore", invalid="ignore"):
                out = (ck.sum(-1) / cs) / (bk.sum(-1) / bs)
            return np.where((cs > 0) & (bs > 0), out, np.nan)
    else:
        def stat(bt, bk, ct, ck):
            cm = np.median(ct, -1)
            with np.errstate(divide="ignore", invalid="ignore"):
                return np.where(cm > 0, np.median(bt, -1) / cm, np.nan)
    return stat


def speedup(records: list[SampleRecord], baseline: list[SampleRecord], key: str, seed: int = 0) -> tuple[float, float, float]:
    """(point, low, high): the cell's speedup over the baseline for `key` (a TIMES entry or
    'decode'), point from per-sample medians over repeats, 95 % bootstrap interval (BOOTSTRAP
    draws, each resampling the samples and one repeat per sample on each side)."""
    cell, base = align(timed(records), timed(baseline))
    col = "decode_ms" if key == "decode" else key
    ct, bt = _timing_arrays(cell, col), _timing_arrays(base, col)
    ck = np.array([r.decode_tokens for r in cell], dtype=float)
    bk = np.array([r.decode_tokens for r in base], dtype=float)
    stat = _speedup_stat(key)
    point = float(stat(np.median(bt, 1), bk, np.median(ct, 1), ck))
    rng = np.random.default_rng(seed)
    n = len(cell)
    idx = rng.integers(0, n, (BOOTSTRAP, n))
    rb = rng.integers(0, bt.shape[1], (BOOTSTRAP, n))
    rc = rng.integers(0, ct.shape[1], (BOOTSTRAP, n))
    draws = stat(bt[idx, rb], bk[idx], ct[idx, rc], ck[idx])
    draws = draws[~np.isnan(draws)]
    if not len(draws):
        return point, float("nan"), float("nan")
    return point, float(np.percentile(draws, 2.5)), float(np.percentile(draws, 97.5))


def accuracy_diff(records: list[SampleRecord], baseline: list[SampleRecord], seed: int = 0) -> tuple[float, float, float]:
    """Mean paired score difference (cell - baseline) and its 95 % paired-bootstrap interval."""
    cell, base = align(records, baseline)
    d = np.array([c.score - b.score for c, b in zip(cell, base)], dtype=float)
    rng = np.random.default_rng(seed)
    means = d[rng.integers(0, len(d), (BOOTSTRAP, len(d)))].mean(1)
    return float(d.mean()), float(np.percentile(means, 2.5)), float(np.percentile(means, 97.5))


def paired_reference(records: list[SampleRecord]) -> list[SampleRecord]:
    """The baseline timings taken beside each sample of a cell (timing.paired), as records."""
    return [r.paired_reference() for r in records]


def relative_metrics(records: list[SampleRecord], baseline: list[SampleRecord]) -> dict:
    cell, base = align(records, baseline)
    if not cell:
        return {}
    paired = any(r.baseline_timings is not None for r in cell)
    timed_base = paired_reference(cell) if paired else base
    acc = statistics.fmean(r.score for r in cell)
    base_acc = statistics.fmean(r.score for r in base)
    m = {"relative_accuracy": acc / base_acc if base_acc > 0 else float("nan"),
         "agreement_with_baseline": statistics.fmean(float(c.prediction == b.prediction)
                                                     for c, b in zip(cell, base))}
    m["accuracy_diff"], m["accuracy_diff_ci_low"], m["accuracy_diff_ci_high"] = accuracy_diff(cell, base)
    for name, key in (("prefill", "prefill_ms"), ("ttft", "ttft_ms"), ("e2e", "e2e_ms"), ("decode", "decode")):
        p, lo, hi = speedup(cell, timed_base, key)
        if p == p:
            m[f"{name}_speedup"], m[f"{name}_speedup_ci_low"], m[f"{name}_speedup_ci_high"] = p, lo, hi
    return m
