"""Run an experiment: every cell on every sample, aggregated and logged to MLflow.

Order: validate everything -> open (or reopen) the sweep's parent run -> skip the cells already
FINISHED there -> run the others, each model loaded once, the baseline of each (model, dataset)
first -> one child run per cell, logged once its baseline is known (relative figures need it).
A cell that fails is logged FAILED (with the error) and the sweep goes on; the sweep's exit status
says whether every cell finished. Running the same sweep again resumes it (see harness.tracking).

Executors: "local" runs the cells in this process; "ray" runs each cell as a Ray task asking for
`gpus_per_cell` GPUs (workers keep their loaded models between tasks) and logs the results here,
so that every result lands in the one tracking store the driver points at.
"""
from __future__ import annotations

import json
import os
import re
import resource
import statistics
import sys
import time
import traceback
from dataclasses import dataclass

import torch

from harness import measure
from harness.data import load_samples, score
from harness.engine.generate import generate, sync
from harness.engine.speculative import speculative_generate
from harness.experiment import Cell, Experiment, model_name
from harness.models.adapter import DTYPES, ModelAdapter, load_model
from harness.tracking import DEFAULT_TRACKING_URI, SweepStore, environment_tags
from methods import ModelShape, build_method


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


def _peak_memory(device) -> dict:
    if torch.device(device).type == "cuda":
        return {"peak_gpu_allocated_mb": torch.cuda.max_memory_allocated(device) / 2 ** 20}
    return {"peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}  # KiB on Linux


def run_cell(adapter: ModelAdapter, cell: Cell, samples: list, inputs: list[dict], max_new_tokens: int | None = None,
             warmup: int | None = None, baseline: list[dict] | None = None, repeats: int | None = None,
             progress: bool = False) -> CellResult:
    """One cell over the samples (`inputs`: their processed prompts); every sample is timed
    `repeats` times (the tokens of the first pass are the record's, the others must match).
    Relative metrics compare with `baseline`'s records; a baseline cell is its own reference."""
    max_new_tokens = max_new_tokens or cell.generation["max_new_tokens"]
    warmup = cell.timing["warmup"] if warmup is None else warmup
    repeats = repeats or cell.timing["repeats"]
    method = cell.build()
    method.bind(adapter)
    method.configure(ModelShape(adapter.num_layers, adapter.num_visual))
    ssd = cell.decoding
    twig = twig_for(adapter, method, ssd) if ssd else None
    shape = measure.text_shape(adapter.model.config)
    value_bytes = torch.finfo(DTYPES[adapter.dtype_name]).bits // 8
    twig_layers = getattr(method, "T", 0) if getattr(method, "twig", None) is not None else 0

    paired = cell.timing.get("paired") and not _is_reference(cell)
    reference = build_method("baseline") if paired else None

    def timed_reference(s, x) -> tuple[dict, int]:
        """The baseline (greedy, every token) on the same sample, right before the cell's own pass."""
        sync(adapter.device)
        t0 = time.perf_counter()
        rec = generate(adapter, x["input_ids"], x["pixel_values"], reference, max_new_tokens, sample=s)
        sync(adapter.device)
        return _timing(rec, (time.perf_counter() - t0) * 1e3), len(rec.tokens) - 1

    def decode(s, x):
        sync(adapter.device)
        t0 = time.perf_counter()
        if not ssd:
            rec, stats = generate(adapter, x["input_ids"], x["pixel_values"], method, max_new_tokens, sample=s), None
        else:
            rec, stats = speculative_generate(adapter, x["input_ids"], x["pixel_values"], method, twig,
                                              max_new_tokens, delta=ssd["delta"], theta=ssd["theta"], sample=s)
        sync(adapter.device)
        return rec, stats, (time.perf_counter() - t0) * 1e3

    for s, x in list(zip(samples, inputs))[:warmup]:  # untimed warm-up, results discarded
        decode(s, x)
    if adapter.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(adapter.device)
    records, mismatches = [], 0
    bar = _bar(len(samples) * repeats, cell.label, progress, leave=False, position=1)
    for s, x in zip(samples, inputs):
        timings, first, ref_timings, ref_tokens = [], None, [], 0
        for _ in range(repeats):
            if paired:
                t, ref_tokens = timed_reference(s, x)
                ref_timings.append(t)
            rec, stats, wall_ms = decode(s, x)
            timings.append(_timing(rec, wall_ms))
            if first is None:
                first = (rec, stats)
            elif rec.tokens != first[0].tokens:
                mismatches += 1
            bar.update()
        rec, stats = first
        text_tokens = x["input_ids"].shape[1] - adapter.num_visual
        spec = {} if stats is None else {"target_forwards": stats.target_forwards, "drafted": stats.drafted,
                                         "accepted": stats.accepted, "rounds": len(stats.rounds)}
        records.append({**spec,
            "uid": s.uid, "qtype": s.qtype, "question": s.question, "answer": s.answer,
            "prediction": rec.text, "tokens": rec.tokens, "score": score(s, rec.text), "new_tokens": len(rec.tokens),
            "decode_tokens": len(rec.tokens) - (1 if stats is None else stats.first_tokens),
            "timings": timings, "equal_token_average": rec.equal_token_average,
            **({"baseline_timings": ref_timings, "baseline_decode_tokens": ref_tokens} if paired else {}),
            "prefill_gflops": measure.prefill_gflops(rec.visual_per_layer, text_tokens, shape, twig_layers,
                                                     adapter.num_visual),
            "kv_cache_mb": measure.kv_cache_mb(rec.visual_per_layer, text_tokens, shape, value_bytes),
            "visual_per_layer": rec.visual_per_layer, "keep": {str(k): v for k, v in rec.keep.items()},
            "merged": {str(k): {str(p): src for p, src in v.items()} for k, v in rec.merged.items()},
        })
    bar.close()
    if ssd:
        params_ssd = {"decoding": "ssd", "ssd_twig": ssd["twig"], "ssd_delta": ssd["delta"],
                      "ssd_theta": ssd["theta"], "ssd_K": twig.K, "ssd_T": twig.T}
    else:
        params_ssd = {"decoding": "greedy"}
    params = {**method.params(), **params_ssd, "model": adapter.name, "dtype": adapter.dtype_name,
              "attn_implementation": adapter.attn_implementation, "num_layers": adapter.num_layers,
              "num_visual": adapter.num_visual, "max_new_tokens": max_new_tokens, "warmup": warmup,
              "repeats": repeats, "paired_timing": bool(paired), "dataset": cell.dataset["name"], "split": cell.dataset["split"],
              "cell": cell.label, "series": cell.series, "cell_hash": cell.hash}
    metrics = {**aggregate(records), **_peak_memory(adapter.device), "repeat_token_mismatches": mismatches}
    reference = records if _is_reference(cell) and baseline is None else baseline
    if reference is not None:
        metrics.update(measure.relative_metrics(records, reference))
    return CellResult(cell, params, metrics, records)


def _timing(rec, wall_ms: float) -> dict:
    return {"vision_ms": rec.vision_ms, "select_ms": rec.select_ms, "prefill_ms": rec.prefill_ms,
            "ttft_ms": rec.vision_ms + rec.prefill_ms, "decode_ms": rec.decode_ms, "e2e_ms": wall_ms}


def aggregate(records: list[dict]) -> dict:
    """The cell's own figures (no baseline needed): accuracy, timing, proxies, SSD counters."""
    m = {"accuracy": statistics.fmean(r["score"] for r in records), "samples": len(records),
         **measure.timing_metrics(records)}
    for k in ("equal_token_average", "prefill_gflops", "kv_cache_mb"):
        m[k] = statistics.fmean(r[k] for r in records)
    new = sum(r["new_tokens"] for r in records)
    if "drafted" in records[0]:
        drafted = sum(r["drafted"] for r in records)
        m["acceptance_rate"] = sum(r["accepted"] for r in records) / drafted if drafted else 0.0
        m["mean_accepted_length"] = new / max(1, sum(r["rounds"] for r in records))
        m["target_forwards_per_token"] = sum(r["target_forwards"] for r in records) / max(1, new)
    else:
        m["target_forwards_per_token"] = 1.0  # greedy: one full forward per output token
    for t in sorted({r["qtype"] for r in records}):
        m[f"accuracy_{t}"] = statistics.fmean(r["score"] for r in records if r["qtype"] == t)
    return m


def _bar(total: int, desc: str, enabled: bool, leave: bool = True, position: int = 0):
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, disable=not enabled, leave=leave, file=sys.stderr, dynamic_ncols=True,
                position=position, mininterval=0.5 if sys.stderr.isatty() else 30)


