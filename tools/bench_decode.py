"""Decode-speed benchmark of self-speculative decoding on the embedded long-description task.

    python -m tools.bench_decode [--samples 12] [--max-new-tokens 64] [--twig embedded]

Prints, from one process on the same samples (rows interleaved, median of --repeats passes):
tokens/s of greedy, SSD, TTP+SSD, FastV and TTP
(greedy), their ratio to greedy, SSD's mean accepted length and acceptance rate, and the analytic
speedup bound for the measured acceptance. Timings are clock measurements of this machine; the
counters (target forwards per token, accepted length) do not depend on the clock.

Analytic bound: with per-draft acceptance a and at most d drafts per round, a round emits
E = (1 - a^(d+1)) / (1 - a) tokens in expectation and costs one target forward plus d draft steps;
a draft step runs K + T of the target's L layers, so the speedup is at most E / (1 + d (K + T) / L)
(an upper bound: it ignores the fixed costs of each forward that small models are dominated by).
"layers" is the same estimate from the measured counters (tokens per round, drafts per round),
which with theta's early stops can exceed the bound computed for d drafts every round.
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch

from harness.data import synthetic as syn
from harness.engine.generate import generate
from harness.engine.speculative import speculative_generate
from harness.models.adapter import load_model
from methods import ModelShape, build_method


def analytic_bound(acceptance: float, delta: int, draft_layers: int, num_layers: int) -> float:
    a = min(acceptance, 0.999999)
    expected = (1 - a ** (delta + 1)) / (1 - a)
    return expected / (1 + delta * draft_layers / num_layers)


def run(model: str = "embedded", twig: str = "embedded", samples: int = 12, max_new_tokens: int = 64,
        delta: int = 5, theta: float = 0.6, budget: float = 0.889, threads: int | None = None,
        final_wipe: int | None | str = "default", repeats: int = 3) -> list[dict]:
    if threads:
        torch.set_num_threads(threads)
    adapter = load_model(model)
    shape = ModelShape(adapter.num_layers, adapter.num_visual)

    def method(name, b=None, **kw):
        m = build_method(name, b, **kw)
        m.bind(adapter)
        m.configure(shape)
        return m

    wipe = {} if final_wipe == "default" else {"final_wipe": final_wipe}
    ttp = method("twigvlm", budget, twig=twig, **wipe)
    rows = [("greedy", method("baseline"), False), ("SSD", method("baseline"), True),
            ("TTP+SSD", ttp, True), ("FastV", method("fastv", budget, K=1), False), ("TTP", ttp, False)]
    data = [syn.make_sample("test", i * len(syn.QUESTION_TYPES) + syn.QUESTION_TYPES.index("describe"))
            for i in range(samples)]
    inputs = [adapter.inputs(s.image, s.question) for s in data]
    for x in inputs[:2]:  # warm-up
        generate(adapter, x["input_ids"], x["pixel_values"], rows[0][1], 8)
    results = {name: {"name": name, "rates": []} for name, _, _ in rows}
    for _ in range(repeats):  # rows interleaved per repeat, so that drift of the machine hits all alike
        for name, m, ssd in rows:
            tokens, seconds, drafted, accepted, rounds, forwards = 0, 0.0, 0, 0, 0, 0
            for s, x in zip(data, inputs):
                t0 = time.perf_counter()
                if ssd:
                    rec, st = speculative_generate(adapter, x["input_ids"], x["pixel_values"], m, ttp.twig,
                                                   max_new_tokens, delta, theta, sample=s)
                    drafted, accepted, rounds = drafted + st.drafted, accepted + st.accepted, rounds + len(st.rounds)
                    forwards += st.target_forwards
                else:
                    rec = generate(adapter, x["input_ids"], x["pixel_values"], m, max_new_tokens, sample=s)
                    forwards += len(rec.tokens)
                seconds += time.perf_counter() - t0
                tokens += len(rec.tokens)
            r = results[name]
            r["rates"].append(tokens / seconds)
            r.update({"tokens": tokens, "target_forwards_per_token": forwards / tokens,
                      "acceptance": accepted / drafted if drafted else None,
                      "mean_accepted_length": tokens / rounds if rounds else None,
                      "drafts_per_round": drafted / rounds if rounds else None})
    results = list(results.values())
    for r in results:
        r["tokens_per_s"] = statistics.median(r["rates"])
        r["spread"] = max(r["rates"]) - min(r["rates"])
    base = results[0]["tokens_per_s"]
    draft_layers = ttp.K + ttp.twig.T
    print(f"{'':10} {'tokens/s':>9} {'+-':>5} {'vs greedy':>9} {'fwd/token':>9} {'accept':>7} {'len':>5} {'bound':>6} "
          f"{'layers':>7}")
    for r in results:
        r["ratio"] = r["tokens_per_s"] / base
        bound = analytic_bound(r["acceptance"], delta, draft_layers, adapter.num_layers) if r["acceptance"] is not None else None
        r["bound"] = bound
        acc = "" if r["acceptance"] is None else f"{100 * r['acceptance']:.1f}%"
        ln = "" if r["mean_accepted_length"] is None else f"{r['mean_accepted_length']:.2f}"
        bd = "" if bound is None else f"{bound:.2f}x"
        # measured counters in units of full-model forwards: a round = 1 target forward + its drafts
        est = (None if r["mean_accepted_length"] is None else
               r["mean_accepted_length"] / (1 + r["drafts_per_round"] * draft_layers / adapter.num_layers))
        r["layer_estimate"] = est
        es = "" if est is None else f"{est:.2f}x"
        print(f"{r['name']:10} {r['tokens_per_s']:9.1f} {r['spread'] / 2:5.1f} {r['ratio']:8.2f}x "
              f"{r['target_forwards_per_token']:9.2f} "
              f"{acc:>7} {ln:>5} {bd:>6} {es:>7}")
    print(f"(median of {repeats} interleaved repeats, +- half their range; "
          f"{samples} describe samples, up to {max_new_tokens} new tokens, budget {budget}, delta {delta}, "
          f"theta {theta}, draft = {ttp.K} + {ttp.twig.T} of {adapter.num_layers} layers, "
          f"TTP FinalWipe at {ttp.final_wipe})")
    return results


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="embedded")
    ap.add_argument("--twig", default="embedded")
    ap.add_argument("--samples", type=int, default=12)
    ap.add_argument("--max-new-tokens", type=int, default=64)
    ap.add_argument("--delta", type=int, default=5)
    ap.add_argument("--theta", type=float, default=0.6)
    ap.add_argument("--budget", type=float, default=0.889)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--repeats", type=int, default=3, help="interleaved timing repeats (median reported)")
    ap.add_argument("--final-wipe", default="default",
                    help="TTP's FinalWipe layer: a layer index, 'none', or 'default' (the method's own)")
    a = ap.parse_args(argv)
    wipe = a.final_wipe if a.final_wipe in ("default", "none") else int(a.final_wipe)
    run(a.model, a.twig, a.samples, a.max_new_tokens, a.delta, a.theta, a.budget, a.threads,
        None if wipe == "none" else wipe, a.repeats)


if __name__ == "__main__":
    main()
