"""Reports from a recorded sweep: a small sweep written to MLflow with the harness's own store and
aggregation (no model runs), then the report built from MLflow and its content checked."""
import json
import re
import statistics
from html.parser import HTMLParser

import numpy as np
import pytest

from harness import measure
from harness.cell import aggregate
from harness.data.synthetic import QUESTION_TYPES, make_sample
from harness.records import SampleRecord
from harness.tracking import SweepStore
from reports import content, figures
from reports.build import build_report
from reports.load import load_sweep
from reports.tables import tex_escape

N = 12  # samples test-0 .. test-11: two of each question type (make_sample cycles the types)


def _records(score, keep=None, merged=None, prefill=10.0, decode_ms=20.0, ssd=False, base_prefill=12.0):
    """N records; score(i) -> 0/1; a fixed timing per repeat (two repeats), the baseline beside it."""
    out = []
    for i in range(N):
        q = QUESTION_TYPES[i % len(QUESTION_TYPES)]
        tokens = 30 if q == "describe" else 3
        t = {"vision_ms": 2.0, "select_ms": 0.1, "prefill_ms": prefill + i * 0.01, "ttft_ms": prefill + 2.0,
             "decode_ms": decode_ms * (tokens - 1) / 2, "e2e_ms": prefill + decode_ms * tokens}
        b = {**t, "prefill_ms": base_prefill + i * 0.01, "ttft_ms": base_prefill + 2.0,
             "decode_ms": 20.0 * (tokens - 1) / 2, "e2e_ms": base_prefill + 20.0 * tokens}
        spec = {"drafted": 10, "accepted": 6, "rounds": 3, "target_forwards": 3} if ssd else {}
        out.append(SampleRecord(uid=f"test-{i}", score=float(score(i)), prediction=f"p{i}{score(i)}",
                                decode_tokens=tokens - 1, timings=[t, dict(t)], qtype=q, question=f"q{i}",
                                answer="a", new_tokens=tokens, equal_token_average=0.0,
                                keep=dict(keep or {}), merged=dict(merged or {}), baseline_timings=[b, dict(b)],
                                baseline_decode_tokens=tokens - 1, **spec))
    return out


# (label, method, series, tokens or None (budget-free), params, score, extra record fields)
CELLS = [
    ("baseline", "baseline", "baseline", None, {}, lambda i: i % 3 != 0, {}),
    ("baseline+ssd", "baseline", "baseline+ssd", None, {"decoding": "ssd", "ssd_T": 2}, lambda i: i % 3 != 0,
     {"ssd": True}),
    ("fastv@48", "fastv", "fastv[K=1]", 48, {"K": 1}, lambda i: i % 2 == 0, {"keep": {"0": [1, 2, 3]}}),
    ("fastv@16", "fastv", "fastv[K=1]", 16, {"K": 1}, lambda i: i % 4 == 0, {"keep": {"0": [1]}}),
    ("twigvlm@48", "twigvlm", "twigvlm", 48, {"K": 1, "twig_layers": 2}, lambda i: i % 3 != 1,
     {"keep": {"0": [5, 6], "12": []}}),
    ("twigvlm@16", "twigvlm", "twigvlm", 16, {"K": 1, "twig_layers": 2}, lambda i: i < 6, {}),
    ("twigvlm@16[K=2]", "twigvlm", "twigvlm[K=2]", 16, {"K": 2, "twig_layers": 2}, lambda i: i < 3, {}),
    ("sparsevlm@48", "sparsevlm", "sparsevlm", 48, {"official_equal_token_average": 48.2}, lambda i: i % 2 == 1, {}),
    ("oracle@48", "oracle", "oracle", 48, {}, lambda i: True,
     {"keep": {"-1": [0, 5, 13]}, "merged": {"-1": {"13": [14, 26]}}}),
    ("random@48", "random", "random", 48, {}, lambda i: i % 2 == 0, {}),
    ("blind", "blind", "blind", None, {}, lambda i: i == 0, {}),
]
EQ = {"sparsevlm@48": 56.4}  # measured equal-token averages off the budget


