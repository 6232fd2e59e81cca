"""The measurement protocol's arithmetic: FLOPs against torch's own counter, KV bytes against a real
cache, bootstrap intervals that cover what they should."""
import statistics

import numpy as np
import pytest
import torch

from harness import measure
from harness.records import SampleRecord


def records(times, tokens, scores=None, key="prefill_ms"):
    """Records with per-repeat timings (samples x repeats)."""
    out = []
    for i, (row, k) in enumerate(zip(times, tokens)):
        out.append(SampleRecord(uid=f"s{i}", score=1.0 if scores is None else scores[i], prediction=str(i),
                                decode_tokens=k,
                                timings=[{"vision_ms": 1.0, "select_ms": 0.0, "prefill_ms": t, "ttft_ms": t + 1.0,
                                          "e2e_ms": t + 1.0 + 2 * t, "decode_ms": 2 * t} for t in row]))
    return out


def test_layer_flops_match_torch_flop_counter_on_a_real_decoder_layer(tiny_llava_dir, device):
    from torch.utils.flop_counter import FlopCounterMode
    from transformers import LlavaForConditionalGeneration

    model = LlavaForConditionalGeneration.from_pretrained(tiny_llava_dir, attn_implementation="eager").to(device)
    lm = model.model.language_model
    s = measure.text_shape(model.config)
    for n in (5, 40):
        x = torch.randn(1, n, s["hidden"], device=device)
        pos = torch.arange(n, device=device)[None]
        with FlopCounterMode(display=False) as fc, torch.no_grad():
            lm.layers[0](x, attention_mask=None, position_ids=pos, position_embeddings=lm.rotary_emb(x, pos))
        counted = fc.get_total_flops()
        # torch counts the full n x n attention matmuls; ours counts the causal half (n (n + 1) / 2 pairs)
        q = s["heads"] * s["head_dim"]
        full_attention = 2 * 2 * q * n * n
        assert measure.layer_flops(n, s) - 2 * q * n * (n + 1) == counted - full_attention


def test_kv_cache_bytes_match_a_real_cache(tiny_llava_dir, device):
    from transformers import DynamicCache, LlavaForConditionalGeneration

    model = LlavaForConditionalGeneration.from_pretrained(tiny_llava_dir).to(device)
    lm = model.model.language_model
    s = measure.text_shape(model.config)
    cache = DynamicCache()
    n = 23
    with torch.no_grad():
        lm(inputs_embeds=torch.randn(1, n, s["hidden"], device=device), cache=cache, use_cache=True)
    real = sum(l.keys.numel() * 4 + l.values.numel() * 4 for l in cache.layers) / 2 ** 20
    # n tokens = 3 text + 20 visual in every layer
    assert measure.kv_cache_mb([20.0] * len(lm.layers), 3, s, 4) == pytest.approx(real)


def test_speedup_interval_covers_a_known_ratio_and_a_null_effect():
    rng = np.random.default_rng(1)
    base_t = rng.uniform(10, 20, (30, 1)) * rng.uniform(0.97, 1.03, (30, 3))  # samples differ, repeats jitter
    fast_t = base_t / 2 * rng.uniform(0.95, 1.05, (30, 3))
    base, fast = records(base_t, [10] * 30), records(fast_t, [10] * 30)
    for key in ("prefill_ms", "decode"):
        p, lo, hi = measure.speedup(fast, base, key)
        assert lo < 2.0 < hi and 1.9 < p < 2.1 and hi - lo < 0.3
    p, lo, hi = measure.speedup(base, base, "prefill_ms")
    assert p == 1.0 and lo <= 1.0 <= hi
    # samples are paired by uid, not by position
    assert measure.speedup(fast[::-1], base, "prefill_ms")[0] == measure.speedup(fast, base, "prefill_ms")[0]


def test_decode_speedup_is_a_ratio_of_pooled_tokens_per_second():
    base = records([[10.0]] * 2, [10, 30])  # decode 20 ms each: 40 tokens / 40 ms
    cell = records([[5.0], [20.0]], [10, 30])  # 10 ms and 40 ms: 40 tokens / 50 ms
    p, _, _ = measure.speedup(cell, base, "decode")
    assert p == pytest.approx((40 / 50) / (40 / 40))
    m = measure.timing_metrics(cell)
    assert m["decode_tokens_per_s_pooled"] == pytest.approx(40 / 0.050)
    assert m["decode_tokens_per_s_mean"] == pytest.approx((10 / 0.010 + 30 / 0.040) / 2)


def test_accuracy_difference_interval_is_paired():
    base_scores = [1.0] * 20 + [0.0] * 20
    cell_scores = [1.0] * 18 + [0.0] * 22  # loses exactly two samples, both right before
    base = records([[1.0]] * 40, [1] * 40, base_scores)
    cell = records([[1.0]] * 40, [1] * 40, cell_scores)
    d, lo, hi = measure.accuracy_diff(cell, base)
    assert d == pytest.approx(-0.05) and lo <= d <= hi <= 0.0
    rel = measure.relative_metrics(cell, base)
    assert rel["relative_accuracy"] == pytest.approx(0.9) and rel["agreement_with_baseline"] == 1.0


