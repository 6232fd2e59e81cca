"""The report's tables, built from a sweep as MLflow holds it (`reports.load.Sweep`):

- accuracy in the papers' layout: row groups "Upper bound, M tokens (100 %)", "Retain R tokens
  (↓ x %)" per budget (and "No visual tokens"), a row per method, a column per benchmark (per
  question type on the embedded benchmark), Avg., RelAcc and the paired 95 % interval of the
  accuracy difference; the best method of each group in bold (controls never count as best);
  published values beside the cells whose model, benchmark, method, settings and tokens match;
- speed, for short answers and long generation separately (the papers' TextVQA vs MM-Vet split;
  here: the short question types vs `describe`), recomputed from the samples' timings with the
  harness's own protocol (`harness.measure`);
- ablations: one table per swept setting (K, T, twig init, score source, FinalWipe, δ, θ, draft T);
- the published numbers in the same layout.
"""
from __future__ import annotations

import statistics
from collections import Counter

from harness import measure
from harness.data.synthetic import QUESTION_TYPES
from reports import published
from reports.load import CellRun, Sweep
from reports.tables import Row, Table

LONG = ("describe",)  # the long-generation question types (the papers' MM-Vet)


# ---- formatting ------------------------------------------------------------------------------
def pct(v) -> str:
    return "" if v is None or v != v else f"{100 * v:.1f}"


def score(v) -> str:
    """An accuracy as the papers print it: a fraction in %, a score (MME) as is."""
    return "" if v is None or v != v else (f"{100 * v:.1f}" if abs(v) <= 1 else f"{v:.0f}")


def signed(v) -> str:
    return f"{v:+.1f}".replace("-", "−")


def times(m: dict, name: str) -> str:
    """'1.52× (1.48–1.57)': a speedup with its 95 % interval, from metrics name, name_ci_low/high."""
    p = m.get(name)
    if p is None or p != p:
        return ""
    lo, hi = m.get(f"{name}_ci_low"), m.get(f"{name}_ci_high")
    return f"{p:.2f}×" + ("" if lo is None or lo != lo else f" ({lo:.2f}–{hi:.2f})")


def num(v, digits: int = 1) -> str:
    return "" if v is None or v != v else f"{v:.{digits}f}"


# ---- row groups ------------------------------------------------------------------------------
def tier(c: CellRun) -> tuple[int, int]:
    """Sort key and identity of a cell's row group: the upper bound first, then budgets from the
    most tokens down, then no visual tokens."""
    if not c.budgeted and c.tokens >= c.num_visual:
        return (0, c.num_visual)
    if not c.budgeted and c.tokens == 0:
        return (2, 0)
    return (1, -c.tokens)


def heading(key: tuple[int, int], num_visual: int) -> str:
    kind, t = key
    if kind == 0:
        return f"Upper bound, {t} tokens (100 %)"
    if kind == 2:
        return "No visual tokens (↓ 100 %)"
    return f"Retain {-t} tokens (↓ {100 * (1 + t / num_visual):.1f} %)"


def token_notes(cells: list[CellRun]) -> dict[str, str]:
    """series@tokens -> the note of a cell whose measured equal-token average is more than one
    token off its budget, with the reason."""
    out = {}
    for c in cells:
        eq = c.metrics.get("equal_token_average")
        if not c.budgeted or eq is None or abs(eq - c.tokens) <= 1:
            continue
        if "official_equal_token_average" in c.params:
            why = (f"by its own accounting (a pruning layer counted at its output size) "
                   f"{float(c.params['official_equal_token_average']):.1f}")
        elif "grid" in c.params:
            why = f"the largest pooling grid within the budget is {c.params['grid']}"
        else:
            why = "see the method's documentation"
        out[f"{c.series}@{c.tokens}"] = (f"{c.series} at {c.tokens} tokens processes {eq:.1f} visual tokens per "
                                         f"layer on average (measured); {why}.")
    return out


def _bold(rows: list[tuple[CellRun, list, Row]], columns: range) -> None:
    """Bold the best value of each column among the methods (not the controls) of a row group."""
    for j in columns:
        vals = [(v[j], r) for c, v, r in rows if not c.is_control and v[j] is not None and v[j] == v[j]]
        if len(vals) < 2:
            continue
        if len({round(v, 4) for v, _ in vals}) == 1:  # all equal: nobody is best
            continue
        best = max(round(v, 4) for v, _ in vals)
        for v, r in vals:
            if round(v, 4) == best:
                r.bold.add(j + 1)