def record_sweep(uri: str, experiment: str = "rep", model: str = "embedded", dataset: str = "shapes",
                 num_visual: int = 144, cells=CELLS, ok: bool = True) -> str:
    pytest.importorskip("mlflow", reason="MLflow is not installed here")
    store = SweepStore(uri, experiment)
    store.open("h" + experiment, f"sweep-{experiment}", {"cells": len(cells)}, {"device": "cpu (test)",
               "git_commit": "abc123"}, "experiment: x\n",
               json.dumps([{"label": c[0], "hash": f"c{i}"} for i, c in enumerate(cells)]))
    base = None
    for i, (label, method, series, tokens, extra, score, fields) in enumerate(cells):
        recs = _records(score, prefill=12.0 if method == "baseline" and "decoding" not in extra else 10.0, **fields)
        eq = EQ.get(label, float(num_visual if tokens is None and method != "blind" else tokens or 0))
        for r in recs:
            r.equal_token_average = eq
        m = aggregate(recs)
        if method == "baseline" and "decoding" not in extra:
            base = recs
        elif base is None:
            pass
        else:
            m.update(measure.relative_metrics(recs, base))
        params = {"method": method, "series": series, "num_visual": num_visual, "model": model, "dataset": dataset,
                  "split": "test", "dtype": "float32", "attn_implementation": "sdpa", "repeats": 2, "warmup": 1,
                  "max_new_tokens": 48, "paired_timing": method != "baseline" or "decoding" in extra,
                  "decoding": "greedy", "budget_tokens": int(eq) if tokens is None else tokens, **extra}
        if tokens is not None:
            params["budget_ratio"] = round(1 - tokens / num_visual, 4)
        store.log_cell(label, {"method": method, "series": series, "cell_hash": f"c{i}", "model": model,
                               "dataset": f"{dataset}:test"}, params, m, recs, 1_700_000_000_000 + i * 60_000,
                       1_700_000_000_000 + i * 60_000 + 25_000)
    store.log_curves()
    store.close(ok)
    return store.parent_id


@pytest.fixture(scope="module")
def recorded(tmp_path_factory):
    d = tmp_path_factory.mktemp("rep")
    uri = f"sqlite:///{d / 'm.db'}"
    pid = record_sweep(uri)
    out = d / "out"
    index = build_report("rep", uri, None, out)
    return uri, pid, out / "rep", index


def _acc(sweep, label, key="accuracy"):
    return next(c for c in sweep.cells if c.label == label).metrics[key]


def test_accuracy_table_has_the_papers_row_groups_columns_and_relacc(recorded):
    uri, pid, _, _ = recorded
    sweep = load_sweep("rep", uri)
    assert [c.label for c in sweep.cells] == [c[0] for c in CELLS]  # the experiment's order
    t = content.accuracy_table(sweep, "embedded")
    assert [h for h, _ in t.groups] == ["Upper bound, 144 tokens (100 %)", "Retain 48 tokens (↓ 66.7 %)",
                                        "Retain 16 tokens (↓ 88.9 %)", "No visual tokens (↓ 100 %)"]
    assert t.columns == ["Method", *QUESTION_TYPES, "Avg.", "RelAcc", "Δ vs upper bound (95 % CI)"]
    rows = {(h, r.cells[0].split(" ")[0]): r for h, rs in t.groups for r in rs}
    # one benchmark: Avg. is the cell's accuracy, RelAcc its accuracy over the upper bound's (logged values)
    for label, series, group in (("fastv@48", "fastv[K=1]", 1), ("twigvlm@16", "twigvlm", 2)):
        row = rows[(t.groups[group][0], series)]
        assert row.cells[-2] == f"{100 * _acc(sweep, label) / _acc(sweep, 'baseline'):.1f}"
        assert row.cells[-3] == f"{100 * _acc(sweep, label):.1f}"
        assert row.cells[1 + QUESTION_TYPES.index("count")] == f"{100 * _acc(sweep, label, 'accuracy_count'):.1f}"
    assert rows[(t.groups[0][0], "baseline")].cells[-2] == "100.0"
    # best method per group in bold: the oracle (a control) scores higher but is never bold
    g48 = dict(t.groups)["Retain 48 tokens (↓ 66.7 %)"]
    avg = t.columns.index("Avg.")
    best = max((r for r in g48 if not r.muted), key=lambda r: float(r.cells[avg]))
    assert avg in best.bold and all(avg not in r.bold for r in g48 if r is not best)
    oracle = next(r for r in g48 if r.cells[0] == "oracle")
    assert oracle.muted and not oracle.bold and float(oracle.cells[avg]) > float(best.cells[avg])
    # the equal-token average beside the budget, with the reason
    sparse = next(r for r in g48 if r.cells[0].startswith("sparsevlm"))
    assert sparse.cells[0] == "sparsevlm (56.4 tokens) †"
    assert any("56.4" in n and "48.2" in n and n.startswith("†") for n in t.notes)
    # the paired interval of the difference to the upper bound
    m = next(c for c in sweep.cells if c.label == "fastv@48").metrics
    lo, hi = 100 * m["accuracy_diff_ci_low"], 100 * m["accuracy_diff_ci_high"]
    assert rows[(t.groups[1][0], "fastv[K=1]")].cells[-1].endswith(
        f"({f'{lo:+.1f}'.replace('-', '−')}, {f'{hi:+.1f}'.replace('-', '−')})")


