"""The real-size engine check runs (here at a tiny size of the same proportions) and reports the
tokens, FLOPs and physical bounds each method promises, in both engine regimes."""
import math

from tools import shape_check


def test_shape_check_reports_tokens_and_flops_per_method(capsys, device):
    rows = shape_check.run("tiny", (96, 48), samples=2, repeats=1, dtype="float32", device=str(device))
    for engine in ("eager", "graphs"):
        mine = [r for r in rows if r["engine"] == engine]
        assert [r["method"] for r in mine] == ["baseline", "fastv[K=2]", "twigvlm", "fastv[K=2]", "twigvlm"]
        base = mine[0]
        assert base["tokens_per_layer"] == 144 and base["flop_ratio"] == 1.0 and base["speedup"] == 1.0
        for r in mine[1:]:
            assert abs(r["tokens_per_layer"] - r["budget"]) <= 1.5, r
            assert r["prefill_ms"] > 0 and 0 < r["bound_ms"]
            if r["method"].startswith("fastv"):
                assert r["gflops"] < base["gflops"] and r["bound_ms"] < base["bound_ms"]
        # TTP pays for its twig (3 layers over the whole prompt): more FLOPs than FastV at the same
        # tokens per layer; on this 8-layer model that is more than the baseline at 96 tokens
        assert mine[2]["gflops"] > mine[1]["gflops"] and mine[4]["gflops"] > mine[3]["gflops"]
    # both regimes process the same tokens
    assert [r["tokens_per_layer"] for r in rows[:5]] == [r["tokens_per_layer"] for r in rows[5:]]
    assert "tok/layer" in capsys.readouterr().out


def test_shape_check_decode_and_ssd_round_tables(capsys, device):
    shape_check.run("tiny", (96,), samples=1, repeats=1, dtype="float32", device=str(device), new_tokens=8,
                    decode=True)
    dec, rnd = shape_check.run.last["decode"], shape_check.run.last["round"]
    assert [(r["engine"], r["decoding"]) for r in dec] == [
        ("eager", "greedy"), ("eager", "ssd"), ("graphs", "greedy"), ("graphs", "ssd"), ("hf generate()", "greedy")]
    for r in dec:
        assert r["tokens_per_s"] > 0 and r["roofline_tokens_per_s"] > 0
        assert math.isclose(r["roofline_fraction"], r["tokens_per_s"] / r["roofline_tokens_per_s"])
    assert dec[-1]["vs_hf"] == 1.0
    assert [r["engine"] for r in rnd] == ["eager", "graphs"]
    for r in rnd:
        assert r["full_ms"] > 0 and r["draft_ms"] > 0 and r["verify_ms"] > 0
        # the bound's draft step (2 + 3 layers of 8, one row) costs less than a full step (8 layers)
        assert 0 < r["bound_draft_over_full"] < 1 and r["speedup_bound_paper"] > 0
    out = capsys.readouterr().out
    assert "2. decode" in out and "3. SSD round" in out


def test_idle_gaps_finds_where_the_gpu_waits_and_what_the_host_did():
    kernels = [(0, 10, "k1"), (5, 12, "k2"), (40, 50, "k3"), (52, 60, "k4"), (160, 170, "k5")]
    host = [(13, 14, "aten::sort"), (15, 16, "aten::cat"), (20, 21, "aten::cat"), (61, 90, "aten::topk"),
            (1, 2, "aten::mm")]  # the last one began while kernels ran: not behind a gap
    g = shape_check.idle_gaps(kernels, host, top=5, min_us=5)
    assert g["span_us"] == 170 and g["busy_us"] == 12 + 10 + 8 + 10 and g["idle_us"] == 130
    assert [(x["us"], x["next_kernel"]) for x in g["gaps"]] == [(100, "k5"), (28, "k3")]  # the 2 us gap is below min
    assert g["gaps"][1]["host_ops"] == [("aten::cat", 2), ("aten::sort", 1)]
    assert g["gaps"][0]["host_ops"] == [("aten::topk", 1)]
    assert shape_check.idle_gaps([], host)["gaps"] == []
