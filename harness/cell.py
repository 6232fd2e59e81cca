"""One cell: a method (and decoding) on one model over a dataset's samples, timed by the protocol of
`harness.measure`, into typed records (`harness.records`) and the cell's metrics.

    method = cell.build() -> bind, configure -> per sample: [baseline beside it] + the cell's pass,
    `timing.repeats` times -> SampleRecord -> aggregate (+ relative figures against the baseline)
"""
from __future__ import annotations

import resource
import statistics
import sys
import time

import torch

from harness import measure, roofline
from harness.contract import ModelShape, build_method, draft_source
from harness.data import score
from harness.engine.generate import generate, sync
from harness.engine.graphs import regime, set_regime
from harness.engine.speculative import speculative_generate
from harness.experiment import Cell
from harness.models.adapter import DTYPES, ModelAdapter
from harness.records import CellResult, SampleRecord


_DRAFTS: dict = {}  # (model, draft path) -> draft model, for the model in memory


def forget_drafts() -> None:
    """Drop the loaded draft models (the workspace loads another model)."""
    _DRAFTS.clear()


def draft_for(adapter: ModelAdapter, method, decoding: dict):
    """The draft model of an SSD cell: the method's own when it holds the one asked for (TTP with
    the same twig), else loaded once per model."""
    source = draft_source()
    path = source.resolve(decoding["twig"])
    own = method.own_draft(path)
    if own is not None:
        return own
    key = (id(adapter.model), str(path))
    if key not in _DRAFTS:
        _DRAFTS[key] = source.load(path, adapter.model)
    return _DRAFTS[key]


