"""Run an experiment: every cell on every sample, aggregated and logged to MLflow.

Order: validate everything -> load the model once -> baseline cell first (relative metrics need
it) -> the other cells -> one child run per cell. A cell that fails marks its run FAILED and
stops the sweep with the error; runs already logged stay as they are.
"""
from __future__ import annotations

import statistics
import time
from dataclasses import dataclass

from harness.data import load_samples, score
from harness.engine.generate import Record, generate
from harness.engine.speculative import speculative_generate
from harness.experiment import Cell, Experiment
from harness.models.adapter import ModelAdapter, load_model
from harness.tracking import DEFAULT_TRACKING_URI, environment_tags, sweep_run
from methods import ModelShape


@dataclass
class CellResult:
    cell: Cell
    params: dict
    metrics: dict
    records: list[dict]


_TWIGS: dict = {}


def twig_for(adapter: ModelAdapter, method, decoding: dict):
    """The drafting twig of an SSD cell: the method's own (TTP with the same twig) or loaded once."""
    from methods.twigvlm.ttp import resolve_twig
    from methods.twigvlm.twig import load_twig

    path = resolve_twig(decoding["twig"])
    if getattr(method, "twig", None) is not None and getattr(method, "twig_dir", None) == path:
        return method.twig
    key = (id(adapter.model), str(path))
    if key not in _TWIGS:
        _TWIGS[key] = load_twig(path, adapter.model)
    return _TWIGS[key]


def run_cell(adapter: ModelAdapter, cell: Cell, samples: list, inputs: list[dict], max_new_tokens: int,
             warmup: int, baseline: list[dict] | None = None) -> CellResult:
    """One cell over the samples (`inputs`: their processed prompts). Relative metrics compare
    with `baseline`'s records; the first baseline cell is its own reference; without a baseline
    cell in the sweep there are no relative metrics."""
    method = cell.build()
    method.bind(adapter)
    method.configure(ModelShape(adapter.num_layers, adapter.num_visual))
    ssd = cell.decoding
    twig = twig_for(adapter, method, ssd) if ssd else None

    def decode(s, x):
        if not ssd:
            return generate(adapter, x["input_ids"], x["pixel_values"], method, max_new_tokens, sample=s), None
        return speculative_generate(adapter, x["input_ids"], x["pixel_values"], method, twig, max_new_tokens,
                                    delta=ssd["delta"], theta=ssd["theta"], sample=s)

    for s, x in list(zip(samples, inputs))[:warmup]:  # untimed warm-up, results discarded
        decode(s, x)
    records = []
    for s, x in zip(samples, inputs):
        rec, stats = decode(s, x)
        spec = {} if stats is None else {"target_forwards": stats.target_forwards, "drafted": stats.drafted,
                                         "accepted": stats.accepted, "rounds": len(stats.rounds)}
        records.append({**spec,
            "uid": s.uid, "qtype": s.qtype, "question": s.question, "answer": s.answer,
            "prediction": rec.text, "tokens": rec.tokens, "score": score(s, rec.text), "new_tokens": len(rec.tokens),
            "decode_tokens": len(rec.tokens) - (1 if stats is None else stats.first_tokens),
            "vision_ms": rec.vision_ms, "prefill_ms": rec.prefill_ms, "select_ms": rec.select_ms,
            "decode_ms": rec.decode_ms, "equal_token_average": rec.equal_token_average,
            "visual_per_layer": rec.visual_per_layer, "keep": {str(k): v for k, v in rec.keep.items()},
            "merged": {str(k): {str(p): src for p, src in v.items()} for k, v in rec.merged.items()},
        })
    if ssd:
        params_ssd = {"decoding": "ssd", "ssd_twig": ssd["twig"], "ssd_delta": ssd["delta"],
                      "ssd_theta": ssd["theta"], "ssd_K": twig.K, "ssd_T": twig.T}
    else:
        params_ssd = {"decoding": "greedy"}
    params = {**method.params(), **params_ssd, "model": adapter.name, "dtype": adapter.dtype_name,
              "attn_implementation": adapter.attn_implementation, "num_layers": adapter.num_layers,
              "num_visual": adapter.num_visual, "max_new_tokens": max_new_tokens, "cell": cell.label,
              "series": cell.series}
    reference = records if cell.method == "baseline" and baseline is None else baseline
    return CellResult(cell, params, aggregate(records, reference), records)


