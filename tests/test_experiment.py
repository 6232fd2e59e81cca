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


def test_grid_zip_exclude_and_several_models_expand_as_written(tiny_llava_dir, tmp_path):
    raw = {"experiment": "t", "models": [{"path": tiny_llava_dir}, {"path": tiny_llava_dir, "dtype": "bfloat16"}],
           "datasets": [{"split": "val", "samples_per_type": 1}, {"split": "test", "samples_per_type": 1}],
           "budgets": [0.3, 0.4],
           "methods": ["baseline",
                       {"name": "fastv", "grid": {"K": [1, 2]}},  # 2 budgets x 2 K
                       {"name": "random", "grid": {"K": [1, 2]}, "zip": [["K", "budget"]]}],  # 2 pairs
           "exclude": [{"method": "fastv", "K": 2, "budget": 0.4}, {"split": "test", "method": "random"}]}
    exp = load_experiment(write(tmp_path, yaml.safe_dump(raw)))
    per_val = ["baseline", "fastv@0.3[K=1]", "fastv@0.3[K=2]", "fastv@0.4[K=1]", "random@0.3[K=1]", "random@0.4[K=2]"]
    per_test = per_val[:4]
    labels = [c.label for c in exp.cells]
    assert len(labels) == 2 * (len(per_val) + len(per_test)) == len(set(labels))
    for dtype in ("float32", "bfloat16"):
        for split, expected in (("val", per_val), ("test", per_test)):
            got = [c.label.split(" ", 1)[1] for c in exp.cells
                   if c.model["dtype"] == dtype and c.dataset["split"] == split]
            assert sorted(got) == sorted(expected)
            assert all(f"[{dtype},sdpa]/shapes:{split} " in c.label for c in exp.cells
                       if c.model["dtype"] == dtype and c.dataset["split"] == split)
    # identity: the resolved config decides the hash; dtype and split are part of it
    assert len({c.hash for c in exp.cells}) == len(exp.cells)
    again = load_experiment(write(tmp_path, yaml.safe_dump(raw)))
    assert [c.hash for c in again.cells] == [c.hash for c in exp.cells] and again.hash == exp.hash
    raw["generation"] = {"max_new_tokens": 7}
    changed = load_experiment(write(tmp_path, yaml.safe_dump(raw)))
    assert not {c.hash for c in changed.cells} & {c.hash for c in exp.cells}


