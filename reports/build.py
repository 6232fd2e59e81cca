"""`twigbench report EXPERIMENT` (and the end of every sweep): a sweep's paper-style report, read
from MLflow alone (never re-running a model), under reports/out/<experiment>/:

    index.html   one page (figures beside it, no network): the protocol, every table and figure
    report.md    the same tables in Markdown          tables.tex  the same tables (booktabs)
    *.png/*.pdf  accuracy vs tokens, accuracy vs speedup, SSD speedup vs length, keep maps
    cells.csv    one row per cell: its params and metrics as logged

The files are also attached to the sweep's parent run (artifacts under report/).
"""
from __future__ import annotations

import datetime as dt
import html
from pathlib import Path

import pandas as pd

from harness.tracking import DEFAULT_TRACKING_URI, _mlflow, resolved_uri
from reports import content, figures
from reports.load import Sweep, load_sweep
from reports.tables import Table, html_table, latex_document, markdown


def default_out_dir() -> Path:
    """reports/out/ under the folder the command runs in (never inside the installed package)."""
    return Path.cwd() / "reports" / "out"


# ---- the protocol header ---------------------------------------------------------------------
def _values(sweep: Sweep, key: str, default: str = "") -> str:
    vals = list(dict.fromkeys(str(c.params[key]) for c in sweep.cells if key in c.params))
    return ", ".join(vals) if vals else default


def _subset(sweep: Sweep) -> bool:
    return any("timed_samples" in c.params and int(c.params["timed_samples"]) < int(c.metrics.get("samples", 0))
               for c in sweep.cells)