def aggregate(records: list[dict], baseline: list[dict] | None) -> dict:
    med = lambda k: statistics.median(r[k] for r in records)  # noqa: E731
    decode_tokens = sum(r["decode_tokens"] for r in records)  # tokens after the first (ones)
    decode_s = sum(r["decode_ms"] for r in records) / 1e3
    m = {
        "accuracy": statistics.fmean(r["score"] for r in records),
        "vision_ms": med("vision_ms"), "prefill_ms": med("prefill_ms"), "select_ms": med("select_ms"),
        "ttft_ms": statistics.median(r["vision_ms"] + r["prefill_ms"] for r in records),
        "decode_tokens_per_s": decode_tokens / decode_s if decode_s > 0 else float("nan"),
        "equal_token_average": statistics.fmean(r["equal_token_average"] for r in records),
        "samples": len(records),
    }
    if "drafted" in records[0]:
        drafted = sum(r["drafted"] for r in records)
        m["acceptance_rate"] = sum(r["accepted"] for r in records) / drafted if drafted else 0.0
        m["mean_accepted_length"] = sum(r["new_tokens"] for r in records) / max(1, sum(r["rounds"] for r in records))
        m["target_forwards_per_token"] = sum(r["target_forwards"] for r in records) / sum(r["new_tokens"] for r in records)
    for t in sorted({r["qtype"] for r in records}):
        m[f"accuracy_{t}"] = statistics.fmean(r["score"] for r in records if r["qtype"] == t)
    if baseline is not None:
        base = {r["uid"]: r for r in baseline}
        base_acc = statistics.fmean(r["score"] for r in baseline)
        m["relative_accuracy"] = m["accuracy"] / base_acc if base_acc > 0 else float("nan")
        m["agreement_with_baseline"] = statistics.fmean(
            float(r["prediction"] == base[r["uid"]]["prediction"]) for r in records)
        m["prefill_speedup"] = statistics.median(r["prefill_ms"] for r in baseline) / m["prefill_ms"]
        base_tokens = sum(r["decode_tokens"] for r in baseline)
        base_s = sum(r["decode_ms"] for r in baseline) / 1e3
        if base_s > 0 and decode_s > 0:
            m["decode_speedup"] = m["decode_tokens_per_s"] / (base_tokens / base_s)
    return m


def run_experiment(exp: Experiment, tracking_uri: str = DEFAULT_TRACKING_URI, progress=print) -> tuple[str, list[CellResult]]:
    adapter = load_model(exp.model["path"], exp.model["dtype"], exp.model["attn_implementation"])
    samples = load_samples(exp.dataset["name"], exp.dataset["split"], exp.dataset["samples_per_type"])
    inputs = [adapter.inputs(s.image, s.question) for s in samples]  # once, shared by every cell
    cells = sorted(exp.cells, key=lambda c: c.method != "baseline")  # baseline first
    results: list[CellResult] = []
    baseline = None
    sweep_params = {"model": exp.model["path"], "dataset": exp.dataset["name"],
                    "split": exp.dataset["split"], "samples": len(samples), "cells": len(cells),
                    "dtype": exp.model["dtype"], "attn_implementation": exp.model["attn_implementation"]}
    tags = environment_tags(str(adapter.device))
    run_name = f"sweep-{time.strftime('%Y%m%d-%H%M%S')}"
    with sweep_run(tracking_uri, exp.name, run_name, sweep_params, tags, exp.source) as (parent_id, log_cell):
        for i, cell in enumerate(cells, 1):
            t0 = time.perf_counter()
            res = run_cell(adapter, cell, samples, inputs, exp.generation["max_new_tokens"],
                           exp.timing["warmup"], baseline)
            res.params.update(dataset=exp.dataset["name"], split=exp.dataset["split"])
            if cell.method == "baseline" and baseline is None:
                baseline = res.records
            log_cell(cell.label, res.params, res.metrics, res.records)
            results.append(res)
            progress(f"[{i}/{len(cells)}] {cell.label:<28} acc {res.metrics['accuracy']:.3f}  "
                     f"prefill {res.metrics['prefill_ms']:.2f} ms  "
                     f"eq-tokens {res.metrics['equal_token_average']:.1f}  "
                     f"({time.perf_counter() - t0:.0f} s)")
    return parent_id, results