# ---- accuracy --------------------------------------------------------------------------------
def accuracy_columns(groups: list[tuple[tuple, list[CellRun]]]) -> list[tuple[tuple, str, str, str | None]]:
    """(group, metric, title, benchmark) per column: the question types of a dataset that has
    several (the embedded benchmark), else the dataset itself as one benchmark."""
    cols = []
    for g, cells in groups:
        types = {k[len("accuracy_"):] for c in cells for k in c.metrics
                 if k.startswith("accuracy_") and not k.startswith("accuracy_diff")}
        ordered = [t for t in QUESTION_TYPES if t in types] + sorted(types - set(QUESTION_TYPES))
        prefix = f"{g[1]}: " if len(groups) > 1 else ""
        if len(ordered) > 1 and not published.benchmark_name(g[1]):  # a known benchmark: one column
            cols += [(g, f"accuracy_{t}", prefix + t, None) for t in ordered]
        else:
            cols.append((g, "accuracy", published.benchmark_name(g[1]) or g[1], g[1]))
    return cols


def _benchmark_value(c: CellRun, metric: str):
    """The cell's value of a column; an lmms-eval task whose per-sample metric is not a number
    (MME's per-category dicts) has no harness accuracy: its own metric (lmms/<task>/<metric>)."""
    v = c.metrics.get(metric)
    if (v is None or v != v) and metric == "accuracy" and c.params.get("lmms_task"):
        v = c.metrics.get(f"lmms/{c.params['lmms_task']}/{c.params.get('lmms_metric', '')}")
    return v


