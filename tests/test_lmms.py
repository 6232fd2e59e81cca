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
    ({"method": "fastv", "budget": 16, "Q": 1}, "Q"),
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
        assert len(model.records) == len(predictions) and all(r["timings"]["e2e_ms"] > 0 for r in model.records)
        if name == "ttp+ssd":
            assert all(r["rounds"] >= 1 for r in model.records)
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