def test_published_values_sit_beside_the_matching_cells(tmp_path):
    uri = f"sqlite:///{tmp_path / 'm.db'}"
    cells = [("baseline", "baseline", "baseline", None, {}, lambda i: i % 5 != 0, {}),
             ("fastv@64", "fastv", "fastv[K=2]", 64, {"K": 2}, lambda i: i % 2 == 0, {}),
             ("visionzip@64", "visionzip", "visionzip", 64, {}, lambda i: i % 2 == 0, {}),
             ("random@64", "random", "random", 64, {}, lambda i: i % 2 == 0, {}),
             ("fastv@64[K=5]", "fastv", "fastv[K=5]", 64, {"K": 5}, lambda i: i % 2 == 0, {})]
    record_sweep(uri, "pub", model="llava-1.5-7b-hf", dataset="gqa", num_visual=576, cells=cells)
    sweep = load_sweep("pub", uri)
    t = content.accuracy_table(sweep, "llava-1.5-7b-hf")
    assert t.columns[1] == "GQA"
    rows = {r.cells[0]: r.cells[1] for r in t.rows()}
    base = 100 * _acc(sweep, "baseline")
    assert rows["baseline"] == f"{base:.1f} · pub 61.9* ({f'{base - 61.9:+.1f}'.replace('-', '−')})"
    fastv = 100 * _acc(sweep, "fastv@64")
    assert rows["fastv[K=2]"] == f"{fastv:.1f} · pub 44.1* ({f'{fastv - 44.1:+.1f}'.replace('-', '−')})"
    assert "pub 55.1" in rows["visionzip"]
    assert "pub" not in rows["random"]  # nothing published for a control
    assert "pub" not in rows["fastv[K=5]"]  # not the papers' setting
    assert any("TwigVLM paper Table 1" in n for n in t.notes)


def test_every_published_source_of_a_value_is_shown(tmp_path):
    """FastV on POPE at 192 tokens has two published values (VisionZip's rerun, TwigVLM v3 Table 9)."""
    uri = f"sqlite:///{tmp_path / 'm.db'}"
    cells = [("baseline", "baseline", "baseline", None, {}, lambda i: i % 5 != 0, {}),
             ("fastv@192", "fastv", "fastv[K=2]", 192, {"K": 2}, lambda i: i % 2 == 0, {})]
    record_sweep(uri, "pope", model="llava-1.5-7b-hf", dataset="lmms_eval:pope", num_visual=576, cells=cells)
    t = content.accuracy_table(load_sweep("pope", uri), "llava-1.5-7b-hf")
    fastv = next(r.cells[1] for r in t.rows() if r.cells[0] == "fastv[K=2]")
    base = next(r.cells[1] for r in t.rows() if r.cells[0] == "baseline")  # 85.9 in both its sources
    assert "pub 85.9* (" in base and "/ 85.9** (" in base
    assert "pub 64.8* (" in fastv and "/ 79.2*** (" in fastv
    assert ("* VisionZip paper Table 1; ** TwigVLM paper Table 9; *** TwigVLM paper v3 Table 9" in t.notes[-1])