# ---- executing cells ------------------------------------------------------------------------
class Workspace:
    """Models, samples and processed prompts, each made once and reused across cells."""

    def __init__(self):
        self.adapters: dict[str, ModelAdapter] = {}
        self.data: dict[tuple, tuple[list, list]] = {}

    def adapter(self, model: dict) -> ModelAdapter:
        key = json.dumps(model, sort_keys=True)
        if key not in self.adapters:
            self.adapters.clear()  # one model in memory at a time
            self.data.clear()
            _TWIGS.clear()
            self.adapters[key] = load_model(model["path"], model["dtype"], model["attn_implementation"],
                                            checkpoint=model.get("checkpoint"))
        return self.adapters[key]

    def samples(self, adapter: ModelAdapter, dataset: dict) -> tuple[list, list]:
        key = (id(adapter), json.dumps(dataset, sort_keys=True))
        if key not in self.data:
            samples = load_samples(dataset["name"], dataset["split"], dataset["samples_per_type"])
            self.data[key] = samples, [adapter.inputs(s.image, s.question) for s in samples]
        return self.data[key]

    def run(self, cell: Cell, progress: bool = False) -> CellResult:
        adapter = self.adapter(cell.model)
        samples, inputs = self.samples(adapter, cell.dataset)
        return run_cell(adapter, cell, samples, inputs, progress=progress)


