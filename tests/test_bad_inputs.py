"""Bad input to `twigbench sweep` / `twigbench report`: one line naming the value and what is
allowed, exit status 2, and nothing created in MLflow (the tracking database is never made)."""
import json
import shutil
import socket
from pathlib import Path

import pytest
import yaml

from harness.cli import main

BASE = {"experiment": "bad", "model": {"path": "embedded"},
        "dataset": {"split": "val", "samples_per_type": 1}, "generation": {"max_new_tokens": 2},
        "timing": {"warmup": 0}, "budgets": [0.5], "methods": ["baseline"]}


def unused_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def copied_model(tmp, tiny_llava_dir) -> Path:
    d = tmp / "model"
    shutil.copytree(tiny_llava_dir, d)
    return d


def bad_config_json(tmp, tiny):
    d = copied_model(tmp, tiny)
    (d / "config.json").write_text("{not json")
    return {"model": {"path": str(d)}}, []


def no_vision_config(tmp, tiny):
    d = copied_model(tmp, tiny)
    cfg = json.loads((d / "config.json").read_text())
    del cfg["vision_config"]
    (d / "config.json").write_text(json.dumps(cfg))
    return {"model": {"path": str(d)}}, []


def truncated_weights(tmp, tiny):
    d = copied_model(tmp, tiny)
    w = d / "model.safetensors"
    w.write_bytes(w.read_bytes()[: w.stat().st_size // 2])
    return {"model": {"path": str(d)}}, []


def empty_twig(tmp, tiny):
    d = tmp / "twig"
    d.mkdir()
    (d / "twig.safetensors").write_bytes(b"")
    return {"methods": ["baseline", {"name": "twigvlm", "settings": {"twig": str(d)}}]}, []


ROWS = {
    # experiment-file content
    "config.json not JSON": (bad_config_json, "config.json is not valid JSON"),
    "config without vision_config": (no_vision_config, "config.json has no vision_config"),
    "truncated model weights": (truncated_weights, "model.safetensors"),
    "twig file empty": (empty_twig, "twig.safetensors"),
    "ssd twig null": (lambda t, m: ({"methods": [{"name": "baseline", "decoding": {"name": "ssd", "twig": None}}]}, []),
                      "twig None is not a path"),
    "twigvlm twig null": (lambda t, m: ({"methods": [{"name": "twigvlm", "settings": {"twig": None}}]}, []),
                          "twig None is not a path"),
    "split validation": (lambda t, m: ({"dataset": {"split": "validation"}}, []), "unknown split 'validation'"),
    # command-line destinations
    "report dir under a file": (lambda t, m: ({}, ["--report-dir", str(t / "afile" / "reports")]), "is a file, not a folder"),
    "report dir unwritable": (lambda t, m: ({}, ["--report-dir", "/proc/1/twigbench-reports"]), "report folder"),
    "sqlite under a file": (lambda t, m: ({}, ["--tracking-uri", f"sqlite:///{t / 'afile' / 'x.db'}"]),
                            "is a file, not a folder"),
    "sqlite in an unwritable place": (lambda t, m: ({}, ["--tracking-uri", "sqlite:////proc/1/twigbench/x.db"]),
                                      "cannot create the database"),
    "sqlite file not a writable database": (lambda t, m: ({}, ["--tracking-uri", f"sqlite:///{t / 'afile'}"]),
                                            "the database cannot be written"),
    "nothing listening at the tracking URI": (lambda t, m: ({}, ["--tracking-uri", f"http://127.0.0.1:{unused_port()}"]),
                                              "no MLflow server answers"),
    "unknown tracking scheme": (lambda t, m: ({}, ["--tracking-uri", "notascheme://x"]), "unknown scheme 'notascheme'"),
    "unreachable Ray address": (lambda t, m: ({}, ["--executor", "ray", "--ray-address", f"127.0.0.1:{unused_port()}"]),
                                "nothing answers"),
}


@pytest.mark.parametrize("row", list(ROWS))
def test_bad_sweep_input_is_one_line_and_creates_no_run(row, tmp_path, tiny_llava_dir, capsys):
    make, expected = ROWS[row]
    afile = b"not a folder, not a database" * 40
    (tmp_path / "afile").write_bytes(afile)
    change, args = make(tmp_path, tiny_llava_dir)
    exp = {**BASE, **change}
    p = tmp_path / "exp.yaml"
    p.write_text(yaml.safe_dump(exp))
    db = tmp_path / "mlflow.db"
    argv = ["sweep", str(p), "--no-progress"]
    if "--tracking-uri" not in args:
        argv += ["--tracking-uri", f"sqlite:///{db}"]
    if "--report-dir" not in args:
        argv += ["--report-dir", str(tmp_path / "reports")]
    assert main(argv + args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and expected in err[0], err
    assert "Traceback" not in err[0]
    # no MLflow store made, so no run: not the default one, no file store, the given files untouched
    assert not db.exists() and not (tmp_path / "mlruns").exists()
    assert (tmp_path / "afile").read_bytes() == afile


@pytest.mark.parametrize("content,expected", [
    (None, "is a directory"), (b"", "is empty"), (bytes(range(256)) * 4, "is not text"),
    (b"experiment: x\nmethods: [baseline]\nmethods: [fastv]\n", "key 'methods' appears twice"),
    (b"experiment: x\n? [a, b]\n: 1\n", "is not a plain value"),
])
def test_bad_experiment_files(tmp_path, capsys, content, expected):
    p = tmp_path / "exp.yaml"
    if content is None:
        p.mkdir()
    else:
        p.write_bytes(content)
    assert main(["sweep", str(p), "--tracking-uri", f"sqlite:///{tmp_path / 'm.db'}"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and expected in err[0], err
    assert not (tmp_path / "m.db").exists()


def test_report_to_an_unwritable_folder_is_one_line(tmp_path, capsys):
    (tmp_path / "afile").write_text("x")
    assert main(["report", "any", "--tracking-uri", f"sqlite:///{tmp_path / 'm.db'}",
                 "--report-dir", str(tmp_path / "afile" / "r")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "is a file, not a folder" in err[0], err


def test_reports_go_to_the_working_folder_and_a_resumed_sweep_logs_drift(tiny_llava_dir, tmp_path, monkeypatch):
    """Without --report-dir the report lands in ./reports/out/<experiment>/; running the finished
    sweep again (nothing left to run) still times the baseline once more and logs the drift."""
    mlflow = pytest.importorskip("mlflow", reason="MLflow is not installed here")

    monkeypatch.chdir(tmp_path)
    p = tmp_path / "exp.yaml"
    p.write_text(yaml.safe_dump({**BASE, "model": {"path": tiny_llava_dir}, "methods": ["baseline", "random"]}))
    uri = f"sqlite:///{tmp_path / 'm.db'}"
    assert main(["sweep", str(p), "--tracking-uri", uri, "--no-progress"]) == 0
    assert (tmp_path / "reports" / "out" / "bad" / "report.md").is_file()
    assert main(["sweep", str(p), "--tracking-uri", uri, "--no-progress", "--no-report"]) == 0
    client = mlflow.MlflowClient(uri)
    exp = client.get_experiment_by_name("bad")
    parent = client.search_runs([exp.experiment_id], "tags.role = 'sweep'")[0]
    assert len(client.get_metric_history(parent.info.run_id, "drift_prefill")) == 2


def test_yaml_merge_keys_still_work(tmp_path):
    """Refusing duplicate keys must not refuse YAML merges (`<<: *anchor`)."""
    from harness.experiment import load_experiment

    p = tmp_path / "merge.yaml"
    p.write_text("experiment: m\ndataset: {split: val, samples_per_type: 1}\nbudgets: [0.5]\nmethods:\n"
                 "  - &f {name: fastv, settings: {K: 1}}\n  - {<<: *f, budgets: [0.6]}\n")
    exp = load_experiment(p)
    assert [(c.method, c.settings, c.budget) for c in exp.cells] == [("fastv", {"K": 1}, 0.5), ("fastv", {"K": 1}, 0.6)]


def test_preflight_accepts_valid_destinations(tmp_path):
    """What must pass: the default store (new or existing), a folder store, SQLAlchemy driver
    schemes, any HTTP server that answers (even 404: MLflow handles the rest), Ray's auto/local."""
    import http.server
    import sqlite3
    import threading

    from harness.preflight import check_ray_address, check_tracking_uri

    check_tracking_uri(f"sqlite:///{tmp_path / 'new.db'}")
    sqlite3.connect(tmp_path / "old #1.db").execute("create table t (x)").connection.commit()
    check_tracking_uri(f"sqlite:///{tmp_path / 'old #1.db'}")
    check_tracking_uri(str(tmp_path / "mlruns"))
    check_tracking_uri("postgresql+psycopg2://user@db.invalid/mlflow")  # passed on to MLflow unchecked
    server = http.server.HTTPServer(("127.0.0.1", 0), http.server.BaseHTTPRequestHandler)  # answers 501
    threading.Thread(target=server.handle_request, daemon=True).start()
    check_tracking_uri(f"http://127.0.0.1:{server.server_address[1]}")
    server.server_close()
    for address in (None, "auto", "local"):
        check_ray_address(address)
    assert not (tmp_path / "new.db").exists()  # checked, not created