def test_speed_tables_split_short_answers_from_long_generation(recorded):
    uri, _, _, _ = recorded
    sweep = load_sweep("rep", uri)
    (g, cells), = sweep.groups()
    short, long = content.speed_tables(sweep, g, cells)
    assert "short answers" in short.title and "long generation" in long.title
    assert "τ" in short.columns and "Acc. rate %" in short.columns
    fastv = next(c for c in cells if c.label == "fastv@48")
    recs = [r for r in sweep.records(fastv) if r.qtype != "describe"]
    row = next(r for h, rs in short.groups if h.startswith("Retain 48") for r in rs if r.cells[0] == "fastv[K=1]")
    assert row.cells[2] == f"{statistics.median(r.timings[0]['prefill_ms'] for r in recs):.2f}"
    p, lo, hi = measure.speedup(recs, measure.paired_reference(recs), "prefill_ms")
    assert row.cells[3] == f"{p:.2f}× ({lo:.2f}–{hi:.2f})"
    ssd = next(r for r in long.rows() if r.cells[0] == "baseline+ssd")
    assert ssd.cells[-2] == f"{30 / 3:.2f}" and ssd.cells[-1] == "60.0"  # 30 tokens in 3 rounds; 6 of 10 drafted


def test_ablation_tables_cover_each_swept_setting(recorded):
    uri, _, _, _ = recorded
    tables = content.ablation_tables(load_sweep("rep", uri))
    assert [t.title for t in tables] == ["Ablation: K — twigvlm at 16 tokens"]
    assert [r.cells[0] for r in tables[0].rows()] == ["1", "2"]


class _Refs(HTMLParser):
    def __init__(self):
        super().__init__()
        self.src, self.external = [], []

    def handle_starttag(self, tag, attrs):
        for k, v in attrs:
            if k in ("src", "href") and v and not v.startswith("#"):
                (self.external if re.match(r"[a-z]+:", v) else self.src).append(v)


def test_report_files_html_refs_markdown_and_latex(recorded):
    uri, pid, out, index = recorded
    html = index.read_text()
    refs = _Refs()
    refs.feed(html)
    assert refs.external == []  # nothing fetched from the network
    assert refs.src and all((out / s).is_file() and (out / s).stat().st_size > 1000 for s in refs.src)
    for name in ("accuracy_vs_tokens.png", "accuracy_vs_tokens.pdf", "accuracy_vs_speedup.png",
                 "ssd_speedup_vs_length.png", "keep_maps_test-3.png"):
        assert name in refs.src or (out / name).is_file(), name
    for k in ("engine regime", "device", "git commit", "timing mode", "repeats", pid):
        assert k in html
    md = (out / "report.md").read_text()
    assert "| *Retain 48 tokens (↓ 66.7 %)* |" in md and "Speed — long generation" in md
    tex = (out / "tables.tex").read_text()
    assert tex.count(r"\begin{table}") == tex.count(r"\end{table}") == len(re.findall(r"\\caption", tex)) >= 5
    assert tex.count(r"\begin{tabular}") == tex.count(r"\end{tabular}")
    bare = re.sub(r"\\[{}]", "", tex)
    depth = 0
    for ch in bare:
        depth += {"{": 1, "}": -1}.get(ch, 0)
        assert depth >= 0
    assert depth == 0
    widths = {len(spec) for spec in re.findall(r"\\begin\{tabular\}\{(l?r*)\}", tex)}
    for line in tex.splitlines():
        if line.startswith("%"):  # the file's own comment lines
            continue
        if line.endswith(r" \\") and not line.startswith(r"\multicolumn"):
            assert len(re.findall(r"(?<!\\)&", line)) + 1 in widths, line
        bare = re.sub(r"\$[^$]*\$", "", re.sub(r"\\[%#_&{}$]", "", line))  # escapes and math removed
        assert not re.search(r"[%#_$]", bare), line
    assert "?" not in tex  # every character of the tables is ASCII or has its LaTeX form
    assert tex_escape("50 % of a_b & {c} #1 ~ ^") == r"50 \% of a\_b \& \{c\} \#1 \textasciitilde{} \textasciicircum{}"