def test_spread_is_the_range_over_repeats():
    recs = records([[10.0, 12.0, 11.0], [10.0, 14.0, 11.0]], [1, 1])
    m = measure.timing_metrics(recs)
    assert m["repeats"] == 3
    assert m["prefill_ms"] == 11.0 and m["prefill_ms_spread"] == pytest.approx(13.0 - 10.0)


def test_paired_timing_times_the_baseline_beside_every_sample(tiny_llava_dir, device):
    from harness.data import load_samples
    from harness.experiment import Cell
    from harness.models.adapter import load_model
    from harness.cell import run_cell

    adapter = load_model(tiny_llava_dir, device=device)
    samples = load_samples("shapes", "val", 2)
    inputs = [adapter.inputs(s.image, s.question) for s in samples]
    timing = {"warmup": 0, "repeats": 2, "paired": True}
    base = run_cell(adapter, Cell("baseline", {}, None, timing=timing), samples, inputs, 3)
    assert base.records[0].baseline_timings is None  # the reference itself is not paired
    cell = run_cell(adapter, Cell("random", {}, 60, timing=timing), samples, inputs, 3, baseline=base.records)
    r = cell.records[0]
    assert len(r.baseline_timings) == len(r.timings) == 2
    assert r.baseline_decode_tokens == base.records[0].decode_tokens
    # the speedups use the paired timings, not the baseline cell's
    p, _, _ = measure.speedup(cell.records, measure.paired_reference(cell.records), "prefill_ms")
    assert cell.metrics["prefill_speedup"] == p and cell.params["paired_timing"] is True


def test_timing_subset_times_the_first_samples_and_answers_all(tiny_llava_dir, device):
    """timing.subset: the first N samples are timed (repeats, paired baseline); the others run once
    for their answers, and no timing figure reads them."""
    from harness.cell import run_cell
    from harness.data import load_samples
    from harness.experiment import Cell
    from harness.models.adapter import load_model

    adapter = load_model(tiny_llava_dir, device=device)
    samples = load_samples("shapes", "val", 1)  # 6 samples
    inputs = [adapter.inputs(s.image, s.question) for s in samples]
    timing = {"warmup": 0, "repeats": 2, "paired": True, "subset": 4}
    base = run_cell(adapter, Cell("baseline", {}, None, timing=timing), samples, inputs, 3)
    cell = run_cell(adapter, Cell("random", {}, 60, timing=timing), samples, inputs, 3, baseline=base.records)
    assert [r.timed for r in cell.records] == [True] * 4 + [False] * 2
    assert [len(r.timings) for r in cell.records] == [2] * 4 + [1] * 2
    assert [r.baseline_timings is not None for r in cell.records] == [True] * 4 + [False] * 2
    assert cell.metrics["samples"] == 6 and cell.params["timed_samples"] == 4
    assert cell.metrics["accuracy"] == statistics.fmean(r.score for r in cell.records)
    first = cell.records[:4]
    p, lo, hi = measure.speedup(first, measure.paired_reference(first), "prefill_ms")
    assert (cell.metrics["prefill_speedup"], cell.metrics["prefill_speedup_ci_low"]) == (p, lo)
    assert cell.metrics["prefill_ms"] == measure.timing_metrics(first)["prefill_ms"]
    diff = measure.accuracy_diff(cell.records, base.records)  # every sample's answer counts
    assert cell.metrics["accuracy_diff"] == diff[0]


@pytest.mark.cuda_only("GPU memory is what a cell on a GPU reports")
def test_a_cell_on_the_gpu_reports_its_peak_gpu_memory(tiny_llava_dir, device):
    from harness.cell import run_cell
    from harness.data import load_samples
    from harness.experiment import Cell
    from harness.models.adapter import load_model

    adapter = load_model(tiny_llava_dir, device=device)
    samples = load_samples("shapes", "val", 1)
    inputs = [adapter.inputs(s.image, s.question) for s in samples]
    res = run_cell(adapter, Cell("baseline", {}, None), samples, inputs, 3, 0, repeats=1)
    weights_mb = sum(p.numel() * p.element_size() for p in adapter.model.parameters()) / 2 ** 20
    assert res.metrics["peak_gpu_allocated_mb"] >= weights_mb and "peak_rss_mb" not in res.metrics


def test_a_timing_pass_runs_the_timed_samples_alone(tiny_llava_dir):
    """The sweep's closing pass (Workspace.run(timed_only=True)) times the cell's timed subset and
    skips the samples that run once for their answers; without a subset it runs them all."""
    from harness.executors import Workspace
    from harness.experiment import MODEL_DEFAULTS, Cell

    model = {**MODEL_DEFAULTS, "path": tiny_llava_dir}
    dataset = {"name": "shapes", "split": "val", "samples_per_type": 1}  # 6 samples
    gen = {"max_new_tokens": 3}
    ws = Workspace()
    subset = Cell("baseline", {}, None, model=model, dataset=dataset, generation=gen,
                  timing={"warmup": 0, "repeats": 1, "paired": False, "subset": 4})
    whole = Cell("baseline", {}, None, model=model, dataset=dataset, generation=gen,
                 timing={"warmup": 0, "repeats": 1, "paired": False, "subset": None})
    assert [r.timed for r in ws.run(subset, timed_only=True).records] == [True] * 4
    assert [r.timed for r in ws.run(subset).records] == [True] * 4 + [False] * 2
    assert len(ws.run(whole, timed_only=True).records) == 6
