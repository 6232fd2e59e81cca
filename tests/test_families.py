"""LLaVA-NeXT (anyres) and Video-LLaVA: the engine reproduces each model's own forward, every method
of the registry runs on them with the tokens it promises, and keeping everything changes nothing."""
import pytest
import torch
import yaml

from harness.data import synthetic as syn
from harness.engine.generate import encode_vision, generate, prefill
from harness.engine.speculative import speculative_generate
from harness.models import families
from harness.models.adapter import load_model, read_shape
from methods import ModelShape, build_method
from methods.twigvlm.twig import Twig, save_twig
from numerics import assert_fp32_close, decoder_reduction

FAMILIES = ("llava-next", "video-llava")


@pytest.fixture(scope="module", params=FAMILIES)
def family_dir(request, tmp_path_factory):
    return request.param, str(families.save(request.param, tmp_path_factory.mktemp(request.param)))


def hf_inputs(adapter, x):
    v = x["pixel_values"]
    if adapter.family == "llava-next":
        return {"input_ids": x["input_ids"], "pixel_values": v.pixel_values, "image_sizes": v.image_sizes}
    return {"input_ids": x["input_ids"], "pixel_values_videos": v.pixel_values}


def method_for(adapter, name, budget=None, **settings):
    m = build_method(name, budget, **settings)
    m.bind(adapter)
    m.configure(ModelShape(adapter.num_layers, adapter.num_visual))
    return m


def test_shape_is_known_before_loading_and_matches_the_prompt(family_dir, device):
    family, path = family_dir
    adapter = load_model(path, device=device)
    assert adapter.family == family
    s = syn.make_sample("val", 0)
    x = adapter.inputs(s.image, s.question)
    in_prompt = int((x["input_ids"] == adapter.image_token_id).sum())
    assert read_shape(path) == {"num_layers": 4, "num_visual": adapter.num_visual} and in_prompt == adapter.num_visual
    assert adapter.num_visual == {"llava-next": 300, "video-llava": 4 * 145}[family]


def test_engine_matches_the_models_own_forward(family_dir, device):
    _, path = family_dir
    adapter = load_model(path, device=device)
    base = method_for(adapter, "baseline")
    for i in range(3):
        s = syn.make_sample("val", i)
        x = adapter.inputs(s.image, s.question)
        with torch.no_grad():
            ref = adapter.model(**hf_inputs(adapter, x)).logits[0, -1]
            ours = prefill(adapter, x["input_ids"], x["pixel_values"], base).logits
        # the same layers with the engine's masks and cache against the model's own forward: every
        # layer and the LM head (measured: <= 6 u x max|ref|)
        cfg = adapter.language_model.config
        assert_fp32_close(ours, ref, decoder_reduction(cfg, x["input_ids"].shape[1]), depth=adapter.num_layers + 1)
        with torch.no_grad():
            hf = adapter.model.generate(**hf_inputs(adapter, x), max_new_tokens=5, do_sample=False)
        rec = generate(adapter, x["input_ids"], x["pixel_values"], base, 5)
        assert rec.tokens == hf[0, x["input_ids"].shape[1]:].tolist()[: len(rec.tokens)]


def test_tower_token_index_and_grids_point_at_the_right_visual_tokens(family_dir, device):
    family, path = family_dir
    adapter = load_model(path, device=device)
    s = syn.make_sample("val", 1)
    x = adapter.inputs(s.image, s.question)
    with torch.no_grad():
        states = adapter.vision_hidden_states(x["pixel_values"])
        default = adapter.default_features(states)
        tower = adapter.tower_state(states)
        projected = adapter.project(tower.hidden)  # (P, N+1, D)
    idx = tower.token_index
    used = idx >= 0
    # the projector's two matmuls over other batch shapes (measured: equal here)
    assert_fp32_close(default[idx[used]], projected[used], reduction=max(projected.shape[-1], states[0].shape[-1]),
                      depth=2)
    grids = adapter.grids()
    in_grid = torch.cat([g.flatten() for g in grids])
    assert len(set(in_grid.tolist())) == len(in_grid)
    outside = sorted(set(range(adapter.num_visual)) - set(in_grid.tolist()))
    if family == "llava-next":  # base 12x12, then a 12x12 crop grid, each row followed by a newline
        assert [tuple(g.shape) for g in grids] == [(12, 12), (12, 12)] and len(outside) == 12
        newline = adapter.model.model.image_newline
        assert torch.equal(default[outside], newline.expand(len(outside), -1))  # a copy: exact
    else:  # one 12x12 grid per frame; the frames' CLS tokens are outside
        assert [tuple(g.shape) for g in grids] == [(12, 12)] * 4 and outside == [0, 145, 290, 435]