def _order(cells: list[Cell]) -> list[Cell]:
    """Grouped by model (each loaded once), baselines first within a model."""
    models = list(dict.fromkeys(json.dumps(c.model, sort_keys=True) for c in cells))
    return sorted(cells, key=lambda c: (models.index(json.dumps(c.model, sort_keys=True)),
                                        not _is_reference(c)))


def _is_reference(cell: Cell) -> bool:
    return cell.method == "baseline" and not cell.decoding


def local_executor(cells: list[Cell], progress: bool = True, ws: Workspace | None = None):
    """Yields (cell, CellResult or the error text) in order."""
    ws = ws or Workspace()
    for cell in _order(cells):
        try:
            yield cell, ws.run(cell, progress)
        except Exception:  # a failed cell is logged FAILED; the sweep goes on
            yield cell, traceback.format_exc(limit=6)


_WORKSPACE: Workspace | None = None


def _ray_cell(cell: Cell):
    global _WORKSPACE
    torch.set_num_threads(int(os.environ.get("TWIGBENCH_THREADS", "0")) or torch.get_num_threads())
    if _WORKSPACE is None:
        _WORKSPACE = Workspace()
    try:
        return _WORKSPACE.run(cell)
    except Exception:
        return traceback.format_exc(limit=6)


def ray_executor(cells: list[Cell], address: str | None = None, gpus_per_cell: float | None = None,
                 cpus_per_cell: float = 1, ray_init: dict | None = None):
    """Each cell a Ray task (num_gpus=gpus_per_cell; default 1 where the driver sees a GPU, else 0)."""
    import ray

    if gpus_per_cell is None:
        gpus_per_cell = 1 if torch.cuda.is_available() else 0
    started = not ray.is_initialized()
    if started:
        ray.init(address=address, **(ray_init or {}))
    try:
        task = ray.remote(num_gpus=gpus_per_cell, num_cpus=cpus_per_cell, max_retries=0)(_ray_cell)
        pending = {task.remote(c): c for c in _order(cells)}
        while pending:
            done, _ = ray.wait(list(pending), num_returns=1)
            cell = pending.pop(done[0])
            try:
                yield cell, ray.get(done[0])
            except Exception as e:  # the worker died
                yield cell, f"ray task failed: {e}"
    finally:
        if started:
            ray.shutdown()


