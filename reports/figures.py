"""The report's figures (PNG and PDF), drawn from what a sweep logged:

- accuracy vs visual tokens retained, a curve per method with its paired 95 % band, the oracle
  (ceiling) and random (floor) controls drawn apart, the upper bound and the blind control as lines;
- accuracy vs end-to-end speedup, the Pareto front marked;
- SSD: decode speedup against output length, per sample and binned;
- keep maps: for a few fixed samples, the image with the patches each method kept (merged
  groups tinted), one panel per method and budget: exact pixels (kept patch = the image, merged
  patch = half the image + half MERGE_RGB, dropped patch = a quarter of the image).
"""
from __future__ import annotations

import math
import statistics
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from reports.load import CellRun, Sweep

MERGE_RGB = np.array([0, 90, 255], dtype=np.uint16)
SCALE = 2  # keep-map pixels per image pixel


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, out: Path, name: str) -> list[str]:
    fig.tight_layout()
    files = []
    for ext in ("png", "pdf"):
        fig.savefig(out / f"{name}.{ext}", dpi=130)
        files.append(f"{name}.{ext}")
    _pyplot().close(fig)
    return files


def _style():
    import seaborn as sns

    return sns.axes_style("whitegrid")


def _palette(series: list[str]) -> dict[str, tuple]:
    import seaborn as sns

    return dict(zip(series, sns.color_palette("tab10", max(10, len(series)))))


# ---- accuracy vs tokens ----------------------------------------------------------------------
def _scored(cells: list[CellRun]) -> list[CellRun]:
    """The cells with a harness accuracy (an lmms-eval task without a numeric per-sample score has none)."""
    return [c for c in cells if c.metrics.get("accuracy") == c.metrics.get("accuracy") is not None]


def accuracy_vs_tokens(cells: list[CellRun], out: Path, name: str, title: str) -> list[str]:
    plt = _pyplot()
    cells = _scored(cells)
    budgeted = [c for c in cells if c.budgeted]
    if not budgeted:
        return []
    series = list(dict.fromkeys(c.series for c in budgeted if not c.is_control))
    colour = _palette(series)
    with _style():
        fig, ax = plt.subplots(figsize=(8.5, 4.4))
        for s in dict.fromkeys(c.series for c in budgeted):
            pts = sorted((c for c in budgeted if c.series == s), key=lambda c: c.tokens)
            x = [c.tokens for c in pts]
            y = np.array([100 * c.metrics["accuracy"] for c in pts])
            method = pts[0].method
            if method == "oracle":
                style = dict(color="tab:green", linestyle="--", marker="^", label=f"{s} (ceiling)")
            elif method == "random":
                style = dict(color="grey", linestyle=":", marker="v", label=f"{s} (floor)")
            elif pts[0].is_control:
                style = dict(color="darkgrey", linestyle="-.", marker=".", label=s)
            else:
                style = dict(color=colour[s], marker="o", label=s)
            ax.plot(x, y, **style)
            lo = [100 * (c.metrics["accuracy"] - c.metrics["accuracy_diff"] + c.metrics["accuracy_diff_ci_low"])
                  if "accuracy_diff_ci_low" in c.metrics else np.nan for c in pts]
            hi = [100 * (c.metrics["accuracy"] - c.metrics["accuracy_diff"] + c.metrics["accuracy_diff_ci_high"])
                  if "accuracy_diff_ci_high" in c.metrics else np.nan for c in pts]
            if not pts[0].is_control:
                ax.fill_between(x, lo, hi, color=style["color"], alpha=0.12, linewidth=0)
        for c in cells:
            if c.is_reference:
                ax.axhline(100 * c.metrics["accuracy"], color="black", linestyle="--", linewidth=1,
                           label=f"upper bound ({c.tokens} tokens)")
            elif not c.budgeted and c.tokens == 0:
                ax.axhline(100 * c.metrics["accuracy"], color="grey", linestyle="-", linewidth=0.8,
                           label=f"{c.series} (no visual token)")
        ax.set_xlabel("visual tokens retained (equal-token average per layer)")
        ax.set_ylabel("accuracy (%)")
        ax.set_title(title, fontsize=10)
        ax.legend(fontsize=7, bbox_to_anchor=(1.01, 1), loc="upper left")
        return _save(fig, out, name)


# ---- accuracy vs speedup ---------------------------------------------------------------------
def pareto_front(points: list[tuple[float, float]]) -> list[int]:
    """Indices of the points no other point beats on both speed (x) and accuracy (y), by x."""
    front = [i for i, (x, y) in enumerate(points)
             if not any((x2 >= x and y2 >= y) and (x2 > x or y2 > y) for x2, y2 in points)]
    return sorted(front, key=lambda i: points[i][0])


