"""Roofline bounds: parameter and byte counts against an independently built model, regimes
(memory-bound decode, compute-bound prefill), FLOPs against measure.prefill_gflops, the SSD
speedup formula at its end points, and measured peaks on CPU."""
import math
import time
from types import SimpleNamespace

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from harness import measure, roofline
from harness.roofline import Peaks

# LLaVA-1.5-7B's language model
SHAPE_7B = {"hidden": 4096, "heads": 32, "kv_heads": 32, "head_dim": 128, "ffn": 11008, "vocab": 32064}
LAYERS_7B = 32
FP16 = 2
H100 = Peaks(flops=989e12, bandwidth=3.35e12, device_name="H100 SXM (datasheet)", dtype="float16")
PROMPT = 576 + 40  # LLaVA-1.5's visual tokens + a short question


def meta_llama(shape: dict, layers: int) -> LlamaForCausalLM:
    cfg = LlamaConfig(hidden_size=shape["hidden"], intermediate_size=shape["ffn"], num_hidden_layers=layers,
                      num_attention_heads=shape["heads"], num_key_value_heads=shape["kv_heads"],
                      head_dim=shape["head_dim"], vocab_size=shape["vocab"], tie_word_embeddings=False)
    with torch.device("meta"):
        return LlamaForCausalLM(cfg)


def numel(module) -> int:
    return sum(p.numel() for p in module.parameters())


# ---- parameters and bytes -------------------------------------------------------------------
def test_layer_params_match_transformers_llama_and_the_explicit_formula():
    model = meta_llama(SHAPE_7B, LAYERS_7B)
    h, f = SHAPE_7B["hidden"], SHAPE_7B["ffn"]
    assert roofline.layer_params(SHAPE_7B) == 4 * h * h + 3 * h * f + 2 * h == numel(model.model.layers[0])
    assert LAYERS_7B * roofline.layer_params(SHAPE_7B) == numel(model.model.layers)
    assert roofline.lm_head_params(SHAPE_7B) == numel(model.lm_head) + numel(model.model.norm)


def test_grouped_query_shape_from_measure_text_shape_matches_transformers():
    # kv_heads < heads and heads * head_dim != hidden: a formula that used hidden for Q or KV fails here
    cfg = LlamaConfig(hidden_size=96, intermediate_size=160, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, head_dim=32, vocab_size=50, tie_word_embeddings=False)
    s = measure.text_shape(SimpleNamespace(text_config=cfg))
    with torch.device("meta"):
        model = LlamaForCausalLM(cfg)
    assert roofline.layer_params(s) == numel(model.model.layers[0])


def test_decode_step_of_7b_fp16_is_memory_bound_at_about_13_5_gb_and_4_ms():
    kv = [PROMPT] * LAYERS_7B
    model = meta_llama(SHAPE_7B, LAYERS_7B)
    weights = numel(model.model.layers) + numel(model.lm_head) + numel(model.model.norm)  # embedding not read whole
    assert weights * FP16 == 13_215_211_520  # 13.2 GB of weights alone
    kv_entry = 2 * SHAPE_7B["kv_heads"] * SHAPE_7B["head_dim"]  # key + value values per token per layer
    h, v = SHAPE_7B["hidden"], SHAPE_7B["vocab"]
    expected_bytes = FP16 * (weights
                             + LAYERS_7B * kv_entry * (PROMPT + 1)  # read the cache, the new entry included
                             + LAYERS_7B * kv_entry  # write the new entry
                             + LAYERS_7B * 2 * h  # layer activations in and out
                             + h + v)  # LM head: hidden in, logits out
    costs = [roofline.layer_cost(1, k, SHAPE_7B, FP16) for k in kv] + [roofline.lm_head_cost(1, SHAPE_7B, FP16)]
    total_bytes = sum(b for _, b in costs)
    assert total_bytes == expected_bytes
    assert total_bytes == pytest.approx(13.54e9, rel=1e-3)
    for flops, nbytes in costs:  # every layer and the head: far below the ridge point
        assert flops / H100.flops < 0.01 * nbytes / H100.bandwidth
    step = roofline.decode_step_bound_s(kv, SHAPE_7B, H100, FP16)
    assert step == pytest.approx(total_bytes / H100.bandwidth, rel=1e-12)
    assert step == pytest.approx(4.04e-3, abs=0.01e-3)
    assert 247 < 1 / step < 249  # tokens/s as a roofline