# ---- the sweep ------------------------------------------------------------------------------
@dataclass
class SweepOutcome:
    parent_id: str
    resumed: bool
    ran: list[str]  # labels of the cells run by this invocation
    skipped: list[str]  # already FINISHED
    failed: dict  # label -> error
    metrics: dict  # label -> metrics (every finished cell)
    drift: dict = None  # baseline label -> {prefill, decode}: closing pass / first pass

    @property
    def ok(self) -> bool:
        return not self.failed


def _sweep_params(exp: Experiment) -> dict:
    return {"models": ", ".join(m["path"] for m in exp.models),
            "datasets": ", ".join(f"{d['name']}:{d['split']}x{d['samples_per_type']}" for d in exp.datasets),
            "cells": len(exp.cells), "max_new_tokens": exp.generation["max_new_tokens"],
            "warmup": exp.timing["warmup"], "repeats": exp.timing["repeats"]}


def cell_tags(cell: Cell, env: dict) -> dict:
    return {**env, "method": cell.method, "series": cell.series, "cell_hash": cell.hash,
            "model": model_name(cell.model), "dataset": f"{cell.dataset['name']}:{cell.dataset['split']}",
            "decoding": (cell.decoding or {}).get("name", "greedy")}


def run_experiment(exp: Experiment, tracking_uri: str = DEFAULT_TRACKING_URI, executor: str = "local",
                   progress: bool = True, log=print, fresh: bool = False, **executor_options) -> SweepOutcome:
    store = SweepStore(tracking_uri, exp.name)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    env = environment_tags(device)
    cells_json = json.dumps([{"label": c.label, "hash": c.hash, **c.config()} for c in exp.cells], indent=1,
                            default=str)
    resumed = store.open(exp.hash, f"sweep-{exp.name}-{exp.hash[:8]}", _sweep_params(exp), env, exp.source,
                         cells_json, fresh)
    done = store.finished_cells()
    todo = [c for c in exp.cells if c.hash not in done]
    skipped = [c.label for c in exp.cells if c.hash in done]
    if resumed:
        log(f"resuming sweep {store.parent_id}: {len(skipped)} cell(s) finished before, {len(todo)} to run")
    # the reference records of each (model, dataset) group: from this run or a finished one
    references: dict[tuple, list[dict] | None] = {}
    for c in exp.cells:
        if _is_reference(c):
            references[c.group] = store.records(done[c.hash]) if c.hash in done else None
    waiting: dict[tuple, list] = {}
    outcome = SweepOutcome(store.parent_id, resumed, [], skipped, {},
                           {c.label: store.metrics(done[c.hash]) for c in exp.cells if c.hash in done})

    def finish(res: CellResult, reference):
        if reference is not None and not _is_reference(res.cell):
            res.metrics.update(measure.relative_metrics(res.records, reference))
        store.log_cell(res.cell.label, cell_tags(res.cell, env), res.params, res.metrics, res.records)
        outcome.ran.append(res.cell.label)
        outcome.metrics[res.cell.label] = res.metrics
        m = res.metrics
        speed = f"  prefill x{m['prefill_speedup']:.2f}" if "prefill_speedup" in m else ""
        log(f"[{len(outcome.ran) + len(outcome.failed)}/{len(todo)}] {res.cell.label:<30} acc {m['accuracy']:.3f}  "
            f"prefill {m['prefill_ms']:.2f} ms{speed}  eq-tokens {m['equal_token_average']:.1f}")

    ws = Workspace()
    runner = local_executor(todo, progress, ws) if executor == "local" else ray_executor(todo, **executor_options)
    bar = _bar(len(todo), f"sweep {exp.name} (cells)", progress)
    if progress and log is print:
        log = bar.write  # lines above the bars
    for cell, res in runner:
        bar.update()
        if isinstance(res, str):
            store.log_failure(cell.label, cell_tags(cell, env), res)
            outcome.failed[cell.label] = res.strip().splitlines()[-1]
            log(f"FAILED {cell.label}: {outcome.failed[cell.label]}")
            if _is_reference(cell):  # its group's other cells are logged without relative figures
                for r in waiting.pop(cell.group, []):
                    finish(r, None)
                references[cell.group] = None
            continue
        group = cell.group
        if _is_reference(cell):
            references[group] = res.records
            finish(res, None)
            for r in waiting.pop(group, []):
                finish(r, res.records)
        elif group in references and references[group] is None and _reference_pending(exp, todo, outcome, group):
            waiting.setdefault(group, []).append(res)  # its baseline is still running (Ray)
        else:
            finish(res, references.get(group))
    for group, rs in waiting.items():
        for r in rs:
            finish(r, references.get(group))
    bar.close()
    if executor == "local" and outcome.ran:
        outcome.drift = closing_pass(ws, exp, outcome, store, log)
    store.close(outcome.ok)
    return outcome


