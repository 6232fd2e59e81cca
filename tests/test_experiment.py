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
