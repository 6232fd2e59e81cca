"""The one module that talks to MLflow: an experiment per study, a parent run per sweep, a child
run per cell. Default store: sqlite:///mlflow.db in the working directory."""
from __future__ import annotations

import contextlib
import json
import os
import subprocess
import tempfile
from pathlib import Path

DEFAULT_TRACKING_URI = "sqlite:///mlflow.db"


def _mlflow(tracking_uri: str):
    os.environ.setdefault("MLFLOW_ENABLE_ASYNC_LOGGING", "false")
    import mlflow

    mlflow.set_tracking_uri(tracking_uri)
    return mlflow


def _git_commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True,
                              cwd=Path(__file__).resolve().parent, timeout=5).stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def environment_tags(device: str) -> dict:
    import torch
    import transformers

    return {"git_commit": _git_commit(), "torch_version": torch.__version__,
            "transformers_version": transformers.__version__, "device": device}


@contextlib.contextmanager
def sweep_run(tracking_uri: str, experiment: str, run_name: str, params: dict, tags: dict,
              config_text: str):
    """Parent run of a sweep; yields a function that logs one cell as a child run."""
    mlflow = _mlflow(tracking_uri)
    mlflow.set_experiment(experiment)
    with mlflow.start_run(run_name=run_name, tags={**tags, "role": "sweep"}) as parent:
        mlflow.log_params(params)
        mlflow.log_text(config_text, "experiment.yaml")

        def log_cell(name: str, cell_params: dict, metrics: dict, records: list[dict]):
            with mlflow.start_run(run_name=name, nested=True,
                                  tags={**tags, "role": "cell", "method": cell_params["method"]}):
                mlflow.log_params(cell_params)
                mlflow.log_metrics({k: float(v) for k, v in metrics.items() if v == v})  # drop NaN
                with tempfile.TemporaryDirectory() as d:
                    path = Path(d) / "samples.jsonl"
                    path.write_text("".join(json.dumps(r) + "\n" for r in records))
                    mlflow.log_artifact(str(path))

        yield parent.info.run_id, log_cell


def cell_runs(tracking_uri: str, experiment: str, parent_run_id: str | None = None):
    """Child runs of a sweep (the latest finished sweep unless parent_run_id is given) as a DataFrame."""
    mlflow = _mlflow(tracking_uri)
    exp = mlflow.get_experiment_by_name(experiment)
    if exp is None:
        raise ValueError(f"no MLflow experiment {experiment!r} in {tracking_uri}")
    if parent_run_id is None:
        parents = mlflow.search_runs([exp.experiment_id], filter_string="tags.role = 'sweep' and "
                                     "attributes.status = 'FINISHED'", order_by=["start_time DESC"],
                                     max_results=1)
        if parents.empty:
            raise ValueError(f"experiment {experiment!r} has no finished sweep in {tracking_uri}")
        parent_run_id = parents.iloc[0]["run_id"]
    runs = mlflow.search_runs([exp.experiment_id],
                              filter_string=f"tags.mlflow.parentRunId = '{parent_run_id}'")
    return parent_run_id, runs
