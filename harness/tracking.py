"""The one module that talks to MLflow: an experiment per study, a parent run per sweep, a child
run per cell. Default store: sqlite:///mlflow.db in the working directory.

Layout (names chosen for the UI's compare and chart views):
- parent run "sweep-<name>-<sweep hash>", tag role=sweep, tag sweep_hash; params = the sweep's
  shared settings; artifacts experiment.yaml (as written) and cells.json (every cell resolved).
- child run per cell, named by the cell's label ("fastv@0.889[K=1]"), tags role=cell, method,
  series, cell_hash, model, dataset; params = the cell's resolved config and the method's own
  settings (method, budget_tokens, K, ...); metrics = accuracy, timing, proxies, relative figures;
  artifact samples.jsonl (one record per sample). Group by params.method or tags.series, x = params.budget_tokens.
- every run carries the environment tags: git commit, torch / transformers / harness versions,
  device name.

Resuming: a sweep is identified by its hash; running it again reopens the same parent, skips cells
whose child run FINISHED, deletes stale children (FAILED, or RUNNING from a killed process) and
runs those cells again, so that every cell ends with exactly one run.
"""
from __future__ import annotations

import json
import os
import subprocess
import tempfile
import time
from pathlib import Path
from urllib.parse import quote

from harness.records import SampleRecord

DEFAULT_TRACKING_URI = "sqlite:///mlflow.db"


def _mlflow(tracking_uri: str):
    os.environ.setdefault("MLFLOW_ENABLE_ASYNC_LOGGING", "false")
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    import mlflow

    mlflow.set_tracking_uri(tracking_uri)
    return mlflow


def _git_commit() -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True,
                             cwd=Path(__file__).resolve().parent, timeout=5).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], capture_output=True,
                               text=True, cwd=Path(__file__).resolve().parent, timeout=5).stdout.strip()
        return (out + ("-dirty" if dirty else "")) if out else "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def harness_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("twigbench")
    except PackageNotFoundError:
        return "unknown"


def device_name(device) -> str:
    import torch

    d = torch.device(device)
    if d.type == "cuda":
        return torch.cuda.get_device_name(d)
    import platform

    return f"cpu ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)"


def environment_tags(device) -> dict:
    import torch
    import transformers

    return {"git_commit": _git_commit(), "torch_version": torch.__version__,
            "transformers_version": transformers.__version__, "harness_version": harness_version(),
            "device": device_name(device)}


def _write_artifact(mlflow, run_id: str, name: str, text: str) -> None:
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / name
        path.write_text(text)
        mlflow.MlflowClient().log_artifact(run_id, str(path))


# the cell metrics drawn against the budget by the series runs (SweepStore.log_curves)
CURVES = ("accuracy", "relative_accuracy", "prefill_speedup", "ttft_speedup", "decode_speedup", "e2e_speedup",
          "equal_token_average", "prefill_gflops")
SIGNIFICANT = 5  # digits kept in MLflow (the raw figures stay in samples.jsonl)


def rounded(v: float) -> float:
    return float(f"{v:.{SIGNIFICANT}g}")


def _metrics(metrics: dict, step: int = 0, when: int | None = None) -> list:
    """MLflow metric entities of the numeric, non-NaN values, to SIGNIFICANT digits."""
    from mlflow.entities import Metric

    now = when or int(time.time() * 1000)
    return [Metric(k, rounded(v), now, step) for k, v in metrics.items() if isinstance(v, (int, float)) and v == v]


def _param(value) -> str:
    text = value if isinstance(value, str) else json.dumps(value, sort_keys=True, default=str)
    return text[:6000]


