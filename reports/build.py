"""Render a sweep's results from MLflow (never by re-running models): a Markdown table and an
accuracy-vs-budget figure under reports/out/<experiment>/."""
from __future__ import annotations

from pathlib import Path

import pandas as pd

from harness.data.synthetic import QUESTION_TYPES
from harness.records import METRICS
from harness.tracking import DEFAULT_TRACKING_URI, cell_runs

def default_out_dir() -> Path:
    """reports/out/ under the folder the command runs in (never inside the installed package)."""
    return Path.cwd() / "reports" / "out"


def question_types(runs: pd.DataFrame) -> list[str]:
    """The question types the cells report accuracy for (metrics accuracy_<type>), the embedded
    benchmark's in its own order first."""
    found = {c[len("metrics.accuracy_"):] for c in runs.columns
             if c.startswith("metrics.accuracy_") and c[len("metrics."):] not in METRICS}
    return [t for t in QUESTION_TYPES if t in found] + sorted(found - set(QUESTION_TYPES))


def cell_table(runs: pd.DataFrame) -> pd.DataFrame:
    """One row per cell, sorted by method then budget (most tokens first)."""
    def col(name, default=float("nan")):
        if name.startswith("metrics.") and name[len("metrics."):] not in METRICS \
                and not name.startswith("metrics.accuracy_"):
            raise KeyError(f"{name} is not a metric the cells log (harness.records.METRICS)")
        return runs[name] if name in runs else pd.Series(default, index=runs.index)

    table = pd.DataFrame({
        "method": col("params.method"),
        "series": col("params.series"),
        "budget_tokens": pd.to_numeric(col("params.budget_tokens"), errors="coerce"),
        "accuracy": col("metrics.accuracy"),
        "relative_accuracy": col("metrics.relative_accuracy"),
        **{f"acc_{t}": col(f"metrics.accuracy_{t}") for t in question_types(runs)},
        "prefill_ms": col("metrics.prefill_ms"),
        "prefill_speedup": col("metrics.prefill_speedup"),
        "prefill_speedup_ci_low": col("metrics.prefill_speedup_ci_low"),
        "prefill_speedup_ci_high": col("metrics.prefill_speedup_ci_high"),
        "decode_tokens_per_s": col("metrics.decode_tokens_per_s_pooled"),
        "decode_speedup": col("metrics.decode_speedup"),
        "decode_speedup_ci_low": col("metrics.decode_speedup_ci_low"),
        "decode_speedup_ci_high": col("metrics.decode_speedup_ci_high"),
        "accuracy_diff_ci_low": col("metrics.accuracy_diff_ci_low"),
        "accuracy_diff_ci_high": col("metrics.accuracy_diff_ci_high"),
        "prefill_gflops": col("metrics.prefill_gflops"),
        "acceptance_rate": col("metrics.acceptance_rate"),
        "mean_accepted_length": col("metrics.mean_accepted_length"),
        "equal_token_average": col("metrics.equal_token_average"),
        "official_equal_token_average": pd.to_numeric(col("params.official_equal_token_average"), errors="coerce"),
    })
    table["_order"] = table["method"].ne("baseline")
    table = table.sort_values(["_order", "series", "budget_tokens"], ascending=[True, True, False])
    return table.drop(columns="_order").reset_index(drop=True)


def markdown(table: pd.DataFrame, title: str, meta: str, figure: str = "accuracy_vs_budget.png") -> str:
    show = table.copy()
    for c in show.columns:
        if (c.startswith("acc") and c != "acceptance_rate") or c == "relative_accuracy":
            show[c] = (100 * show[c]).map(lambda v: "" if pd.isna(v) else f"{v:.1f}")
    for c in ("prefill_ms", "decode_tokens_per_s", "equal_token_average", "official_equal_token_average"):
        show[c] = show[c].map(lambda v: "" if pd.isna(v) else f"{v:.1f}" if c != "prefill_ms" else f"{v:.2f}")
    for c in ("prefill_speedup", "decode_speedup"):
        show[c] = [("" if pd.isna(v) else f"{v:.2f}x" if pd.isna(lo) else f"{v:.2f}x [{lo:.2f}, {hi:.2f}]")
                   for v, lo, hi in zip(table[c], table[c + "_ci_low"], table[c + "_ci_high"])]
    show["diff_ci"] = [("" if pd.isna(lo) else f"[{100 * lo:+.1f}, {100 * hi:+.1f}]")
                       for lo, hi in zip(table["accuracy_diff_ci_low"], table["accuracy_diff_ci_high"])]
    show["prefill_gflops"] = show["prefill_gflops"].map(lambda v: "" if pd.isna(v) else f"{v:.3g}")
    show = show.drop(columns=[c for c in show.columns if c.endswith(("_ci_low", "_ci_high"))])
    order = list(show.columns)
    order.insert(order.index("relative_accuracy") + 1, order.pop(order.index("diff_ci")))
    show = show[order]
    show["acceptance_rate"] = show["acceptance_rate"].map(lambda v: "" if pd.isna(v) else f"{100 * v:.1f}")
    show["mean_accepted_length"] = show["mean_accepted_length"].map(lambda v: "" if pd.isna(v) else f"{v:.2f}")
    show = show.drop(columns=[c for c in ("acceptance_rate", "mean_accepted_length", "official_equal_token_average")
                              if table[c].isna().all()])
    show["budget_tokens"] = show["budget_tokens"].map(lambda v: "all" if pd.isna(v) else str(int(v)))
    header = "| " + " | ".join(show.columns) + " |\n|" + "---|" * len(show.columns) + "\n"
    rows = "".join("| " + " | ".join(map(str, r)) + " |\n" for r in show.itertuples(index=False))
    return (f"# {title}\n\n{meta}\n\n{conventions(table)}Accuracy in %, relative accuracy against the baseline cell of "
            f"the same sweep, diff_ci the 95 % paired-bootstrap interval of the accuracy difference "
            f"(points); speedups carry 95 % bootstrap intervals over samples and timing repeats; prefill is the median time of the LLM's prompt pass (pruning included, vision "
            f"encoding excluded; for SSD cells, the time to the first token); decode speedup is the "
            f"decode tokens/s against the baseline cell's; acceptance rate (%) and mean accepted length "
            f"(tokens per target forward) are SSD's; equal-token average is the "
            f"visual tokens each backbone layer processed, averaged over layers (measured); prefill GFLOPs "
            f"is analytic (decoder layers at the measured tokens, the twig's layers included).\n\n{header}{rows}\n"
            f"![accuracy vs budget]({figure})\n")


