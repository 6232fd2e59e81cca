"""Published numbers the reports set beside measured ones (`published.csv`, one row per value:
source, model, method, budget_tokens, benchmark, value).

Checked (2026-11) against text copies of TwigVLM arXiv v3 (Table 1, 4b, 9, 10), the TwigVLM++ README
and, for the VisionZip rows, a later paper's verbatim copy of VisionZip's Table 1 (not VisionZip's own
text): no value differs. Rows whose source does not say "v3" matched v3's text; whether v1/v2 print
the same was not checked. Table 4b's "TwigVLM-SSD" is SSD without pruning (576 tokens).

Known inconsistencies, kept visible wherever a value is shown (its source is always printed):
- FastV's POPE/MMMU/SEED rows from the VisionZip paper are VisionZip's own rerun of FastV (POPE 64.8 /
  59.6 / 48.0); TwigVLM's v3 Table 9 gives 79.2 / 73.2 / 55.6. The two sources are never mixed in one
  row.
- TwigVLM SQA-IMG at 192 tokens: 68.9 in one README, 68.8 in Table 9 (the table's value is kept).
- Some README speed percentages do not match their raw tokens/s (41.5 / 39.8 = 104 %, printed 106 %);
  ratios are computed from the raw numbers.
- MM-Vet tokens/s: the master README says "about 60.6" for TwigVLM (60.2 here, the speed table's), and
  a commented-out README table gives FastV 40.9 (41.5 here). The README's printed speedups do not follow
  from its own tokens/s (60.2 / 39.8 = 151 %, printed 154 %; the paper averages per sample).
- Speed figures: TwigVLM times `generate()` with `cuda.synchronize`, batch 1, max 1,024 new tokens,
  speed = total tokens / total time, eager attention (no SDPA), RTX 4090.
"""
from __future__ import annotations

import csv
import re
from dataclasses import dataclass
from functools import cache
from pathlib import Path

CSV = Path(__file__).with_name("published.csv")

# the names a run may give a benchmark (an lmms-eval task, a dataset name) -> the papers' column
BENCHMARKS = {
    "gqa": "GQA", "mmbench": "MMB", "mmbench_en": "MMB", "mmbench_en_dev": "MMB", "mmb": "MMB", "mme": "MME",
    "textvqa": "TextVQA", "textvqa_val": "TextVQA", "scienceqa_img": "SQA-IMG", "sqa-img": "SQA-IMG",
    "sqa_img": "SQA-IMG", "vqav2": "VQAv2", "vqav2_val": "VQAv2", "vqav2_test": "VQAv2", "pope": "POPE",
    "mmmu": "MMMU", "mmmu_val": "MMMU", "seedbench": "SEED", "seed": "SEED", "seed_bench": "SEED",
    "mmvet": "MM-Vet", "mm-vet": "MM-Vet",
}
# a run's method (the series' method name) -> the papers' row name
METHODS = {"baseline": "baseline", "fastv": "FastV", "sparsevlm": "SparseVLM", "visionzip": "VisionZip",
           "twigvlm": "TwigVLM", "pdrop": "PDrop"}
# a run's model name -> the papers' model name
MODELS = {"llava-1.5-7b": "llava-1.5-7b", "llava-1.5-7b-hf": "llava-1.5-7b", "llava-v1.5-7b": "llava-1.5-7b"}


@dataclass(frozen=True)
class Published:
    source: str
    model: str
    method: str
    tokens: int
    benchmark: str
    value: float


@cache
def table() -> tuple[Published, ...]:
    with open(CSV, newline="") as f:
        return tuple(Published(r["source"], r["model"], r["method"], int(r["budget_tokens"]), r["benchmark"],
                               float(r["value"])) for r in csv.DictReader(f))


def benchmark_name(dataset: str) -> str | None:
    """The papers' name of a run's benchmark (`lmms_eval:gqa`, `gqa`, `GQA`), or None."""
    key = dataset.split(":")[-1].strip().lower()
    return BENCHMARKS.get(key) or next((b for b in BENCHMARKS.values() if b.lower() == key), None)


def model_name(model: str) -> str | None:
    key = Path(model).name.lower()
    return MODELS.get(key)


def method_name(method: str) -> str | None:
    return METHODS.get(re.split(r"[\[+@]", method)[0])


# the settings the papers ran each method with (as the cells log them); a cell set otherwise, or
# with any other setting than these and the twig checkpoint, matches no published value
PUBLISHED_SETTINGS = {"fastv": {"K": "2"}, "twigvlm": {"K": "2", "twig_layers": "3"}}
FREE_SETTINGS = {"K", "twig"}


def _settings(series: str) -> set[str]:
    inner = series.split("[", 1)[1].split("]", 1)[0] if "[" in series.split("+")[0] else ""
    return {kv.split("=", 1)[0] for kv in inner.split(",") if kv}


def lookup(model: str, benchmark: str, method: str, tokens: int, ssd: bool = False, params: dict | None = None,
           series: str | None = None) -> list[Published]:
    """Published values for a run's cell: same model, benchmark, method, retained tokens and the
    papers' settings of the method (the greedy baseline at any token count: the papers' upper
    bound), every source that has one. SSD cells have no published accuracy of their own (SSD does
    not change the answers). The benchmark's split is not checked (the papers use each one's
    standard evaluation split)."""
    m, b, meth = model_name(model), benchmark_name(benchmark), method_name(method)
    if not (m and b and meth) or ssd:
        return []
    if series is not None and not _settings(series) <= FREE_SETTINGS:
        return []
    for k, v in PUBLISHED_SETTINGS.get(method, {}).items():
        if params is not None and str(params.get(k)) != v:
            return []
    return [p for p in table() if p.model == m and p.benchmark == b and p.method == meth
            and (meth == "baseline" or p.tokens == tokens)]
