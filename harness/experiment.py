"""Experiment files: load, validate and expand into cells, before anything runs.

    experiment: default                 # MLflow experiment name (one per study)
    model: {path: embedded, dtype: float32, attn_implementation: sdpa, engine: eager}
                                        # engine: eager (the model's modules step by step, as the papers'
                                        # code runs them) | graphs (static KV caches, CUDA graphs on a GPU)
    # or several:  models: [{path: embedded}, {path: /ckpt/llava-1.5-7b-hf, dtype: float16}]
    dataset: {name: shapes, split: test, samples_per_type: 50}
    # or several:  datasets: [{split: val}, {split: test}]
    generation: {max_new_tokens: 64}
    timing: {warmup: 3, repeats: 1, paired: false, subset: null}  # untimed warm-up samples; timed passes
                                        # per sample; paired: time the baseline beside every sample; subset:
                                        # time only the first N samples (the rest run once, for accuracy)
    budgets: [0.667, 0.778, 0.889]      # pruning ratios (float) or retained tokens (int)
    methods:
      - name: baseline                  # budget-free methods run once
      - name: fastv
        settings: {K: 1}
        budgets: [0.5]                  # optional: overrides the sweep's budgets for this method
      - name: twigvlm
        grid: {twig: [twigs/K1-T2, twigs/K2-T2], score_layer: [null, 1]}   # swept settings
        zip: [[twig, budget]]           # optional: axes that advance together instead of crossing
    exclude:                            # optional: cells to leave out (every key must match)
      - {method: twigvlm, score_layer: 1, budget: 0.889}

The grid is models x datasets x (per method) budgets x grid settings; `zip` groups axes of one
method (its grid settings and `budget`) that must have equal lengths. Every problem (a bad key,
value, method, setting, combination, an exclusion that matches no cell, or an impossible budget
for a model) raises ExperimentError with one line naming the value and what is allowed.

A cell's identity is `Cell.hash`: a hash of its resolved configuration (model, dataset, method,
settings, budget, decoding, generation, timing), which the sweep (harness.sweep) uses to resume.
"""
from __future__ import annotations

import hashlib
import itertools
import json
from dataclasses import dataclass, field
from pathlib import Path

import yaml

import methods as plugins  # noqa: F401  (registers the methods and the draft models)
from harness.contract import REGISTRY, MethodError, ModelShape, build_method, draft_source
from harness.data import DATASETS, DatasetError
from harness.data.synthetic import SPLITS
from harness.engine.graphs import REGIMES
from harness.models.adapter import ATTN_IMPLEMENTATIONS, DTYPES, ModelError, read_shape, resolve_model_path


class ExperimentError(ValueError):
    """An experiment file that cannot be run."""


MODEL_DEFAULTS = {"path": "embedded", "dtype": "float32", "attn_implementation": "sdpa", "checkpoint": None,
                  "engine": "eager"}
DATASET_DEFAULTS = {"name": "shapes", "split": "test", "samples_per_type": 50}
SECTIONS = {
    "experiment": None,
    "model": MODEL_DEFAULTS,
    "models": None,
    "dataset": DATASET_DEFAULTS,
    "datasets": None,
    "generation": {"max_new_tokens": 64},
    "timing": {"warmup": 3, "repeats": 1, "paired": False, "subset": None},
    "budgets": [],
    "methods": None,
    "exclude": None,
}
METHOD_KEYS = {"name", "settings", "budgets", "decoding", "grid", "zip"}
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
        draft_source().resolve(out["twig"])
    except MethodError as e:
        raise ExperimentError(f"{where}: decoding: {e}") from None
    return out


def model_name(model: dict) -> str:
    return model["path"] if model["path"] == "embedded" else Path(model["path"]).name or model["path"]