def _peak_memory(device) -> dict:
    if torch.device(device).type == "cuda":
        return {"peak_gpu_allocated_mb": torch.cuda.max_memory_allocated(device) / 2 ** 20}
    return {"peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}  # KiB on Linux


def timed_pass(adapter: ModelAdapter, method, x: dict, max_new_tokens: int, ssd: dict | None = None, twig=None,
               sample=None):
    """One generation of a processed prompt `x` (greedy, or SSD with `twig` as its draft), timed
    between device syncs: (engine record, SSD stats or None, wall ms)."""
    sync(adapter.device)
    t0 = time.perf_counter()
    if not ssd:
        rec, stats = generate(adapter, x["input_ids"], x["pixel_values"], method, max_new_tokens, sample=sample), None
    else:
        rec, stats = speculative_generate(adapter, x["input_ids"], x["pixel_values"], method, twig, max_new_tokens,
                                          delta=ssd["delta"], theta=ssd["theta"], sample=sample)
    sync(adapter.device)
    return rec, stats, (time.perf_counter() - t0) * 1e3


class CellRunner:
    """A cell's method, draft and protocol, ready to measure one sample at a time (the native
    sweep's run_cell and the lmms-eval model share it): `warm` runs a sample untimed; `measure`
    times it `repeats` times (the baseline beside every repeat with timing.paired) into a record."""

    def __init__(self, adapter: ModelAdapter, cell: Cell, max_new_tokens: int | None = None,
                 repeats: int | None = None):
        self.adapter, self.cell = adapter, cell
        self.max_new_tokens = max_new_tokens or cell.generation["max_new_tokens"]
        self.repeats = repeats or cell.timing["repeats"]
        set_regime(adapter, cell.model.get("engine", "eager"))
        self.method = cell.build()
        self.method.bind(adapter)
        self.method.configure(ModelShape(adapter.num_layers, adapter.num_visual))
        self.ssd = cell.decoding
        self.twig = draft_for(adapter, self.method, self.ssd) if self.ssd else None
        self.shape = measure.text_shape(adapter.model.config)
        self.value_bytes = torch.finfo(DTYPES[adapter.dtype_name]).bits // 8
        self.peaks = roofline.measure_peaks(adapter.device, DTYPES[adapter.dtype_name])  # once per device, cached
        self.paired = bool(cell.timing.get("paired")) and not cell.is_reference
        self.reference = build_method("baseline") if self.paired else None
        self.mismatches = 0  # repeats whose tokens differed from the first pass

    def decode(self, sample, x: dict, max_new_tokens: int | None = None):
        return timed_pass(self.adapter, self.method, x, max_new_tokens or self.max_new_tokens, self.ssd, self.twig,
                          sample)

    def warm(self, sample, x: dict, max_new_tokens: int | None = None) -> None:
        self.decode(sample, x, max_new_tokens)

    def timed_reference(self, sample, x: dict, max_new_tokens: int) -> tuple[dict, int]:
        """The baseline (greedy, every token) on the same sample, right before the cell's own pass."""
        adapter = self.adapter
        sync(adapter.device)
        t0 = time.perf_counter()
        rec = generate(adapter, x["input_ids"], x["pixel_values"], self.reference, max_new_tokens, sample=sample)
        sync(adapter.device)
        return _timing(rec, (time.perf_counter() - t0) * 1e3), len(rec.tokens) - 1

    def bounds(self, rec, text_tokens: int, decode_tokens: int) -> dict:
        """The roofline of a sample's prefill (its layers at their measured tokens, the twig's at the
        full prompt) and of greedy decoding of its decode tokens over what prefill cached."""
        kv = [v + text_tokens for v in rec.visual_per_layer]
        pre = roofline.prefill_bound_s(rec.visual_per_layer, text_tokens, self.shape, self.peaks, self.value_bytes,
                                       self.method.extra_prefill_layers, self.adapter.num_visual)
        dec = roofline.decode_bound_s(kv, decode_tokens, self.shape, self.peaks, self.value_bytes)
        return {"bound_prefill_ms": pre * 1e3, "bound_decode_ms": dec * 1e3}

    def measure(self, sample, x: dict, max_new_tokens: int | None = None, bar=None, timed: bool = True) -> SampleRecord:
        """The sample's record (score left at NaN for the caller's scorer); `timed` False: one pass
        for its answer, outside timing.subset (no repeats, no paired baseline)."""
        adapter, max_new = self.adapter, max_new_tokens or self.max_new_tokens
        timings, first, ref_timings, ref_tokens = [], None, [], 0
        for _ in range(self.repeats if timed else 1):
            if self.paired and timed:
                t, ref_tokens = self.timed_reference(sample, x, max_new)
                ref_timings.append(t)
            rec, stats, wall_ms = self.decode(sample, x, max_new)
            timings.append(_timing(rec, wall_ms))
            if first is None:
                first = (rec, stats)
            elif rec.tokens != first[0].tokens:
                self.mismatches += 1
            if bar is not None:
                bar.update()
        rec, stats = first
        text_tokens = x["input_ids"].shape[1] - adapter.num_visual
        spec = {} if stats is None else {"target_forwards": stats.target_forwards, "drafted": stats.drafted,
                                         "accepted": stats.accepted, "rounds": len(stats.rounds)}
        paired_fields = ({"baseline_timings": ref_timings, "baseline_decode_tokens": ref_tokens}
                         if self.paired and timed else {})
        return SampleRecord(
            uid=sample.uid, qtype=getattr(sample, "qtype", ""), question=getattr(sample, "question", ""),
            answer=getattr(sample, "answer", ""), prediction=rec.text, tokens=rec.tokens, score=float("nan"),
            new_tokens=len(rec.tokens), decode_tokens=len(rec.tokens) - (1 if stats is None else stats.first_tokens),
            timings=timings, equal_token_average=rec.equal_token_average,
            prefill_gflops=measure.prefill_gflops(rec.visual_per_layer, text_tokens, self.shape,
                                                  self.method.extra_prefill_layers, adapter.num_visual),
            kv_cache_mb=measure.kv_cache_mb(rec.visual_per_layer, text_tokens, self.shape, self.value_bytes),
            visual_per_layer=rec.visual_per_layer, keep={str(k): v for k, v in rec.keep.items()},
            **self.bounds(rec, text_tokens, len(rec.tokens) - (1 if stats is None else stats.first_tokens)),
            merged={str(k): {str(p): src for p, src in v.items()} for k, v in rec.merged.items()},
            timed=timed, **paired_fields, **spec)

    def params(self, records: list[SampleRecord], warmup: int) -> dict:
        """The cell's MLflow params."""
        adapter, method, ssd, cell = self.adapter, self.method, self.ssd, self.cell
        if ssd:
            params_ssd = {"decoding": "ssd", "ssd_twig": ssd["twig"], "ssd_delta": ssd["delta"],
                          "ssd_theta": ssd["theta"], "ssd_K": self.twig.K, "ssd_T": self.twig.T}
        else:
            params_ssd = {"decoding": "greedy"}
        # a budget-free cell names the visual tokens it processed (baseline: all, blind: none), so
        # that a chart against budget_tokens has it on it
        tokens = {} if method.budget is not None else {
            "budget_tokens": int(round(statistics.fmean(r.equal_token_average for r in records)))}
        return {**tokens, **method.params(), **params_ssd, "model": adapter.name, "dtype": adapter.dtype_name,
                "attn_implementation": adapter.attn_implementation,
                "engine": "graphs" if regime(adapter) is not None else "eager", "num_layers": adapter.num_layers,
                "num_visual": adapter.num_visual, "max_new_tokens": self.max_new_tokens, "warmup": warmup,
                "repeats": self.repeats, "paired_timing": self.paired, "timed_samples": sum(r.timed for r in records),
                "dataset": cell.dataset["name"],
                "split": cell.dataset["split"], "cell": cell.label, "series": cell.series, "cell_hash": cell.hash}

    def result(self, records: list[SampleRecord], warmup: int, start_ms: int,
               baseline: list[SampleRecord] | None = None, extra_params: dict | None = None,
               extra_metrics: dict | None = None, artifacts: dict | None = None) -> CellResult:
        """Records -> the cell's params and metrics (relative ones against `baseline`; a baseline
        cell is its own reference)."""
        metrics = {**aggregate(records), **_peak_memory(self.adapter.device),
                   "repeat_token_mismatches": self.mismatches, **(extra_metrics or {})}
        reference = records if self.cell.is_reference and baseline is None else baseline
        if reference is not None:
            metrics.update(measure.relative_metrics(records, reference))
        params = {**self.params(records, warmup), **(extra_params or {})}
        return CellResult(self.cell, params, metrics, records, start_ms, int(time.time() * 1000), artifacts or {})


def run_cell(adapter: ModelAdapter, cell: Cell, samples: list, inputs: list[dict], max_new_tokens: int | None = None,
             warmup: int | None = None, baseline: list[SampleRecord] | None = None, repeats: int | None = None,
             progress: bool = False) -> CellResult:
    """One cell over the samples (`inputs`: their processed prompts); every sample is timed
    `repeats` times (the tokens of the first pass are the record's, the others must match).
    Relative metrics compare with `baseline`'s records; a baseline cell is its own reference."""
    start_ms = int(time.time() * 1000)
    warmup = cell.timing["warmup"] if warmup is None else warmup
    runner = CellRunner(adapter, cell, max_new_tokens, repeats)
    for s, x in list(zip(samples, inputs))[:warmup]:  # untimed warm-up, results discarded
        runner.warm(s, x)
    if adapter.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(adapter.device)
    records = []
    subset = cell.timing.get("subset")
    bar = progress_bar(len(samples) * runner.repeats, cell.label, progress, leave=False, position=1)
    for i, (s, x) in enumerate(zip(samples, inputs)):
        rec = runner.measure(s, x, bar=bar, timed=subset is None or i < subset)
        rec.score = score(s, rec.prediction)
        records.append(rec)
    bar.close()
    return runner.result(records, warmup, start_ms, baseline)


def _timing(rec, wall_ms: float) -> dict:
    return {"vision_ms": rec.vision_ms, "select_ms": rec.select_ms, "prefill_ms": rec.prefill_ms,
            "ttft_ms": rec.vision_ms + rec.prefill_ms, "decode_ms": rec.decode_ms, "e2e_ms": wall_ms,
            **{f"gpu_{k}": v for k, v in rec.gpu.items() if v is not None}}


def aggregate(records: list[SampleRecord]) -> dict:
    """The cell's own figures (no baseline needed): accuracy, timing, proxies, SSD counters."""
    m = {"accuracy": statistics.fmean(r.score for r in records), "samples": len(records),
         **measure.timing_metrics(records)}
    for k in ("equal_token_average", "prefill_gflops", "kv_cache_mb"):
        m[k] = statistics.fmean(getattr(r, k) for r in records)
    new = sum(r.new_tokens for r in records)
    if records[0].drafted is not None:
        drafted = sum(r.drafted for r in records)
        m["acceptance_rate"] = sum(r.accepted for r in records) / drafted if drafted else 0.0
        m["mean_accepted_length"] = new / max(1, sum(r.rounds for r in records))
        m["target_forwards_per_token"] = sum(r.target_forwards for r in records) / max(1, new)
    else:
        m["target_forwards_per_token"] = 1.0  # greedy: one full forward per output token
    m.update(roofline_metrics(records))
    for t in sorted({r.qtype for r in records}):
        m[f"accuracy_{t}"] = statistics.fmean(r.score for r in records if r.qtype == t)
    return m


def roofline_metrics(records: list[SampleRecord]) -> dict:
    """bound / measured over the timed samples (each sample's median repeat): prefill, decode
    (SSD: against greedy decoding's bound, so above 1 means faster than plain decoding can be) and
    both together."""
    recs = [r for r in measure.timed(records) if r.bound_prefill_ms is not None]
    if not recs:
        return {}
    med = {k: sum(statistics.median(t[k] for t in r.timings) for r in recs) for k in ("prefill_ms", "decode_ms")}
    bp, bd = sum(r.bound_prefill_ms for r in recs), sum(r.bound_decode_ms for r in recs)
    return {"prefill_roofline_fraction": roofline.fraction(bp, med["prefill_ms"]),
            "decode_roofline_fraction": roofline.fraction(bd, med["decode_ms"]),
            "roofline_fraction": roofline.fraction(bp + bd, med["prefill_ms"] + med["decode_ms"])}


def progress_bar(total: int, desc: str, enabled: bool, leave: bool = True, position: int = 0):
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, disable=not enabled, leave=leave, file=sys.stderr, dynamic_ncols=True,
                position=position, mininterval=0.5 if sys.stderr.isatty() else 30)


