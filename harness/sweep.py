"""Run an experiment: every cell on every sample, aggregated and logged to MLflow.

Order: validate everything -> open (or reopen) the sweep's parent run -> skip the cells already
FINISHED there -> run the others, each model loaded once, the baseline of each (model, dataset)
first -> one child run per cell, logged once its baseline is known (relative figures need it).
A cell that fails is logged FAILED (with the error) and the sweep goes on; the sweep's exit status
says whether every cell finished. Running the same sweep again resumes it (see harness.tracking).
Cells run in an executor (harness.executors): in this process, or as Ray tasks.
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass

from harness import measure, roofline
from harness.cell import progress_bar
from harness.executors import Workspace, local_executor, ray_executor
from harness.experiment import Cell, Experiment, model_name
from harness.models.adapter import default_device
from harness.records import CellResult, SampleRecord
from harness.tracking import DEFAULT_TRACKING_URI, SweepStore, environment_tags


@dataclass
class SweepOutcome:
    parent_id: str
    resumed: bool
    ran: list[str]  # labels of the cells run by this invocation
    skipped: list[str]  # already FINISHED
    failed: dict  # label -> error
    metrics: dict  # label -> metrics (every finished cell)
    drift: dict = None  # baseline label -> {prefill, decode}: closing pass / first pass
    experiment_id: str = ""

    @property
    def ok(self) -> bool:
        return not self.failed


def _sweep_params(exp: Experiment) -> dict:
    return {"models": ", ".join(m["path"] for m in exp.models),
            "datasets": ", ".join(f"{d['name']} (limit {d['limit']})" if "lmms_eval" in d else
                                  f"{d['name']}:{d['split']}x{d['samples_per_type']}" for d in exp.datasets),
            "cells": len(exp.cells), "max_new_tokens": exp.generation["max_new_tokens"],
            "warmup": exp.timing["warmup"], "repeats": exp.timing["repeats"]}


def cell_tags(cell: Cell, env: dict) -> dict:
    return {**env, "method": cell.method, "series": cell.series, "cell_hash": cell.hash,
            "model": model_name(cell.model), "dataset": f"{cell.dataset['name']}:{cell.dataset['split']}",
            "decoding": (cell.decoding or {}).get("name", "greedy")}


def device_peaks(exp: Experiment, device) -> dict:
    """The device's measured peaks (harness.roofline), once per dtype the sweep's models use: the
    denominators of every cell's roofline_fraction."""
    from harness.models.adapter import DTYPES

    out = {}
    for dtype in sorted({m["dtype"] for m in exp.models}):
        p = roofline.measure_peaks(device, DTYPES[dtype])
        out[f"peak_tflops_{dtype}"] = p.flops / 1e12
        out["peak_bandwidth_tb_per_s"] = p.bandwidth / 1e12
    return out