DRIFT_WARN = 0.10


def closing_pass(ws: Workspace, exp: Experiment, outcome: SweepOutcome, store: SweepStore, log) -> dict:
    """Time the baseline cell(s) of the loaded model again after every other cell: the ratio to
    their first pass shows how much the machine drifted during the sweep, an uncertainty that the
    speedup intervals (repeats within a cell) do not contain. Logged on the parent run."""
    drift = {}
    loaded = set(ws.adapters)
    for cell in exp.cells:
        if not (_is_reference(cell) and cell.label in outcome.ran and json.dumps(cell.model, sort_keys=True) in loaded):
            continue
        first = outcome.metrics[cell.label]
        again = ws.run(cell).metrics
        d = {"prefill": again["prefill_ms"] / first["prefill_ms"],
             "decode": again["decode_tokens_per_s_pooled"] / first["decode_tokens_per_s_pooled"]}
        drift[cell.label] = d
        prefix = re.sub(r"[^\w\-.]+", "_", cell.prefix.strip())
        store.log_parent_metrics({f"{prefix + '_' if prefix else ''}drift_{k}": v for k, v in d.items()})
        worst = max(abs(v - 1) for v in d.values())
        log(f"timing drift over the sweep ({cell.label} timed again at the end): prefill x{d['prefill']:.2f}, "
            f"decode tokens/s x{d['decode']:.2f}" + (
                f"  WARNING: more than {DRIFT_WARN:.0%}; speedups between cells run far apart carry that "
                f"uncertainty beyond their intervals" if worst > DRIFT_WARN else ""))
    return drift


def _reference_pending(exp: Experiment, todo: list[Cell], outcome: SweepOutcome, group) -> bool:
    return any(_is_reference(c) and c.group == group and c.label not in outcome.ran and c.label not in outcome.failed
               for c in todo)


def summary_table(exp: Experiment, outcome: SweepOutcome) -> str:
    """One line per cell: accuracy, relative accuracy, prefill and decode speedups with intervals."""
    def ci(m, k):
        if k not in m:
            return ""
        return f"{m[k]:.2f}x [{m[k + '_ci_low']:.2f}, {m[k + '_ci_high']:.2f}]"

    lines = [f"{'cell':<34} {'acc %':>6} {'rel %':>6} {'eq-tok':>6} {'prefill speedup (95% CI)':>26} "
             f"{'decode speedup (95% CI)':>26}"]
    for c in exp.cells:
        m = outcome.metrics.get(c.label)
        if m is None:
            lines.append(f"{c.label:<34} FAILED: {outcome.failed.get(c.label, '')[:60]}")
            continue
        rel = f"{100 * m['relative_accuracy']:.1f}" if "relative_accuracy" in m else ""
        lines.append(f"{c.label:<34} {100 * m['accuracy']:6.1f} {rel:>6} {m['equal_token_average']:6.1f} "
                     f"{ci(m, 'prefill_speedup'):>26} {ci(m, 'decode_speedup'):>26}")
    return "\n".join(lines)
