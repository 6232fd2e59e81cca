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
