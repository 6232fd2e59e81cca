"""Each pruning method against a plain, loop-by-loop reference of its official algorithm, written
here independently of the methods' code, on a tiny random LLaVA with eager attention."""
import math

import pytest
import torch

from harness.engine.generate import encode_vision, generate, prefill
from harness.models.adapter import load_model
from methods import ModelShape, build_method
from methods.pool import pool_grid
from methods.sparsevlm import scaled_layers, scaled_schedule, visual_counts
from methods.visionzip import visionzip_split
from numerics import assert_fp32_close, decoder_reduction, fp32_atol, topk_like


def configured(adapter, name, budget, **settings):
    m = build_method(name, budget, **settings)
    m.configure(ModelShape(adapter.num_layers, adapter.num_visual))
    return m


def image_features(adapter, x):
    cfg = adapter.model.config
    with torch.no_grad():
        out = adapter.model.model.get_image_features(
            pixel_values=x["pixel_values"], vision_feature_layer=cfg.vision_feature_layer,
            vision_feature_select_strategy=cfg.vision_feature_select_strategy)
    return out.pooler_output[0]


# ------------------------------------------------------------------------------ VisionZip

def naive_visionzip(adapter, x, dominant, contextual, prefer=()):
    """Eager CLIP attentions and a hook on the feature layer's k_proj; plain Python loops. CLS
    scores within float noise of the cut are ties, resolved like `prefer` (patch ids)."""
    model = adapter.model
    tower = model.model.vision_tower
    n_layers = len(adapter.vision_layers)
    layer = n_layers + model.config.vision_feature_layer  # -2 -> the second-to-last layer
    keys = {}
    hook = adapter.vision_layers[layer].self_attn.k_proj.register_forward_hook(
        lambda mod, inp, out: keys.update(k=out[0]))
    try:
        with torch.no_grad():
            out = tower(x["pixel_values"], output_hidden_states=True, output_attentions=True)
    finally:
        hook.remove()
    att = out.attentions[layer][0]  # (H, N+1, N+1)
    hidden = out.hidden_states[layer + 1][0]  # (N+1, Dv)
    heads = att.shape[0]
    k = keys["k"].view(hidden.shape[0], heads, -1).mean(1)
    n = hidden.shape[0]
    cls_score = [float(att[:, 0, j].sum()) for j in range(1, n)]
    # the two sides differ in q.k (head_dim terms) and the softmax's sum over the n tokens
    noise = fp32_atol(torch.tensor(cls_score), n, depth=2)
    dom = [0] + [j + 1 for j in topk_like(cls_score, dominant - 1, noise, prefer)]
    rest = [j for j in range(n) if j not in dom]
    step = max(1, len(rest) // contextual)
    targets = [rest[i] for i in range(0, len(rest), step)][:contextual]
    others = [j for j in rest if j not in targets]
    unit = lambda v: v / v.norm()  # noqa: E731
    groups = {t: [] for t in targets}
    for o in others:
        sims = [float(unit(k[o]) @ unit(k[t])) for t in targets]
        groups[targets[max(range(len(targets)), key=lambda i: sims[i])]].append(o)
    ctx = [hidden[t] + (torch.stack([hidden[o] for o in groups[t]]).mean(0) if groups[t] else 0)
           for t in targets]
    feats = torch.cat([hidden[dom], torch.stack(ctx)])
    with torch.no_grad():
        projected = model.model.multi_modal_projector(feats)
    return projected, [d - 1 for d in dom] + [t - 1 for t in targets], {t - 1: sorted([t - 1] + [o - 1 for o in groups[t]]) for t in targets}


@pytest.mark.parametrize("budget", [16, 40])
def test_visionzip_builds_what_the_naive_reference_builds(tiny_llava_dir, samples, budget, device):
    adapter = load_model(tiny_llava_dir, attn_implementation="eager", device=device)
    method = configured(adapter, "visionzip", budget)
    for s in samples[:3]:
        x = adapter.inputs(s.image, s.question)
        pre = prefill(adapter, x["input_ids"], x["pixel_values"], method)
        ref_feats, ref_ids, ref_groups = naive_visionzip(adapter, x, method.dominant, method.contextual,
                                                         prefer=pre.keep[-1][:method.dominant])
        assert pre.keep[-1] == ref_ids
        assert {p: sorted(v) for p, v in pre.merged[-1].items()} == ref_groups
        assert pre.visual_per_layer == [budget] * adapter.num_layers
        with torch.no_grad():
            ours = encode_vision(adapter, x["pixel_values"], method).features
        # merge means over up to all n tower tokens (index_add vs a Python mean), then the projector's
        # two matmuls: 3 sums of at most n terms. Measured: <= 4.3 u x max|ref| (bound: 3 x 145 u).
        assert_fp32_close(ours, ref_feats, reduction=adapter.num_visual + 1, depth=3)


def test_visionzip_splits_follow_the_official_ratio():
    assert [visionzip_split(r) for r in (64, 128, 192)] == [(54, 10), (108, 20), (162, 30)]
    assert [visionzip_split(r) for r in (16, 32, 48)] == [(14, 2), (27, 5), (40, 8)]


# ------------------------------------------------------------------------------ pool

def test_pool_averages_each_grid_cell(tiny_llava_dir, samples, device):
    adapter = load_model(tiny_llava_dir, device=device)
    side = math.isqrt(adapter.num_visual)
    s = samples[0]
    x = adapter.inputs(s.image, s.question)
    feats = image_features(adapter, x)
    for budget, (h, w) in ((16, (4, 4)), (48, (6, 8)), (32, (4, 8))):
        method = configured(adapter, "pool", budget)
        assert (method.params()["grid"], h * w) == (f"{h}x{w}", budget)
        pre = prefill(adapter, x["input_ids"], x["pixel_values"], method)
        with torch.no_grad():
            ours = encode_vision(adapter, x["pixel_values"], method).features
        ref = []
        for i in range(h):
            for j in range(w):
                rows = range(math.floor(i * side / h), math.ceil((i + 1) * side / h))
                cols = range(math.floor(j * side / w), math.ceil((j + 1) * side / w))
                ref.append(torch.stack([feats[r * side + c] for r in rows for c in cols]).mean(0))
        # the same features averaged per cell in another order: one sum over a cell's patches
        # (measured: <= 1.3 u x max|ref|)
        cell = math.ceil(side / h) * math.ceil(side / w)
        assert_fp32_close(ours, torch.stack(ref), reduction=cell)
        assert pre.visual_per_layer == [budget] * adapter.num_layers
    assert [pool_grid(r, 24) for r in (192, 128, 64)] == [(12, 16), (8, 16), (8, 8)]


# ------------------------------------------------------------------------------ SparseVLM

def naive_dpc_knn(x, clusters):
    n, d = x.shape
    dist = [[float((x[i] - x[j]).norm()) / math.sqrt(d) for j in range(n)] for i in range(n)]
    density = [math.exp(-sum(v * v for v in sorted(row)[:clusters]) / clusters) for row in dist]
    top = max(max(row) for row in dist)
    delta = []
    for i in range(n):
        denser = [dist[i][j] for j in range(n)
                  if density[j] > density[i] or (density[j] == density[i] and j < i)]
        delta.append(min(denser) if denser else top)
    centres = sorted(range(n), key=lambda i: -delta[i] * density[i])[:clusters]
    assign = [min(range(clusters), key=lambda c: dist[centres[c]][i]) for i in range(n)]
    for c, i in enumerate(centres):
        assign[i] = c
    merged = []
    for c in range(clusters):
        members = [x[i] for i in range(n) if assign[i] == c]
        merged.append(torch.stack(members).sum(0) / (len(members) + 1e-6))
    return torch.stack(merged), centres, assign


def naive_sparsevlm(adapter, x, layers, schedule, ours):
    """Layer by layer with transformers' eager attention weights (a hook on self_attn). Scores
    within float noise of a cut are ties, resolved like `ours` (the engine's prefill)."""
    lm = adapter.language_model
    ids = x["input_ids"][0]
    img = (ids == adapter.image_token_id).nonzero().flatten().tolist()
    start = img[0]
    with torch.no_grad():
        hidden = lm.embed_tokens(ids).clone()
        hidden[img] = image_features(adapter, x)
    text = list(range(img[-1] + 1, len(ids)))
    r = (hidden[img] @ hidden[text].T).softmax(-1).mean(0)
    offsets = [len(text) - j for j in range(len(text)) if r[j] > r.mean()]
    patch = list(range(len(img)))  # patch id of each visual row
    pos = list(range(len(ids)))
    hidden = hidden[None]
    captured, stages = {}, {}
    hooks = [layer.self_attn.register_forward_hook(lambda m, i, o, _l=li: captured.__setitem__(_l, o[1]))
             for li, layer in enumerate(lm.layers)]
    try:
        for li, layer in enumerate(lm.layers):
            n = hidden.shape[1]
            mask = torch.full((n, n), torch.finfo(hidden.dtype).min, device=hidden.device).triu(1)[None, None]
            p = torch.tensor(pos, device=hidden.device)[None]
            with torch.no_grad():
                hidden = layer(hidden, attention_mask=mask, position_ids=p,
                               position_embeddings=lm.rotary_emb(hidden, p))
            if li not in layers:
                continue
            att = captured[li][0].mean(0)  # (n, n), head mean
            raters = [n - o for o in offsets]
            vis = list(range(start, start + len(patch)))
            score = [float(sum(att[q, c] for q in raters) / len(raters)) for c in vis]
            # SDPA layers + the probe against eager ones: li + 1 layers of sums over the widths or n
            noise = fp32_atol(torch.tensor(score), decoder_reduction(lm.config, n), depth=li + 1)
            k = min(schedule[layers.index(li)], len(vis) - 1)
            kept_by_ours = set(ours.keep[li][:k])
            keep = topk_like(score, k, noise, [j for j in range(len(vis)) if patch[j] in kept_by_ours])
            dropped = [j for j in range(len(vis)) if j not in keep]
            m = int(len(dropped) * 0.3) + 1
            recycled_by_ours = {p for ps in ours.merged[li].values() for p in ps}
            chosen = [dropped[i] for i in topk_like([score[j] for j in dropped], m, noise,
                                                     [i for i, j in enumerate(dropped) if patch[j] in recycled_by_ours])]
            chosen.sort(key=lambda j: -score[j])  # by score, as the official code orders them
            clusters = int(m / 10) + 1
            merged, centres, assign = naive_dpc_knn(hidden[0, [vis[j] for j in chosen]].float(), clusters)
            centre_rows = [chosen[c] for c in centres]
            sources = {patch[chosen[c]]: sorted(patch[chosen[i]] for i in range(len(chosen)) if assign[i] == ci)
                       for ci, c in enumerate(centres)}
            post = list(range(start + len(vis), n))
            hidden = torch.cat([hidden[:, :start], hidden[:, [vis[j] for j in keep]],
                                merged[None].to(hidden.dtype), hidden[:, post]], dim=1)
            pos = pos[:start] + [pos[vis[j]] for j in keep] + [pos[vis[j]] for j in centre_rows] + [pos[q] for q in post]
            patch = [patch[j] for j in keep] + [patch[j] for j in centre_rows]
            stages[li] = (list(patch), sources)
    finally:
        for h in hooks:
            h.remove()
    with torch.no_grad():
        logits = adapter.logits(hidden[:, -1:])[0, -1]
    return stages, logits


@pytest.mark.parametrize("budget", [0.6, 0.85])
def test_sparsevlm_selects_and_recycles_what_the_naive_reference_does(tiny_llava_dir, samples, budget, device):
    engine = load_model(tiny_llava_dir, device=device)  # SDPA + the attention probe
    eager = load_model(tiny_llava_dir, attn_implementation="eager", device=device)
    method = configured(engine, "sparsevlm", budget)
    layers, schedule = list(method.prune_layers), list(method.schedule)
    assert layers == [0, 1, 2]  # scaled to 4 layers
    for s in samples[:3]:
        x = engine.inputs(s.image, s.question)
        pre = prefill(engine, x["input_ids"], x["pixel_values"], method)
        stages, logits = naive_sparsevlm(eager, x, layers, schedule, pre)
        assert sorted(pre.keep) == layers
        for li in layers:
            assert pre.keep[li] == stages[li][0], (s.uid, li)
            assert {p: sorted(v) for p, v in pre.merged[li].items()} == stages[li][1]
        processed, _ = visual_counts(layers, schedule, engine.num_layers, engine.num_visual)
        assert pre.visual_per_layer == processed
        # SDPA engine against eager layers, every layer and the LM head (measured: <= 35 u x max|ref|)
        cfg = engine.language_model.config
        assert_fp32_close(pre.logits, logits, decoder_reduction(cfg, x["input_ids"].shape[1]),
                          depth=engine.num_layers + 1)


def test_sparsevlm_official_schedules_and_token_accounting():
    assert scaled_layers(32) == (2, 6, 15) and scaled_layers(16) == (1, 3, 8)
    assert [scaled_schedule(r, 576) for r in (192, 128, 64)] == [(300, 200, 110), (303, 110, 36), (66, 30, 17)]
    for r in (192, 128, 64):  # SparseVLM's own accounting reproduces its budgets
        _, official = visual_counts((2, 6, 15), scaled_schedule(r, 576), 32, 576)
        assert abs(sum(official) / 32 - r) < 1
    processed, _ = visual_counts((2, 6, 15), (300, 200, 110), 32, 576)
    assert sum(processed) / 32 == pytest.approx(206.5)


# ------------------------------------------------------------------------------ keep everything

@pytest.mark.parametrize("name", ["pool", "visionzip", "sparsevlm"])
def test_keep_everything_reproduces_the_baseline(tiny_llava_dir, samples, name, device):
    adapter = load_model(tiny_llava_dir, device=device)
    method = configured(adapter, name, 0.0)
    for s in samples[:2]:
        x = adapter.inputs(s.image, s.question)
        base = generate(adapter, x["input_ids"], x["pixel_values"], build_method("baseline"), 10)
        ours = generate(adapter, x["input_ids"], x["pixel_values"], method, 10)
        assert ours.tokens == base.tokens
        assert ours.visual_per_layer == base.visual_per_layer
