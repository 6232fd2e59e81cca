"""Executors: where cells run. `local_executor` runs them in this process; `ray_executor` runs each
as a Ray task (workers keep their loaded model between tasks). Both yield (cell, CellResult or the
error text) and leave logging to the sweep, so every result lands in the driver's one store.
"""
from __future__ import annotations

import json
import os
import traceback

import torch

from harness import cell as cell_runner
from harness.data import load_samples
from harness.experiment import Cell
from harness.models.adapter import ModelAdapter, load_model
from harness.records import CellResult


class Workspace:
    """Models, samples and processed prompts, each made once and reused across cells."""

    def __init__(self):
        self.adapters: dict[str, ModelAdapter] = {}
        self.data: dict[tuple, tuple[list, list]] = {}

    @staticmethod
    def key(model: dict) -> str:
        """A loaded model's key: the model entry without its engine (both regimes share the weights)."""
        return json.dumps({k: v for k, v in model.items() if k != "engine"}, sort_keys=True)

    def adapter(self, model: dict) -> ModelAdapter:
        key = self.key(model)
        if key not in self.adapters:
            self.adapters.clear()  # one model in memory at a time
            self.data.clear()
            cell_runner.forget_drafts()
            self.adapters[key] = load_model(model["path"], model["dtype"], model["attn_implementation"],
                                            checkpoint=model.get("checkpoint"))
        return self.adapters[key]

    def samples(self, adapter: ModelAdapter, dataset: dict) -> tuple[list, list]:
        key = (id(adapter), json.dumps(dataset, sort_keys=True))
        if key not in self.data:
            samples = load_samples(dataset["name"], dataset["split"], dataset["samples_per_type"])
            self.data[key] = samples, [adapter.inputs(s.image, s.question) for s in samples]
        return self.data[key]

    def run(self, cell: Cell, progress: bool = False, timed_only: bool = False) -> CellResult:
        """The cell's result; `timed_only`: its timed samples alone (timing.subset), for a timing pass."""
        adapter = self.adapter(cell.model)
        if "lmms_eval" in cell.dataset:  # an lmms-eval task, run through lmms-eval with this model
            from harness.lmms.run import run_lmms_cell

            return run_lmms_cell(adapter, cell)
        samples, inputs = self.samples(adapter, cell.dataset)
        if timed_only and cell.timing.get("subset") is not None:
            samples, inputs = samples[:cell.timing["subset"]], inputs[:cell.timing["subset"]]
        return cell_runner.run_cell(adapter, cell, samples, inputs, progress=progress)


def _order(cells: list[Cell]) -> list[Cell]:
    """Grouped by model (each loaded once), baselines first within a model."""
    models = list(dict.fromkeys(json.dumps(c.model, sort_keys=True) for c in cells))
    return sorted(cells, key=lambda c: (models.index(json.dumps(c.model, sort_keys=True)),
                                        not c.is_reference))


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


