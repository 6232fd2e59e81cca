"""End to end: a sweep through the CLI lands in MLflow as a parent run with one child per cell,
and the report is rebuilt from MLflow alone."""
import json

import pytest
import yaml

from harness.cli import main


@pytest.mark.slow
def test_sweep_logs_parent_and_children_and_writes_the_report(tiny_llava_dir, tmp_path, capsys, device):
    mlflow = pytest.importorskip("mlflow", reason="MLflow is not installed here")
    exp = {"experiment": "e2e", "model": {"path": tiny_llava_dir},
           "dataset": {"name": "shapes", "split": "val", "samples_per_type": 2},
           "generation": {"max_new_tokens": 6}, "timing": {"warmup": 1, "repeats": 2}, "budgets": [0.4, 60],
           "methods": ["baseline", {"name": "fastv", "settings": {"K": 1}}, "random", "oracle", "sparsevlm",
                       "visionzip", "pool"]}
    p = tmp_path / "exp.yaml"
    p.write_text(yaml.safe_dump(exp))
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    assert main(["sweep", str(p), "--tracking-uri", uri, "--report-dir", str(tmp_path / "reports")]) == 0
    out = capsys.readouterr().out
    assert "sweep finished" in out and "report:" in out

    mlflow.set_tracking_uri(uri)
    e = mlflow.get_experiment_by_name("e2e")
    runs = mlflow.search_runs([e.experiment_id])
    parents = runs[runs["tags.role"] == "sweep"]
    children = runs[runs["tags.role"] == "cell"]
    assert len(parents) == 1 and len(children) == 13  # baseline + 6 methods x 2 budgets
    assert set(children["tags.mlflow.parentRunId"]) == {parents["run_id"].iloc[0]}
    assert (children["status"] == "FINISHED").all()
    env = ("git_commit", "torch_version", "transformers_version", "harness_version", "device")
    for tag in env + ("cell_hash", "series", "method", "model", "dataset", "decoding"):
        assert children[f"tags.{tag}"].notna().all(), tag
    for tag in env:
        assert parents[f"tags.{tag}"].notna().all(), tag
    assert children["tags.cell_hash"].nunique() == 13
    # the closing pass: the baseline timed again after the other cells, drift logged on the parent
    assert parents["metrics.drift_prefill"].iloc[0] > 0 and "timing drift over the sweep" in out
    # the device's measured peaks on the parent, the default engine regime on every cell
    assert parents["metrics.peak_tflops_float32"].iloc[0] > 0 and parents["metrics.peak_bandwidth_tb_per_s"].iloc[0] > 0
    assert (children["params.engine"] == "eager").all()
    art = mlflow.artifacts.download_artifacts(run_id=parents["run_id"].iloc[0], artifact_path="cells.json",
                                              dst_path=str(tmp_path / "cells"))
    cells = json.loads(open(art).read())
    assert sorted(c["hash"] for c in cells) == sorted(children["tags.cell_hash"])
    base = children[children["params.method"] == "baseline"].iloc[0]
    assert base["metrics.agreement_with_baseline"] == 1.0  # relative accuracy is undefined at 0 % (random weights)
    assert base["metrics.equal_token_average"] == 144
    for _, r in children[children["params.method"] != "baseline"].iterrows():
        measured, budget = r["metrics.equal_token_average"], float(r["params.budget_tokens"])
        if r["params.method"] == "pool":  # the largest h x w grid within the budget
            h, w = map(int, r["params.grid"].split("x"))
            assert measured == h * w <= budget
        elif r["params.method"] == "sparsevlm":  # its own accounting hits the budget, ours is higher
            assert abs(float(r["params.official_equal_token_average"]) - budget) <= 6 < measured - budget
        else:
            assert abs(measured - budget) <= 1
        for key in ("params.dtype", "params.attn_implementation", "metrics.prefill_ms", "metrics.prefill_ms_spread",
                    "metrics.decode_tokens_per_s_pooled", "metrics.decode_tokens_per_s_mean", "metrics.e2e_ms",
                    "metrics.vision_ms", "metrics.select_ms", "metrics.ttft_ms",
                    # the sweep's models are on the test device ($TWIGBENCH_DEVICE): GPU memory there
                    "metrics.peak_gpu_allocated_mb" if device.type == "cuda" else "metrics.peak_rss_mb",
                    "metrics.prefill_gflops", "metrics.kv_cache_mb", "metrics.target_forwards_per_token",
                    "metrics.accuracy_describe", "metrics.accuracy_diff", "metrics.agreement_with_baseline"):
            assert key in r.index and r[key] == r[key], key
        assert r["metrics.repeats"] == 2 and r["metrics.repeat_token_mismatches"] == 0
        # bound / measured, logged for every cell (a CPU's caches can beat the copy bandwidth the bound
        # assumes for a model this small, so only finite and positive here; tools.shape_check checks the GPU)
        for k in ("prefill_roofline_fraction", "decode_roofline_fraction", "roofline_fraction"):
            assert 0 < r[f"metrics.{k}"] < float("inf"), k
        assert r["metrics.accuracy_diff_ci_low"] <= r["metrics.accuracy_diff"] <= r["metrics.accuracy_diff_ci_high"]
        assert r["metrics.prefill_speedup_ci_low"] <= r["metrics.prefill_speedup_ci_high"]
        # fewer tokens in the decoder: fewer analytic FLOPs and a smaller cache than the baseline's
        assert r["metrics.prefill_gflops"] < base["metrics.prefill_gflops"]
        assert r["metrics.kv_cache_mb"] < base["metrics.kv_cache_mb"]
    # per-sample records are an artifact of each child run
    local = mlflow.artifacts.download_artifacts(run_id=base["run_id"], artifact_path="samples.jsonl",
                                                dst_path=str(tmp_path / "dl"))
    lines = [json.loads(x) for x in open(local)]
    assert len(lines) == 12 and {"prediction", "score", "keep", "visual_per_layer", "timings"} <= set(lines[0])
    assert len(lines[0]["timings"]) == 2

    # keep and merge maps: VisionZip's happen before the LLM (-1), CLS is patch -1
    vz = children[(children["params.method"] == "visionzip") & (children["params.budget_tokens"] == "60")].iloc[0]
    local = mlflow.artifacts.download_artifacts(run_id=vz["run_id"], artifact_path="samples.jsonl",
                                                dst_path=str(tmp_path / "dl-vz"))
    rec = json.loads(open(local).readline())
    assert len(rec["keep"]["-1"]) == 60 and -1 in rec["keep"]["-1"]
    assert len(rec["merged"]["-1"]) == int(vz["params.contextual"])

    report = (tmp_path / "reports" / "e2e" / "report.md").read_text()
    assert "| *Retain 60 tokens (↓ 58.3 %)* |" in report
    assert "| fastv[K=1] |" in report and "| *oracle* |" in report and "| visionzip |" in report
    assert "sparsevlm at 60 tokens processes" in report
    for name in ("index.html", "tables.tex", "accuracy_vs_tokens.png", "accuracy_vs_speedup.pdf"):
        assert (tmp_path / "reports" / "e2e" / name).stat().st_size > 1000, name


def test_relative_metrics_need_a_baseline_cell(tiny_llava_dir, device):
    from harness.data import load_samples
    from harness.experiment import Cell
    from harness.models.adapter import load_model
    from harness.cell import run_cell

    adapter = load_model(tiny_llava_dir, device=device)
    samples = load_samples("shapes", "val", 1)
    inputs = [adapter.inputs(s.image, s.question) for s in samples]
    alone = run_cell(adapter, Cell("random", {}, 60), samples, inputs, 3, 0)
    assert "relative_accuracy" not in alone.metrics and "agreement_with_baseline" not in alone.metrics
    base = run_cell(adapter, Cell("baseline", {}, None), samples, inputs, 3, 0)
    assert base.metrics["agreement_with_baseline"] == 1.0
    other = run_cell(adapter, Cell("random", {}, 60), samples, inputs, 3, 0, baseline=base.records)
    assert other.metrics["agreement_with_baseline"] < 1.0
