"""The engine at real size: a random-weight model of LLaVA-1.5-7B's shape (CLIP ViT-L/14-336 tower,
576 visual tokens, 32 Llama layers of 4096), in both engine regimes, beside its physical bound.

    python -m tools.shape_check [--budgets 192 128 64] [--samples 8] [--repeats 3]   # on a GPU
    python -m tools.shape_check --tiny           # anywhere (the default without a GPU)

Three tables, each row with the figure the hardware allows next to the measured one:

1. prefill (vision excluded): baseline, FastV (K=2) and TwigVLM TTP (K=2, T=3) at each budget, per
   regime: wall ms (median of repeats of the per-sample median; methods interleaved), GPU kernel
   ms (profiler: the sum of the kernels of one prefill), wall / kernel, speedup over the same
   regime's baseline, FLOP ratio, and the roofline bound with `roofline_fraction` = bound / wall.
2. decode (greedy, batch 1, a fixed number of new tokens; random weights never stop at EOS here):
   tokens/s per regime and through HF `generate()`, against the roofline's tokens/s (the bytes of
   the weights and the cache each step must read at the measured bandwidth); SSD tokens/s with
   its acceptance (random weights: the draft rarely agrees; the cost ratios below are the point).
3. SSD's round: one draft step (layers 0..K-1 + the twig + its head), one verification of
   delta + 1 rows (layers K..L-1 + the head), one full decode step, each timed alone per regime;
   their ratios, and the analytic decode speedup bound at the paper's 57.4 % acceptance and at
   the measured one: E(alpha) * full / (delta * draft + verify), E = (1 - alpha^(delta+1)) / (1 - alpha).

`--gaps` (GPU) takes table 1's wall/kernel ratio apart: per method, the GPU's idle time between the
kernels of one prefill and its largest gaps, each with the host ops that began while it waited.

Peaks (FLOP/s from a large matmul, bytes/s from a large copy) are measured once at start-up and
printed with the device's name. The twig is grown from the backbone's own layers, as TwigVLM
initialises it.
"""
from __future__ import annotations

import argparse
import statistics
import tempfile
import time

import torch

from harness import measure, roofline
from harness.data import synthetic as syn
from harness.engine.generate import decode_step, encode_vision, generate, new_cache, prefill, sync
from harness.engine.graphs import REGIMES, regime, set_regime
from harness.engine.speculative import crop, shallow_step, speculative_generate, twig_step
from harness.layers import Rows, forward
from harness.models import embedded
from harness.models.adapter import ModelAdapter
from methods import ModelShape, build_method

PAPER_ACCEPTANCE = 0.574  # TwigVLM's measured acceptance on LLaVA-1.5-7B (delta = 5)

SHAPES = {
    # LLaVA-1.5-7B: CLIP ViT-L/14 at 336 px (24 x 24 patches), Vicuna-7B (Llama-2 7B)
    "llava-1.5-7b": dict(v_hidden=1024, v_layers=24, v_heads=16, v_ffn=4096, image=336, patch=14,
                         hidden=4096, layers=32, heads=32, kv_heads=32, ffn=11008, vocab=32064),
    # the same proportions, small enough for a CPU
    "tiny": dict(v_hidden=64, v_layers=2, v_heads=4, v_ffn=128, image=96, patch=8,
                 hidden=64, layers=8, heads=4, kv_heads=4, ffn=128, vocab=128),
}


class NoEosAdapter(ModelAdapter):
    """Decoding never stops at EOS: every timed generation has the same length."""
    eos_token_id = -1


