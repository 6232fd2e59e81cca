"""Is accuracy explained by what was kept? The miniature's fidelity check (issue 11), from a sweep
in MLflow (no model is run): for every pruning cell at one budget, each sample's score against the
fraction of its question's object pixels that sit in patches kept as themselves (patches merged
into a kept token count only with --merged: VisionZip's contextual tokens and pooling then cover
nearly everything), fitted as score = effect[method] + f(coverage) by least squares, f a step
function over the coverage bins BINS (--fit linear: f = slope * coverage). A faithful miniature
gives every method the same effect at equal coverage (within a few points); a model trained on
some selection rule's patterns answers better from that rule's tokens.

Coverage is read at the pruning point whose kept count is nearest the budget (--point budget).
A method that prunes in stages (SparseVLM: 17, 8 and 4 tokens after layers 1, 3 and 8 at 16
tokens) keeps less after that point, so its effect there includes what its later stages cut;
--point last reads the last point that keeps visual tokens instead (a FinalWipe, which keeps
nothing, is skipped), where its effect includes what its earlier stages showed. A faithful model
puts a staged method at or below 0 at its first point and at or above 0 at its last.

Why bins: accuracy rises steeply with the first objects' patches and then flattens, and the
methods sit at different coverage (FastV mostly at 0, random spread over 0.05-0.35, the oracle at
1), so a straight line leaves each method's share of the curve in its effect. The bins compare
methods where their samples share a coverage bin; a method alone in its bins gets a wide interval.

    python -m tools.fidelity [--experiment default] [--tokens 16] [--tracking-uri sqlite:///mlflow.db] [--merged]
    python -m tools.fidelity --model DIR [--tokens 16] [--samples 150] [--methods fastv:K=1 random oracle ...]

`--model` runs the cells here instead (a model directory, e.g. a candidate before it has a twig or
a sweep): the baseline and each method on the first --samples short-answer samples of the test
split from 600 on (no test uses them), 3 new tokens each.

Prints per method: samples, mean coverage, accuracy, and the effect at equal coverage relative to
the mean of the methods, with a 95 % bootstrap interval over samples (and the other fit's point).
"""
from __future__ import annotations

import argparse
import copy

import numpy as np

from harness.data.synthetic import NUM_PATCHES, make_sample
from harness.tracking import DEFAULT_TRACKING_URI
from reports.figures import kept_patches
from reports.load import load_sweep

BOOTSTRAP = 1000
BINS = (0.0, 0.05, 0.1, 0.2, 0.35, 0.5, 0.7, 0.9, 0.999)  # left edges; exactly 0 is a bin of its own
FITS = ("bins", "linear")
POINTS = ("budget", "last")


def last_point(keep: dict) -> str | None:
    """The last pruning point that keeps visual tokens (a FinalWipe's empty point is skipped)."""
    kept = [k for k in sorted(keep, key=int) if keep[k]]
    return kept[-1] if kept else None


def coverage(record, tokens: int, with_merged: bool = False, point: str = "budget") -> float | None:
    """Fraction of the question's object pixels in patches kept at the pruning point nearest the
    budget (point 'budget') or at the last one that keeps tokens ('last')."""
    split, _, index = record.uid.rpartition("-")
    relevance = make_sample(split, int(index), record.qtype or None).patch_relevance()
    total = float(relevance.sum())
    if total == 0:
        return None
    if point == "last" and record.keep:
        layer = last_point(record.keep)
        if layer is None:  # every point keeps nothing
            return 0.0
        record = copy.copy(record)
        record.keep = {layer: record.keep[layer]}
        record.merged = {k: v for k, v in record.merged.items() if int(k) <= int(layer)}
    kept, merged, _ = kept_patches(record, tokens)
    kept = set(range(NUM_PATCHES)) if kept is None else kept | (merged if with_merged else set())
    return float(sum(relevance[p] for p in kept if p < NUM_PATCHES)) / total


def coverage_bin(cov: np.ndarray) -> np.ndarray:
    """Index of each coverage's bin: 0 for exactly 0, then one per left edge of BINS above 0."""
    return np.where(cov <= 0, 0, np.searchsorted(BINS, cov, side="right"))


