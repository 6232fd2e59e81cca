"""Experiment files: every mistake stops before any run with one line naming the bad value."""
import pytest
import yaml

from harness.cli import main
from harness.experiment import ExperimentError, load_experiment


def write(tmp_path, text):
    p = tmp_path / "exp.yaml"
    p.write_text(text)
    return p


def good(model_dir, **over):
    d = {"experiment": "t", "model": {"path": model_dir}, "dataset": {"samples_per_type": 1},
         "budgets": [0.4], "methods": [{"name": "baseline"}, {"name": "fastv", "settings": {"K": 1}}]}
    d.update(over)
    return yaml.safe_dump(d)


def test_good_file_expands_into_cells(tiny_llava_dir, tmp_path):
    exp = load_experiment(write(tmp_path, good(tiny_llava_dir)))
    assert [c.label for c in exp.cells] == ["baseline", "fastv@0.4[K=1]"]


@pytest.mark.parametrize("mutate,message", [
    (lambda m: "experiment: [unclosed\n", "malformed YAML at line"),
    (lambda m: good(m, methods=[{"name": "fastvv"}]), "unknown method 'fastvv'; allowed:"),
    (lambda m: good(m, budgets=[1.5]), "budget ratio 1.5 is out of range"),
    (lambda m: good(m, budgets=[0.889], methods=[{"name": "fastv", "settings": {"K": 2}}]),
     "impossible with K=2"),
    (lambda m: good(m, colour="red"), "unknown section"),
    (lambda m: good(m, model={"path": "/nonexistent/llava"}), "model path '/nonexistent/llava' is not a checkpoint"),
    (lambda m: good(m, methods=[{"name": "fastv", "settings": {"k": 1}}]), "unknown setting"),
    (lambda m: good(m, methods=[{"name": "baseline", "budgets": [0.5]}]), "takes no budget"),
    (lambda m: good(m, methods=[{"name": "baseline", "decoding": "beam"}]), "decoding 'beam'; allowed: greedy, ssd"),
    (lambda m: good(m, methods=[{"name": "baseline", "decoding": {"name": "ssd", "delta": 0}}]),
     "decoding delta 0; allowed"),
    (lambda m: good(m, methods=[{"name": "baseline", "decoding": {"name": "ssd", "twig": "/no/twig"}}]),
     "twig '/no/twig' is not a directory"),
    (lambda m: good(m, methods=[{"name": "twigvlm", "settings": {"twig": "/no/twig"}}]),
     "twig '/no/twig' is not a directory"),
])
def test_bad_files_fail_with_one_clear_line_and_create_no_run(tiny_llava_dir, tmp_path, capsys, mutate, message):
    p = write(tmp_path, mutate(tiny_llava_dir))
    with pytest.raises(ExperimentError, match=message):
        load_experiment(p)
    db = tmp_path / "mlflow.db"
    assert main(["sweep", str(p), "--tracking-uri", f"sqlite:///{db}"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error:") and message.split("'")[0].split(".*")[0] in err[0]
    assert not db.exists()


def test_ssd_cells_run_and_report_acceptance(tiny_llava_dir, tmp_path):
    """A decoding choice next to any method: same tokens as greedy, plus SSD's counters."""
    from harness.data import load_samples
    from harness.experiment import Cell
    from harness.models.adapter import load_model
    from harness.runner import run_cell
    from methods.twigvlm.twig import Twig, save_twig

    adapter = load_model(tiny_llava_dir)
    save_twig(Twig.grow(adapter.model, 1, 2, "copy"), tmp_path / "twig", {"init": "copy"})
    ssd = {"name": "ssd", "twig": str(tmp_path / "twig"), "delta": 3, "theta": 0.0}
    samples = load_samples("shapes", "val", 1)
    inputs = [adapter.inputs(s.image, s.question) for s in samples]
    for method, budget, settings in (("baseline", None, {}), ("fastv", 0.5, {"K": 1})):
        greedy = run_cell(adapter, Cell(method, settings, budget), samples, inputs, 8, 0)
        spec = run_cell(adapter, Cell(method, settings, budget, ssd), samples, inputs, 8, 0)
        assert [r["tokens"] for r in spec.records] == [r["tokens"] for r in greedy.records]
        assert spec.params["decoding"] == "ssd" and greedy.params["decoding"] == "greedy"
        assert 0 <= spec.metrics["acceptance_rate"] <= 1 and spec.metrics["mean_accepted_length"] >= 1
        assert spec.metrics["target_forwards_per_token"] <= 1
    assert Cell("fastv", {"K": 1}, 0.5, ssd).label.startswith("fastv@0.5[K=1]+ssd[")
