"""Sweeps resume: a cell's identity is its config hash; FINISHED cells are skipped, FAILED or killed
ones run again, and every cell ends with exactly one run. The Ray executor lands in the same store."""
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from harness.cli import main
from harness.experiment import load_experiment
from harness.sweep import run_experiment

mlflow = pytest.importorskip("mlflow", reason="MLflow is not installed here (every test here runs a sweep)")

ROOT = Path(__file__).resolve().parents[1]


def experiment(tmp_path, model_dir, name, budgets, samples_per_type=1, max_new_tokens=3):
    exp = {"experiment": name, "model": {"path": model_dir},
           "dataset": {"name": "shapes", "split": "val", "samples_per_type": samples_per_type},
           "generation": {"max_new_tokens": max_new_tokens}, "timing": {"warmup": 0, "repeats": 2},
           "budgets": budgets, "methods": ["baseline", "random", {"name": "fastv", "settings": {"K": 1}}]}
    p = tmp_path / f"{name}.yaml"
    p.write_text(yaml.safe_dump(exp))
    return p


def children(uri, name):
    """Every child run of the experiment's sweeps that is not deleted."""
    client = mlflow.MlflowClient(uri)
    e = client.get_experiment_by_name(name)
    return [r for r in client.search_runs([e.experiment_id], "tags.role = 'cell'", max_results=1000)]


def exactly_once(uri, exp):
    runs = children(uri, exp.name)
    assert sorted(r.data.tags["cell_hash"] for r in runs) == sorted(c.hash for c in exp.cells)
    assert all(r.info.status == "FINISHED" for r in runs)
    assert len({r.data.tags["mlflow.parentRunId"] for r in runs}) == 1
    return {r.data.tags["cell_hash"]: r.info.run_id for r in runs}


def test_failed_and_stale_cells_run_again_finished_ones_are_kept(tiny_llava_dir, tmp_path):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    exp = load_experiment(experiment(tmp_path, tiny_llava_dir, "resume", [0.5]))
    first = run_experiment(exp, uri, progress=False, log=lambda *_: None)
    assert first.ok and not first.resumed and len(first.ran) == len(exp.cells) == 3
    assert set(first.drift) == {"baseline"} and first.drift["baseline"]["prefill"] > 0
    ids = exactly_once(uri, exp)

    client = mlflow.MlflowClient(uri)
    fastv = next(c for c in exp.cells if c.method == "fastv")
    rand = next(c for c in exp.cells if c.method == "random")
    client.set_terminated(ids[fastv.hash], "FAILED")  # a cell that failed
    stale = client.create_run(client.get_run(ids[rand.hash]).info.experiment_id, run_name=rand.label,
                              tags={"role": "cell", "cell_hash": rand.hash,
                                    "mlflow.parentRunId": first.parent_id})  # a process killed while logging
    assert stale.info.status == "RUNNING"

    again = run_experiment(exp, uri, progress=False, log=lambda *_: None)
    assert again.resumed and again.parent_id == first.parent_id
    assert again.ran == [fastv.label] and sorted(again.skipped) == sorted([c.label for c in exp.cells if c is not fastv])
    ids2 = exactly_once(uri, exp)
    assert ids2[fastv.hash] != ids[fastv.hash] and ids2[rand.hash] == ids[rand.hash]
    # the re-run cell still has its relative figures: the baseline's records come from MLflow
    metrics = client.get_run(ids2[fastv.hash]).data.metrics
    assert "prefill_speedup_ci_low" in metrics and "accuracy_diff" in metrics
    assert client.get_run(first.parent_id).info.status == "FINISHED"

    # a third run has nothing left to do
    third = run_experiment(exp, uri, progress=False, log=lambda *_: None)
    assert third.ran == [] and exactly_once(uri, exp) == ids2

    # --fresh: every cell again under a new parent; the old sweep is left as it was
    fresh = run_experiment(exp, uri, progress=False, log=lambda *_: None, fresh=True)
    assert fresh.parent_id != first.parent_id and len(fresh.ran) == len(exp.cells)
    by_parent = {}
    for r in children(uri, exp.name):
        by_parent.setdefault(r.data.tags["mlflow.parentRunId"], set()).add(r.info.run_id)
    assert by_parent[first.parent_id] == set(ids2.values()) and len(by_parent[fresh.parent_id]) == len(exp.cells)