def _when(ms) -> str:
    return "" if not ms else dt.datetime.fromtimestamp(ms / 1000, dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")


def protocol(sweep: Sweep) -> list[tuple[str, str]]:
    """(name, value) lines stating how the numbers were measured."""
    paired = any(str(c.params.get("paired_timing")).lower() == "true" for c in sweep.cells)
    samples = ", ".join(f"{g[1]}:{g[2]} {int(cs[0].metrics.get('samples', 0))}" for g, cs in sweep.groups())
    drift = {k: v for k, v in sweep.metrics.items() if "drift" in k}
    lines = [
        ("experiment", sweep.experiment),
        ("model", _values(sweep, "model")),
        ("dtype", _values(sweep, "dtype")),
        ("attention implementation", _values(sweep, "attn_implementation")),
        ("engine regime", _values(sweep, "engine", "eager (the model's own modules, step by step)")),
        ("device", sweep.tags.get("device", "?")),
        ("samples per cell", samples),
        ("generation", f"greedy, batch 1, at most {_values(sweep, 'max_new_tokens')} new tokens"),
        ("repeats", f"{_values(sweep, 'repeats')} timed pass(es) per sample after {_values(sweep, 'warmup')} "
                    "untimed warm-up sample(s)" + (f"; timed: the first {_values(sweep, 'timed_samples')} samples of "
                                                   "each cell (the others run once, for accuracy)"
                                                   if _subset(sweep) else "")),
        ("timing mode", "paired: the baseline timed right before every sample of every cell" if paired
         else "per cell: speedups against the baseline cell's timings"),
        ("timing drift", ", ".join(f"{k} ×{v:.3f}" for k, v in drift.items()) + " (the baseline timed again at "
                         "the end / its first pass)" if drift else "not measured"),
        ("git commit", sweep.tags.get("git_commit", "?")),
        ("versions", f"torch {sweep.tags.get('torch_version', '?')}, transformers "
                     f"{sweep.tags.get('transformers_version', '?')}, twigbench {sweep.tags.get('harness_version', '?')}"),
        ("MLflow", f"sweep run {sweep.parent_id} (experiment {sweep.experiment_id}) in "
                   f"{resolved_uri(sweep.tracking_uri)}"),
        ("swept", f"{_when(sweep.start_ms)} – {_when(sweep.end_ms)}, {len(sweep.cells)} finished cells"
                  + ("" if sweep.status == "FINISHED" else f"; the sweep is {sweep.status}: failed cells are "
                     "missing from every table")),
    ]
    return lines


# ---- assembling ------------------------------------------------------------------------------
STYLE = """body{font-family:system-ui,sans-serif;max-width:1200px;margin:2em auto;padding:0 1em;color:#222}
table{border-collapse:collapse;margin:.5em 0 1em;font-size:13px}th,td{padding:3px 8px;text-align:right}
th:first-child,td:first-child{text-align:left}thead th{border-bottom:2px solid #444}
tbody tr:last-child td{border-bottom:2px solid #444}tr.group td{text-align:left;font-style:italic;
border-top:1px solid #999;background:#f4f4f4}tr.muted td{color:#777}tr.muted td:first-child{font-style:italic}
.caption,.notes{font-size:13px;color:#444}figure{margin:1em 0}figure img{max-width:100%;border:1px solid #ddd}
figcaption{font-size:13px;color:#444}dl.protocol{display:grid;grid-template-columns:max-content auto;gap:2px 14px;
font-size:13px}dl.protocol dt{font-weight:600}dl.protocol dd{margin:0}nav a{margin-right:1em}"""


def _figure_html(file: str, caption: str) -> str:
    e = html.escape
    return f'<figure><img src="{e(file)}" alt="{e(caption)}"><figcaption>{e(caption)}</figcaption></figure>'


def render(sweep: Sweep, out: Path) -> list[str]:
    """Write every file of the report into `out`; returns their names."""
    sections: list[tuple[str, str, list]] = []  # (id, heading, [Table | (figure file, caption)])
    written: list[str] = []
    models = list(dict.fromkeys(g[0] for g, _ in sweep.groups()))
    acc = [content.accuracy_table(sweep, m) for m in models]
    acc_figs = []
    for i, (g, cells) in enumerate(sweep.groups()):
        suffix = "" if len(sweep.groups()) == 1 else f"_{i + 1}"
        where = f"{g[0]} on {g[1]}:{g[2]}"
        files = figures.accuracy_vs_tokens(cells, out, f"accuracy_vs_tokens{suffix}", where)
        written += files
        if files:
            acc_figs.append((files[0], f"Accuracy against visual tokens retained ({where}); bands: paired 95 % "
                                       "intervals of the difference to the upper bound, drawn around each point."))
        files = figures.accuracy_vs_speedup(cells, out, f"accuracy_vs_speedup{suffix}", where)
        written += files
        if files:
            acc_figs.append((files[0], f"Accuracy against end-to-end speedup ({where}); the numbers are tokens "
                                       "retained; circled: the Pareto front (no other cell faster and more accurate)."))
    sections.append(("accuracy", "Accuracy", [*acc, *acc_figs]))
    speed: list = []
    for i, (g, cells) in enumerate(sweep.groups()):
        speed += content.speed_tables(sweep, g, cells)
        suffix = "" if len(sweep.groups()) == 1 else f"_{i + 1}"
        files = figures.ssd_speedup_vs_length(sweep, cells, out, f"ssd_speedup_vs_length{suffix}",
                                              f"{g[0]} on {g[1]}:{g[2]}")
        written += files
        if files:
            speed.append((files[0], "SSD: each sample's decode speedup against greedy decoding (its paired baseline) "
                                    "by the sample's output length, with the binned median per cell."))
    sections.append(("speed", "Speed", speed))
    ablations = content.ablation_tables(sweep)
    if ablations:
        sections.append(("ablations", "Ablations", ablations))
    maps = []
    for i, (g, cells) in enumerate(sweep.groups()):
        for file, caption in figures.keep_maps(sweep, cells, out, f"keep_maps{'' if len(sweep.groups()) == 1 else i + 1}"):
            maps.append((file, caption))
            written += [file, file[:-4] + ".pdf"]
    if maps:
        sections.append(("keep-maps", "Keep maps", maps))
    pub = [content.published_table("TwigVLM paper Table 1")]
    sections.append(("published", "Published numbers (LLaVA-1.5-7B)", pub))

    tables = [x for _, _, items in sections for x in items if isinstance(x, Table)]
    (out / "tables.tex").write_text(latex_document(tables))
    (out / "report.md").write_text(_markdown(sweep, sections))
    (out / "index.html").write_text(_html(sweep, sections))
    cells_csv(sweep).to_csv(out / "cells.csv", index=False)
    return written + ["tables.tex", "report.md", "index.html", "cells.csv"]


def _markdown(sweep: Sweep, sections) -> str:
    lines = [f"# Report: {sweep.experiment}", ""] + [f"- **{k}**: {v}" for k, v in protocol(sweep)] + [""]
    for _, title, items in sections:
        lines += [f"## {title}", ""]
        for x in items:
            lines.append(markdown(x) if isinstance(x, Table) else f"![{x[1]}]({x[0]})\n\n*{x[1]}*\n")
    return "\n".join(lines)


def _html(sweep: Sweep, sections) -> str:
    e = html.escape
    head = "".join(f"<dt>{e(k)}</dt><dd>{e(v)}</dd>" for k, v in protocol(sweep))
    nav = "".join(f'<a href="#{sid}">{e(title)}</a>' for sid, title, _ in sections)
    body = []
    for sid, title, items in sections:
        body.append(f'<h2 id="{sid}">{e(title)}</h2>')
        body += [html_table(x) if isinstance(x, Table) else _figure_html(*x) for x in items]
    return (f'<!doctype html><html lang="en"><head><meta charset="utf-8"><title>{e(sweep.experiment)} — twigbench '
            f'report</title><style>{STYLE}</style></head><body><h1>Report: {e(sweep.experiment)}</h1>'
            f'<dl class="protocol">{head}</dl><nav>{nav}</nav>{"".join(body)}<p class="notes">Written by twigbench '
            f'from MLflow (no model was run); tables.tex and report.md hold the same tables.</p></body></html>\n')


def cells_csv(sweep: Sweep) -> pd.DataFrame:
    return pd.DataFrame([{"label": c.label, "series": c.series, "method": c.method, "tokens": c.tokens,
                          "model": c.model, "dataset": c.dataset, "split": c.split, "run_id": c.run_id,
                          **{f"params.{k}": v for k, v in sorted(c.params.items())},
                          **{f"metrics.{k}": v for k, v in sorted(c.metrics.items())}} for c in sweep.cells])


def build_report(experiment: str, tracking_uri: str = DEFAULT_TRACKING_URI, parent_run_id: str | None = None,
                 out_dir: Path | None = None, attach: bool = True) -> Path:
    """Write the report of a sweep (default: the experiment's latest finished one) and attach it to
    the sweep's parent run; returns the path of index.html."""
    return build(experiment, tracking_uri, parent_run_id, out_dir, attach)[0]


def build(experiment: str, tracking_uri: str = DEFAULT_TRACKING_URI, parent_run_id: str | None = None,
          out_dir: Path | None = None, attach: bool = True) -> tuple[Path, Sweep]:
    sweep = load_sweep(experiment, tracking_uri, parent_run_id)
    out = Path(out_dir or default_out_dir()) / experiment
    out.mkdir(parents=True, exist_ok=True)
    written = render(sweep, out)
    if attach:
        client = _mlflow(tracking_uri).MlflowClient()
        for name in written:
            client.log_artifact(sweep.parent_id, str(out / name), "report")
    return out / "index.html", sweep
