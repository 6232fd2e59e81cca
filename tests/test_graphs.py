"""The `graphs` engine regime gives the `eager` regime's tokens: static caches (every device),
CUDA graphs captured and replayed without host reads (GPU), and the experiment switch."""
import pytest
import torch

from harness.data import synthetic as syn
from harness.engine.generate import decode_step, generate, prefill, run_layers, start_prompt
from harness.engine.graphs import Graphs, StaticCache, regime, set_regime
from harness.engine.speculative import speculative_generate
from harness.experiment import ExperimentError, parse_experiment
from harness.models.adapter import load_model
from methods import ModelShape, build_method

METHODS = [("baseline", None, {}), ("fastv", 32, {"K": 2}), ("twigvlm", 16, {}), ("sparsevlm", 32, {}),
           ("visionzip", 32, {}), ("random", 16, {})]


def _methods(adapter):
    shape = ModelShape(adapter.num_layers, adapter.num_visual)
    out = []
    for name, b, kw in METHODS:
        m = build_method(name, b, **kw)
        m.bind(adapter)
        m.configure(shape)
        out.append((name, m))
    return out


def _both(adapter, fn):
    out = {}
    for engine in ("eager", "graphs"):
        set_regime(adapter, engine)
        out[engine] = fn()
    set_regime(adapter, "eager")
    return out


@pytest.fixture(scope="module")
def adapter32(device):
    return load_model("embedded", device=str(device))


def test_graphs_regime_gives_the_eager_tokens(adapter32):
    """Every method, greedy and SSD: the same tokens, tokens per layer and kept patches; the
    prefill's last logits agree to fp32 round-off (the static path pads prompt segments to 16
    rows and attends over whole buffers with a mask: other reduction shapes, same maths)."""
    a = adapter32
    methods = _methods(a)
    twig = methods[2][1].twig
    for i in range(2):
        s = syn.make_sample("test", 600 + i)
        x = a.inputs(s.image, s.question)
        for name, m in methods:
            def run():
                pre = prefill(a, x["input_ids"], x["pixel_values"], m, s)
                g = generate(a, x["input_ids"], x["pixel_values"], m, 16, sample=s)
                r, st = speculative_generate(a, x["input_ids"], x["pixel_values"], m, twig, 16, sample=s)
                return pre, g, r
            res = _both(a, run)
            (pe, ge, re_), (pg, gg, rg) = res["eager"], res["graphs"]
            assert isinstance(pg.cache, StaticCache) and not isinstance(pe.cache, StaticCache)
            assert gg.tokens == ge.tokens, (name, i)
            assert rg.tokens == re_.tokens == ge.tokens, (name, i)
            assert gg.visual_per_layer == ge.visual_per_layer and gg.keep == ge.keep, name
            scale = pe.logits.abs().max()
            assert (pg.logits - pe.logits).abs().max() <= 1e-4 * scale, name


def test_static_cache_grows_past_its_reserve(adapter32):
    """A prefill sized for 1 new token still decodes 48 (past EOS, the same loop in both regimes):
    each layer's buffer moves to a larger one when it would overflow, keeping what it holds."""
    a = adapter32
    s = syn.make_sample("test", 605)
    x = a.inputs(s.image, s.question)
    m = build_method("baseline")

    def decode(reserve):
        pre = prefill(a, x["input_ids"], x["pixel_values"], m, s, reserve=reserve)
        tokens, caps = [int(pre.logits.argmax())], [layer.capacity for layer in pre.cache.layers] \
            if isinstance(pre.cache, StaticCache) else []
        for position in range(pre.prompt_len, pre.prompt_len + 47):
            tokens.append(int(decode_step(a, tokens[-1], position, pre.cache).argmax()))
        return tokens, caps, pre

    ref, _, _ = decode(1)
    set_regime(a, "graphs")
    try:
        tokens, caps, pre = decode(1)
        n = pre.prompt_len + 47
        assert all(layer.length == n for layer in pre.cache.layers)
        assert tokens == ref
        assert n > max(caps), "the decode did not outgrow the first buffers: nothing was tested"
        assert all(layer.capacity >= n for layer in pre.cache.layers)
    finally:
        set_regime(a, "eager")


def test_engine_is_an_experiment_setting():
    exp = parse_experiment({"experiment": "x", "model": {"engine": "graphs"}, "methods": ["baseline"]}, "t")
    assert exp.cells[0].model["engine"] == "graphs" and exp.cells[0].config()["model"]["engine"] == "graphs"
    eager = parse_experiment({"experiment": "x", "methods": ["baseline"]}, "t").cells[0]
    # eager is the default and stays out of the cell's identity: sweeps logged before it resume
    assert eager.model["engine"] == "eager" and "engine" not in eager.config()["model"]
    with pytest.raises(ExperimentError, match=r"model engine 'fast'; allowed: eager, graphs"):
        parse_experiment({"experiment": "x", "model": {"engine": "fast"}, "methods": ["baseline"]}, "t")
    with pytest.raises(ValueError, match="allowed: eager, graphs"):
        set_regime(object(), "fast")


