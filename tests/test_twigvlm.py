"""TwigVLM: the twig module and its checkpoints, and TTP against a plain reference."""
import json

import pytest
import torch
from safetensors.torch import save_file

from harness.engine.generate import generate, prefill
from harness.models.adapter import load_model
from methods import ModelShape, build_method
from methods.base import MethodError
from methods.twigvlm.twig import Twig, TwigError, load_twig, save_twig
from numerics import decoder_reduction, fp32_atol, topk_like


@pytest.fixture(scope="module")
def tiny_twig(tiny_llava_dir, tmp_path_factory, device):
    """A twig grown on the tiny model after layer K=1 (T=2), initialised by copy, saved."""
    adapter = load_model(tiny_llava_dir, device=device)
    twig = Twig.grow(adapter.model, K=1, T=2, init="copy")
    d = tmp_path_factory.mktemp("twig")
    save_twig(twig, d, {"init": "copy"})
    return str(d)


def configured(adapter, budget, **settings):
    m = build_method("twigvlm", budget, **settings)
    m.bind(adapter)
    m.configure(ModelShape(adapter.num_layers, adapter.num_visual))
    return m


def test_twig_inits_and_the_released_layout(tiny_llava_dir, tmp_path, device):
    adapter = load_model(tiny_llava_dir, device=device)
    lm = adapter.language_model
    copy = Twig.grow(adapter.model, 1, 2, "copy")
    last = Twig.grow(adapter.model, 1, 2, "last")
    rand = Twig.grow(adapter.model, 1, 2, "random")
    w = lambda layer: layer.self_attn.q_proj.weight  # noqa: E731
    assert torch.equal(w(copy.layers[0]), w(lm.layers[1])) and torch.equal(w(copy.layers[1]), w(lm.layers[2]))
    assert torch.equal(w(last.layers[0]), w(lm.layers[2])) and torch.equal(w(last.layers[1]), w(lm.layers[3]))
    assert not any(torch.equal(w(rand.layers[0]), w(x)) for x in lm.layers)
    assert torch.equal(copy.lm_head.weight, adapter.model.lm_head.weight)
    # TwigVLM's released files name the layers model.layers.i, the norm model.norm
    released = {("model." + k if k.startswith(("layers.", "norm.")) else k): v for k, v in copy.state_dict().items()}
    save_file({k: v.contiguous() for k, v in released.items()}, str(tmp_path / "model.safetensors"))
    with pytest.raises(TwigError, match="pass K"):
        load_twig(tmp_path, adapter.model)
    loaded = load_twig(tmp_path, adapter.model, K=1)
    assert loaded.T == 2 and all(torch.equal(a, b) for a, b in zip(loaded.state_dict().values(),
                                                                      copy.state_dict().values()))


def test_ttp_budget_formula_matches_the_paper(tiny_twig):
    for rbar, r in ((192, 227), (128, 134), (64, 41)):
        m = build_method("twigvlm", rbar, twig=tiny_twig, K=2)
        m.K = 2  # the formula on LLaVA-1.5-7B's shape, K = 2, K_f = 24
        m.configure(ModelShape(32, 576))
        assert (m.final_wipe, m.keep_n) == (24, r)
    with pytest.raises(MethodError, match="final_wipe"):
        build_method("twigvlm", 64, twig=tiny_twig, final_wipe=1).configure(ModelShape(4, 144))
    with pytest.raises(MethodError, match="not a directory with a trained twig"):
        build_method("twigvlm", 64, twig="/nonexistent/twig")