def timing_note(runs: pd.DataFrame) -> str:
    """The timing protocol of the cells, from their params."""
    if "params.repeats" not in runs:
        return ""
    repeats = sorted(set(runs["params.repeats"].dropna()))
    paired = "params.paired_timing" in runs and runs["params.paired_timing"].astype(str).str.lower().eq("true").any()
    against = ("the baseline timed beside every sample of each cell (paired)" if paired
               else "the baseline cell's timings")
    return f" Timing: {'/'.join(repeats)} timed repeat(s) per sample; speedups against {against}."


def conventions(table: pd.DataFrame) -> str:
    """A line per cell whose measured equal-token average is more than one token off its budget."""
    off = table[(table["equal_token_average"] - table["budget_tokens"]).abs() > 1]
    if off.empty:
        return ""
    lines = []
    for r in off.itertuples():
        why = (f"by its own accounting (a pruning layer counted at its output size) {r.official_equal_token_average:.1f}"
               if pd.notna(r.official_equal_token_average) else "see the method's documentation")
        lines.append(f"- `{r.series}` at {int(r.budget_tokens)} tokens: measured {r.equal_token_average:.1f}; {why}.")
    return ("Token conventions: these cells process more (or fewer) visual tokens than their budget "
            "under the measured accounting:\n\n" + "\n".join(lines) + "\n\n")


def plot(table: pd.DataFrame, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    base = table[table["method"] == "baseline"]
    swept = table[table["method"] != "baseline"]
    for series, g in swept[swept["budget_tokens"].notna()].groupby("series"):
        g = g.sort_values("budget_tokens")
        ax.plot(g["budget_tokens"], 100 * g["accuracy"], marker="o", label=series)
    for _, r in swept[swept["budget_tokens"].isna()].iterrows():  # budget-free controls (blind)
        ax.axhline(100 * r["accuracy"], color="grey", linestyle=":", label=r["series"])
    if not base.empty:
        ax.axhline(100 * base["accuracy"].iloc[0], color="black", linestyle="--", label="baseline (all tokens)")
    ax.set_xlabel("visual tokens retained (equal-token average)")
    ax.set_ylabel("accuracy (%)")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def build_report(experiment: str, tracking_uri: str = DEFAULT_TRACKING_URI, parent_run_id: str | None = None,
                 out_dir: Path | None = None) -> Path:
    parent_run_id, runs = cell_runs(tracking_uri, experiment, parent_run_id)
    if runs.empty:
        raise ValueError(f"sweep {parent_run_id} of {experiment!r} has no cell runs")
    d = Path(out_dir or default_out_dir()) / experiment
    d.mkdir(parents=True, exist_ok=True)
    keys = [k for k in ("params.model", "params.dataset", "params.split") if k in runs]
    groups = list(runs.groupby(keys, sort=False)) if keys else [((), runs)]
    sections, tables = [], []
    for i, (key, g) in enumerate(groups):
        key = key if isinstance(key, tuple) else (key,)
        model, dataset, split = (list(key) + ["?", "?", "?"])[:3]
        table = cell_table(g)
        figure = "accuracy_vs_budget.png" if len(groups) == 1 else f"accuracy_vs_budget_{i + 1}.png"
        plot(table, d / figure)
        meta = (f"Model `{model}`, dataset `{dataset}` ({split} split), MLflow sweep run `{parent_run_id}` "
                f"in `{tracking_uri}`.{timing_note(g)}")
        title = f"Sweep report: {experiment}" + ("" if len(groups) == 1 else f" — {model} / {dataset}:{split}")
        sections.append(markdown(table, title, meta, figure))
        tables.append(table.assign(model=model, dataset=dataset, split=split))
    (d / "report.md").write_text("\n".join(sections))
    pd.concat(tables).to_csv(d / "cells.csv", index=False)
    return d / "report.md"