class SweepStore:
    """The MLflow side of one sweep: its parent run and its children (see the module docstring)."""

    def __init__(self, tracking_uri: str, experiment: str):
        self.mlflow = _mlflow(tracking_uri)
        self.client = self.mlflow.MlflowClient()
        self.uri = tracking_uri
        exp = self.client.get_experiment_by_name(experiment)
        if exp is not None and exp.lifecycle_stage == "deleted":
            self.client.restore_experiment(exp.experiment_id)
        self.experiment_id = (exp.experiment_id if exp is not None
                              else self.client.create_experiment(experiment))
        # the UI opens it in its machine-learning view (runs, charts), not the GenAI one (traces)
        self.client.set_experiment_tag(self.experiment_id, "mlflow.experimentKind", "custom_model_development")
        self.parent_id: str | None = None

    def open(self, sweep_hash: str, run_name: str, params: dict, tags: dict, config_text: str,
             cells_json: str, fresh: bool = False) -> bool:
        """Reopen the sweep's latest parent run if it exists (returns True), else create it;
        `fresh` always creates a new one (the old runs stay as they are)."""
        found = [] if fresh else self.client.search_runs(
            [self.experiment_id], f"tags.sweep_hash = '{sweep_hash}' and tags.role = 'sweep'",
            order_by=["attributes.start_time DESC"])
        if found:
            self.parent_id = found[0].info.run_id
            self.client.update_run(self.parent_id, status="RUNNING")
            for k, v in tags.items():  # the environment of the latest invocation
                self.client.set_tag(self.parent_id, k, v)
            return True
        run = self.client.create_run(self.experiment_id, run_name=run_name,
                                     tags={**tags, "role": "sweep", "sweep_hash": sweep_hash})
        self.parent_id = run.info.run_id
        for k, v in params.items():
            self.client.log_param(self.parent_id, k, _param(v))
        _write_artifact(self.mlflow, self.parent_id, "experiment.yaml", config_text)
        _write_artifact(self.mlflow, self.parent_id, "cells.json", cells_json)
        return False

    def children(self) -> list:
        """The sweep's cell runs."""
        return self.client.search_runs([self.experiment_id], f"tags.mlflow.parentRunId = '{self.parent_id}' "
                                       "and tags.role = 'cell'", max_results=50000)

    def finished_cells(self) -> dict[str, str]:
        """cell hash -> run id of the FINISHED children; every other child (FAILED, or RUNNING
        because its process was killed) is deleted so that its cell runs again."""
        done = {}
        for r in self.children():
            h = r.data.tags.get("cell_hash")
            if r.info.status == "FINISHED" and h and h not in done:
                done[h] = r.info.run_id
            else:
                self.client.delete_run(r.info.run_id)
        return done

    def records(self, run_id: str) -> list[SampleRecord]:
        with tempfile.TemporaryDirectory() as d:
            local = self.mlflow.artifacts.download_artifacts(run_id=run_id, artifact_path="samples.jsonl",
                                                             dst_path=d, tracking_uri=self.uri)
            return [SampleRecord.from_json(json.loads(line)) for line in Path(local).read_text().splitlines() if line]

    def metrics(self, run_id: str) -> dict:
        return dict(self.client.get_run(run_id).data.metrics)

    def log_cell(self, name: str, tags: dict, params: dict, metrics: dict, records: list[SampleRecord],
                 start_ms: int | None = None, end_ms: int | None = None, artifacts: dict | None = None) -> str:
        """One child run, FINISHED only once everything is logged (a kill leaves it RUNNING); its
        start and end are the cell's own (not the logging's) when given."""
        run = self.client.create_run(self.experiment_id, run_name=name, start_time=start_ms or None,
                                     tags={**tags, "role": "cell", "mlflow.parentRunId": self.parent_id})
        rid = run.info.run_id
        from mlflow.entities import Param

        self.client.log_batch(rid, params=[Param(k, _param(v)) for k, v in params.items()],
                              metrics=_metrics(metrics, when=end_ms))
        _write_artifact(self.mlflow, rid, "samples.jsonl", "".join(json.dumps(r.to_json()) + "\n" for r in records))
        for file, text in (artifacts or {}).items():
            _write_artifact(self.mlflow, rid, file, text)
        self.client.set_terminated(rid, "FINISHED", end_time=end_ms or None)
        return rid

    def log_curves(self) -> int:
        """One run per series under the sweep (tag role=series) with the FINISHED cells' CURVES
        metrics at step = visual tokens retained (params.budget_tokens): MLflow's line charts then
        draw a curve per method against the budget. Replaces the sweep's earlier series runs;
        returns how many it logged."""
        for r in self.client.search_runs([self.experiment_id], f"tags.role = 'series' and "
                                         f"tags.sweep_run_id = '{self.parent_id}'", max_results=50000):
            self.client.delete_run(r.info.run_id)
        cells = [r for r in self.children() if r.info.status == "FINISHED"
                 and "budget_tokens" in r.data.params and "series" in r.data.tags]
        def group(r) -> str:  # the cells that share a baseline
            p = r.data.params
            return f"{r.data.tags.get('model')} {p.get('dtype')} {p.get('attn_implementation')}, {r.data.tags.get('dataset')}"

        several = len({group(r) for r in cells}) > 1
        curves: dict[str, dict[str, dict[int, float]]] = {}
        for r in cells:
            series = r.data.tags["series"] + (f" ({group(r)})" if several else "")
            for name in CURVES:
                if name in r.data.metrics:
                    curves.setdefault(series, {}).setdefault(f"vs_tokens/{name}", {})[
                        int(float(r.data.params["budget_tokens"]))] = r.data.metrics[name]
        for series, metrics in curves.items():
            # not nested under the sweep: MLflow's charts draw only the runs its table shows, and
            # it shows a parent's children collapsed
            run = self.client.create_run(self.experiment_id, run_name=f"curve {series}",
                                         tags={"role": "series", "series": series, "sweep_run_id": self.parent_id})
            entities = [m for name, points in metrics.items() for step, v in sorted(points.items())
                        for m in _metrics({name: v}, step=int(step))]
            for i in range(0, len(entities), 1000):
                self.client.log_batch(run.info.run_id, metrics=entities[i:i + 1000])
            self.client.set_terminated(run.info.run_id, "FINISHED")
        return len(curves)

    def log_report(self, folder: Path) -> None:
        """The report's files as the sweep run's artifacts under report/."""
        self.client.log_artifacts(self.parent_id, str(folder), "report")

    def log_failure(self, name: str, tags: dict, error: str) -> None:
        run = self.client.create_run(self.experiment_id, run_name=name,
                                     tags={**tags, "role": "cell", "error": error[:5000],
                                           "mlflow.parentRunId": self.parent_id})
        self.client.set_terminated(run.info.run_id, "FAILED")

    def log_parent_metrics(self, metrics: dict) -> None:
        self.client.log_batch(self.parent_id, metrics=_metrics(metrics))

    def close(self, ok: bool) -> None:
        self.client.set_terminated(self.parent_id, "FINISHED" if ok else "FAILED")


