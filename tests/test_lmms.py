"""twigbench inside lmms-eval: model_args validated like an experiment cell; the plug-in found through
its entry point; the embedded benchmark exported as a task; the same answers through lmms-eval's
CLI, through simple_evaluate and through the native sweep."""
import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from harness.experiment import ExperimentError
from harness.lmms.args import cell_from_args

SPT = 2  # samples per question type: 12 samples
METHODS = {  # model_args of the three paths the issue names, and the native cell they must equal
    "baseline": {"method": "baseline"},
    "fastv": {"method": "fastv", "budget": 16, "K": 1},
    "ttp+ssd": {"method": "twigvlm", "budget": 16, "decoding": "ssd"},
}


@pytest.mark.parametrize("args, message", [
    ({"method": "fastvv"}, "unknown method 'fastvv'; allowed:"),
    ({"method": "baseline", "budget": 64}, "method 'baseline' takes no budget"),
    ({"method": "fastv"}, "method 'fastv' needs budgets"),
    ({"method": "fastv", "budget": 1000}, "exceeds the model's 144 visual"),
    ({"decoding": "beam"}, "decoding='beam'; allowed: greedy, ssd"),
    ({"delta": 3}, "delta apply to decoding=ssd only"),
    ({"dtype": "float8"}, "model dtype 'float8'; allowed:"),
    ({"method": "fastv", "budget": 16, "Q": 1}, "fastv: unknown setting(s) 'Q'; allowed: K"),
])
def test_model_args_are_validated_like_an_experiment_cell(args, message):
    with pytest.raises(ExperimentError) as e:
        cell_from_args(args)
    assert message in str(e.value) and "\n" not in str(e.value)


def test_model_args_make_the_cell_an_experiment_file_would():
    c = cell_from_args({"method": "twigvlm", "budget": 0.889, "decoding": "ssd", "delta": 4, "max_new_tokens": 20})
    assert (c.method, c.budget, c.decoding["delta"], c.decoding["twig"]) == ("twigvlm", 0.889, 4, "embedded")
    assert c.generation["max_new_tokens"] == 20 and c.model["path"] == "embedded"
    c = cell_from_args({"method": "fastv", "budget": 16, "K": 1})
    assert c.series == "fastv[K=1]" and c.decoding is None


def test_the_plugin_is_found_through_its_entry_point():
    lmms_eval = pytest.importorskip("lmms_eval")
    from importlib.metadata import entry_points

    ep = [e for e in entry_points(group="lmms_eval.models") if e.name == "twigbench"]
    assert len(ep) == 1 and ep[0].load()().simple_class_path == "harness.lmms.model.TwigbenchLMM"
    from lmms_eval.models import get_model

    assert get_model("twigbench").__name__ == "TwigbenchLMM" and lmms_eval


def test_export_shapes_writes_the_native_samples_in_order(tmp_path):
    from harness.data import load_samples
    from harness.lmms.tasks import export_shapes
    from PIL import Image
    import numpy as np

    d = export_shapes(tmp_path, "test", SPT)
    docs = [json.loads(x) for x in (d / "data.jsonl").read_text().splitlines()]
    samples = load_samples("shapes", "test", SPT)
    assert [x["uid"] for x in docs] == [s.uid for s in samples]
    assert [x["question"] for x in docs] == [s.question for s in samples]
    assert np.array_equal(np.asarray(Image.open(d / docs[3]["image"]).convert("RGB")),
                          np.asarray(samples[3].image.convert("RGB")))
    assert "task: shapes_test" in (d / "shapes_test.yaml").read_text()


def _text(resps) -> str:
    """A logged answer: lmms-eval keeps a list in memory and writes its first element to the file."""
    return resps[0] if isinstance(resps, list) else resps


def _native(args: dict) -> list[str]:
    from harness.executors import Workspace

    cell = dataclasses.replace(cell_from_args(args), dataset={"name": "shapes", "split": "test", "samples_per_type": SPT},
                               timing={"warmup": 0, "repeats": 1, "paired": False})
    res = Workspace().run(cell)
    return [r.prediction for r in res.records], [r.score for r in res.records]


