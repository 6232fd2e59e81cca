"""Budget conversion, the registry's errors, and the controls' selections."""
import pytest
import torch

from harness.data import synthetic as syn
from harness.engine.generate import generate
from harness.models.adapter import load_model
from methods import REGISTRY, Budget, MethodError, ModelShape, build_method

LLAVA = ModelShape(num_layers=32, num_visual=576)
EMBEDDED = ModelShape(num_layers=16, num_visual=144)


@pytest.mark.parametrize("budget,expected", [(192, 166), (128, 98), (64, 30)])
def test_fastv_equal_token_conversion_matches_the_published_settings(budget, expected):
    m = build_method("fastv", budget, K=2)
    m.configure(LLAVA)
    assert m.keep_n == expected
    measured = (2 * 576 + 30 * m.keep_n) / 32
    assert abs(measured - budget) <= 1


@pytest.mark.parametrize("ratio,tokens", [(0.667, 48), (0.778, 32), (0.889, 16)])
def test_ratios_resolve_to_the_embedded_budgets(ratio, tokens):
    assert Budget.parse(ratio).tokens(144) == tokens
    for name in ("fastv", "random", "oracle"):
        m = build_method(name, ratio, K=1)
        m.configure(EMBEDDED)
        measured = (144 + 15 * m.keep_n) / 16
        assert abs(measured - tokens) <= 1, (name, m.keep_n)


def test_errors_name_the_bad_value_and_what_is_allowed():
    with pytest.raises(MethodError, match="unknown method 'fastvv'; allowed: .*fastv"):
        build_method("fastvv", 0.5)
    with pytest.raises(MethodError, match="budget ratio 1.5 is out of range"):
        build_method("fastv", 1.5)
    with pytest.raises(MethodError, match="exceeds the model's 144 visual tokens"):
        m = build_method("fastv", 200, K=1)
        m.configure(EMBEDDED)
    with pytest.raises(MethodError, match="impossible with K=2"):
        m = build_method("fastv", 0.889, K=2)
        m.configure(EMBEDDED)
    with pytest.raises(MethodError, match="unknown setting"):
        build_method("fastv", 0.5, layer=3)
    with pytest.raises(MethodError, match="takes no budget"):
        build_method("baseline", 0.5)
    assert {"baseline", "fastv", "random", "oracle"} <= set(REGISTRY)


def test_random_is_seeded_per_sample_and_oracle_keeps_the_question_patches(tiny_llava_dir, device):
    adapter = load_model(tiny_llava_dir, device=device)
    shape = ModelShape(adapter.num_layers, adapter.num_visual)
    s = syn.make_sample("val", 0)  # an attribute question about one object
    x = adapter.inputs(s.image, s.question)
    runs = []
    for name in ("random", "random", "oracle"):
        m = build_method(name, 16)
        m.configure(shape)
        runs.append(generate(adapter, x["input_ids"], x["pixel_values"], m, 4, sample=s))
    assert runs[0].keep == runs[1].keep and len(runs[0].keep[-1]) == 16
    assert runs[0].visual_per_layer == [16] * adapter.num_layers
    oracle = runs[2].keep[-1]
    relevant = set(torch.as_tensor(s.patch_relevance()).nonzero().flatten().tolist())
    assert 0 < len(relevant) <= 16 and relevant <= set(oracle)


def test_oracle_grid_mapping_covers_a_finer_model_grid():
    from methods.controls import to_annotation_grid

    assert to_annotation_grid(144, 144).tolist() == list(range(144))
    fine = to_annotation_grid(576, 144).view(24, 24)
    assert fine[0, 0] == 0 and fine[0, 1] == 0 and fine[0, 2] == 1 and fine[23, 23] == 143
    assert fine[2, 0] == 12


def test_blind_removes_every_visual_token(tiny_llava_dir, device):
    adapter = load_model(tiny_llava_dir, device=device)
    s = syn.make_sample("val", 1)
    x = adapter.inputs(s.image, s.question)
    rec = generate(adapter, x["input_ids"], x["pixel_values"], build_method("blind"), 4, sample=s)
    assert rec.visual_per_layer == [0] * adapter.num_layers and rec.keep == {-1: []}
