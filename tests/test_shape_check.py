"""The real-size engine check runs (here at a tiny size of the same proportions) and reports the
tokens and FLOPs each method promises."""
from tools import shape_check


def test_shape_check_reports_tokens_and_flops_per_method(capsys):
    rows = shape_check.run("tiny", (96, 48), samples=2, repeats=1, dtype="float32", device="cpu")
    assert [r["method"] for r in rows] == ["baseline", "fastv[K=2]", "twigvlm", "fastv[K=2]", "twigvlm"]
    base = rows[0]
    assert base["tokens_per_layer"] == 144 and base["flop_ratio"] == 1.0
    for r in rows[1:]:
        assert abs(r["tokens_per_layer"] - r["budget"]) <= 1.5, r
        assert r["prefill_ms"] > 0
        if r["method"].startswith("fastv"):
            assert r["gflops"] < base["gflops"]
    # TTP pays for its twig (3 layers over the whole prompt): more FLOPs than FastV at the same tokens
    # per layer; on this 8-layer model that is more than the baseline at 96 tokens
    assert rows[2]["gflops"] > rows[1]["gflops"] and rows[4]["gflops"] > rows[3]["gflops"]
    assert "tokens/layer" in capsys.readouterr().out