@pytest.mark.slow
def test_cli_simple_evaluate_and_native_sweep_give_the_same_answers(tmp_path):
    pytest.importorskip("lmms_eval")
    from lmms_eval.evaluator import simple_evaluate
    from lmms_eval.tasks import TaskManager

    from harness.lmms.model import TwigbenchLMM
    from harness.lmms.tasks import export_shapes

    export_shapes(tmp_path / "tasks", "test", SPT)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "PYTHONPATH": str(Path.cwd())}
    seen = {}
    for name, args in METHODS.items():
        predictions, scores = _native(args)
        seen[name] = predictions
        model = TwigbenchLMM(**args)
        tm = TaskManager("WARNING", include_path=str(tmp_path / "tasks"))
        res = simple_evaluate(model=model, tasks=["shapes_test"], log_samples=True, task_manager=tm,
                              bootstrap_iters=0)
        logged = sorted(res["samples"]["shapes_test"], key=lambda s: s["doc_id"])
        assert [_text(s["filtered_resps"]) for s in logged] == predictions, name
        assert res["results"]["shapes_test"]["accuracy,none"] == pytest.approx(sum(scores) / len(scores), abs=1e-12)
        assert len(model.records) == len(predictions) and all(r.timings[0]["e2e_ms"] > 0 for r in model.records)
        assert [r.prediction for r in model.records] == predictions
        if name == "ttp+ssd":
            assert all(r.rounds >= 1 for r in model.records)
        # the CLI: exit status 0 even after errors, so the test reads what it wrote
        out = tmp_path / f"cli-{name.replace('+', '-')}"
        margs = ",".join(f"{k}={v}" for k, v in {"pretrained": "embedded", **args}.items())
        run = subprocess.run([sys.executable, "-m", "lmms_eval", "--model", "twigbench", "--model_args", margs,
                              "--tasks", "shapes_test", "--include_path", str(tmp_path / "tasks"), "--output_path",
                              str(out), "--log_samples", "--batch_size", "1"], capture_output=True, text=True, env=env,
                             timeout=900)
        assert "Error during evaluation" not in run.stdout + run.stderr, (run.stdout + run.stderr)[-3000:]
        (samples_file,) = out.rglob("*_samples_shapes_test.jsonl")
        cli = sorted((json.loads(x) for x in samples_file.read_text().splitlines()), key=lambda s: s["doc_id"])
        assert [_text(s["filtered_resps"]) for s in cli] == predictions, name
        (results_file,) = out.rglob("*_results.json")
        acc = json.loads(results_file.read_text())["results"]["shapes_test"]["accuracy,none"]
        assert acc == pytest.approx(sum(scores) / len(scores), abs=1e-12), name
    # the samples tell the methods apart: a plug-in that ignored its method would fail above
    assert seen["fastv"] != seen["baseline"] and seen["ttp+ssd"] != seen["baseline"]


def test_bad_model_args_through_the_plugin_are_one_line():
    pytest.importorskip("lmms_eval")
    from harness.lmms.model import TwigbenchLMM

    with pytest.raises(ExperimentError, match="unknown method 'nope'"):
        TwigbenchLMM(method="nope")
    with pytest.raises(ValueError, match="batch_size=4; allowed: 1"):
        TwigbenchLMM(batch_size=4)


@pytest.mark.slow
def test_an_experiment_with_an_lmms_eval_dataset_logs_like_a_native_one(tmp_path, capsys):
    pytest.importorskip("lmms_eval")
    import mlflow
    import yaml

    from harness.cli import main
    from harness.lmms.tasks import export_shapes

    export_shapes(tmp_path / "tasks", "test", SPT)
    exp = {"experiment": "lmms", "model": {"path": "embedded"},
           "datasets": [{"lmms_eval": "shapes_test", "limit": 6, "include_path": str(tmp_path / "tasks")}],
           "timing": {"warmup": 1, "repeats": 1, "paired": True}, "budgets": [16],
           "methods": ["baseline", {"name": "fastv", "settings": {"K": 1}}]}
    (tmp_path / "e.yaml").write_text(yaml.safe_dump(exp))
    uri = f"sqlite:///{tmp_path / 'm.db'}"
    assert main(["sweep", str(tmp_path / "e.yaml"), "--tracking-uri", uri, "--report-dir", str(tmp_path / "r"),
                 "--no-progress"]) == 0
    mlflow.set_tracking_uri(uri)
    runs = mlflow.search_runs([mlflow.get_experiment_by_name("lmms").experiment_id], "tags.role = 'cell'")
    assert len(runs) == 2
    predictions = {}
    for _, r in runs.iterrows():
        assert r["params.dataset"] == "lmms_eval:shapes_test" and r["params.lmms_task"] == "shapes_test"
        assert r["metrics.samples"] == 6 and r["metrics.lmms/shapes_test/accuracy"] == r["metrics.accuracy"]
        local = mlflow.artifacts.download_artifacts(run_id=r["run_id"], artifact_path="samples.jsonl",
                                                    dst_path=str(tmp_path / r["run_id"]))
        recs = [json.loads(x) for x in open(local)]
        assert [x["uid"] for x in recs] == [f"shapes_test-{i}" for i in range(6)]
        assert all(len(x["timings"]) == 1 and x["timings"][0]["prefill_ms"] > 0 for x in recs)
        predictions[r["params.method"]] = [x["prediction"] for x in recs]
        mlflow.artifacts.download_artifacts(run_id=r["run_id"], artifact_path="lmms_samples_shapes_test.jsonl",
                                            dst_path=str(tmp_path / r["run_id"]))
    fastv = runs[runs["params.method"] == "fastv"].iloc[0]
    assert fastv["metrics.prefill_speedup"] > 0 and "metrics.relative_accuracy" in fastv.index
    assert fastv["metrics.equal_token_average"] == pytest.approx(16, abs=1)
    # the same answers as the native cells on the first six samples
    native_fastv, _ = _native(METHODS["fastv"])
    assert predictions["fastv"] == native_fastv[:6]
    report = (tmp_path / "r" / "lmms" / "report.md").read_text()
    assert "| Method | lmms_eval:shapes_test | RelAcc |" in report and "| fastv[K=1] |" in report