def accuracy_table(sweep: Sweep, model: str) -> Table:
    """The accuracy table of one model (variant): its datasets' columns. Avg. is the cell's
    accuracy over all its samples (one dataset) or the mean over the datasets; RelAcc is accuracy
    relative to the upper bound's, per dataset and then averaged over the datasets (TwigVLM's
    RelAcc over benchmarks)."""
    groups = [(g, cells) for g, cells in sweep.groups() if g[0] == model]
    cols = accuracy_columns(groups)
    cells = [c for _, cs in groups for c in cs]
    refs = {g: next((c for c in cs if c.is_reference), None) for g, cs in groups}
    num_visual = max(c.num_visual for c in cells)
    single = len(groups) == 1
    avg_col = len(cols) > 1
    notes_by_key = token_notes(cells)
    # rows: (tier, series) -> {group: cell}, in the sweep's order
    rows: dict[tuple, dict] = {}
    for c in cells:
        rows.setdefault((tier(c), c.series), {})[c.group] = c
    columns = ["Method", *[t for _, _, t, _ in cols]] + (["Avg."] if avg_col else []) + ["RelAcc"] + (
        ["Δ vs upper bound (95 % CI)"] if single else [])
    sources: list[str] = []
    matched, marks, omitted = [], [], set()
    by_tier: dict[tuple, list] = {}
    for (key, series), per_group in rows.items():
        first = next(iter(per_group.values()))
        vals, texts = [], []
        for g, metric, _, bench in cols:
            c = per_group.get(g)
            v = _benchmark_value(c, metric) if c else None
            vals.append(v)
            text = score(v)
            if bench and c is not None and v is not None:
                pub = published.lookup(c.model, bench, c.method, c.tokens, c.ssd, c.params, c.series)
                if pub:
                    parts = []
                    for p in pub:
                        if p.source not in sources:
                            sources.append(p.source)
                        delta = 100 * v - p.value if abs(v) <= 1 else v - p.value
                        parts.append(f"{p.value:g}{'*' * (sources.index(p.source) + 1)} ({signed(delta)})")
                    text += " · pub " + " / ".join(parts)
                    matched.append(f"{series} at {c.tokens} tokens on {pub[0].benchmark}")
            texts.append(text)
        measured = [(g, c) for g, c in per_group.items() if "accuracy" in c.metrics]
        if len(measured) < len(per_group):
            omitted.update(g[1] for g, c in per_group.items() if "accuracy" not in c.metrics)
        avg = (first.metrics.get("accuracy") if single else
               statistics.fmean(c.metrics["accuracy"] for _, c in measured) if measured else None)
        rels = [c.metrics["accuracy"] / refs[g].metrics["accuracy"] for g, c in measured
                if refs.get(g) is not None and refs[g].metrics.get("accuracy")]
        rel = statistics.fmean(rels) if rels else None
        label = series
        note = notes_by_key.get(f"{series}@{first.tokens}")
        if note:  # the measured equal-token average beside the budget, the reason in the note
            marks.append(note)
            label += f" ({first.metrics['equal_token_average']:.1f} tokens) " + "†" * len(marks)
        row_vals = vals + ([avg] if avg_col else []) + [rel]
        cells_text = [label, *texts] + ([pct(avg)] if avg_col else []) + [pct(rel)]
        if single:
            m = first.metrics
            d = m.get("accuracy_diff")
            cells_text.append("" if d is None or first.is_reference else
                              f"{signed(100 * d)} ({signed(100 * m['accuracy_diff_ci_low'])}, "
                              f"{signed(100 * m['accuracy_diff_ci_high'])})")
            row_vals.append(None)
        by_tier.setdefault(key, []).append((first, row_vals, Row(cells_text, muted=first.is_control)))
    table_groups = []
    for key in sorted(by_tier):
        entries = by_tier[key]
        if key[0] == 1:
            _bold(entries, range(len(cols) + (1 if avg_col else 0) + 1))
        table_groups.append((heading(key, num_visual), [r for _, _, r in entries]))
    bench = ", ".join(f"{g[1]} ({g[2]} split)" for g, _ in groups)
    caption = (f"{model} on {bench}: accuracy in %"
               + ("; Avg. is the accuracy over all the samples (the question types are equally many)" if single and
                  avg_col else "; Avg. is the mean over the benchmarks" if avg_col else "")
               + "; RelAcc is the accuracy relative to the upper bound's"
               + ("" if single else " on each benchmark, averaged over the benchmarks")
               + ("; Δ is the paired difference to the upper bound in points with its 95 % bootstrap interval"
                  if single else "")
               + ". Bold: the best method of each group (controls in italics never count). Tokens are "
                 "visual tokens retained per layer, averaged over the layers (the equal-token convention).")
    notes = [f"{'†' * (i + 1)} {n}" for i, n in enumerate(marks)]
    if omitted:
        notes.append(f"Avg. and RelAcc leave out {', '.join(sorted(omitted))}: no numeric per-sample score (its "
                     "column shows lmms-eval's own metric).")
    if matched:
        notes.append("pub: the published value of the same model, benchmark, method, settings and tokens, with the "
                     "difference measured − published; sources: " + "; ".join(
                         f"{'*' * (i + 1)} {src}" for i, src in enumerate(sources))
                     + " (see reports/published.py for the known disagreements between sources). Matched: "
                     + "; ".join(matched) + ".")
    return Table(f"Accuracy — {model}", columns, table_groups, caption, notes, key=f"accuracy-{_slug(model)}")


# ---- speed -----------------------------------------------------------------------------------
def _subset_figures(sweep: Sweep, cell: CellRun, types: set | None) -> dict:
    """Timing figures of the cell on the samples of `types` (None: all), with speedups against
    its paired baseline timings (or the reference cell's), as harness.measure computes them."""
    recs = [r for r in sweep.records(cell) if types is None or r.qtype in types]
    if not measure.timed(recs):  # no timed sample of these types (timing.subset)
        return {}
    m = dict(measure.timing_metrics(recs))
    ref = sweep.reference(cell)
    if ref is not None and not cell.is_reference:
        base = [r for r in sweep.records(ref) if types is None or r.qtype in types]
        m.update(measure.relative_metrics(recs, base))
    if recs[0].drafted is not None:
        drafted = sum(r.drafted for r in recs)
        m["acceptance_rate"] = sum(r.accepted for r in recs) / drafted if drafted else 0.0
        m["mean_accepted_length"] = sum(r.new_tokens for r in recs) / max(1, sum(r.rounds for r in recs))
    m["accuracy"] = statistics.fmean(r.score for r in recs)
    m["samples"] = len(recs)
    return m