@pytest.mark.parametrize("name,settings", [
    ("fastv", {"K": 1}), ("sparsevlm", {}), ("visionzip", {}), ("random", {}), ("random", {"K": 1}),
    ("pool", {}), ("oracle", {}), ("twigvlm", None),
])
def test_every_method_runs_and_keeps_what_it_promises(family_dir, tmp_path_factory, name, settings, device):
    family, path = family_dir
    adapter = load_model(path, device=device)
    if settings is None:  # a twig grown on this model, saved and loaded like a trained one
        d = tmp_path_factory.mktemp("twig")
        save_twig(Twig.grow(adapter.model, 1, 1, "copy"), d, {"init": "copy"})
        settings = {"twig": str(d), "final_wipe": None}
    m = adapter.num_visual
    budget = 0.6
    method = method_for(adapter, name, budget, **settings)
    base = method_for(adapter, "baseline")
    r = round(m * 0.4)
    for i in range(2):
        s = syn.make_sample("val", i)
        x = adapter.inputs(s.image, s.question)
        rec = generate(adapter, x["input_ids"], x["pixel_values"], method, 4, sample=s)
        assert len(rec.tokens) >= 1
        if name == "sparsevlm":  # its own accounting; measured is above the budget, below all tokens
            assert r < rec.equal_token_average < m
        elif name == "pool":  # the largest grids within each grid's share
            assert r - 12 <= rec.equal_token_average <= r
        else:
            assert abs(rec.equal_token_average - r) <= 1.5, (name, rec.equal_token_average, r)
        keep_all = method_for(adapter, name, 0.0, **settings)
        full = generate(adapter, x["input_ids"], x["pixel_values"], keep_all, 4, sample=s)
        assert full.tokens == generate(adapter, x["input_ids"], x["pixel_values"], base, 4, sample=s).tokens
        if name in ("visionzip", "pool"):  # vision-stage: ids name visual tokens (-1: a tower token the
            with torch.no_grad():        # model itself drops: CLS, LLaVA-NeXT's padding), merges cover them
                red = encode_vision(adapter, x["pixel_values"], method, s)
            ids = red.patch_ids.tolist() + [p for ps in red.merged.values() for p in ps]
            assert all(-1 <= p < m for p in ids) and len(red.features) == len(red.patch_ids)
            if name == "pool":
                assert min(ids) >= 0


def test_self_speculative_decoding_is_lossless_on_both_families(family_dir, tmp_path_factory, device):
    _, path = family_dir
    adapter = load_model(path, device=device)
    twig = Twig.grow(adapter.model, 1, 2, "copy")
    for name, budget, settings in (("baseline", None, {}), ("fastv", 0.6, {"K": 1})):
        method = method_for(adapter, name, budget, **settings)
        for i in range(2):
            s = syn.make_sample("val", i)
            x = adapter.inputs(s.image, s.question)
            greedy = generate(adapter, x["input_ids"], x["pixel_values"], method, 8, sample=s)
            spec, stats = speculative_generate(adapter, x["input_ids"], x["pixel_values"], method, twig, 8,
                                               delta=3, theta=0.0, sample=s)
            assert spec.tokens == greedy.tokens and stats.target_forwards <= len(spec.tokens)


def test_one_experiment_sweeps_three_families(tiny_llava_dir, tmp_path):
    from harness.experiment import load_experiment

    dirs = [tiny_llava_dir] + [str(families.save(f, tmp_path / f)) for f in FAMILIES]
    p = tmp_path / "families.yaml"
    p.write_text(yaml.safe_dump({"experiment": "families", "models": [{"path": d} for d in dirs],
                                 "dataset": {"split": "val", "samples_per_type": 1}, "budgets": [0.6],
                                 "methods": ["baseline", {"name": "fastv", "settings": {"K": 1}}, "pool", "visionzip"]}))
    exp = load_experiment(p)
    assert len(exp.cells) == 3 * 4 and len({c.hash for c in exp.cells}) == 12
    assert {c.model["path"] for c in exp.cells} == set(dirs)