def test_a_real_task_without_its_data_stops_before_any_run(tmp_path, capsys):
    pytest.importorskip("lmms_eval")
    import yaml

    from harness.cli import main

    exp = {"experiment": "nodata", "datasets": [{"lmms_eval": "mme", "limit": 5}], "methods": ["baseline"]}
    (tmp_path / "e.yaml").write_text(yaml.safe_dump(exp))
    uri = f"sqlite:///{tmp_path / 'm.db'}"
    assert main(["sweep", str(tmp_path / "e.yaml"), "--tracking-uri", uri, "--no-progress"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "lmms-eval task 'mme'" in err[0] and "huggingface-cli download" in err[0], err
    assert not (tmp_path / "m.db").exists()
    exp["datasets"] = [{"lmms_eval": "no_such_task"}]
    (tmp_path / "e.yaml").write_text(yaml.safe_dump(exp))
    assert main(["sweep", str(tmp_path / "e.yaml"), "--tracking-uri", uri]) == 2
    assert "lmms-eval task 'no_such_task' not found" in capsys.readouterr().err


def test_loglikelihood_is_the_continuations_nll_after_the_prompt(tiny_llava_dir, device):
    """Baseline: the NLL of the continuation teacher-forced through the engine's cache equals the
    one of a plain transformers forward over prompt + continuation (fp32 sums in another order)."""
    pytest.importorskip("lmms_eval")
    from types import SimpleNamespace

    import torch

    from harness.data.synthetic import make_sample
    from harness.lmms.model import TwigbenchLMM
    from tests.numerics import decoder_reduction, fp32_atol

    m = TwigbenchLMM(pretrained=tiny_llava_dir)  # loaded on the test device ($TWIGBENCH_DEVICE)
    assert m.adapter.device == device
    image = make_sample("test", 0).image
    m.task_dict = {"t": {"test": [{"id": 0}]}}
    req = SimpleNamespace(args=("What is in the image?", " a red circle", lambda doc: [image], 0, "t", "test"))
    (res,) = m.loglikelihood([req])
    nll, greedy = res.text
    x = m.adapter.inputs(image, "What is in the image?")
    full = m.adapter.processor(images=image, text=m.adapter.prompt("What is in the image?") + " a red circle",
                               return_tensors="pt")["input_ids"].to(device)  # tokenized together, as the model reads it
    ids = full[0, x["input_ids"].shape[1]:].tolist()
    assert len(ids) >= 3
    with torch.no_grad():
        logits = m.adapter.model(input_ids=full, pixel_values=x["pixel_values"]).logits[0].float()
    n = x["input_ids"].shape[1]
    steps = logits[n - 1:n - 1 + len(ids)]
    ref = -float(sum(torch.log_softmax(steps[i], -1)[t] for i, t in enumerate(ids)))
    cfg = m.adapter.model.config.text_config
    atol = 2 * len(ids) * fp32_atol(steps, decoder_reduction(cfg, full.shape[1]), cfg.num_hidden_layers + 1)
    assert abs(nll - ref) <= atol, (nll, ref, atol)
    assert greedy == all(int(steps[i].argmax()) == t for i, t in enumerate(ids))
    assert m.scoring[0]["equal_token_average"] == m.adapter.num_visual


def test_tasks_a_sweep_cannot_time_are_refused_before_any_run(tmp_path):
    pytest.importorskip("lmms_eval")
    from harness.data import DatasetError
    from harness.lmms.run import check_task
    from harness.lmms.tasks import export_shapes

    d = export_shapes(tmp_path, "test", 1)
    text = (d / "shapes_test.yaml").read_text().replace("task: shapes_test", "task: shapes_choice").replace(
        "output_type: generate_until", "output_type: multiple_choice\ndoc_to_choice: [a, b]")
    (d / "shapes_choice.yaml").write_text(text)
    check_task("shapes_test", str(tmp_path))  # a generation task with its data here: accepted
    with pytest.raises(DatasetError, match="'shapes_choice' is scored by multiple_choice; allowed as an experiment"):
        check_task("shapes_choice", str(tmp_path))


def test_a_temperature_without_sampling_is_greedy_and_sampling_is_refused():
    pytest.importorskip("lmms_eval")
    from types import SimpleNamespace

    from harness.data.synthetic import make_sample
    from harness.lmms.model import TwigbenchLMM

    m = TwigbenchLMM(max_new_tokens=4)
    m.task_dict = {"t": {"test": [{"id": 0}]}}
    image = make_sample("test", 0).image
    req = lambda kw: SimpleNamespace(args=("What is it?", kw, lambda doc: [image], 0, "t", "test"))  # noqa: E731
    (text,) = m.generate_until([req({"temperature": 0.2, "do_sample": False, "max_new_tokens": 4})])
    assert m.max_new_used == {4} and text.token_counts.output_tokens <= 4
    with pytest.raises(ValueError, match="do_sample=True; allowed: greedy decoding only"):
        m.generate_until([req({"do_sample": True})])