@dataclass
class Cell:
    method: str
    settings: dict
    budget: float | int | None
    decoding: dict | None = None  # None: greedy; {"name": "ssd", "twig", "delta", "theta"}
    model: dict = field(default_factory=lambda: dict(MODEL_DEFAULTS))
    dataset: dict = field(default_factory=lambda: dict(DATASET_DEFAULTS))
    generation: dict = field(default_factory=lambda: dict(SECTIONS["generation"]))
    timing: dict = field(default_factory=lambda: dict(SECTIONS["timing"]))
    prefix: str = ""  # "model/dataset:split " when the sweep has several models or datasets

    @property
    def is_reference(self) -> bool:
        """The cell the others of its (model, dataset) group are compared with: greedy baseline."""
        return self.method == "baseline" and not self.decoding

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
        return f"{self.prefix}{self.method}{b}{extra}"

    @property
    def group(self) -> tuple:
        """Cells of one group share a model and a dataset, hence a baseline."""
        return (json.dumps(self.model, sort_keys=True), json.dumps(self.dataset, sort_keys=True))

    def config(self) -> dict:
        """The resolved configuration: everything that decides the cell's results."""
        # timing.subset left out when unset and model.engine when eager, so that sweeps logged
        # before they existed still resume
        timing = {k: v for k, v in self.timing.items() if not (k == "subset" and v is None)}
        model = {k: v for k, v in self.model.items() if not (k == "engine" and v == "eager")}
        return {"model": model, "dataset": self.dataset, "method": self.method,
                "settings": self.settings, "budget": self.budget, "decoding": self.decoding,
                "generation": self.generation, "timing": timing}

    @property
    def hash(self) -> str:
        text = json.dumps(self.config(), sort_keys=True, default=str)
        return hashlib.sha256(text.encode()).hexdigest()[:16]

    def build(self):
        return build_method(self.method, self.budget, **self.settings)


@dataclass
class Experiment:
    name: str
    models: list[dict]
    datasets: list[dict]
    generation: dict
    timing: dict
    cells: list[Cell] = field(default_factory=list)
    source: str = ""

    @property
    def hash(self) -> str:
        """Identity of the sweep: its cells' identities (order-free)."""
        return hashlib.sha256(" ".join(sorted(c.hash for c in self.cells)).encode()).hexdigest()[:16]


def _mapping(value, defaults: dict, what: str, where: str) -> dict:
    if value is None:
        value = {}
    if not isinstance(value, dict):
        raise ExperimentError(f"{where}: '{what}' must be a mapping, got {value!r}")
    unknown = set(value) - set(defaults)
    if unknown:
        raise ExperimentError(f"{where}: unknown key(s) {', '.join(sorted(unknown))} in '{what}'; "
                              f"allowed: {', '.join(defaults)}")
    return {**defaults, **value}


LMMS_KEYS = ("lmms_eval", "limit", "include_path")


def _dataset_entry(value, defaults: dict, what: str, where: str) -> dict:
    """A native dataset, or an lmms-eval task: {lmms_eval: TASK, limit: N, include_path: DIR}."""
    if not isinstance(value, dict) or "lmms_eval" not in value:
        return _mapping(value, defaults, what, where)
    unknown = set(value) - set(LMMS_KEYS)
    if unknown:
        raise ExperimentError(f"{where}: unknown key(s) {', '.join(sorted(unknown))} in '{what}' (an lmms-eval "
                              f"task); allowed: {', '.join(LMMS_KEYS)}")
    task, limit, include = value["lmms_eval"], value.get("limit"), value.get("include_path")
    if not isinstance(task, str) or not task.strip():
        raise ExperimentError(f"{where}: {what}.lmms_eval = {task!r}; allowed: an lmms-eval task name (e.g. mme)")
    if limit is not None:
        _check_int(limit, f"{what}.limit", 1, where)
    if isinstance(include, str) and not Path(include).is_absolute() and Path(where).is_file():
        include = str(Path(where).parent / include)  # relative to the experiment file
    if include is not None and not (isinstance(include, str) and Path(include).is_dir()):
        raise ExperimentError(f"{where}: {what}.include_path = {include!r} is not a folder; allowed: a folder of "
                              "lmms-eval task YAMLs (e.g. one `twigbench export-shapes DIR` wrote)")
    return {"name": f"lmms_eval:{task}", "split": "test", "samples_per_type": None, "lmms_eval": task,
            "limit": limit, "include_path": str(Path(include).resolve()) if include else None}