def test_ttp_keeps_what_a_naive_twig_reference_keeps(tiny_llava_dir, samples, tiny_twig, device):
    """Naive TTP: transformers' eager forward gives the hidden states entering layer K; the twig's
    layers run on them with eager attention (weights captured by a hook); last layer, last row,
    head mean, image columns, top-R."""
    engine = load_model(tiny_llava_dir, device=device)
    eager = load_model(tiny_llava_dir, attn_implementation="eager", device=device)
    method = configured(engine, 0.6, twig=tiny_twig, final_wipe=None)
    naive_twig = load_twig(tiny_twig, eager.model)
    for layer in naive_twig.layers:
        layer.self_attn.config._attn_implementation = "eager"
    K = method.K
    for s in samples[:3]:
        x = engine.inputs(s.image, s.question)
        with torch.no_grad():
            h = eager.model(**x, output_hidden_states=True).hidden_states[K]
            n = h.shape[1]
            mask = torch.full((n, n), torch.finfo(h.dtype).min, device=h.device).triu(1)[None, None]
            pos = torch.arange(n, device=h.device)[None]
            pe = eager.language_model.rotary_emb(h, pos)
            seen = {}
            hook = naive_twig.layers[-1].self_attn.register_forward_hook(lambda m, i, o: seen.update(w=o[1]))
            for layer in naive_twig.layers:
                h = layer(h, attention_mask=mask, position_ids=pos, position_embeddings=pe)
            hook.remove()
        cols = (x["input_ids"][0] == engine.image_token_id).nonzero().flatten()
        scores = seen["w"][0, :, -1, cols].mean(0)
        pre = prefill(engine, x["input_ids"], x["pixel_values"], method)
        # ties within float noise (SDPA engine and twig against eager, K + T layers) go either way
        noise = fp32_atol(scores, decoder_reduction(engine.language_model.config, n), depth=K + method.twig.T)
        assert pre.keep[K - 1] == topk_like(scores, method.keep_n, noise, prefer=pre.keep[K - 1])
        assert pre.visual_per_layer == [engine.num_visual] * K + [method.keep_n] * (engine.num_layers - K)


def test_ttp_keep_everything_without_finalwipe_is_the_baseline(tiny_llava_dir, samples, tiny_twig, device):
    adapter = load_model(tiny_llava_dir, device=device)
    method = configured(adapter, 0.0, twig=tiny_twig, final_wipe=None)
    for s in samples[:2]:
        x = adapter.inputs(s.image, s.question)
        base = generate(adapter, x["input_ids"], x["pixel_values"], build_method("baseline"), 10)
        ours = generate(adapter, x["input_ids"], x["pixel_values"], method, 10)
        assert ours.tokens == base.tokens


def test_finalwipe_drops_every_visual_token_at_its_layer(tiny_llava_dir, samples, tiny_twig, device):
    adapter = load_model(tiny_llava_dir, device=device)
    method = configured(adapter, 0.5, twig=tiny_twig, final_wipe=3)
    s = samples[0]
    x = adapter.inputs(s.image, s.question)
    pre = prefill(adapter, x["input_ids"], x["pixel_values"], method)
    R = method.keep_n
    assert pre.visual_per_layer == [adapter.num_visual, R, R, 0]
    assert abs(sum(pre.visual_per_layer) / 4 - method.budget.tokens(adapter.num_visual)) <= 1
    assert json.loads(open(f"{tiny_twig}/twig.json").read())["K"] == 1


@pytest.mark.parametrize("j", [1, 2])
def test_ttp_backbone_score_source_is_that_layers_last_row(tiny_llava_dir, samples, tiny_twig, j, device):
    """Score-source ablation: backbone layer j's attention on the unpruned prompt (eager reference)."""
    engine = load_model(tiny_llava_dir, device=device)
    eager = load_model(tiny_llava_dir, attn_implementation="eager", device=device)
    method = configured(engine, 0.6, twig=tiny_twig, final_wipe=None, score_layer=j)
    s = samples[2]
    x = engine.inputs(s.image, s.question)
    with torch.no_grad():
        att = eager.model(**x, output_attentions=True).attentions[j][0]
    cols = (x["input_ids"][0] == engine.image_token_id).nonzero().flatten()
    scores = att[:, -1, cols].mean(0)
    pre = prefill(engine, x["input_ids"], x["pixel_values"], method)
    # ties within float noise (SDPA layers and the probe against eager, j + 1 layers) go either way
    noise = fp32_atol(scores, decoder_reduction(engine.language_model.config, att.shape[-1]), depth=j + 1)
    assert pre.keep[method.K - 1] == topk_like(scores, method.keep_n, noise, prefer=pre.keep[method.K - 1])
    assert method.params()["score_source"] == f"backbone layer {j}"