@pytest.mark.cuda_only("CUDA graphs exist on a GPU only")
def test_graphs_capture_replay_and_read_nothing_back(device):
    """On a GPU: passes are captured once per shape and replayed; a decode step and the layer
    loop of a FastV or TTP prefill (selection included) make no host synchronisation; in fp16 the
    embedded model's tokens equal the eager regime's (logits within 2 % of their range: fp16
    keeps 11 bits, summed in other orders over 16 layers)."""
    for dtype in ("float32", "float16"):
        a = load_model("embedded", dtype=dtype, device=str(device))
        methods = dict(_methods(a))
        for i in range(3):
            s = syn.make_sample("test", 620 + i)
            x = a.inputs(s.image, s.question)
            for name in ("baseline", "fastv", "twigvlm"):
                m = methods[name]
                res = _both(a, lambda: (prefill(a, x["input_ids"], x["pixel_values"], m, s),
                                        generate(a, x["input_ids"], x["pixel_values"], m, 16, sample=s)))
                (pe, ge), (pg, gg) = res["eager"], res["graphs"]
                assert gg.tokens == ge.tokens, (dtype, name, i)
                tol = (1e-4 if dtype == "float32" else 2e-2) * pe.logits.abs().max()
                assert (pg.logits.float() - pe.logits.float()).abs().max() <= tol, (dtype, name)
        set_regime(a, "graphs")
        eng = regime(a)
        assert isinstance(eng, Graphs) and eng.captures > 0 and eng.replays > eng.captures
        s = syn.make_sample("test", 620)
        x = a.inputs(s.image, s.question)
        for name in ("fastv", "twigvlm"):
            m = methods[name]
            seq, _, _ = start_prompt(a, x["input_ids"], x["pixel_values"], m, s)
            prompt_len = seq.hidden.shape[1]
            cache = StaticCache(eng, "backbone", a.num_layers, 16)  # generate(..., 16) above captured its shapes
            torch.cuda.synchronize()
            torch.cuda.set_sync_debug_mode("error")
            try:
                with torch.no_grad():
                    run_layers(a, seq, m, cache, 0, a.num_layers)
                    decode_step(a, 1, prompt_len, cache)
            finally:
                torch.cuda.set_sync_debug_mode("default")
        set_regime(a, "eager")


class ReplayOnCPU(Graphs):
    """CUDA graph semantics on a CPU: a pass's first call of a key is traced (its Python body
    stored) and every later call of that key re-runs the stored body, not the caller's: what the
    key does not distinguish is replayed from the first capture, as on a GPU."""

    def __init__(self, device):
        super().__init__(device, capture=True, fuse=False)

    def _capture(self, g, body, layers):
        g.graph = type("Stored", (), {"replay": lambda _self: setattr(g, "out", body())})()
        g.out = body()
        self.captures += 1


def test_replays_keep_twigs_and_method_passes_apart(adapter32):
    """Two twigs of one shape, and TTP's own twig pass beside SSD's draft twig: each replay runs
    the modules and cache it was captured with, so drafting statistics equal the eager regime's."""
    from methods.twigvlm.twig import Twig

    a = adapter32
    shape = ModelShape(a.num_layers, a.num_visual)
    ttp = build_method("twigvlm", 16)
    ttp.bind(a)
    ttp.configure(shape)
    other = Twig.grow(a.model, 1, 2, "copy").eval()  # the embedded twig's shape, other weights
    deep = Twig.grow(a.model, 2, 2, "copy").eval()  # prunes after layer 1: TTP's pass after SSD's twig cache
    deep_ttp = build_method("twigvlm", 24, twig="embedded", K=1)
    deep_ttp.bind(a)
    deep_ttp.twig, deep_ttp.K = deep, 2
    deep_ttp.configure(shape)
    runs = [(build_method("baseline"), ttp.twig), (build_method("baseline"), other), (deep_ttp, ttp.twig)]
    s = syn.make_sample("test", 605)  # a description: the two twigs draft differently (15/12 vs 16/9 accepted)
    x = a.inputs(s.image, s.question)

    def stats():
        out = []
        for m, twig in runs:
            rec, st = speculative_generate(a, x["input_ids"], x["pixel_values"], m, twig, 16, sample=s)
            out.append((rec.tokens, rec.keep, st.drafted, st.accepted, st.rounds))
        return out

    eager = stats()
    a.graphs_state = ReplayOnCPU(a.device)
    set_regime(a, "graphs")
    try:
        assert stats() == eager and stats() == eager  # first pass captures, second replays
        assert a.graphs_state.captures > 0
    finally:
        set_regime(a, "eager")
        del a.graphs_state
