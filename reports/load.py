"""What a report reads: one sweep from MLflow (its parent run, its finished cells and their
samples), typed. Nothing here runs a model."""
from __future__ import annotations

import json
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from harness.records import SampleRecord
from harness.tracking import DEFAULT_TRACKING_URI, _mlflow

CONTROLS = ("random", "pool", "oracle", "blind")  # the honest controls: never "the best method"


@dataclass
class CellRun:
    """One finished cell as MLflow holds it."""
    run_id: str
    label: str
    params: dict
    metrics: dict
    tags: dict
    start_ms: int | None = None
    end_ms: int | None = None
    variant: str = ""  # the model as the report names it (load_sweep: with dtype / attention when they vary)
    _records: list[SampleRecord] | None = field(default=None, repr=False)

    @property
    def method(self) -> str:
        return self.params.get("method", self.tags.get("method", "?"))

    @property
    def series(self) -> str:
        return self.tags.get("series") or self.params.get("series") or self.method

    @property
    def ssd(self) -> bool:
        return self.params.get("decoding") == "ssd"

    @property
    def is_reference(self) -> bool:
        """The greedy baseline: what the other cells of its model and dataset are compared with."""
        return self.method == "baseline" and not self.ssd

    @property
    def is_control(self) -> bool:
        return self.method in CONTROLS

    @property
    def num_visual(self) -> int:
        return int(self.params.get("num_visual", 0))

    @property
    def budgeted(self) -> bool:
        return "budget_ratio" in self.params

    @property
    def tokens(self) -> int:
        """Visual tokens retained: the budget, or for a budget-free cell what it processed (sweeps
        logged before budget-free cells named theirs: the measured equal-token average)."""
        if "budget_tokens" in self.params:
            return int(float(self.params["budget_tokens"]))
        return int(round(self.metrics.get("equal_token_average", self.num_visual)))

    @property
    def model(self) -> str:
        return self.params.get("model", self.tags.get("model", "?"))

    @property
    def dataset(self) -> str:
        return self.params.get("dataset", "?")

    @property
    def split(self) -> str:
        return self.params.get("split", "?")

    @property
    def group(self) -> tuple[str, str, str]:
        """(model variant, dataset, split): the cells that share a baseline."""
        return self.variant or self.model, self.dataset, self.split


@dataclass
class Sweep:
    experiment: str
    experiment_id: str
    tracking_uri: str
    parent_id: str
    params: dict
    tags: dict
    metrics: dict
    cells: list[CellRun]
    start_ms: int | None = None
    end_ms: int | None = None
    status: str = "FINISHED"  # FAILED: some cells failed (the report shows the finished ones)

    def records(self, cell: CellRun) -> list[SampleRecord]:
        """The cell's samples.jsonl (downloaded once)."""
        if cell._records is None:
            mlflow = _mlflow(self.tracking_uri)
            with tempfile.TemporaryDirectory() as d:
                local = mlflow.artifacts.download_artifacts(run_id=cell.run_id, artifact_path="samples.jsonl",
                                                            dst_path=d, tracking_uri=self.tracking_uri)
                cell._records = [SampleRecord.from_json(json.loads(line))
                                 for line in Path(local).read_text().splitlines() if line]
        return cell._records

    def groups(self) -> list[tuple[tuple[str, str, str], list[CellRun]]]:
        """Cells by (model, dataset, split), in the sweep's order."""
        out: dict = {}
        for c in self.cells:
            out.setdefault(c.group, []).append(c)
        return list(out.items())

    def reference(self, cell: CellRun) -> CellRun | None:
        return next((c for c in self.cells if c.is_reference and c.group == cell.group), None)


def load_sweep(experiment: str, tracking_uri: str = DEFAULT_TRACKING_URI, parent_run_id: str | None = None) -> Sweep:
    """The sweep `parent_run_id` of `experiment` (default: its latest finished sweep) with its
    FINISHED cells, in the order of the experiment file (the sweep's cells.json)."""
    mlflow = _mlflow(tracking_uri)
    client = mlflow.MlflowClient()
    exp = client.get_experiment_by_name(experiment)
    if exp is None:
        raise ValueError(f"no MLflow experiment {experiment!r} in {tracking_uri}")
    if parent_run_id is None:  # the latest finished sweep, else the latest one (some cells failed)
        parents = client.search_runs([exp.experiment_id], "tags.role = 'sweep' and attributes.status = 'FINISHED'",
                                     order_by=["attributes.end_time DESC"], max_results=1) or \
            client.search_runs([exp.experiment_id], "tags.role = 'sweep'", order_by=["attributes.start_time DESC"],
                               max_results=1)
        if not parents:
            raise ValueError(f"experiment {experiment!r} has no sweep in {tracking_uri}")
        parent = parents[0]
    else:
        parent = client.get_run(parent_run_id)
    pid = parent.info.run_id
    runs = client.search_runs([exp.experiment_id], f"tags.mlflow.parentRunId = '{pid}' and tags.role = 'cell' "
                              "and attributes.status = 'FINISHED'", max_results=50000)
    if not runs:
        raise ValueError(f"sweep {pid} of {experiment!r} has no finished cell runs")
    cells = [CellRun(r.info.run_id, r.info.run_name or r.data.params.get("cell", "?"), dict(r.data.params),
                     dict(r.data.metrics), dict(r.data.tags), r.info.start_time, r.info.end_time) for r in runs]
    setups: dict[str, set] = {}
    for c in cells:
        setups.setdefault(c.model, set()).add((c.params.get("dtype"), c.params.get("attn_implementation"),
                                               c.params.get("engine", "eager")))
    for c in cells:  # one checkpoint run at several dtypes / attention implementations / engines: one group each
        engine = c.params.get("engine", "eager")
        c.variant = c.model if len(setups[c.model]) == 1 else \
            f"{c.model} ({c.params.get('dtype')}, {c.params.get('attn_implementation')}" + \
            ("" if engine == "eager" else f", {engine}") + ")"
    order = _cell_order(mlflow, pid, tracking_uri)
    cells.sort(key=lambda c: (order.get(c.tags.get("cell_hash"), len(order)), c.label))
    return Sweep(experiment, exp.experiment_id, tracking_uri, pid, dict(parent.data.params), dict(parent.data.tags),
                 dict(parent.data.metrics), cells, parent.info.start_time, parent.info.end_time, parent.info.status)


def _cell_order(mlflow, parent_id: str, tracking_uri: str) -> dict[str, int]:
    try:
        with tempfile.TemporaryDirectory() as d:
            local = mlflow.artifacts.download_artifacts(run_id=parent_id, artifact_path="cells.json", dst_path=d,
                                                        tracking_uri=tracking_uri)
            return {c["hash"]: i for i, c in enumerate(json.loads(Path(local).read_text()))}
    except Exception:  # an older sweep without cells.json: by label
        return {}
