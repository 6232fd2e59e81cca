"""The miniature's fidelity (issue 11): across methods at 16 of 144 visual tokens (88.9 % pruned),
is each sample's correctness explained by how much of its question's objects was kept, whatever
method kept it? A model trained on some selection rule's patterns answers better from that rule's
tokens than their coverage explains; a faithful miniature, like a real LVLM, does not."""
import os

import numpy as np
import pytest

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
    names, rows, records = fidelity.run_inline("embedded", TOKENS, N, METHODS, device=str(device))
    base = records.pop("baseline")
    point, lo, hi, _ = fidelity.effects(rows, len(names))
    acc = fidelity.accuracy(records | {"baseline": base})
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
    names, rows, records = fidelity.run_inline("embedded", TOKENS, 6, ["fastv:K=1", "oracle"])
    assert names == ["fastv[K=1]", "oracle"] and set(fidelity.accuracy(records)) == {"baseline", *names}
    assert len(rows) == 12 and all(0.0 <= v <= 1.0 and s in (0.0, 1.0) for _, v, s in rows)
    oracle = [v for m, v, _ in rows if m == 1]
    assert np.mean(oracle) > 0.9  # the oracle keeps (nearly all of) the question's objects
    assert fidelity.method_entry("fastv:K=1,R=2") == {"name": "fastv", "settings": {"K": 1, "R": 2}}
    with pytest.raises(SystemExit, match="'K' of 'fastv:K': expected NAME=INT"):
        fidelity.method_entry("fastv:K")