def linked(n_methods: int, cov: np.ndarray, which: np.ndarray) -> list[list[int]]:
    """The methods in groups that reach each other through shared coverage bins (one group: every
    pair of methods is compared at equal coverage, directly or through others)."""
    group = list(range(n_methods))

    def root(m):
        while group[m] != m:
            m = group[m]
        return m

    bins = coverage_bin(cov)
    for b in np.unique(bins):
        ms = np.unique(which[bins == b])
        for m in ms[1:]:
            group[root(int(m))] = root(int(ms[0]))
    out: dict[int, list[int]] = {}
    for m in range(n_methods):
        out.setdefault(root(m), []).append(m)
    return list(out.values())


def fit(n_methods: int, cov: np.ndarray, score: np.ndarray, which: np.ndarray, how: str = "bins") -> np.ndarray:
    """Least squares of score on one intercept per method and a common function of coverage (a step
    per coverage bin, or a slope); returns each method's intercept minus their mean, i.e. its effect
    at equal coverage. A constant shared by the intercepts and the bin levels cancels in the mean, so
    the result is unique when the methods are linked() through shared bins (effects() checks)."""
    if how == "linear":
        f = cov[:, None]
    else:
        b = coverage_bin(cov)
        f = np.eye(len(BINS) + 1)[b][:, 1:]  # bin 0 is the reference level
    x = np.c_[np.eye(n_methods)[which], f]
    beta, *_ = np.linalg.lstsq(x, score, rcond=None)
    return beta[:n_methods] - beta[:n_methods].mean()


def effects(rows: list[tuple[int, float, float]], n_methods: int, seed: int = 0, how: str = "bins",
            names: list[str] | None = None):
    """(point, low, high): each method's effect at equal coverage (fit) with a 95 % bootstrap
    interval over samples (resampled within each method), from rows of (method, coverage, score)."""
    which = np.array([m for m, _, _ in rows])
    cov = np.array([v for _, v, _ in rows])
    score = np.array([s for _, _, s in rows])
    if how == "bins" and len(groups := linked(n_methods, cov, which)) > 1:
        named = " | ".join(", ".join(str(names[m]) if names else str(m) for m in g) for g in groups)
        raise ValueError(f"no coverage bin links these groups of methods: {named}; their effects at equal "
                         "coverage are not defined (more samples, or --fit linear)")
    point = fit(n_methods, cov, score, which, how)
    rng = np.random.default_rng(seed)
    draws = []
    for _ in range(BOOTSTRAP):
        idx = np.concatenate([rng.choice(np.flatnonzero(which == m), (which == m).sum()) for m in range(n_methods)])
        draws.append(fit(n_methods, cov[idx], score[idx], which[idx], how))
    lo, hi = np.percentile(draws, [2.5, 97.5], axis=0)
    return point, lo, hi


def table(methods: list[str], rows, title: str, how: str = "bins") -> str:
    """The printed fidelity table: the chosen fit's effects with intervals, the other fit's point."""
    which = np.array([m for m, _, _ in rows])
    cov = np.array([v for _, v, _ in rows])
    score = np.array([s for _, _, s in rows])
    try:
        point, lo, hi = effects(rows, len(methods), how=how, names=methods)
    except ValueError as e:
        raise SystemExit(f"{title}: {e}") from None
    other = "linear" if how == "bins" else "bins"
    alt = fit(len(methods), cov, score, which, other)
    shape = "a step per coverage bin" if how == "bins" else "slope * coverage"
    out = [f"{title}: score = effect[method] + f(coverage), f {shape}",
           f"{'method':<22} {'n':>4} {'coverage':>9} {'accuracy':>9} {'effect at equal coverage (95 % CI)':>38} "
           f"{other + ' fit':>11}"]
    for m, name in enumerate(methods):
        sel = which == m
        out.append(f"{name:<22} {sel.sum():>4} {cov[sel].mean():>9.3f} {100 * score[sel].mean():>8.1f}% "
                   f"{100 * point[m]:>+14.1f} points [{100 * lo[m]:+.1f}, {100 * hi[m]:+.1f}] {100 * alt[m]:>+10.1f}")
    return "\n".join(out)