def test_keep_map_pixels_are_the_kept_patches_exactly():
    image = make_sample("test", 3).image
    rec = _records(lambda i: 1, keep={"-1": [0, 5, 13]}, merged={"-1": {"13": [14, 26]}})[3]
    kept, merged, what = figures.kept_patches(rec, 3)
    assert kept == {0, 5, 13} and merged == {14, 26} and what == "3 kept before the LLM"
    out = np.asarray(figures.keep_map(image, 12, kept, merged, scale=2)).astype(int)
    src = np.asarray(image.convert("RGB")).astype(int).repeat(2, 0).repeat(2, 1)
    side = 16  # 8-pixel patches, scaled 2x
    for p in range(144):
        r, c = divmod(p, 12)
        got = out[r * side:(r + 1) * side, c * side:(c + 1) * side]
        ref = src[r * side:(r + 1) * side, c * side:(c + 1) * side]
        want = ref if p in kept else (ref + figures.MERGE_RGB.astype(int)) // 2 if p in merged else ref // 4
        assert np.array_equal(got, want), p
    # the pruning point drawn: the one closest to the budget, a FinalWipe (nothing kept) never
    assert figures.keep_layer({"0": [5, 6], "12": []}, 0) == "0"
    assert figures.keep_layer({"1": list(range(30)), "3": list(range(20)), "8": list(range(5))}, 16) == "3"


def test_the_mlflow_side_charts_times_rounding_and_attached_report(recorded):
    import mlflow

    uri, pid, _, _ = recorded
    client = mlflow.MlflowClient(uri)
    exp = client.get_experiment_by_name("rep")
    assert exp.tags["mlflow.experimentKind"] == "custom_model_development"
    cells = client.search_runs([exp.experiment_id], f"tags.mlflow.parentRunId = '{pid}'")
    fastv = next(r for r in cells if r.info.run_name == "fastv@48")
    assert fastv.info.end_time - fastv.info.start_time == 25_000  # the cell's own times
    assert all(len(f"{abs(v):.15g}".replace(".", "").lstrip("0")) <= 5 for v in fastv.data.metrics.values())
    base = next(r for r in cells if r.info.run_name == "baseline")
    assert base.data.params["budget_tokens"] == "144"
    series = client.search_runs([exp.experiment_id], f"tags.role = 'series' and tags.sweep_run_id = '{pid}'")
    curve = next(r for r in series if r.data.tags["series"] == "fastv[K=1]")
    hist = client.get_metric_history(curve.info.run_id, "vs_tokens/accuracy")
    sweep = load_sweep("rep", uri)
    assert sorted((h.step, h.value) for h in hist) == [(16, round(_acc(sweep, "fastv@16"), 4)),
                                                       (48, round(_acc(sweep, "fastv@48"), 4))]
    assert "mlflow.parentRunId" not in curve.data.tags  # charted: the UI hides collapsed children
    files = {f.path for f in client.list_artifacts(pid, "report")}
    assert {"report/index.html", "report/report.md", "report/tables.tex", "report/accuracy_vs_tokens.png"} <= files


def test_a_sweep_without_its_baseline_still_reports(tmp_path):
    """The baseline cell failed (not FINISHED): the others are reported without relative figures."""
    uri = f"sqlite:///{tmp_path / 'm.db'}"
    record_sweep(uri, "nobase", cells=CELLS[2:4])
    index = build_report("nobase", uri, None, tmp_path / "out")
    t = content.accuracy_table(load_sweep("nobase", uri), "embedded")
    assert [h for h, _ in t.groups] == ["Retain 48 tokens (↓ 66.7 %)", "Retain 16 tokens (↓ 88.9 %)"]
    assert all(r.cells[t.columns.index("RelAcc")] == "" for r in t.rows())
    assert "Speed — short answers" in index.read_text()