def _listed(raw: dict, one: str, many: str, defaults: dict, where: str, entry=None) -> list[dict]:
    entry = entry or _mapping
    if one in raw and many in raw:
        raise ExperimentError(f"{where}: both '{one}' and '{many}' given; allowed: one of them")
    if many in raw:
        items = raw[many]
        if not isinstance(items, list) or not items:
            raise ExperimentError(f"{where}: '{many}' must be a non-empty list of mappings, got {items!r}")
        out = [entry(x, defaults, f"{many}[{i}]", where) for i, x in enumerate(items)]
    else:
        out = [entry(raw.get(one), defaults, one, where)]
    seen = [json.dumps(x, sort_keys=True) for x in out]
    if len(set(seen)) < len(seen):
        raise ExperimentError(f"{where}: '{many}' lists the same entry twice")
    return out


def _check_model(model: dict, where: str) -> None:
    if not isinstance(model["path"], str) or not model["path"]:
        raise ExperimentError(f"{where}: model path {model['path']!r}; allowed: 'embedded' or a local checkpoint")
    if model["dtype"] not in DTYPES:
        raise ExperimentError(f"{where}: model dtype {model['dtype']!r}; allowed: {', '.join(DTYPES)}")
    if model["attn_implementation"] not in ATTN_IMPLEMENTATIONS:
        raise ExperimentError(f"{where}: attn_implementation {model['attn_implementation']!r}; "
                              f"allowed: {', '.join(ATTN_IMPLEMENTATIONS)}")
    if model["engine"] not in REGIMES:
        raise ExperimentError(f"{where}: model engine {model['engine']!r}; allowed: {', '.join(REGIMES)}")


def _check_int(value, name: str, lo: int, where: str) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < lo:
        raise ExperimentError(f"{where}: {name} = {value!r}; allowed: an integer >= {lo}")


def _method_cells(m, i: int, budgets: list, where: str) -> tuple[str, list[tuple[dict, object, dict | None]]]:
    """The method of one `methods` entry and the (settings, budget, decoding) of every cell it
    expands into."""
    at = f"{where}: methods[{i}]"
    if isinstance(m, str):
        m = {"name": m}
    if not isinstance(m, dict) or "name" not in m:
        raise ExperimentError(f"{at} must be a mapping with a 'name', got {m!r}")
    bad = set(m) - METHOD_KEYS
    if bad:
        raise ExperimentError(f"{at} has unknown key(s) {', '.join(sorted(bad))}; "
                              f"allowed: {', '.join(sorted(METHOD_KEYS))}")
    method = m["name"]
    if method not in REGISTRY:
        raise ExperimentError(f"{where}: unknown method {method!r}; allowed: {', '.join(sorted(REGISTRY))}")
    settings = m.get("settings") or {}
    if not isinstance(settings, dict):
        raise ExperimentError(f"{at}.settings must be a mapping, got {settings!r}")
    grid = m.get("grid") or {}
    if not isinstance(grid, dict):
        raise ExperimentError(f"{at}.grid must be a mapping of setting -> list of values, got {grid!r}")
    for k, v in grid.items():
        if not isinstance(v, list) or not v:
            raise ExperimentError(f"{at}.grid.{k} must be a non-empty list of values, got {v!r}")
        if k in settings:
            raise ExperimentError(f"{at}: {k!r} is both in settings and in grid; allowed: one of them")
        if k == "budget":
            raise ExperimentError(f"{at}.grid: use 'budgets' for the budget axis")
    decoding = parse_decoding(m.get("decoding"), at)
    own = m.get("budgets", budgets)
    if not isinstance(own, list):
        raise ExperimentError(f"{at}.budgets must be a list, got {own!r}")
    if REGISTRY[method].budgeted:
        if not own:
            raise ExperimentError(f"{where}: method {method!r} needs budgets (sweep 'budgets' or its own)")
    else:
        if "budgets" in m:
            raise ExperimentError(f"{where}: method {method!r} takes no budget; remove its 'budgets'")
        own = [None]
    axes = {"budget": own, **grid}
    groups = m.get("zip") or []
    if not isinstance(groups, list) or not all(isinstance(g, list) and len(g) >= 2 for g in groups):
        raise ExperimentError(f"{at}.zip must be a list of lists of at least two axis names, got {groups!r}")
    zipped = [a for g in groups for a in g]
    for a in zipped:
        if a not in axes or (a == "budget" and own == [None]):
            allowed = [x for x in axes if not (x == "budget" and own == [None])]
            raise ExperimentError(f"{at}.zip names axis {a!r}; allowed: {', '.join(allowed) or 'none'}")
        if zipped.count(a) > 1:
            raise ExperimentError(f"{at}.zip names axis {a!r} twice; allowed: each axis in one group")
    for g in groups:
        lengths = {a: len(axes[a]) for a in g}
        if len(set(lengths.values())) > 1:
            raise ExperimentError(f"{at}.zip group {g} has unequal lengths {lengths}; allowed: equal lengths")
    units = [[dict(zip(g, vals)) for vals in zip(*(axes[a] for a in g))] for g in groups]
    units += [[{a: v} for v in axes[a]] for a in axes if a not in zipped]
    out = []
    for combo in itertools.product(*units):
        point = {k: v for d in combo for k, v in d.items()}
        budget = point.pop("budget")
        out.append(({**settings, **point}, budget, decoding))
    return method, out