OPTIONAL_SPEED = (("roofline_fraction", "Roofline %", pct), ("gpu_prefill_ms", "GPU prefill ms", num),
                  ("gpu_decode_ms", "GPU decode ms", num))


def speed_tables(sweep: Sweep, group: tuple, cells: list[CellRun]) -> list[Table]:
    present = {r.qtype for c in cells[:1] for r in sweep.records(c)}
    parts = [(None, "all samples", "")]
    if present & set(LONG) and present - set(LONG):
        short = sorted(present - set(LONG), key=lambda t: QUESTION_TYPES.index(t) if t in QUESTION_TYPES else 99)
        parts = [(set(short), "short answers", ", ".join(short)), (set(LONG), "long generation", ", ".join(LONG))]
    ssd = any(c.ssd for c in cells)
    extra = [(k, title, f) for k, title, f in OPTIONAL_SPEED if any(k in c.metrics for c in cells)]
    columns = ["Method", "Acc.", "Prefill ms", "Prefill ×", "TTFT ms", "TTFT ×", "Decode tok/s", "Decode ×",
               "E2E ms", "E2E ×"] + (["τ", "Acc. rate %"] if ssd else []) + [t for _, t, _ in extra]
    num_visual = max(c.num_visual for c in cells)
    out = []
    for types, name, listed in parts:
        by_tier: dict = {}
        for c in cells:
            m = _subset_figures(sweep, c, types)
            if not m:
                continue
            row = [c.series, pct(m["accuracy"]), num(m["prefill_ms"], 2), times(m, "prefill_speedup"),
                   num(m["ttft_ms"], 2), times(m, "ttft_speedup"), num(m["decode_tokens_per_s_pooled"]),
                   times(m, "decode_speedup"), num(m["e2e_ms"]), times(m, "e2e_speedup")]
            if ssd:
                row += [num(m.get("mean_accepted_length"), 2), pct(m.get("acceptance_rate"))]
            row += [f(c.metrics.get(k)) for k, _, f in extra]  # the cell's own (all samples)
            by_tier.setdefault(tier(c), []).append(Row(row, muted=c.is_control))
        groups = [(heading(k, num_visual), by_tier[k]) for k in sorted(by_tier)]
        n = _samples(sweep, cells[0], types)
        caption = (f"{group[0]} on {group[1]} ({group[2]} split), {name}"
                   + (f" ({listed})" if listed else "") + f", {n} samples per cell: "
                   "prefill = the LLM's prompt pass (pruning included, vision excluded; SSD cells: up to the first "
                   "token), TTFT = vision + prefill, decode tokens/s pooled over the samples, E2E = the whole "
                   "generation of one sample; medians over samples (over repeats: the median); × = speedup "
                   "against the baseline timed beside each sample (or the baseline cell) with its 95 % bootstrap "
                   "interval" + ("; τ = tokens per target forward, acceptance rate of the drafted tokens" if ssd else "")
                   + ("; GPU and roofline columns are the cell's over all its samples" if extra else "") + ".")
        several = len(sweep.groups()) > 1
        out.append(Table(f"Speed — {name}" + (f" ({group[0]}, {group[1]}:{group[2]})" if several else ""), columns,
                         groups, caption, key=f"speed-{_slug(name)}-{_slug(' '.join(group))}"))
    return out


def _samples(sweep: Sweep, cell: CellRun, types: set | None) -> str:
    recs = [r for r in sweep.records(cell) if types is None or r.qtype in types]
    n, t = len(recs), len(measure.timed(recs))
    return str(n) if t == n else f"{n} (timed: the first {t})"


# ---- ablations -------------------------------------------------------------------------------
AXES = (("K", "K"), ("twig_layers", "T"), ("twig_init", "twig init"), ("score_source", "score source"),
        ("final_wipe", "FinalWipe K_f"), ("ssd_delta", "δ (draft steps)"), ("ssd_theta", "θ (draft confidence)"),
        ("ssd_T", "draft twig T"), ("ssd_K", "draft twig K"))


def _value_key(v: str):
    try:
        return (0, float(v), v)
    except (TypeError, ValueError):
        return (1, 0.0, str(v))