def run_experiment(exp: Experiment, tracking_uri: str = DEFAULT_TRACKING_URI, executor: str = "local",
                   progress: bool = True, log=print, fresh: bool = False, **executor_options) -> SweepOutcome:
    store = SweepStore(tracking_uri, exp.name)
    device = default_device()  # where the workspace loads the models ($TWIGBENCH_DEVICE, else a GPU if any)
    env = environment_tags(device)
    cells_json = json.dumps([{"label": c.label, "hash": c.hash, **c.config()} for c in exp.cells], indent=1,
                            default=str)
    resumed = store.open(exp.hash, f"sweep-{exp.name}-{exp.hash[:8]}", _sweep_params(exp), env, exp.source,
                         cells_json, fresh)
    store.log_parent_metrics(device_peaks(exp, device))
    done = store.finished_cells()
    todo = [c for c in exp.cells if c.hash not in done]
    skipped = [c.label for c in exp.cells if c.hash in done]
    if resumed:
        log(f"resuming sweep {store.parent_id}: {len(skipped)} cell(s) finished before, {len(todo)} to run")
    # the reference records of each (model, dataset) group: from this run or a finished one
    references: dict[tuple, list[SampleRecord] | None] = {}
    for c in exp.cells:
        if c.is_reference:
            references[c.group] = store.records(done[c.hash]) if c.hash in done else None
    waiting: dict[tuple, list] = {}
    outcome = SweepOutcome(store.parent_id, resumed, [], skipped, {},
                           {c.label: store.metrics(done[c.hash]) for c in exp.cells if c.hash in done})

    def finish(res: CellResult, reference):
        if reference is not None and not res.cell.is_reference:
            res.metrics.update(measure.relative_metrics(res.records, reference))
        store.log_cell(res.cell.label, cell_tags(res.cell, env), res.params, res.metrics, res.records,
                       res.start_ms, res.end_ms, res.artifacts)
        outcome.ran.append(res.cell.label)
        outcome.metrics[res.cell.label] = res.metrics
        m = res.metrics
        speed = f"  prefill x{m['prefill_speedup']:.2f}" if "prefill_speedup" in m else ""
        log(f"[{len(outcome.ran) + len(outcome.failed)}/{len(todo)}] {res.cell.label:<30} acc {m['accuracy']:.3f}  "
            f"prefill {m['prefill_ms']:.2f} ms{speed}  eq-tokens {m['equal_token_average']:.1f}")

    ws = Workspace()
    runner = local_executor(todo, progress, ws) if executor == "local" else ray_executor(todo, **executor_options)
    bar = progress_bar(len(todo), f"sweep {exp.name} (cells)", progress)
    if progress and log is print:
        log = bar.write  # lines above the bars
    for cell, res in runner:
        bar.update()
        if isinstance(res, str):
            store.log_failure(cell.label, cell_tags(cell, env), res)
            outcome.failed[cell.label] = res.strip().splitlines()[-1]
            log(f"FAILED {cell.label}: {outcome.failed[cell.label]}")
            if cell.is_reference:  # its group's other cells are logged without relative figures
                for r in waiting.pop(cell.group, []):
                    finish(r, None)
                references[cell.group] = None
            continue
        group = cell.group
        if cell.is_reference:
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
    if executor == "local":  # a resumed sweep too, even with nothing left to run
        try:
            outcome.drift = closing_pass(ws, exp, outcome, store, log)
        except Exception as e:  # the cells are logged already: a failed re-timing must not lose them
            log(f"WARNING: the closing timing pass failed ({type(e).__name__}: {e}); no drift logged")
    try:
        store.log_curves()
    except Exception as e:  # charts only: the cells are logged already
        log(f"WARNING: the series runs (MLflow curves) were not logged ({type(e).__name__}: {e})")
    store.close(outcome.ok)
    outcome.experiment_id = store.experiment_id
    return outcome


DRIFT_WARN = 0.10


def closing_pass(ws: Workspace, exp: Experiment, outcome: SweepOutcome, store: SweepStore, log) -> dict:
    """Time the baseline cell(s) of the model in memory again after every other cell, their timed
    samples alone (timing.subset; a resumed sweep with nothing left to run loads its first model
    for this): the ratio to their first pass shows how much the machine drifted during the sweep,
    an uncertainty that the speedup intervals (repeats within a cell) do not contain. Logged on the
    parent run."""
    drift = {}
    model = lambda c: ws.key(c.model)  # noqa: E731
    # lmms-eval tasks are left out: timing one again would run the whole benchmark again
    references = [c for c in exp.cells if c.is_reference and c.label in outcome.metrics
                  and "lmms_eval" not in c.dataset]
    in_memory = [c for c in references if model(c) in ws.adapters]
    if not in_memory and references:
        in_memory = [c for c in references if model(c) == model(references[0])]
    for cell in in_memory:
        first = outcome.metrics[cell.label]
        again = ws.run(cell, timed_only=True).metrics  # the untimed samples add no timing
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
    return any(c.is_reference and c.group == group and c.label not in outcome.ran and c.label not in outcome.failed
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
        lines.append(f"{c.label:<34} {100 * m.get('accuracy', float('nan')):6.1f} {rel:>6} "
                     f"{m.get('equal_token_average', float('nan')):6.1f} "
                     f"{ci(m, 'prefill_speedup'):>26} {ci(m, 'decode_speedup'):>26}")
    return "\n".join(lines)