def _matches(cell: Cell, rule: dict) -> bool:
    values = {"method": cell.method, "budget": cell.budget, "model": cell.model["path"],
              "dataset": cell.dataset["name"], "split": cell.dataset["split"],
              "decoding": (cell.decoding or {}).get("name", "greedy"), **cell.settings}
    return all(k in values and values[k] == v for k, v in rule.items())


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
    models = _listed(raw, "model", "models", MODEL_DEFAULTS, where)
    datasets = _listed(raw, "dataset", "datasets", DATASET_DEFAULTS, where, _dataset_entry)
    generation = _mapping(raw.get("generation"), SECTIONS["generation"], "generation", where)
    timing = _mapping(raw.get("timing"), SECTIONS["timing"], "timing", where)
    for model in models:
        _check_model(model, where)
        try:  # a missing checkpoint is the first thing to say
            resolve_model_path(model["path"], model["checkpoint"])
        except ModelError as e:
            raise ExperimentError(f"{where}: {e}") from None
    for d in datasets:
        if "lmms_eval" in d:  # checked against lmms-eval in validate()
            continue
        if d["name"] not in DATASETS:
            raise ExperimentError(f"{where}: unknown dataset {d['name']!r}; allowed: {', '.join(DATASETS)}")
        if d["split"] not in SPLITS:
            raise ExperimentError(f"{where}: unknown split {d['split']!r} of dataset {d['name']!r}; "
                                  f"allowed: {', '.join(SPLITS)}")
        _check_int(d["samples_per_type"], "dataset.samples_per_type", 1, where)
    _check_int(generation["max_new_tokens"], "generation.max_new_tokens", 1, where)
    _check_int(timing["warmup"], "timing.warmup", 0, where)
    _check_int(timing["repeats"], "timing.repeats", 1, where)
    if not isinstance(timing["paired"], bool):
        raise ExperimentError(f"{where}: timing.paired = {timing['paired']!r}; allowed: true or false")
    if timing["subset"] is not None:
        _check_int(timing["subset"], "timing.subset", 1, where)

    budgets = raw.get("budgets", []) or []
    if not isinstance(budgets, list):
        raise ExperimentError(f"{where}: 'budgets' must be a list, got {budgets!r}")
    methods = raw.get("methods")
    if not isinstance(methods, list) or not methods:
        raise ExperimentError(f"{where}: 'methods' must be a non-empty list of {{name, settings, budgets}}")
    per_method = [_method_cells(m, i, budgets, where) for i, m in enumerate(methods)]
    several = len(models) > 1 or len(datasets) > 1
    names = [model_name(m) for m in models]
    names = [n if names.count(n) == 1 else
             f"{n}[{m['dtype']},{m['attn_implementation']}{'' if m['engine'] == 'eager' else ',' + m['engine']}]"
             for n, m in zip(names, models)]
    cells = []
    for model, mname in zip(models, names):
        for d in datasets:
            prefix = f"{mname}/{d['name']}:{d['split']} " if several else ""
            for method, variants in per_method:
                cells += [Cell(method, s, b, dec, model, d, generation, timing, prefix) for s, b, dec in variants]

    rules = raw.get("exclude") or []
    if not isinstance(rules, list) or not all(isinstance(r, dict) and r for r in rules):
        raise ExperimentError(f"{where}: 'exclude' must be a list of non-empty mappings, got {rules!r}")
    for i, rule in enumerate(rules):
        kept = [c for c in cells if not _matches(c, rule)]
        if len(kept) == len(cells):
            raise ExperimentError(f"{where}: exclude[{i}] {rule} matches no cell; allowed keys: method, "
                                  f"budget, model, dataset, split, decoding, or a setting of the method")
        cells = kept
    if not cells:
        raise ExperimentError(f"{where}: the exclusions leave no cell to run")
    labels = [c.label for c in cells]
    dup = {l for l in labels if labels.count(l) > 1}
    if dup:
        raise ExperimentError(f"{where}: duplicate cell(s) {', '.join(sorted(dup))}")
    return Experiment(name.strip(), models, datasets, generation, timing, cells)