def build(shape: str, dtype: torch.dtype, device: str) -> ModelAdapter:
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration, LlavaProcessor
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

    s = SHAPES[shape]
    tok = embedded.build_tokenizer()
    vision = CLIPVisionConfig(hidden_size=s["v_hidden"], intermediate_size=s["v_ffn"], num_hidden_layers=s["v_layers"],
                              num_attention_heads=s["v_heads"], image_size=s["image"], patch_size=s["patch"])
    text = LlamaConfig(vocab_size=max(s["vocab"], len(tok)), hidden_size=s["hidden"], intermediate_size=s["ffn"],
                       num_hidden_layers=s["layers"], num_attention_heads=s["heads"], num_key_value_heads=s["kv_heads"],
                       max_position_embeddings=4096, tie_word_embeddings=False)
    config = LlavaConfig(vision_config=vision, text_config=text, image_token_id=tok.convert_tokens_to_ids("<image>"),
                         vision_feature_layer=-2, vision_feature_select_strategy="default",
                         image_seq_length=(s["image"] // s["patch"]) ** 2, tie_word_embeddings=False)
    with torch.device(device):
        model = LlavaForConditionalGeneration(config).to(dtype).eval()
    ip = CLIPImageProcessorPil(size={"shortest_edge": s["image"]}, crop_size={"height": s["image"], "width": s["image"]},
                               image_mean=embedded.CLIP_MEAN, image_std=embedded.CLIP_STD)
    processor = LlavaProcessor(image_processor=ip, tokenizer=tok, patch_size=s["patch"],
                               vision_feature_select_strategy="default", num_additional_image_tokens=1,
                               image_token="<image>")
    return NoEosAdapter(model, processor, f"{shape} (random weights)", str(dtype).split(".")[-1], "sdpa")


# ------------------------------------------------------------------------------ measuring

def wall_ms(fn, device) -> float:
    sync(device)
    t0 = time.perf_counter()
    fn()
    sync(device)
    return (time.perf_counter() - t0) * 1e3


def kernel_ms(fn, device) -> float:
    """The GPU's own time for `fn`: the sum of its kernels' durations (profiler); nan off CUDA."""
    if device.type != "cuda":
        return float("nan")
    from torch.autograd import DeviceType

    us = sum(e.device_time_total for e in profiled(fn, device) if e.device_type == DeviceType.CUDA)
    return us / 1e3


def profiled(fn, device):
    """The profiler's events (host ops and GPU kernels) of one call of `fn`, synchronised on both ends."""
    from torch.profiler import ProfilerActivity, profile

    sync(device)
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        fn()
        sync(device)
    return prof.events()


def idle_gaps(kernels, host, top: int = 6, min_us: float = 20.0) -> dict:
    """Where a GPU waits within one pass: `kernels` and `host` are (start_us, end_us, name) from a
    profile (GPU kernels; host ops). Returns the kernels' span, busy time (union of the kernel
    intervals), idle time inside the span, and the `top` largest idle gaps (>= min_us), each with
    the kernel that ends it and the host ops that began while the GPU sat idle (the host work the
    GPU waited for), most frequent first."""
    ks = sorted(kernels)
    if not ks:
        return {"span_us": 0.0, "busy_us": 0.0, "idle_us": 0.0, "gaps": []}
    busy, gaps = 0.0, []
    cur_start, cur_end = ks[0][0], ks[0][1]
    for start, end, name in ks[1:]:
        if start > cur_end:
            busy += cur_end - cur_start
            gaps.append((cur_end, start, name))
            cur_start = start
        cur_end = max(cur_end, end)
    busy += cur_end - cur_start
    span = cur_end - ks[0][0]
    out = []
    for a, b, name in sorted(gaps, key=lambda g: g[0] - g[1])[:top]:
        if b - a < min_us:
            break
        names: dict = {}
        for hs, _, hname in host:
            if a <= hs < b:
                names[hname] = names.get(hname, 0) + 1
        ranked = sorted(names.items(), key=lambda kv: -kv[1])
        out.append({"us": b - a, "next_kernel": name, "host_ops": ranked})
    return {"span_us": span, "busy_us": busy, "idle_us": span - busy, "gaps": out}


def prefill_gaps(adapter: ModelAdapter, rows, sample, x, engine: str) -> None:
    """Table 1's wall/kernel ratio taken apart (CUDA only): for one prefill per method, the GPU's
    idle time between its kernels and the largest gaps with the host ops that ran meanwhile."""
    from torch.autograd import DeviceType

    set_regime(adapter, engine)
    print(f"\nidle GPU inside one prefill, engine {engine} (profiler; vision included, its kernels count as busy)")
    with torch.no_grad():
        for name, b, m in rows:
            prefill(adapter, x["input_ids"], x["pixel_values"], m, sample)  # warm (captured already)
            ev = profiled(lambda: prefill(adapter, x["input_ids"], x["pixel_values"], m, sample), adapter.device)
            kernels = [(e.time_range.start, e.time_range.end, e.name) for e in ev if e.device_type == DeviceType.CUDA]
            host = [(e.time_range.start, e.time_range.end, e.name) for e in ev
                    if e.device_type == DeviceType.CPU and not e.name.startswith("cuda")]
            g = idle_gaps(kernels, host)
            print(f"{name} {b or 'all'}: kernels span {g['span_us'] / 1e3:.2f} ms, busy {g['busy_us'] / 1e3:.2f} ms, "
                  f"idle {g['idle_us'] / 1e3:.2f} ms")
            for gap in g["gaps"]:
                ops = ", ".join(f"{n} x{c}" for n, c in gap["host_ops"][:5]) or "(none began: host in one op)"
                print(f"   {gap['us']:8.1f} us before {gap['next_kernel'][:40]:40}  host: {ops}")


def median_ms(fn, device, n: int) -> float:
    return statistics.median(wall_ms(fn, device) for _ in range(n))


def _methods(adapter: ModelAdapter, budgets, twig_dir: str) -> list[tuple[str, int | None, object]]:
    shape = ModelShape(adapter.num_layers, adapter.num_visual)

    def method(name, b=None, **kw):
        m = build_method(name, b, **kw)
        m.bind(adapter)
        m.configure(shape)
        return m

    rows = [("baseline", None, method("baseline"))]
    for b in budgets:
        rows += [("fastv[K=2]", b, method("fastv", b, K=2)), ("twigvlm", b, method("twigvlm", b, twig=twig_dir))]
    return rows


# ------------------------------------------------------------------------------ 1. prefill

def prefill_rows(adapter: ModelAdapter, rows, data, inputs, repeats: int, engine: str, peaks) -> list[dict]:
    set_regime(adapter, engine)
    dev, text = adapter.device, measure.text_shape(adapter.model.config)
    nbytes = adapter.model.dtype.itemsize
    with torch.no_grad():
        for _, _, m in rows:  # warm-up: every method on every sample (graphs: captures its shapes)
            for s, x in zip(data, inputs):
                prefill(adapter, x["input_ids"], x["pixel_values"], m, s)
        times = {i: [] for i in range(len(rows))}  # per repeat: the median over samples
        first = {i: [] for i in range(len(rows))}  # per repeat: sample 0 (the one profiled)
        info = {i: [] for i in range(len(rows))}  # per sample: tokens per layer, GFLOPs, bound ms
        for rep in range(repeats):  # methods interleaved per repeat
            for i, (_, _, m) in enumerate(rows):
                per = []
                for s, x in zip(data, inputs):
                    pre = prefill(adapter, x["input_ids"], x["pixel_values"], m, s)
                    per.append(pre.prefill_ms)
                    if rep == 0:
                        vpl, n_text = pre.visual_per_layer, x["input_ids"].shape[1] - adapter.num_visual
                        twig = m.T if getattr(m, "twig", None) is not None else 0
                        info[i].append((sum(vpl) / len(vpl), measure.prefill_gflops(vpl, n_text, text, twig,
                                                                                     adapter.num_visual),
                                        roofline.prefill_bound_s(vpl, n_text, text, peaks, nbytes, twig,
                                                                 adapter.num_visual) * 1e3))
                times[i].append(statistics.median(per))
                first[i].append(per[0])
        out = []
        s0, x0 = data[0], inputs[0]
        for i, (name, b, m) in enumerate(rows):
            kern = (kernel_ms(lambda: prefill(adapter, x0["input_ids"], x0["pixel_values"], m, s0), dev)
                    - kernel_ms(lambda: encode_vision(adapter, x0["pixel_values"], m, s0), dev))  # vision excluded
            ms = statistics.median(times[i])
            tok, gflops, bound = (statistics.median(v) for v in zip(*info[i]))  # over the same samples as ms
            out.append({"engine": engine, "method": name, "budget": b, "tokens_per_layer": tok, "gflops": gflops,
                        "prefill_ms": ms, "kernel_ms": kern, "wall_over_kernel": statistics.median(first[i]) / kern,
                        "bound_ms": bound, "roofline_fraction": roofline.fraction(bound, ms)})
    base = out[0]
    for r in out:
        r["speedup"] = base["prefill_ms"] / r["prefill_ms"]
        r["flop_ratio"] = base["gflops"] / r["gflops"]
    return out


# ------------------------------------------------------------------------------ 2. decode

def hf_decode_tokens_per_s(adapter: ModelAdapter, x: dict, new_tokens: int, repeats: int) -> float:
    """HF generate(): (time for new_tokens - time for 1) / (new_tokens - 1), greedy, no EOS stop."""
    def gen(n):
        return lambda: adapter.model.generate(input_ids=x["input_ids"], pixel_values=x["pixel_values"],
                                              max_new_tokens=n, min_new_tokens=n, do_sample=False)
    with torch.no_grad():
        gen(new_tokens)()  # warm-up
        full = median_ms(gen(new_tokens), adapter.device, repeats)
        one = median_ms(gen(1), adapter.device, repeats)
    return (new_tokens - 1) / ((full - one) / 1e3)


def decode_rows(adapter: ModelAdapter, x: dict, sample, twig, new_tokens: int, repeats: int, peaks,
                delta: int = 5, theta: float = 0.6) -> list[dict]:
    text = measure.text_shape(adapter.model.config)
    base = build_method("baseline")
    P = x["input_ids"].shape[1]
    step_bound = roofline.decode_bound_s([P] * adapter.num_layers, new_tokens - 1, text, peaks,
                                         adapter.model.dtype.itemsize) / (new_tokens - 1)
    roof = 1.0 / step_bound
    out = []
    for engine in REGIMES:
        set_regime(adapter, engine)
        with torch.no_grad():
            generate(adapter, x["input_ids"], x["pixel_values"], base, new_tokens, sample)  # warm-up/capture
            recs = [generate(adapter, x["input_ids"], x["pixel_values"], base, new_tokens, sample)
                    for _ in range(repeats)]
            tps = statistics.median((len(r.tokens) - 1) / (r.decode_ms / 1e3) for r in recs)
            out.append({"engine": engine, "decoding": "greedy", "tokens_per_s": tps, "roofline_tokens_per_s": roof,
                        "roofline_fraction": tps / roof, "acceptance": None})
            speculative_generate(adapter, x["input_ids"], x["pixel_values"], base, twig, new_tokens, delta, theta, sample)
            runs = [speculative_generate(adapter, x["input_ids"], x["pixel_values"], base, twig, new_tokens, delta,
                                         theta, sample) for _ in range(repeats)]
            tps = statistics.median((len(r.tokens) - st.first_tokens) / (r.decode_ms / 1e3) for r, st in runs)
            out.append({"engine": engine, "decoding": "ssd", "tokens_per_s": tps, "roofline_tokens_per_s": roof,
                        "roofline_fraction": tps / roof, "acceptance": runs[0][1].acceptance_rate})
    tps = hf_decode_tokens_per_s(adapter, x, new_tokens, repeats)
    out.append({"engine": "hf generate()", "decoding": "greedy", "tokens_per_s": tps, "roofline_tokens_per_s": roof,
                "roofline_fraction": tps / roof, "acceptance": None})
    greedy = {r["engine"]: r["tokens_per_s"] for r in out if r["decoding"] == "greedy"}
    for r in out:
        r["vs_hf"] = r["tokens_per_s"] / greedy["hf generate()"]
    return out


# ------------------------------------------------------------------------------ 3. SSD's round

def verify_rows(adapter: ModelAdapter, cache, hidden: torch.Tensor, position: int, K: int) -> torch.Tensor:
    """Layers K..L-1 over `hidden` rows at consecutive positions, then the head on every row."""
    eng = regime(adapter)
    if eng is not None:
        h = eng.run(adapter.layers[K:], cache, adapter.rotary, adapter.implicit_causal, hidden=hidden,
                    first_position=position)[0]
    else:
        pos = torch.arange(position, position + hidden.shape[1], device=hidden.device)
        cos, sin = adapter.rotary(hidden, pos[None])
        h = forward(adapter.layers[K:], Rows(hidden, pos, cos, sin), cache, adapter.implicit_causal).hidden
    return adapter.logits(h)


def round_rows(adapter: ModelAdapter, x: dict, sample, twig, delta: int, reps: int, peaks,
               acceptance: float | None) -> list[dict]:
    """Per regime: one draft step, one verification of delta + 1 rows and one full decode step,
    each timed alone (median of `reps`, caches cropped back after each)."""
    text, nbytes = measure.text_shape(adapter.model.config), adapter.model.dtype.itemsize
    K, L, P = twig.K, adapter.num_layers, x["input_ids"].shape[1]
    draft_b, verify_b, full_b = roofline.ssd_round_bounds([P] * L, K, len(twig.layers), delta + 1, text, peaks, nbytes)
    out = []
    for engine in REGIMES:
        set_regime(adapter, engine)
        with torch.no_grad():
            pre = prefill(adapter, x["input_ids"], x["pixel_values"], build_method("baseline"), sample,
                          reserve=4 * (delta + 1))
            cache = pre.cache
            twig_cache = new_cache(adapter, "twig", len(twig.layers), 4 * (delta + 1))
            D = adapter.model.config.text_config.hidden_size
            hid = torch.randn(1, P, D, device=adapter.device, dtype=adapter.model.dtype) * 0.1
            twig_step(adapter, twig, hid, torch.arange(P, device=adapter.device), twig_cache)
            rows = torch.randn(1, delta + 1, D, device=adapter.device, dtype=adapter.model.dtype) * 0.1

            def full():
                decode_step(adapter, 1, P, cache)
                crop(cache, 1)

            def draft():
                h = shallow_step(adapter, [1], P, cache, K)
                twig_step(adapter, twig, h, P, twig_cache)
                crop(cache, 1, 0, K)
                crop(twig_cache, 1)

            def verify():
                verify_rows(adapter, cache, rows, P, K)
                crop(cache, delta + 1, K, L)

            times = {}
            for name, fn in (("full", full), ("draft", draft), ("verify", verify)):
                for _ in range(3):
                    fn()  # warm-up (graphs: capture)
                times[name] = median_ms(fn, adapter.device, reps)
        r = {"engine": engine, "full_ms": times["full"], "draft_ms": times["draft"], "verify_ms": times["verify"],
             "draft_over_full": times["draft"] / times["full"], "verify_over_full": times["verify"] / times["full"],
             "bound_draft_over_full": draft_b / full_b, "bound_verify_over_full": verify_b / full_b,
             "speedup_bound_paper": roofline.ssd_speedup_bound(PAPER_ACCEPTANCE, delta, times["draft"],
                                                               times["verify"], times["full"])}
        if acceptance is not None:
            r["speedup_bound_measured"] = roofline.ssd_speedup_bound(acceptance, delta, times["draft"],
                                                                     times["verify"], times["full"])
        out.append(r)
    return out


# ------------------------------------------------------------------------------ the check

def run(shape: str = "llava-1.5-7b", budgets=(192, 128, 64), samples: int = 8, repeats: int = 3,
        dtype: str = "float16", device: str | None = None, new_tokens: int = 64, engines=REGIMES,
        decode: bool = False, profile_decode: bool = False, gaps: bool = False) -> list[dict]:
    """Table 1 (prefill) per regime; with `decode`, tables 2 and 3 too. Returns table 1's rows
    (and, with `decode`, attaches the other tables as run.last)."""
    from methods.twigvlm.twig import Twig, save_twig

    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    adapter = build(shape, getattr(torch, dtype), device)
    peaks = roofline.measure_peaks(adapter.device, adapter.model.dtype)
    twig_dir = tempfile.mkdtemp(prefix="twig-")
    save_twig(Twig.grow(adapter.model, 2, 3, "copy"), twig_dir, {"init": "copy"})
    rows = _methods(adapter, budgets, twig_dir)
    data = [syn.make_sample("test", i) for i in range(samples)]
    inputs = [adapter.inputs(s.image, s.question) for s in data]
    name_dev = torch.cuda.get_device_name(adapter.device) if adapter.device.type == "cuda" else "cpu"
    print(f"{adapter.name}, {dtype}, {name_dev}: {adapter.num_layers} layers, {adapter.num_visual} visual tokens; "
          f"peaks measured here: {peaks.flops / 1e12:.1f} TFLOP/s (matmul), {peaks.bandwidth / 1e12:.2f} TB/s (copy)")
    print(f"\n1. prefill = LLM prompt pass incl. pruning and the twig, vision excluded; median of {repeats} "
          f"repeats of the per-sample median over {samples} samples; kernel = sum of GPU kernel time "
          f"(profiler) and wall/kern on sample 0; tokens, GFLOPs and bound = the median over the samples, the bound "
          f"summing over layers max(FLOPs/peak, bytes/bandwidth)")
    print(f"{'engine':7} {'method':11} {'budget':>6} {'tok/layer':>9} {'GFLOPs':>7} {'wall ms':>8} {'kernel ms':>9} "
          f"{'wall/kern':>9} {'speedup':>8} {'FLOP x':>7} {'bound ms':>8} {'roofline':>8}")
    table1 = []
    for engine in engines:
        for r in prefill_rows(adapter, rows, data, inputs, repeats, engine, peaks):
            table1.append(r)
            print(f"{engine:7} {r['method']:11} {r['budget'] or 'all':>6} {r['tokens_per_layer']:9.1f} "
                  f"{r['gflops']:7.4g} {r['prefill_ms']:8.2f} {r['kernel_ms']:9.2f} "
                  f"{r['wall_over_kernel']:9.2f} {r['speedup']:7.2f}x {r['flop_ratio']:6.2f}x "
                  f"{r['bound_ms']:8.2f} {100 * r['roofline_fraction']:7.1f}%")
    if gaps and adapter.device.type == "cuda":
        for engine in engines:
            prefill_gaps(adapter, rows, data[0], inputs[0], engine)
    elif gaps:
        print("\n--gaps: needs a GPU (kernel timestamps)")
    eng = getattr(adapter, "graphs_state", None)
    if eng is not None:
        print(f"graphs regime: {eng.captures} graphs captured, {eng.replays} replays; elementwise fusion "
              f"(torch.compile of the norms, MLP and rotary function) {'on' if eng.fuse else 'off'}"
              + (f" ({eng.fuse_error})" if eng.fuse_error else ""))
    run.last = {"prefill": table1}
    if decode:
        twig = rows[2][2].twig
        dec = decode_rows(adapter, inputs[0], data[0], twig, new_tokens, repeats, peaks)
        print(f"\n2. decode: {new_tokens} new tokens after the baseline's prefill (prompt {inputs[0]['input_ids'].shape[1]} "
              f"tokens), batch 1, median of {repeats}; roofline = 1 / (bytes per step / bandwidth)")
        print(f"{'engine':14} {'decoding':8} {'tok/s':>8} {'vs HF':>6} {'roofline tok/s':>14} {'fraction':>8} "
              f"{'acceptance':>10}")
        for r in dec:
            acc = "" if r["acceptance"] is None else f"{100 * r['acceptance']:.1f}%"
            print(f"{r['engine']:14} {r['decoding']:8} {r['tokens_per_s']:8.1f} {r['vs_hf']:5.2f}x "
                  f"{r['roofline_tokens_per_s']:14.1f} {100 * r['roofline_fraction']:7.1f}% {acc:>10}")
        acc = next(r["acceptance"] for r in dec if r["decoding"] == "ssd" and r["engine"] == "graphs")
        rnd = round_rows(adapter, inputs[0], data[0], twig, 5, max(10, 4 * repeats), peaks, acc)
        print(f"\n3. SSD round (K=2, T=3, delta=5): one draft step, one verification of 6 rows, one full step, "
              f"each alone; bound E(a)*full/(5*draft+verify) at a = {PAPER_ACCEPTANCE} (paper) and at the "
              f"measured a = {100 * acc:.1f}% (random weights)")
        print(f"{'engine':7} {'full ms':>8} {'draft ms':>8} {'verify ms':>9} {'draft/full':>10} {'verify/full':>11} "
              f"{'(bound)':>15} {'x @57.4%':>8} {'x @meas.':>8}")
        for r in rnd:
            print(f"{r['engine']:7} {r['full_ms']:8.2f} {r['draft_ms']:8.2f} {r['verify_ms']:9.2f} "
                  f"{r['draft_over_full']:10.3f} {r['verify_over_full']:11.3f} "
                  f"{r['bound_draft_over_full']:7.3f}/{r['bound_verify_over_full']:.3f} "
                  f"{r['speedup_bound_paper']:7.2f}x {r.get('speedup_bound_measured', float('nan')):7.2f}x")
        run.last.update(decode=dec, round=rnd)
        if profile_decode:
            profile_steps(adapter, inputs[0], data[0])
    return table1


def profile_steps(adapter: ModelAdapter, x: dict, sample, steps: int = 6) -> None:
    """Where the eager regime's decode time goes, beside HF generate()'s: host (CPU) time per op
    over `steps` greedy steps after the prefill (profiler; wall figures inflated by it)."""
    from torch.profiler import ProfilerActivity, profile

    set_regime(adapter, "eager")
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if adapter.device.type == "cuda" else [])
    with torch.no_grad():
        pre = prefill(adapter, x["input_ids"], x["pixel_values"], build_method("baseline"), sample, reserve=steps + 1)
        tok, pos = int(pre.logits.argmax()), pre.prompt_len
        with profile(activities=acts) as p:
            for _ in range(steps):
                tok = int(decode_step(adapter, tok, pos, pre.cache).argmax())
                pos += 1
        print(f"\nengine eager, {steps} decode steps: top host ops")
        print(p.key_averages().table(sort_by="cpu_time_total", row_limit=14, max_name_column_width=48))
        kw = dict(input_ids=x["input_ids"], pixel_values=x["pixel_values"], do_sample=False)
        with profile(activities=acts) as p:
            adapter.model.generate(max_new_tokens=steps + 1, min_new_tokens=steps + 1, **kw)
        print(f"HF generate(), prefill + {steps} decode steps: top host ops")
        print(p.key_averages().table(sort_by="cpu_time_total", row_limit=14, max_name_column_width=48))


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tiny", action="store_true", help="a small model of the same proportions (CPU)")
    ap.add_argument("--budgets", type=int, nargs="+", default=None)
    ap.add_argument("--samples", type=int, default=8)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--engines", nargs="+", default=list(REGIMES), choices=REGIMES)
    ap.add_argument("--no-decode", action="store_true", help="the prefill table only")
    ap.add_argument("--profile-decode", action="store_true",
                    help="also profile the eager regime's decode steps beside HF generate() (host time per op)")
    ap.add_argument("--dtype", default=None, help="default: float16 on GPU, float32 on CPU")
    ap.add_argument("--gaps", action="store_true",
                    help="also: the GPU's idle gaps inside one prefill per method and the host ops behind them")
    a = ap.parse_args(argv)
    dtype = a.dtype or ("float16" if torch.cuda.is_available() else "float32")
    if not a.tiny and not torch.cuda.is_available():
        print("no GPU here: the small model of the same proportions instead (--tiny); a 7B in fp32 needs 28 GB")
        a.tiny = True
    shape, budgets = ("tiny", a.budgets or (96, 72, 48)) if a.tiny else ("llava-1.5-7b", a.budgets or (192, 128, 64))
    run(shape, budgets, a.samples, a.repeats, dtype, new_tokens=a.new_tokens, engines=a.engines,
        decode=not a.no_decode, profile_decode=a.profile_decode, gaps=a.gaps)


if __name__ == "__main__":
    main()