# pool is not among them: it keeps no patch as itself (each token averages a window of patches), so
# the coverage of kept patches does not describe what it shows; --methods pool still runs it
UNFRAMED = ("pool",)  # left out of a sweep's table
NO_TWIG_METHODS = ("fastv:K=1", "sparsevlm", "visionzip", "random", "oracle")


def method_entry(text: str):
    """'fastv:K=1' -> an experiment's method entry ({'name': 'fastv', 'settings': {'K': 1}})."""
    name, _, settings = text.partition(":")
    if not settings:
        return name
    out = {}
    for kv in settings.split(","):
        key, eq, value = kv.partition("=")
        if not eq or not value.lstrip("-").isdigit():
            raise SystemExit(f"method setting {kv!r} of {text!r}: expected NAME=INT, e.g. fastv:K=1")
        out[key] = int(value)
    return {"name": name, "settings": out}


def run_inline(model: str, tokens: int, samples: int, methods, merged: bool = False,
               device: str | None = None, point: str = "budget") -> tuple[list, list, dict]:
    """(method names, rows of (method, coverage, score), records per series incl. the baseline's).
    Methods are experiment entries or NAME:SETTING=INT,... strings."""
    from harness.cell import run_cell
    from harness.data import synthetic as syn
    from harness.experiment import parse_experiment
    from harness.models.adapter import load_model

    adapter = load_model(model, device=device)
    data = syn.short_answer_samples("test", 600, samples)
    inputs = [adapter.inputs(s.image, s.question) for s in data]
    exp = parse_experiment({"experiment": "fidelity", "model": {"path": model}, "generation": {"max_new_tokens": 3},
                            "timing": {"warmup": 0, "repeats": 1}, "budgets": [tokens],
                            "methods": ["baseline", *(method_entry(m) if isinstance(m, str) else m for m in methods)]},
                           "fidelity")
    records = {c.series: run_cell(adapter, c, data, inputs).records for c in exp.cells}
    names = [k for k in records if k != "baseline"]
    rows = [(m, v, r.score) for m, name in enumerate(names) for r in records[name]
            if (v := coverage(r, tokens, merged, point)) is not None]
    return names, rows, records


def accuracy(records: dict) -> dict[str, float]:
    return {k: float(np.mean([r.score for r in v])) for k, v in records.items()}


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--experiment", default="default")
    ap.add_argument("--tokens", type=int, default=16)
    ap.add_argument("--tracking-uri", default=DEFAULT_TRACKING_URI)
    ap.add_argument("--merged", action="store_true", help="patches merged into a kept token count as kept")
    ap.add_argument("--fit", default="bins", choices=FITS, help="f(coverage): a step per bin, or a line")
    ap.add_argument("--point", default="budget", choices=POINTS,
                    help="read coverage at the pruning point nearest the budget, or the last one that keeps tokens")
    ap.add_argument("--model", default=None, help="run the cells here on this model directory (no MLflow)")
    ap.add_argument("--samples", type=int, default=150, help="with --model: short-answer samples per method")
    ap.add_argument("--methods", nargs="+", default=list(NO_TWIG_METHODS),
                    help="with --model: NAME or NAME:SETTING=INT,... (twigvlm needs the model's twig)")
    args = ap.parse_args(argv)
    if args.model:
        names, rows, records = run_inline(args.model, args.tokens, args.samples, args.methods, args.merged,
                                          point=args.point)
        print(table(names, rows, f"{args.model}, {args.tokens} tokens, {args.samples} samples", args.fit))
        print("accuracy: " + ", ".join(f"{k} {100 * v:.1f}%" for k, v in accuracy(records).items()))
        return
    sweep = load_sweep(args.experiment, args.tracking_uri)
    cells = [c for c in sweep.cells if c.budgeted and c.tokens == args.tokens and not c.ssd and c.dataset == "shapes"
             and c.method not in UNFRAMED]
    methods, rows = [], []
    for c in cells:
        methods.append(c.series)
        for r in sweep.records(c):
            v = coverage(r, args.tokens, args.merged, args.point)
            if v is not None:
                rows.append((len(methods) - 1, v, r.score))
    print(table(methods, rows, f"{args.experiment}, {args.tokens} tokens", args.fit))


if __name__ == "__main__":
    main()