class _UniqueKeyLoader(yaml.SafeLoader):
    """YAML's safe loader, except that a key written twice in one mapping is an error (plain YAML
    keeps the last one silently)."""

    def construct_mapping(self, node, deep=False):
        seen = {}
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":  # `<<: *anchor` merges are allowed
                continue
            key = self.construct_object(key_node, deep=deep)
            try:
                hash(key)
            except TypeError:
                raise yaml.constructor.ConstructorError(None, None, f"key {key!r} is not a plain value; allowed: "
                                                        f"names and numbers as keys", key_node.start_mark) from None
            if key in seen:
                raise yaml.constructor.ConstructorError(
                    None, None, f"key {key!r} appears twice (first at line {seen[key] + 1}); allowed: each key once",
                    key_node.start_mark)
            seen[key] = key_node.start_mark.line
        return super().construct_mapping(node, deep)


def load_experiment(path: str | Path) -> Experiment:
    """Parse and fully validate an experiment file (methods configured against each model's shape)."""
    p = Path(path)
    if p.is_dir():
        raise ExperimentError(f"experiment file {str(p)!r} is a directory; allowed: a YAML file (e.g. experiments/default.yaml)")
    if not p.is_file():
        raise ExperimentError(f"experiment file {str(p)!r} not found")
    try:
        text = p.read_text()
    except UnicodeDecodeError:
        raise ExperimentError(f"experiment file {str(p)!r} is not text (not UTF-8); allowed: a YAML file") from None
    except OSError as e:
        raise ExperimentError(f"experiment file {str(p)!r} cannot be read ({e.strerror}); allowed: a readable YAML file") from None
    if not text.strip():
        raise ExperimentError(f"experiment file {str(p)!r} is empty; allowed: a YAML mapping with at least "
                              f"'experiment' and 'methods' (see experiments/default.yaml)")
    try:
        raw = yaml.load(text, Loader=_UniqueKeyLoader)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        at = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        raise ExperimentError(f"{p}: malformed YAML{at}: {getattr(e, 'problem', e)}") from None
    exp = parse_experiment(raw, str(p))
    exp.source = text
    validate(exp, str(p))
    return exp


def validate(exp: Experiment, where: str = "experiment") -> None:
    """Resolve every model's shape and configure every cell's method: impossible cells fail here."""
    shapes, prefix = {}, ""
    try:
        for model in exp.models:
            shapes[model["path"]] = ModelShape(**read_shape(model["path"], model.get("checkpoint")))
        for cell in exp.cells:
            prefix = cell.prefix
            cell.build().configure(shapes[cell.model["path"]])
        prefix = ""
        for d in exp.datasets:  # lmms-eval knows the task and its data is here (offline)
            if "lmms_eval" in d:
                from harness.lmms.run import check_task

                check_task(d["lmms_eval"], d["include_path"])
    except (MethodError, ModelError, DatasetError) as e:
        raise ExperimentError(f"{where}: {prefix}{e}") from None