def accuracy_vs_speedup(cells: list[CellRun], out: Path, name: str, title: str, key: str = "e2e_speedup") -> list[str]:
    plt = _pyplot()
    pts = [(c, 1.0 if c.is_reference else c.metrics.get(key), 100 * c.metrics["accuracy"]) for c in _scored(cells)]
    pts = [(c, x, y) for c, x, y in pts if x is not None and x == x]
    if len(pts) < 2:
        return []
    series = list(dict.fromkeys(c.series for c, _, _ in pts))
    colour = _palette(series)
    with _style():
        fig, ax = plt.subplots(figsize=(8.5, 4.4))
        for s in series:
            mine = [(c, x, y) for c, x, y in pts if c.series == s]
            ax.scatter([x for _, x, _ in mine], [y for _, _, y in mine], color=colour[s], label=s, s=28,
                       marker="s" if mine[0][0].is_control else "o", alpha=0.6 if mine[0][0].is_control else 1)
            for c, x, y in mine:
                ax.annotate(str(c.tokens), (x, y), fontsize=6, xytext=(3, 3), textcoords="offset points")
        methods = [(c, x, y) for c, x, y in pts if not c.is_control]  # the front of what one would deploy
        front = [methods[i] for i in pareto_front([(x, y) for _, x, y in methods])]
        ax.plot([x for _, x, _ in front], [y for _, _, y in front], color="black", linewidth=1,
                drawstyle="steps-pre", label="Pareto front (methods)")
        ax.scatter([x for _, x, _ in front], [y for _, _, y in front], facecolors="none", edgecolors="black", s=90)
        ax.set_xlabel(f"{key.replace('_', ' ')} against the upper bound (×)")
        ax.set_ylabel("accuracy (%)")
        ax.set_title(title, fontsize=10)
        ax.legend(fontsize=7, bbox_to_anchor=(1.01, 1), loc="upper left")
        return _save(fig, out, name)


# ---- SSD decode speedup vs output length -----------------------------------------------------
def ssd_length_points(sweep: Sweep, cell: CellRun) -> list[tuple[int, float]]:
    """(output tokens, decode speedup) per sample of an SSD cell: its decode tokens/s over the
    baseline's on the same sample (paired timings, else the reference cell's record)."""
    ref = sweep.reference(cell)
    base = {r.uid: r for r in sweep.records(ref)} if ref is not None else {}
    out = []
    for r in sweep.records(cell):
        if not r.timed:  # outside timing.subset
            continue
        if r.baseline_timings:
            bt, bk = statistics.median(t["decode_ms"] for t in r.baseline_timings), r.baseline_decode_tokens
        elif r.uid in base and base[r.uid].timed:
            b = base[r.uid]
            bt, bk = statistics.median(t["decode_ms"] for t in b.timings), b.decode_tokens
        else:
            continue
        ct = statistics.median(t["decode_ms"] for t in r.timings)
        if r.decode_tokens > 0 and ct > 0 and bk and bt > 0:
            out.append((r.new_tokens, (r.decode_tokens / ct) / (bk / bt)))
    return out


def ssd_speedup_vs_length(sweep: Sweep, cells: list[CellRun], out: Path, name: str, title: str) -> list[str]:
    plt = _pyplot()
    ssd = [c for c in cells if c.ssd]
    data = {c.label: ssd_length_points(sweep, c) for c in ssd}
    if not any(data.values()):
        return []
    colour = _palette(list(data))
    with _style():
        fig, ax = plt.subplots(figsize=(7, 4.2))
        for label, pts in data.items():
            if not pts:
                continue
            x, y = np.array([p[0] for p in pts]), np.array([p[1] for p in pts])
            ax.scatter(x, y, color=colour[label], alpha=0.35, s=12)
            edges = np.unique(np.quantile(x, np.linspace(0, 1, min(6, len(set(x))) + 1)))
            mids, meds = [], []
            for lo, hi in zip(edges[:-1], edges[1:]):
                sel = (x >= lo) & ((x <= hi) if hi == edges[-1] else (x < hi))
                if sel.any():
                    mids.append(float(np.median(x[sel])))
                    meds.append(float(np.median(y[sel])))
            ax.plot(mids, meds, color=colour[label], marker="o", label=f"{label} (binned median)")
        ax.axhline(1.0, color="black", linestyle="--", linewidth=0.8)
        every = np.array([p[1] for pts in data.values() for p in pts])
        top = max(2.0, float(np.percentile(every, 98)) * 1.15)
        if every.max() > top:  # a few samples with next to no decode time would flatten the rest
            ax.set_ylim(0, top)
            ax.text(0.99, 0.98, f"{int((every > top).sum())} point(s) above {top:.1f}× not shown", ha="right",
                    va="top", transform=ax.transAxes, fontsize=7, color="dimgray")
        ax.set_xlabel("output tokens of the sample")
        ax.set_ylabel("decode speedup against greedy (×)")
        ax.set_title(title, fontsize=10)
        ax.legend(fontsize=7)
        return _save(fig, out, name)


# ---- keep maps -------------------------------------------------------------------------------
def keep_layer(keep: dict, tokens: int) -> str | None:
    """The pruning point to draw: the one whose kept count is closest to the budget (earliest on
    ties), ignoring points that keep nothing (a FinalWipe) unless all do."""
    if not keep:
        return None
    layers = sorted(keep, key=int)
    nonempty = [k for k in layers if keep[k]] or layers
    return min(nonempty, key=lambda k: (abs(len(keep[k]) - tokens), int(k)))