def cell_runs(tracking_uri: str, experiment: str, parent_run_id: str | None = None):
    """Child runs of a sweep (the latest finished sweep unless parent_run_id is given) as a DataFrame."""
    mlflow = _mlflow(tracking_uri)
    exp = mlflow.get_experiment_by_name(experiment)
    if exp is None:
        raise ValueError(f"no MLflow experiment {experiment!r} in {tracking_uri}")
    if parent_run_id is None:
        parents = mlflow.search_runs([exp.experiment_id], filter_string="tags.role = 'sweep' and "
                                     "attributes.status = 'FINISHED'", order_by=["attributes.end_time DESC"],
                                     max_results=1)
        if parents.empty:
            raise ValueError(f"experiment {experiment!r} has no finished sweep in {tracking_uri}")
        parent_run_id = parents.iloc[0]["run_id"]
    runs = mlflow.search_runs([exp.experiment_id],
                              filter_string=f"tags.mlflow.parentRunId = '{parent_run_id}' and tags.role = 'cell'")
    return parent_run_id, runs


def resolved_uri(tracking_uri: str) -> str:
    """A sqlite store with its absolute path (what a UI started elsewhere must be given)."""
    if tracking_uri.startswith("sqlite:///"):
        return "sqlite:///" + str(Path(tracking_uri[len("sqlite:///"):].split("?")[0]).resolve())
    return tracking_uri


def ui_page(experiment_id: str, parent_run_id: str | None = None) -> str:
    """The UI page of an experiment in the machine-learning view; with a sweep's run id, its chart
    view filtered to the sweep's series runs (a curve per method against visual tokens)."""
    page = f"#/experiments/{experiment_id}/runs?workflowType=machine_learning"
    if parent_run_id:
        page += ("&compareRunsMode=CHART&searchFilter="
                 + quote(f"tags.role = 'series' and tags.sweep_run_id = '{parent_run_id}'", safe=""))
    return page


def ui_hint(tracking_uri: str, experiment_id: str, parent_run_id: str | None = None, port: int = 5000) -> str:
    """How to open the experiment (or a sweep's curves) in the MLflow UI."""
    page = ui_page(experiment_id, parent_run_id)
    if tracking_uri.startswith(("http://", "https://")):
        return f"{tracking_uri.rstrip('/')}/{page}"
    store = resolved_uri(tracking_uri)
    return (f"MLFLOW_SERVER_ENABLE_JOB_EXECUTION=false mlflow ui --backend-store-uri {store} --host 127.0.0.1 "
            f"--port {port}, then open http://127.0.0.1:{port}/{page}")
