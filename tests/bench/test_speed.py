"""Speed of every method on the embedded model against its baseline, measured in one process.

Prefill (time to first token: vision + the LLM's prompt pass) of FastV, SparseVLM, VisionZip and
TwigVLM TTP at 88.9 % pruning (16 of 144 tokens) on short questions, each against the unpruned
prefill; decoding of long descriptions with SSD and TTP+SSD against greedy decoding (tokens/s after
the first-token time). Every round times the baseline right before the method, so the machine's
drift hits both sides of each round's ratio; the gate reads the median ratio over the rounds. The
clock-free proxies of each benchmark (visual tokens per layer, analytic prefill FLOPs, target
forwards per output token, mean accepted length, and the rows every backbone and twig layer
processed over a decoding pass, counted by hooks in one extra untimed pass) are gated exactly.
"""
from __future__ import annotations

import pytest
import torch

from speedgate import WARMUP, Ratio, interleaved
from harness import measure
from harness.data import synthetic as syn
from harness.engine.generate import generate, prefill
from harness.engine.speculative import speculative_generate
from harness.models.adapter import load_model
from methods import ModelShape, build_method

pytestmark = pytest.mark.bench

BUDGET = 0.889
PREFILL_SAMPLES, PREFILL_ROUNDS = 8, 21
DECODE_SAMPLES, DECODE_ROUNDS, MAX_NEW_TOKENS = 6, 7, 64
PRUNING = {"fastv": {"K": 1}, "sparsevlm": {}, "visionzip": {}, "twigvlm": {"twig": "embedded"}}


class Embedded:
    """The embedded model, its methods at the benchmark's budget, and fixed test samples."""

    def __init__(self):
        self.adapter = load_model("embedded")
        per = len(syn.QUESTION_TYPES)  # types cycle with the index: every type but describe is short
        self.short = [syn.make_sample("test", i) for i in range(2 * PREFILL_SAMPLES)
                      if syn.QUESTION_TYPES[i % per] != "describe"][:PREFILL_SAMPLES]
        self.long = [syn.make_sample("test", i * per + syn.QUESTION_TYPES.index("describe"))
                     for i in range(DECODE_SAMPLES)]
        self.shape = measure.text_shape(self.adapter.model.config)

    def method(self, name, budget=None, **settings):
        m = build_method(name, budget, **settings)
        m.bind(self.adapter)
        m.configure(ModelShape(self.adapter.num_layers, self.adapter.num_visual))
        return m

    def inputs(self, samples):
        return [(s, self.adapter.inputs(s.image, s.question)) for s in samples]

    def prefill_all(self, method, inputs):
        with torch.no_grad():
            return [prefill(self.adapter, x["input_ids"], x["pixel_values"], method, sample=s) for s, x in inputs]

    def generate_all(self, method, inputs, twig=None) -> dict:
        """Counters over the inputs: tokens, target forwards, SSD's drafts, and the decode phase
        (the tokens after those known at the first-token time, and its seconds)."""
        c = dict.fromkeys(("tokens", "forwards", "drafted", "accepted", "rounds", "decode_tokens", "decode_s"), 0)
        for s, x in inputs:
            if twig is None:
                rec = generate(self.adapter, x["input_ids"], x["pixel_values"], method, MAX_NEW_TOKENS, sample=s)
                c["forwards"] += len(rec.tokens)
                c["decode_tokens"] += len(rec.tokens) - 1
            else:
                rec, st = speculative_generate(self.adapter, x["input_ids"], x["pixel_values"], method, twig,
                                               MAX_NEW_TOKENS, sample=s)
                c["forwards"] += st.target_forwards
                c["drafted"], c["accepted"] = c["drafted"] + st.drafted, c["accepted"] + st.accepted
                c["rounds"] += len(st.rounds)
                c["decode_tokens"] += len(rec.tokens) - st.first_tokens
            c["tokens"] += len(rec.tokens)
            c["decode_s"] += rec.decode_ms / 1e3
        return c

    def layer_rows(self, fn, twig=None) -> tuple[dict, dict]:
        """Run `fn` once (untimed) counting the rows every backbone layer and twig layer
        processes: (fn's result, {"backbone": rows, "twig": rows})."""
        rows = {"backbone": 0, "twig": 0}

        def counter(key):
            return lambda module, args: rows.__setitem__(key, rows[key] + args[0].shape[1])

        hooks = [layer.register_forward_pre_hook(counter("backbone")) for layer in self.adapter.layers]
        hooks += [layer.register_forward_pre_hook(counter("twig")) for layer in (twig.layers if twig else [])]
        try:
            return fn(), rows
        finally:
            for h in hooks:
                h.remove()

    def prefill_proxies(self, records, inputs, method) -> dict:
        twig_layers = method.extra_prefill_layers
        flops = 0.0
        for rec, (_, x) in zip(records, inputs):
            text = x["input_ids"].shape[1] - self.adapter.num_visual
            flops += measure.prefill_gflops(rec.visual_per_layer, text, self.shape, twig_layers, self.adapter.num_visual)
        per_layer = [rec.visual_per_layer for rec in records]
        return {"visual_per_layer": per_layer[0] if all(p == per_layer[0] for p in per_layer) else per_layer,
                "prefill_gflops": round(flops / len(records), 6)}