def keep_map(image: Image.Image, grid: int, kept: set[int] | None, merged: set[int] = frozenset(),
             scale: int = SCALE) -> Image.Image:
    """The image with every patch of the grid drawn as kept (as is), merged into a kept token
    (half image, half MERGE_RGB) or dropped (a quarter of the image). kept None: every patch."""
    a = np.asarray(image.convert("RGB"), dtype=np.uint16)
    side = a.shape[0] // grid
    out = a.copy()
    if kept is not None:
        for p in range(grid * grid):
            r, c = divmod(p, grid)
            block = (slice(r * side, (r + 1) * side), slice(c * side, (c + 1) * side))
            if p in kept:
                continue
            out[block] = (a[block] + MERGE_RGB) // 2 if p in merged else a[block] // 4
    img = Image.fromarray(out.astype(np.uint8))
    return img.resize((img.width * scale, img.height * scale), Image.NEAREST)


def kept_patches(record, tokens: int) -> tuple[set[int] | None, set[int], str]:
    """(kept patches, patches merged into a kept token, what was drawn) of a sample record."""
    layer = keep_layer(record.keep, tokens)
    if layer is None:
        return None, set(), "all tokens"
    kept = {p for p in record.keep[layer] if p >= 0}
    merged = set()
    for k in sorted(record.merged, key=int):
        if int(k) <= int(layer):
            for token, sources in record.merged[k].items():
                if int(token) in kept:  # a merged token still there at the drawn point
                    merged |= {p for p in sources if p >= 0 and p not in kept}
    where = "before the LLM" if layer == "-1" else f"after layer {layer}"
    return kept, merged, f"{len(record.keep[layer])} kept {where}"


def sample_image(uid: str) -> Image.Image | None:
    """The embedded benchmark's image of a sample (the project's own generator), or None."""
    from harness.data.synthetic import SPLITS, make_sample

    split, _, index = uid.rpartition("-")
    if split not in SPLITS or not index.isdigit():
        return None
    return make_sample(split, int(index)).image


def keep_maps(sweep: Sweep, cells: list[CellRun], out: Path, name: str, samples: int = 2) -> list[tuple[str, str]]:
    """One figure per chosen sample: a row per method, a column per budget. Returns (file, caption)."""
    budgeted = [c for c in cells if c.budgeted]
    if not budgeted or budgeted[0].dataset != "shapes":  # the images of the project's own benchmark only
        return []
    first = sweep.records(budgeted[0])
    wanted = []
    for qtype in ("position", "describe", "attribute"):
        uid = next((r.uid for r in first if r.qtype == qtype), None)
        if uid and uid not in wanted:
            wanted.append(uid)
    wanted = (wanted or [r.uid for r in first])[:samples]
    series = list(dict.fromkeys(c.series for c in budgeted))
    budgets = sorted({c.tokens for c in budgeted}, reverse=True)
    by = {(c.series, c.tokens): c for c in budgeted}
    results = []
    for uid in wanted:
        image = sample_image(uid)
        grid = math.isqrt(budgeted[0].num_visual)
        if image is None or grid * grid != budgeted[0].num_visual or image.width != image.height \
                or image.width % grid:  # patches must tile the image exactly
            continue
        panel = image.width * SCALE
        label_w, head_h, cap_h = 150, 34, 14
        canvas = Image.new("RGB", (label_w + len(budgets) * (panel + 8), head_h + len(series) * (panel + cap_h + 8)),
                           "white")
        draw = ImageDraw.Draw(canvas)
        record_any = next(r for r in first if r.uid == uid)
        draw.text((4, 2), f"{uid} ({record_any.qtype}): {record_any.question[:70]}", fill="black")
        for j, t in enumerate(budgets):
            draw.text((label_w + j * (panel + 8), 18), f"{t} tokens", fill="black")
        for i, s in enumerate(series):
            y = head_h + i * (panel + cap_h + 8)
            draw.text((4, y + panel // 2), s[:22], fill="black")
            for j, t in enumerate(budgets):
                c = by.get((s, t))
                rec = next((r for r in sweep.records(c) if r.uid == uid), None) if c else None
                if rec is None:
                    continue
                kept, merged, what = kept_patches(rec, t)
                x = label_w + j * (panel + 8)
                canvas.paste(keep_map(image, grid, kept, merged), (x, y))
                draw.text((x, y + panel + 1), what, fill="dimgray")
        file = f"{name}_{uid}.png"
        canvas.save(out / file)
        canvas.save(out / f"{name}_{uid}.pdf")
        results.append((file, f"Keep maps of sample {uid} ({record_any.qtype}): \"{record_any.question}\" — bright "
                              "patches kept, blue-tinted patches merged into a kept token, dark patches dropped; each "
                              "panel at the pruning point whose kept count is closest to the budget."))
    return results