@pytest.mark.parametrize("a, b", [(1, 1), (576, 40), (40, 576), (615, 1)])
def test_layer_flops_over_a_cache_add_up_to_one_pass_over_the_whole_prompt(a, b):
    # causal pairs: (a+b)(a+b+1)/2 = a(a+1)/2 + b*a + b(b+1)/2, so a pass of b rows over a cache of a
    # entries costs what the whole prompt costs minus a pass of a rows; and with kv = 0 the FLOPs are
    # measure.layer_flops (checked against torch's flop counter in test_measure)
    split = roofline.layer_cost(a, 0, SHAPE_7B, FP16)[0] + roofline.layer_cost(b, a, SHAPE_7B, FP16)[0]
    assert split == pytest.approx(measure.layer_flops(a + b, SHAPE_7B), rel=1e-12)
    q = SHAPE_7B["heads"] * SHAPE_7B["head_dim"]
    grow = roofline.layer_cost(b, a, SHAPE_7B, FP16)[0] - roofline.layer_cost(b, 0, SHAPE_7B, FP16)[0]
    assert grow == pytest.approx(2 * 2 * q * b * a, rel=1e-12)


def test_decode_bound_sums_steps_over_a_growing_cache():
    kv = [PROMPT] * 2 + [144] * (LAYERS_7B - 2)  # a FastV-like cache: pruned after layer 2
    n = 20
    got = roofline.decode_bound_s(kv, n, SHAPE_7B, H100, FP16)
    assert got == pytest.approx(sum(roofline.decode_step_bound_s([k + j for k in kv], SHAPE_7B, H100, FP16)
                                    for j in range(n)), rel=1e-12)
    # memory-bound: each step reads one more KV entry per layer than the last (read, not written twice)
    per_entry = LAYERS_7B * 2 * SHAPE_7B["kv_heads"] * SHAPE_7B["head_dim"] * FP16 / H100.bandwidth
    first = roofline.decode_step_bound_s(kv, SHAPE_7B, H100, FP16)
    assert got == pytest.approx(n * first + n * (n - 1) / 2 * per_entry, rel=1e-9)
    assert roofline.decode_bound_s(kv, 0, SHAPE_7B, H100, FP16) == 0


# ---- prefill --------------------------------------------------------------------------------
@pytest.mark.parametrize("visual, extra", [([576.0] * LAYERS_7B, 0),
                                           ([576.0] * 2 + [143.6] * (LAYERS_7B - 2), 0),
                                           ([576.0] * LAYERS_7B, 3)])
def test_prefill_flops_equal_measure_prefill_gflops(visual, extra):
    # roofline counts attention as 2*2*Q*q*(kv + (q+1)/2); with kv = 0 that is measure.layer_flops'
    # 2*Q*n*(n+1) exactly, and the linear terms and the one-row LM head are the same: no difference.
    text = 40
    rows = [int(round(v)) + text for v in visual] + [576 + text] * extra
    flops = sum(roofline.layer_cost(q, 0, SHAPE_7B, FP16)[0] for q in rows) + roofline.lm_head_cost(1, SHAPE_7B, FP16)[0]
    assert flops == pytest.approx(measure.prefill_gflops(visual, text, SHAPE_7B, extra, 576) * 1e9, rel=1e-12)


@pytest.mark.parametrize("extra", [0, 3])
def test_prefill_of_616_tokens_at_7b_is_compute_bound_per_layer(extra):
    visual, text = [576.0] * LAYERS_7B, 40
    f, b = roofline.layer_cost(PROMPT, 0, SHAPE_7B, FP16)
    assert f / H100.flops > 1.9 * b / H100.bandwidth  # 616 rows: ~1.97x past the ridge (989e12 / 3.35e12 = 295 FLOP/B)
    head = roofline.lm_head_cost(1, SHAPE_7B, FP16)
    got = roofline.prefill_bound_s(visual, text, SHAPE_7B, H100, FP16, extra, 576)
    # compute-bound layers + a memory-bound one-row LM head, from measure's FLOPs, not roofline's layer sums
    layer_flops = measure.prefill_gflops(visual, text, SHAPE_7B, extra, 576) * 1e9 - 2 * SHAPE_7B["hidden"] * SHAPE_7B["vocab"]
    assert got == pytest.approx(layer_flops / H100.flops + head[1] / H100.bandwidth, rel=1e-9)


def test_a_pruned_prefill_layer_of_184_rows_is_memory_bound():
    # FastV-like 75 % pruning leaves 144 + 40 rows: below the ridge, so a FLOP ratio overstates its speedup
    f, b = roofline.layer_cost(144 + 40, 0, SHAPE_7B, FP16)
    assert b / H100.bandwidth > 1.5 * f / H100.flops  # ~1.63x


def test_prefill_bound_is_a_sum_of_per_layer_bounds_not_the_max_of_totals():
    # two compute-bound layers at 616 rows, thirty memory-bound ones at 40 rows
    visual = [576.0] * 2 + [0.0] * (LAYERS_7B - 2)
    got = roofline.prefill_bound_s(visual, 40, SHAPE_7B, H100, FP16)
    costs = [roofline.layer_cost(int(v) + 40, 0, SHAPE_7B, FP16) for v in visual] + [roofline.lm_head_cost(1, SHAPE_7B, FP16)]
    flops, nbytes = sum(c[0] for c in costs), sum(c[1] for c in costs)
    assert got == pytest.approx(sum(max(f / H100.flops, b / H100.bandwidth) for f, b in costs), rel=1e-12)
    assert got > 1.05 * max(flops / H100.flops, nbytes / H100.bandwidth)


