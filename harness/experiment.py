"""Experiment files: load, validate and expand into cells, before anything runs.

    experiment: default                 # MLflow experiment name
    model: {path: embedded, dtype: float32, attn_implementation: sdpa}
    dataset: {name: shapes, split: test, samples_per_type: 50}
    generation: {max_new_tokens: 64}
    timing: {warmup: 3}
    budgets: [0.667, 0.778, 0.889]      # pruning ratios (float) or retained tokens (int)
    methods:
      - name: baseline                  # budget-free methods run once
      - name: fastv
        settings: {K: 1}
        budgets: [0.5]                  # optional: overrides the sweep's budgets for this method

Every problem (a bad key, value, method, setting, or an impossible budget for the model) raises
ExperimentError with one line naming the value and what is allowed.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import yaml

from harness.data import DATASETS, DatasetError
from harness.models.adapter import ATTN_IMPLEMENTATIONS, DTYPES, ModelError, read_shape
from methods import REGISTRY, MethodError, ModelShape, build_method


class ExperimentError(ValueError):
    """An experiment file that cannot be run."""


SECTIONS = {
    "experiment": None,
    "model": {"path": "embedded", "dtype": "float32", "attn_implementation": "sdpa"},
    "dataset": {"name": "shapes", "split": "test", "samples_per_type": 50},
    "generation": {"max_new_tokens": 64},
    "timing": {"warmup": 3},
    "budgets": [],
    "methods": None,
}
METHOD_KEYS = {"name", "settings", "budgets", "decoding"}
DECODING_KEYS = {"name", "twig", "delta", "theta"}


def parse_decoding(value, where: str) -> dict | None:
    """'greedy' (default) or self-speculative decoding: 'ssd' or {name: ssd, twig, delta, theta}."""
    if value in (None, "greedy"):
        return None
    d = {"name": value} if isinstance(value, str) else value
    if not isinstance(d, dict) or d.get("name") != "ssd":
        raise ExperimentError(f"{where}: decoding {value!r}; allowed: greedy, ssd, or "
                              f"{{name: ssd, twig: DIR, delta: INT, theta: FLOAT}}")
    bad = set(d) - DECODING_KEYS
    if bad:
        raise ExperimentError(f"{where}: decoding has unknown key(s) {', '.join(sorted(bad))}; "
                              f"allowed: {', '.join(sorted(DECODING_KEYS))}")
    out = {"name": "ssd", "twig": d.get("twig", "embedded"), "delta": d.get("delta", 5), "theta": d.get("theta", 0.6)}
    if isinstance(out["delta"], bool) or not isinstance(out["delta"], int) or out["delta"] < 1:
        raise ExperimentError(f"{where}: decoding delta {out['delta']!r}; allowed: an integer >= 1")
    if isinstance(out["theta"], bool) or not isinstance(out["theta"], (int, float)) or not 0 <= out["theta"] <= 1:
        raise ExperimentError(f"{where}: decoding theta {out['theta']!r}; allowed: a number in [0, 1]")
    try:
        from methods.twigvlm.ttp import resolve_twig
        resolve_twig(out["twig"])
    except MethodError as e:
        raise ExperimentError(f"{where}: decoding: {str(e).replace('twigvlm: ', '')}") from None
    return out


@dataclass
class Cell:
    method: str
    settings: dict
    budget: float | int | None
    decoding: dict | None = None  # None: greedy; {"name": "ssd", "twig", "delta", "theta"}

    @property
    def series(self) -> str:
        """The method with its settings (and decoding): one curve of a budget sweep."""
        extra = ",".join(f"{k}={v}" for k, v in sorted(self.settings.items()))
        return self.method + (f"[{extra}]" if extra else "") + self.decoding_label

    @property
    def decoding_label(self) -> str:
        if not self.decoding:
            return ""
        d = self.decoding
        tweaks = [f"{k}={d[k]}" for k, dflt in (("twig", "embedded"), ("delta", 5), ("theta", 0.6)) if d[k] != dflt]
        return "+ssd" + (f"[{','.join(tweaks)}]" if tweaks else "")

    @property
    def label(self) -> str:
        b = "" if self.budget is None else f"@{self.budget}"
        extra = self.series[len(self.method):]
        return f"{self.method}{b}{extra}"

    def build(self):
        return build_method(self.method, self.budget, **self.settings)


@dataclass
class Experiment:
    name: str
    model: dict
    dataset: dict
    generation: dict
    timing: dict
    cells: list[Cell] = field(default_factory=list)
    source: str = ""

    def shape(self) -> ModelShape:
        return ModelShape(**read_shape(self.model["path"]))


def _section(raw: dict, key: str, where: str) -> dict:
    value = raw.get(key, {}) or {}
    if not isinstance(value, dict):
        raise ExperimentError(f"{where}: '{key}' must be a mapping, got {value!r}")
    unknown = set(value) - set(SECTIONS[key])
    if unknown:
        raise ExperimentError(f"{where}: unknown key(s) {', '.join(sorted(unknown))} in '{key}'; "
                              f"allowed: {', '.join(SECTIONS[key])}")
    return {**SECTIONS[key], **value}


def parse_experiment(raw, where: str = "experiment") -> Experiment:
    if not isinstance(raw, dict):
        raise ExperimentError(f"{where}: the file must hold a mapping of sections, got {type(raw).__name__}")
    unknown = set(raw) - set(SECTIONS)
    if unknown:
        raise ExperimentError(f"{where}: unknown section(s) {', '.join(sorted(unknown))}; "
                              f"allowed: {', '.join(SECTIONS)}")
    name = raw.get("experiment")
    if not isinstance(name, str) or not name.strip():
        raise ExperimentError(f"{where}: 'experiment' must be a non-empty name, got {name!r}")
    model = _section(raw, "model", where)
    dataset = _section(raw, "dataset", where)
    generation = _section(raw, "generation", where)
    timing = _section(raw, "timing", where)
    if model["dtype"] not in DTYPES:
        raise ExperimentError(f"{where}: model dtype {model['dtype']!r}; allowed: {', '.join(DTYPES)}")
    if model["attn_implementation"] not in ATTN_IMPLEMENTATIONS:
        raise ExperimentError(f"{where}: attn_implementation {model['attn_implementation']!r}; "
                              f"allowed: {', '.join(ATTN_IMPLEMENTATIONS)}")
    if dataset["name"] not in DATASETS:
        raise ExperimentError(f"{where}: unknown dataset {dataset['name']!r}; allowed: {', '.join(DATASETS)}")
    for sec, key, lo in (("generation", "max_new_tokens", 1), ("timing", "warmup", 0),
                         ("dataset", "samples_per_type", 1)):
        v = {"generation": generation, "timing": timing, "dataset": dataset}[sec][key]
        if isinstance(v, bool) or not isinstance(v, int) or v < lo:
            raise ExperimentError(f"{where}: {sec}.{key} = {v!r}; allowed: an integer >= {lo}")

    budgets = raw.get("budgets", []) or []
    if not isinstance(budgets, list):
        raise ExperimentError(f"{where}: 'budgets' must be a list, got {budgets!r}")
    methods = raw.get("methods")
    if not isinstance(methods, list) or not methods:
        raise ExperimentError(f"{where}: 'methods' must be a non-empty list of {{name, settings, budgets}}")
    cells = []
    for i, m in enumerate(methods):
        if isinstance(m, str):
            m = {"name": m}
        if not isinstance(m, dict) or "name" not in m:
            raise ExperimentError(f"{where}: methods[{i}] must be a mapping with a 'name', got {m!r}")
        bad = set(m) - METHOD_KEYS
        if bad:
            raise ExperimentError(f"{where}: methods[{i}] has unknown key(s) {', '.join(sorted(bad))}; "
                                  f"allowed: {', '.join(sorted(METHOD_KEYS))}")
        method = m["name"]
        if method not in REGISTRY:
            raise ExperimentError(f"{where}: unknown method {method!r}; allowed: {', '.join(sorted(REGISTRY))}")
        settings = m.get("settings") or {}
        if not isinstance(settings, dict):
            raise ExperimentError(f"{where}: methods[{i}].settings must be a mapping, got {settings!r}")
        decoding = parse_decoding(m.get("decoding"), f"{where}: methods[{i}]")
        own = m.get("budgets", budgets)
        if not isinstance(own, list):
            raise ExperimentError(f"{where}: methods[{i}].budgets must be a list, got {own!r}")
        if REGISTRY[method].budgeted:
            if not own:
                raise ExperimentError(f"{where}: method {method!r} needs budgets (sweep 'budgets' or its own)")
            cells += [Cell(method, dict(settings), b, decoding) for b in own]
        else:
            if "budgets" in m:
                raise ExperimentError(f"{where}: method {method!r} takes no budget; remove its 'budgets'")
            cells.append(Cell(method, dict(settings), None, decoding))
    labels = [c.label for c in cells]
    dup = {l for l in labels if labels.count(l) > 1}
    if dup:
        raise ExperimentError(f"{where}: duplicate cell(s) {', '.join(sorted(dup))}")
    return Experiment(name.strip(), model, dataset, generation, timing, cells)


def load_experiment(path: str | Path) -> Experiment:
    """Parse and fully validate an experiment file (methods configured against the model's shape)."""
    p = Path(path)
    if not p.is_file():
        raise ExperimentError(f"experiment file {str(p)!r} not found")
    try:
        raw = yaml.safe_load(p.read_text())
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        at = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        raise ExperimentError(f"{p}: malformed YAML{at}: {getattr(e, 'problem', e)}") from None
    exp = parse_experiment(raw, str(p))
    exp.source = p.read_text()
    validate(exp, str(p))
    return exp


def validate(exp: Experiment, where: str = "experiment") -> None:
    """Resolve the model's shape and configure every cell's method: impossible cells fail here."""
    try:
        shape = exp.shape()
        for cell in exp.cells:
            cell.build().configure(shape)
    except (MethodError, ModelError, DatasetError) as e:
        raise ExperimentError(f"{where}: {e}") from None