@pytest.mark.slow
def test_killing_a_sweep_and_running_it_again_completes_every_cell_once(tiny_llava_dir, tmp_path):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    path = experiment(tmp_path, tiny_llava_dir, "killed", [0.2, 0.4, 0.6, 0.7], samples_per_type=2,
                      max_new_tokens=6)
    exp = load_experiment(path)
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen([sys.executable, "-m", "harness.cli", "sweep", str(path), "--tracking-uri", uri,
                             "--no-report", "--no-progress"], cwd=tmp_path, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    try:
        while time.time() < deadline:  # kill it once two cells are in, while the third runs
            try:
                done = [r for r in children(uri, "killed") if r.info.status == "FINISHED"]
            except Exception:  # the store is still being created
                done = []
            if len(done) >= 2:
                break
            assert proc.poll() is None, "the sweep ended before it could be killed"
            time.sleep(0.2)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    finally:
        if proc.poll() is None:
            proc.kill()
    before = {r.data.tags["cell_hash"]: r.info.run_id for r in children(uri, "killed") if r.info.status == "FINISHED"}
    assert 2 <= len(before) < len(exp.cells)

    assert main(["sweep", str(path), "--tracking-uri", uri, "--no-report", "--no-progress"]) == 0
    ids = exactly_once(uri, exp)
    assert all(ids[h] == rid for h, rid in before.items())  # finished cells were not run again


@pytest.mark.slow
def test_ray_executor_runs_every_cell_as_a_task_into_the_same_store(tiny_llava_dir, tmp_path):
    pytest.importorskip("ray")
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    exp = load_experiment(experiment(tmp_path, tiny_llava_dir, "ray", [0.5]))
    ray_tmp = ROOT / "build" / f"ray-{os.getpid()}"  # short: Ray's socket paths have a length limit
    out = run_experiment(exp, uri, executor="ray", progress=False, log=lambda *_: None, gpus_per_cell=0,
                         ray_init={"num_cpus": 2, "include_dashboard": False, "_temp_dir": str(ray_tmp),
                                   "runtime_env": {"env_vars": {"PYTHONPATH": str(ROOT), "TWIGBENCH_THREADS": "1"}}})
    assert out.ok and sorted(out.ran) == sorted(c.label for c in exp.cells)
    exactly_once(uri, exp)
    local = run_experiment(load_experiment(experiment(tmp_path, tiny_llava_dir, "local", [0.5])),
                           f"sqlite:///{tmp_path / 'local.db'}", progress=False, log=lambda *_: None)
    for label, m in out.metrics.items():  # same answers as the in-process executor
        assert m["accuracy"] == local.metrics[label]["accuracy"]
        assert m["equal_token_average"] == local.metrics[label]["equal_token_average"]
    assert "agreement_with_baseline" in out.metrics["random@0.5"]


def test_each_model_is_loaded_once_for_all_its_cells(tiny_llava_dir, tmp_path, monkeypatch):
    import harness.executors as executors

    loads = []
    real = executors.load_model
    monkeypatch.setattr(executors, "load_model", lambda *a, **k: loads.append(a) or real(*a, **k))
    p = tmp_path / "two.yaml"
    p.write_text(yaml.safe_dump({
        "experiment": "two-models", "models": [{"path": tiny_llava_dir}, {"path": tiny_llava_dir, "attn_implementation": "eager"}],
        "dataset": {"split": "val", "samples_per_type": 1}, "generation": {"max_new_tokens": 2},
        "timing": {"warmup": 0}, "budgets": [0.3, 0.5], "methods": ["baseline", "random", "pool"]}))
    exp = load_experiment(p)
    out = run_experiment(exp, f"sqlite:///{tmp_path / 'm.db'}", progress=False, log=lambda *_: None)
    assert out.ok and len(out.ran) == 10 and len(loads) == 2
    # relative figures compare with the baseline of the same model
    for c in exp.cells:
        if c.method != "baseline":
            assert "agreement_with_baseline" in out.metrics[c.label]