def test_train_twig_learns_only_the_twig_and_resumes(tiny_llava_dir, tmp_path, device):
    """Two steps on the synthetic train split, then on LLaVA-format JSON data; the backbone stays
    frozen, the twig's weights move, the result loads as a twig and an interrupted run resumes."""
    from PIL import Image

    from harness.data import synthetic as syn
    from tools import train_twig

    out = tmp_path / "twig"
    train_twig.main(["--model", tiny_llava_dir, "--K", "1", "--T", "2", "--steps", "2", "--batch", "2",
                     "--lr", "1e-2", "--ckpt-every", "1", "--out", str(out)])
    adapter = load_model(tiny_llava_dir, device=device)
    trained = load_twig(out, adapter.model)
    grown = Twig.grow(adapter.model, 1, 2, "copy")
    assert trained.K == 1 and trained.T == 2
    assert not torch.equal(trained.layers[0].mlp.up_proj.weight, grown.layers[0].mlp.up_proj.weight)
    meta = json.loads((out / "twig.json").read_text())
    assert meta["steps"] == 2 and meta["init"] == "copy" and len(meta["log"]) == 1
    # resuming a finished run trains nothing more
    train_twig.main(["--model", tiny_llava_dir, "--K", "1", "--T", "2", "--steps", "2", "--batch", "2",
                     "--out", str(out)])
    again = load_twig(out, adapter.model)
    assert torch.equal(again.layers[0].mlp.up_proj.weight, trained.layers[0].mlp.up_proj.weight)
    # a checkpoint of another backbone (the model retrained since) is set aside, not resumed
    saved = torch.load(out / "ckpt.pt", weights_only=False)
    assert saved["backbone"] == train_twig.fingerprint(adapter.model)
    torch.save({**saved, "backbone": "another"}, out / "ckpt.pt")
    train_twig.main(["--model", tiny_llava_dir, "--K", "1", "--T", "2", "--steps", "2", "--batch", "2",
                     "--lr", "1e-2", "--out", str(out)])
    assert (out / "ckpt.pt.stale").exists()
    assert torch.load(out / "ckpt.pt", weights_only=False)["state"]["step"] == 2  # trained again from 0
    weight = adapter.model.model.language_model.layers[0].mlp.up_proj.weight
    with torch.no_grad():  # a sampled value (every tensor's first, then evenly strided) changed
        weight[0, 0] += 1
        assert train_twig.fingerprint(adapter.model) != saved["backbone"]
        weight[0, 0] -= 1

    records = []
    for i in range(2):
        s = syn.make_sample("train", i)
        s.image.save(tmp_path / f"{i}.png")
        records.append({"image": f"{i}.png", "conversations": [
            {"from": "human", "value": "<image>\n" + s.question}, {"from": "gpt", "value": s.answer},
            {"from": "human", "value": s.question}, {"from": "gpt", "value": s.answer}]})
    records.append({"conversations": [{"from": "human", "value": "text only"}, {"from": "gpt", "value": "skipped"}]})
    (tmp_path / "data.json").write_text(json.dumps(records))
    batches = train_twig.llava_json_batches(adapter, str(tmp_path / "data.json"), str(tmp_path), 2, 0)
    pv, ids, labels, mask = next(batches)
    assert pv.shape[0] == 2 and int((ids[0] == adapter.image_token_id).sum()) == adapter.num_visual
    assert (labels != -100).sum() > 0 and (labels[ids == adapter.image_token_id] == -100).all()
    train_twig.main(["--model", tiny_llava_dir, "--K", "1", "--T", "1", "--data", str(tmp_path / "data.json"),
                     "--image-root", str(tmp_path), "--batch", "2", "--out", str(tmp_path / "twig-json")])
    assert load_twig(tmp_path / "twig-json", adapter.model).T == 1