def test_dry_run_lists_cells_with_their_hashes(tiny_llava_dir, tmp_path, capsys):
    p = write(tmp_path, good(tiny_llava_dir))
    assert main(["sweep", str(p), "--dry-run", "--tracking-uri", f"sqlite:///{tmp_path / 'm.db'}"]) == 0
    out = capsys.readouterr().out.splitlines()
    exp = load_experiment(p)
    assert out[1:] == [f"  {c.hash}  {c.label}" for c in exp.cells]
    assert not (tmp_path / "m.db").exists()


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
    (lambda m: good(m, timing={"repeats": 0}), "timing.repeats = 0; allowed: an integer >= 1"),
    (lambda m: good(m, methods=[{"name": "fastv", "grid": {"K": [1, 2]}, "budgets": [0.3, 0.4, 0.5],
                                 "zip": [["K", "budget"]]}]), "unequal lengths"),
    (lambda m: good(m, methods=[{"name": "fastv", "grid": {"K": [1, 2]}, "zip": [["K", "T"]]}]),
     "zip names axis 'T'; allowed: budget, K"),
    (lambda m: good(m, methods=[{"name": "fastv", "settings": {"K": 1}, "grid": {"K": [2]}}]),
     "'K' is both in settings and in grid"),
    (lambda m: good(m, methods=[{"name": "fastv", "grid": {"K": 2}}]), "grid.K must be a non-empty list"),
    (lambda m: good(m, exclude=[{"method": "fastv", "budget": 0.9}]), r"exclude\[0\] .* matches no cell"),
    (lambda m: good(m, exclude=[{"method": "fastv"}, {"method": "baseline"}]), "leave no cell"),
    (lambda m: good(m, models=[{"path": m}]), "both 'model' and 'models' given"),
    (lambda m: good(m, model={"path": "/ckpt/llava-1.5-7b-hf", "checkpoint": "llava-hf/llava-1.5-7b-hf"}),
     "expects llava-hf/llava-1.5-7b-hf there"),
])
def test_bad_files_fail_with_one_clear_line_and_create_no_run(tiny_llava_dir, tmp_path, capsys, mutate, message):
    p = write(tmp_path, mutate(tiny_llava_dir))
    with pytest.raises(ExperimentError, match=message):
        load_experiment(p)
    db = tmp_path / "mlflow.db"
    assert main(["sweep", str(p), "--tracking-uri", f"sqlite:///{db}"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error:") and message.split("'")[0].split(".*")[0].replace("\\", "") in err[0]
    assert not db.exists()


def test_ssd_cells_run_and_report_acceptance(tiny_llava_dir, tmp_path, device):
    """A decoding choice next to any method: same tokens as greedy, plus SSD's counters."""
    from harness.data import load_samples
    from harness.experiment import Cell
    from harness.models.adapter import load_model
    from harness.cell import run_cell
    from methods.twigvlm.twig import Twig, save_twig

    adapter = load_model(tiny_llava_dir, device=device)
    save_twig(Twig.grow(adapter.model, 1, 2, "copy"), tmp_path / "twig", {"init": "copy"})
    ssd = {"name": "ssd", "twig": str(tmp_path / "twig"), "delta": 3, "theta": 0.0}
    samples = load_samples("shapes", "val", 1)
    inputs = [adapter.inputs(s.image, s.question) for s in samples]
    for method, budget, settings in (("baseline", None, {}), ("fastv", 0.5, {"K": 1})):
        greedy = run_cell(adapter, Cell(method, settings, budget), samples, inputs, 8, 0)
        spec = run_cell(adapter, Cell(method, settings, budget, ssd), samples, inputs, 8, 0)
        assert [r.tokens for r in spec.records] == [r.tokens for r in greedy.records]
        assert spec.params["decoding"] == "ssd" and greedy.params["decoding"] == "greedy"
        assert 0 <= spec.metrics["acceptance_rate"] <= 1 and spec.metrics["mean_accepted_length"] >= 1
        assert spec.metrics["target_forwards_per_token"] <= 1
    assert Cell("fastv", {"K": 1}, 0.5, ssd).label.startswith("fastv@0.5[K=1]+ssd[")


@pytest.mark.parametrize("name,checkpoint", [("llava15_7b", "llava-hf/llava-1.5-7b-hf"),
                                             ("llava_next_7b", "llava-hf/llava-v1.6-vicuna-7b-hf"),
                                             ("ablation_7b", "llava-hf/llava-1.5-7b-hf")])
def test_paper_gpu_settings_name_the_checkpoint_they_need(name, checkpoint):
    """Without the checkpoint (as here: no /models), one line says which and how to fetch it."""
    from pathlib import Path

    p = Path(__file__).resolve().parents[1] / "experiments" / "paper" / f"{name}.yaml"
    with pytest.raises(ExperimentError, match=f"expects {checkpoint} there: fetch it"):
        load_experiment(p)
    raw = yaml.safe_load(p.read_text())  # and the rest of the file is a valid grid
    raw["model"] = {"path": "embedded"}
    from harness.experiment import parse_experiment
    with pytest.raises(ExperimentError, match="twig '/models/twigs/"):
        parse_experiment(raw, name)


def test_timing_subset_is_validated_and_unset_keeps_old_cell_hashes():
    from harness.experiment import ExperimentError, parse_experiment

    raw = {"experiment": "t", "methods": ["baseline"]}
    cell = parse_experiment(raw).cells[0]
    assert "subset" not in cell.config()["timing"]  # sweeps logged before timing.subset resume
    assert parse_experiment({**raw, "timing": {"subset": 8}}).cells[0].config()["timing"]["subset"] == 8
    for bad in (0, -1, "all", 2.5, True):
        with pytest.raises(ExperimentError, match="timing.subset"):
            parse_experiment({**raw, "timing": {"subset": bad}})