@pytest.fixture(scope="module")
def embedded():
    """One torch thread while benchmarking: ratios then do not depend on the machine's core count
    (on 2 cores, 2 threads moved prefill ratios by ~9 % against 1), and a busy second core does
    not disturb them."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield Embedded()
    torch.set_num_threads(threads)


def test_prefill_baseline(benchmark, embedded, gate):
    """The unpruned prefill: the absolute reference for --benchmark-compare, and its proxies."""
    base = embedded.method("baseline")
    inputs = embedded.inputs(embedded.short)
    records = benchmark.pedantic(lambda: embedded.prefill_all(base, inputs), rounds=PREFILL_ROUNDS, warmup_rounds=WARMUP)
    gate.check(benchmark, "prefill_baseline", embedded.prefill_proxies(records, inputs, base))


@pytest.mark.parametrize("name", list(PRUNING))
def test_prefill_speedup(benchmark, embedded, gate, name):
    base, method = embedded.method("baseline"), embedded.method(name, BUDGET, **PRUNING[name])
    inputs = embedded.inputs(embedded.short)
    last = {}

    def run():
        last["records"] = embedded.prefill_all(method, inputs)

    ran, ref = interleaved(benchmark, run, lambda: embedded.prefill_all(base, inputs), PREFILL_ROUNDS)
    gate.check(benchmark, f"prefill_{name}", embedded.prefill_proxies(last["records"], inputs, method),
               Ratio.of([r / t for r, t in zip(ref, ran)]))


def test_decode_greedy(benchmark, embedded, gate):
    """Greedy generation of long descriptions: the reference of the SSD benchmarks."""
    base = embedded.method("baseline")
    inputs = embedded.inputs(embedded.long)
    benchmark.pedantic(lambda: embedded.generate_all(base, inputs), rounds=DECODE_ROUNDS, warmup_rounds=WARMUP)
    c, rows = embedded.layer_rows(lambda: embedded.generate_all(base, inputs))
    gate.check(benchmark, "decode_greedy", {"tokens": c["tokens"], "target_forwards_per_token": c["forwards"] / c["tokens"],
                                            "backbone_rows": rows["backbone"]})


@pytest.mark.parametrize("name", ["ssd", "ttp+ssd"])
def test_decode_speedup(benchmark, embedded, gate, name):
    base = embedded.method("baseline")
    target = embedded.method("twigvlm", BUDGET, twig="embedded") if name == "ttp+ssd" else base
    twig = target.twig if name == "ttp+ssd" else embedded.method("twigvlm", BUDGET, twig="embedded").twig
    inputs = embedded.inputs(embedded.long)
    counts = {"ssd": [], "greedy": []}
    run = lambda: counts["ssd"].append(embedded.generate_all(target, inputs, twig))  # noqa: E731
    reference = lambda: counts["greedy"].append(embedded.generate_all(base, inputs))  # noqa: E731
    interleaved(benchmark, run, reference, DECODE_ROUNDS)
    c, rows = embedded.layer_rows(lambda: embedded.generate_all(target, inputs, twig), twig)
    # decode tokens/s (after the first-token time) of the method over greedy's, round by round
    rate = lambda c: c["decode_tokens"] / c["decode_s"]  # noqa: E731
    per_round = [rate(m) / rate(g) for m, g in zip(counts["ssd"], counts["greedy"])][WARMUP:]
    gate.check(benchmark, f"decode_{name}", {
        "tokens": c["tokens"], "target_forwards_per_token": round(c["forwards"] / c["tokens"], 6),
        "mean_accepted_length": round(c["tokens"] / c["rounds"], 6),
        "acceptance_rate": round(c["accepted"] / c["drafted"], 6),
        "backbone_rows": rows["backbone"], "twig_rows": rows["twig"]}, Ratio.of(per_round))