# ---- self-speculative decoding --------------------------------------------------------------
def test_ssd_round_bounds_decompose_into_decode_steps():
    kv = [PROMPT] * 2 + [200] * (LAYERS_7B - 2)
    k, t = 2, 3
    draft, verify, full = roofline.ssd_round_bounds(kv, k, t, 1, SHAPE_7B, H100, FP16)
    # one row: a draft step is a decode step through layers 0..K-1 + T twig layers (at layer 0's cache),
    # a verification of one row a decode step through layers K..L-1
    assert draft == pytest.approx(roofline.decode_step_bound_s(kv[:k] + [kv[0]] * t, SHAPE_7B, H100, FP16), rel=1e-12)
    assert verify == pytest.approx(roofline.decode_step_bound_s(kv[k:], SHAPE_7B, H100, FP16), rel=1e-12)
    assert full == roofline.decode_step_bound_s(kv, SHAPE_7B, H100, FP16)
    # six rows stay memory-bound: the verification reads the same weights, 5 more rows of cache and activations
    _, verify6, _ = roofline.ssd_round_bounds(kv, k, t, 6, SHAPE_7B, H100, FP16)
    assert verify < verify6 < 1.01 * verify
    h, v, entry_values = SHAPE_7B["hidden"], SHAPE_7B["vocab"], 2 * SHAPE_7B["kv_heads"] * SHAPE_7B["head_dim"]
    more_values = (LAYERS_7B - k) * 5 * (2 * entry_values + 2 * h) + 5 * (h + v)  # per deep layer: cache read + write, activations; head: rows in, logits out
    assert verify6 - verify == pytest.approx(more_values * FP16 / H100.bandwidth, rel=1e-9)
    # the twig's cache can be set apart from layer 0's
    d_small, _, _ = roofline.ssd_round_bounds(kv, k, t, 1, SHAPE_7B, H100, FP16, twig_kv=0)
    entry = 2 * SHAPE_7B["kv_heads"] * SHAPE_7B["head_dim"] * FP16
    assert draft - d_small == pytest.approx(t * PROMPT * entry / H100.bandwidth, rel=1e-9)


def test_ssd_speedup_bound_end_points_and_the_papers_acceptance():
    draft, verify, full = 0.6e-3, 3.8e-3, 4.0e-3
    delta = 5
    assert roofline.ssd_speedup_bound(0.0, delta, draft, verify, full) == pytest.approx(full / (delta * draft + verify), rel=1e-12)
    assert roofline.ssd_speedup_bound(1.0, delta, draft, verify, full) == pytest.approx(6 * full / (delta * draft + verify), rel=1e-12)
    e = (1 - 0.574 ** 6) / (1 - 0.574)
    assert roofline.expected_tokens_per_round(0.574, delta) == pytest.approx(e, rel=1e-12)
    assert e == pytest.approx(2.2635, abs=1e-4)
    assert roofline.ssd_speedup_bound(0.574, delta, draft, verify, full) == pytest.approx(e * full / (delta * draft + verify), rel=1e-12)
    # continuous at alpha -> 1
    assert roofline.expected_tokens_per_round(1 - 1e-9, delta) == pytest.approx(delta + 1, rel=1e-6)
    with pytest.raises(ValueError):
        roofline.ssd_speedup_bound(1.1, delta, draft, verify, full)


# ---- fraction and peaks ---------------------------------------------------------------------
def test_fraction():
    assert roofline.fraction(1.0, 4.0) == 0.25
    for measured in (0, 0.0, None, float("nan")):
        assert math.isnan(roofline.fraction(1.0, measured))


def test_measure_peaks_on_cpu_is_fast_positive_and_cached():
    roofline._PEAKS.pop(("cpu", torch.float32), None)
    t0 = time.perf_counter()
    p = roofline.measure_peaks("cpu")
    assert time.perf_counter() - t0 < 2.0
    assert p.dtype == "float32" and p.matmul_n == 512 and p.copy_bytes > 0
    for x in (p.flops, p.bandwidth):
        assert math.isfinite(x) and x > 0
    # well below any machine's limits would be a timing bug (seconds read as milliseconds, say)
    assert 1e8 < p.flops < 1e14 and 1e8 < p.bandwidth < 1e13
    assert roofline.measure_peaks("cpu") is p
    assert roofline.measure_peaks(torch.device("cpu"), torch.float32) is p