def test_one_checkpoint_at_two_dtypes_gives_two_groups_and_distinct_tables(tmp_path):
    uri = f"sqlite:///{tmp_path / 'm.db'}"
    half = [(f"{c[0]} fp16", *c[1:4], {**c[4], "dtype": "float16"}, *c[5:]) for c in CELLS[:4]]
    record_sweep(uri, "var", cells=CELLS[:4] + half, ok=False)
    sweep = load_sweep("var", uri)  # no finished sweep: the latest one, its finished cells
    assert sweep.status == "FAILED"
    assert [g for g, _ in sweep.groups()] == [("embedded (float32, sdpa)", "shapes", "test"),
                                              ("embedded (float16, sdpa)", "shapes", "test")]
    fp16 = content.accuracy_table(sweep, "embedded (float16, sdpa)")
    assert {r.cells[0] for r in fp16.rows()} == {"baseline", "baseline+ssd", "fastv[K=1]"}
    index = build_report("var", uri, None, tmp_path / "out")
    tex = (tmp_path / "out" / "var" / "tables.tex").read_text()
    labels = re.findall(r"\\label\{([^}]*)\}", tex)
    assert len(labels) == len(set(labels)) >= 6
    assert "the sweep is FAILED" in index.read_text()


def test_an_lmms_eval_task_without_a_numeric_per_sample_score_shows_its_own_metric(tmp_path):
    """MME's per-sample results are dicts: the cell has no harness accuracy; the column shows
    lmms-eval's own score, and the published value beside it."""
    from reports.load import CellRun, Sweep

    def cell(label, method, tokens, score):
        params = {"method": method, "num_visual": "576", "model": "llava-1.5-7b-hf", "dataset": "lmms_eval:mme",
                  "split": "test", "budget_tokens": str(tokens), "lmms_task": "mme",
                  "lmms_metric": "mme_perception_score", **({"budget_ratio": "0.8889", "K": "2"} if tokens < 576 else {})}
        return CellRun(label, label, params, {"lmms/mme/mme_perception_score": score}, {"series": label})

    sweep = Sweep("mme", "1", "sqlite://", "p", {}, {}, {},
                  [cell("baseline", "baseline", 576, 1510.7), cell("fastv[K=2]", "fastv", 64, 1019.4)])
    t = content.accuracy_table(sweep, "llava-1.5-7b-hf")
    rows = {r.cells[0]: r.cells[1] for r in t.rows()}
    assert t.columns[1] == "MME"
    assert rows["baseline"] == "1511 · pub 1862* (−351.3)" and rows["fastv[K=2]"] == "1019 · pub 1218* (−198.6)"
    assert any("leave out lmms_eval:mme" in n for n in t.notes)
    # the figures skip cells without a harness accuracy instead of failing the report
    assert figures.accuracy_vs_tokens(sweep.cells, tmp_path, "a", "t") == []
    assert figures.accuracy_vs_speedup(sweep.cells, tmp_path, "b", "t") == []


def test_fidelity_fit_recovers_a_method_effect_at_equal_coverage():
    """tools.fidelity --fit linear: score = effect[method] + slope * coverage; a method that scores
    0.2 more at the same coverage gets +0.1 against the mean of two, whatever their coverages."""
    from tools.fidelity import fit

    rng = np.random.default_rng(0)
    which = np.repeat([0, 1], 400)
    cov = np.where(which == 0, rng.uniform(0, 0.5, 800), rng.uniform(0.5, 1, 800))  # different coverage
    score = 0.3 + 0.5 * cov + 0.2 * (which == 1)
    assert np.allclose(fit(2, cov, score, which, "linear"), [-0.1, 0.1])
    same = 0.3 + 0.5 * cov  # explained by coverage alone: no method effect
    assert np.allclose(fit(2, cov, same, which, "linear"), [0.0, 0.0], atol=1e-12)
