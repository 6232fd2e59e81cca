"""The miniature's fidelity (issue 11): across methods at 16 of 144 visual tokens (88.9 % pruned),
is each sample's correctness explained by how much of its question's objects was kept, whatever
method kept it? A model trained on some selection rule's patterns answers better from that rule's
tokens than their coverage explains; a faithful miniature, like a real LVLM, does not."""
import os

import numpy as np
import pytest

from harness.cell import run_cell
from harness.data import synthetic as syn
from harness.experiment import parse_experiment
from harness.models.adapter import load_model
from tools import fidelity

TOKENS = 16
METHODS = ["twigvlm", {"name": "fastv", "settings": {"K": 1}}, "sparsevlm", "visionzip", "random", "pool", "oracle"]
N = int(os.environ.get("TWIGBENCH_FIDELITY_N", 300))  # short-answer samples (test split 600..): about +-5 points


@pytest.mark.slow
@pytest.mark.xfail(strict=True, reason="the shipped embedded model is not faithful yet (issue 11): trained on random "
                                       "and oracle-like token dropout, it answers better from random tokens (+16 "
                                       "points at equal coverage) and worse from TwigVLM's (-10); the neutral recipe "
                                       "(make train-neutral) is its replacement")
def test_accuracy_is_explained_by_what_was_kept(device, capsys):
    adapter = load_model("embedded", device=str(device))
    samples = [s for s in (syn.make_sample("test", 600 + i) for i in range(N * 6 // 5 + 6)) if s.qtype != "describe"][:N]
    inputs = [adapter.inputs(s.image, s.question) for s in samples]
    exp = parse_experiment({"experiment": "fidelity",
                            "generation": {"max_new_tokens": 3}, "timing": {"warmup": 0, "repeats": 1},
                            "budgets": [TOKENS], "methods": ["baseline", *METHODS]}, "fidelity")
    records = {c.series: run_cell(adapter, c, samples, inputs).records for c in exp.cells}
    base = records.pop("baseline")
    names, rows = list(records), []
    for m, name in enumerate(names):
        for r in records[name]:
            v = fidelity.coverage(r, TOKENS)
            if v is not None:
                rows.append((m, v, r.score))
    point, lo, hi, _ = fidelity.effects(rows, len(names))
    acc = {k: np.mean([r.score for r in v]) for k, v in records.items()} | {"baseline": np.mean([r.score for r in base])}
    with capsys.disabled():
        print("\n" + fidelity.table(names, rows, f"embedded, {TOKENS} tokens, {N} samples per method"))
        print("accuracy: " + ", ".join(f"{k} {100 * v:.1f}%" for k, v in acc.items()))
    assert (hi - lo).max() <= 0.2, "intervals too wide to mean anything: more samples"
    off = {names[m]: round(100 * point[m], 1) for m in range(len(names)) if abs(point[m]) > 0.05}
    assert not off, f"effects at equal coverage beyond +-5 points: {off}"
    assert abs(acc["oracle"] - acc["baseline"]) <= 0.05
    diff = [r.score - b.score for r, b in zip(records["random"], base)]
    draws = np.random.default_rng(0).choice(diff, (1000, len(diff))).mean(1)
    assert np.percentile(draws, 97.5) < 0, "random selection is not clearly below the baseline"


def test_inline_fidelity_runs_a_model_directory_without_mlflow():
    names, rows, accuracy = fidelity.run_inline("embedded", TOKENS, 6, ["fastv:K=1", "oracle"])
    assert names == ["fastv[K=1]", "oracle"] and set(accuracy) == {"baseline", *names}
    assert len(rows) == 12 and all(0.0 <= v <= 1.0 and s in (0.0, 1.0) for _, v, s in rows)
    oracle = [v for m, v, _ in rows if m == 1]
    assert np.mean(oracle) > 0.9  # the oracle keeps (nearly all of) the question's objects
    assert fidelity.method_entry("fastv:K=1,R=2") == {"name": "fastv", "settings": {"K": 1, "R": 2}}