def ablation_tables(sweep: Sweep) -> list[Table]:
    """One table per swept setting: among the cells of one method (and decoding) at one token
    count, the cells that share every other swept setting's most common value; a setting that then
    takes two values or more makes a table (the layout of TwigVLM's ablations: accuracy, RelAcc,
    speedups, acceptance)."""
    families: dict = {}
    for c in sweep.cells:
        if not c.is_reference and not c.is_control:
            families.setdefault((c.group, c.method, c.ssd, c.tokens), []).append(c)
    out = []
    for (group, method, ssd, tokens), cells in families.items():
        axes = [(k, t) for k, t in AXES if len({c.params.get(k) for c in cells if k in c.params}) > 1]
        for k, title in axes:
            others = [a for a, _ in axes if a != k]
            common = {a: Counter(c.params.get(a) for c in cells).most_common(1)[0][0] for a in others}
            rows = [c for c in cells if all(c.params.get(a) == common[a] for a in others) and k in c.params]
            if len({c.params[k] for c in rows}) < 2:
                continue
            rows.sort(key=lambda c: _value_key(c.params[k]))
            columns = [title, "Acc.", "RelAcc", "Prefill ×", "Decode ×", "E2E ×"] + (
                ["τ", "Acc. rate %"] if ssd else []) + ["twig"]
            table_rows = []
            for c in rows:
                m = c.metrics
                r = [str(c.params[k]), pct(m.get("accuracy")), pct(m.get("relative_accuracy")),
                     times(m, "prefill_speedup"), times(m, "decode_speedup"), times(m, "e2e_speedup")]
                if ssd:
                    r += [num(m.get("mean_accepted_length"), 2), pct(m.get("acceptance_rate"))]
                r.append(str(c.params.get("twig") or c.params.get("ssd_twig") or ""))
                table_rows.append(Row(r))
            name = method + ("+ssd" if ssd else "")
            fixed = ", ".join(f"{dict(AXES)[a]} = {common[a]}" for a in others if common[a] is not None)
            caption = (f"{group[0]} on {group[1]}, {tokens} visual tokens retained; every other swept setting fixed"
                       + (f" ({fixed})" if fixed else "") + ". RelAcc against the upper bound; speedups against the "
                       "baseline with 95 % intervals.")
            where = f" ({group[0]}, {group[1]}:{group[2]})" if len(sweep.groups()) > 1 else ""
            out.append(Table(f"Ablation: {title} — {name} at {tokens} tokens{where}", columns, [("", table_rows)],
                             caption, key=f"ablation-{_slug(name)}-{tokens}-{_slug(k)}-{_slug(' '.join(group))}"))
    return out


# ---- published -------------------------------------------------------------------------------
def published_table(source: str = "TwigVLM paper Table 1", model: str = "llava-1.5-7b") -> Table:
    """A published table in the same layout (for context beside a run on another model)."""
    entries = [p for p in published.table() if p.source == source and p.model == model]
    benches = list(dict.fromkeys(p.benchmark for p in entries))
    base = {p.benchmark: p.value for p in entries if p.method == "baseline"}
    num_visual = max(p.tokens for p in entries)
    rows: dict = {}
    for p in entries:
        rows.setdefault((0 if p.method == "baseline" else 1, -p.tokens), {}).setdefault(p.method, {})[p.benchmark] = p.value
    groups = []
    for key in sorted(rows):
        grp = []
        for meth, vals in rows[key].items():
            rel = [vals[b] / base[b] for b in benches if b in vals and base.get(b)]
            grp.append(Row([meth, *[f"{vals[b]:g}" if b in vals else "" for b in benches],
                            f"{100 * statistics.fmean(rel):.1f}" if rel else ""]))
        groups.append((heading((key[0], num_visual if key[0] == 0 else key[1]), num_visual), grp))
    caption = (f"As published ({source}, {model}); RelAcc computed here as the mean over the benchmarks of each "
               "value relative to the baseline row. Context only: a run on another model or benchmark is not "
               "comparable value by value.")
    return Table(f"Published: {source}", ["Method", *benches, "RelAcc"], groups, caption,
                 key=f"published-{_slug(source)}")


def _slug(text: str) -> str:
    import re

    return re.sub(r"[^a-z0-9]+", "-", str(text).lower()).strip("-")
