"""The engine against transformers itself: generation, the attention probe, pruning bookkeeping."""
import pytest
import torch

from harness.engine.generate import generate, prefill
from harness.models.adapter import load_model
from methods.base import Method, ModelShape, build_method
from numerics import assert_fp32_close, decoder_reduction, fp32_atol, topk_like


class KeepAllAt(Method):
    """Visits the given layers, keeps every token, and records the probe's rows."""
    name = "keep-all-test"

    def __init__(self, layers, rows=None):
        super().__init__()
        self.prune_layers = tuple(layers)
        self.rows, self.seen = rows, {}

    def select(self, ctx):
        if self.rows is not None and ctx.attention is not None:
            rows = torch.tensor(self.rows(ctx.hidden.shape[1]))
            self.seen[ctx.layer] = (rows, ctx.attention(rows))
        return torch.arange(len(ctx.visual_rows))


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_greedy_equals_transformers_generate(tiny_llava_dir, samples, attn, device):
    adapter = load_model(tiny_llava_dir, attn_implementation=attn, device=device)
    for s in samples[:4]:
        x = adapter.inputs(s.image, s.question)
        ours = generate(adapter, x["input_ids"], x["pixel_values"], Method(), max_new_tokens=12)
        ref = adapter.model.generate(**x, max_new_tokens=12, do_sample=False)
        assert ours.tokens == ref[0, x["input_ids"].shape[1]:].tolist()
        assert ours.visual_per_layer == [adapter.num_visual] * adapter.num_layers


def test_probe_equals_eager_attentions(tiny_llava_dir, samples, device):
    adapter = load_model(tiny_llava_dir, attn_implementation="eager", device=device)
    s = samples[0]
    x = adapter.inputs(s.image, s.question)
    rows = lambda n: [n - 1, n - 3, 0, 40]  # noqa: E731  last token, an instruction word, BOS, an image token
    method = KeepAllAt(range(adapter.num_layers), rows)
    prefill(adapter, x["input_ids"], x["pixel_values"], method)
    with torch.no_grad():
        out = adapter.model(**x, output_attentions=True)
    for layer, (r, probe) in method.seen.items():
        ref = out.attentions[layer][0, :, r, :].mean(0)
        # both sides run the same eager layers; they differ in q.k (head_dim terms) and in the
        # softmax's sum over the S keys (measured: <= 2 u x max|ref|)
        assert_fp32_close(probe, ref.float(), reduction=ref.shape[-1], depth=2)


def test_keep_everything_reproduces_baseline(tiny_llava_dir, samples, device):
    adapter = load_model(tiny_llava_dir, device=device)
    for s in samples[:3]:
        x = adapter.inputs(s.image, s.question)
        base = generate(adapter, x["input_ids"], x["pixel_values"], Method(), max_new_tokens=10)
        kept = generate(adapter, x["input_ids"], x["pixel_values"], KeepAllAt([-1, 0, 2]), max_new_tokens=10)
        assert kept.tokens == base.tokens
        assert sorted(kept.keep) == [-1, 0, 2] and all(len(v) == adapter.num_visual for v in kept.keep.values())


def test_fastv_keeps_exactly_the_naive_top_n(tiny_llava_dir, samples, device):
    """Naive FastV: eager forward, layer K-1's attention, last row, head mean, image columns, top-N."""
    adapter = load_model(tiny_llava_dir, attn_implementation="eager", device=device)
    image_id = adapter.image_token_id
    for K in (1, 2):
        method = build_method("fastv", budget=0.4, K=K)
        method.configure(ModelShape(adapter.num_layers, adapter.num_visual))
        for s in samples[:3]:
            x = adapter.inputs(s.image, s.question)
            with torch.no_grad():
                att = adapter.model(**x, output_attentions=True).attentions[K - 1][0]
            cols = (x["input_ids"][0] == image_id).nonzero().flatten()
            scores = att[:, -1, cols].mean(0)
            pre = prefill(adapter, x["input_ids"], x["pixel_values"], method)
            # ties within float noise (the probe against eager attention after K layers) go either way
            noise = fp32_atol(scores, decoder_reduction(adapter.language_model.config, att.shape[-1]), depth=K)
            expected = topk_like(scores, method.keep_n, noise, prefer=pre.keep[K - 1])
            assert pre.keep[K - 1] == expected
            m = adapter.num_visual
            assert pre.visual_per_layer == [m] * K + [method.keep_n] * (adapter.num_layers - K)


def test_pruned_prefill_equals_truncated_transformers_forward(tiny_llava_dir, samples, device):
    """After FastV drops tokens, the first-token logits equal transformers' own forward of layers
    K..L-1 over the kept hidden states at their original position ids."""

    adapter = load_model(tiny_llava_dir, device=device)
    lm = adapter.language_model
    K = 2
    method = build_method("fastv", budget=0.4, K=K)
    method.configure(ModelShape(adapter.num_layers, adapter.num_visual))
    s = samples[1]
    x = adapter.inputs(s.image, s.question)
    pre = prefill(adapter, x["input_ids"], x["pixel_values"], method)
    with torch.no_grad():
        hs = adapter.model(**x, output_hidden_states=True).hidden_states[K][0]  # entering layer K
    ids = x["input_ids"][0]
    cols = (ids == adapter.image_token_id).nonzero().flatten()
    drop = set(cols[[i for i in range(len(cols)) if i not in set(pre.keep[K - 1])]].tolist())
    rows = torch.tensor([r for r in range(len(ids)) if r not in drop], device=device)
    all_layers = lm.layers
    try:
        lm.layers = all_layers[K:]
        lm.config.num_hidden_layers = len(lm.layers)
        with torch.no_grad():
            # An explicit all-ones mask: without it transformers reads the gaps in position_ids as the
            # starts of packed sequences and masks across them.
            out = lm(inputs_embeds=hs[rows][None], position_ids=rows[None], use_cache=False,
                     attention_mask=torch.ones(1, len(rows), dtype=torch.long, device=device))
    finally:
        lm.layers = all_layers
        lm.config.num_hidden_layers = len(all_layers)
    ref = adapter.model.lm_head(out.last_hidden_state[0, -1])
    # layers K..L-1 and the LM head, the same SDPA modules with another mask: sums of up to the
    # widths or the sequence in each (measured: equal here)
    assert_fp32_close(pre.logits, ref, decoder_reduction(lm.config, len(ids)), depth=adapter.num_layers - K + 1)


@pytest.mark.cuda_only("compares the GPU run with the same model on the CPU")
def test_the_gpu_gives_the_cpu_answers(tiny_llava_dir, samples, device):
    """The same checkpoint on the CPU and on the test GPU: the same greedy tokens, first-token
    logits equal up to fp32 sums in another order (TF32 is off: tests/conftest.py)."""
    cpu = load_model(tiny_llava_dir, device="cpu")
    gpu = load_model(tiny_llava_dir, device=device)
    assert gpu.device == device and all(p.device == device for p in gpu.model.parameters())
    depth = len(cpu.vision_layers) + 2 + cpu.num_layers + 1  # tower, projector, decoder layers, LM head
    for s in samples[:3]:
        xc, xg = cpu.inputs(s.image, s.question), gpu.inputs(s.image, s.question)
        assert xg["input_ids"].device == device and torch.equal(xc["input_ids"], xg["input_ids"].cpu())
        on_cpu = generate(cpu, xc["input_ids"], xc["pixel_values"], Method(), max_new_tokens=12)
        on_gpu = generate(gpu, xg["input_ids"], xg["pixel_values"], Method(), max_new_tokens=12)
        assert on_gpu.tokens == on_cpu.tokens, s.uid
        pc = prefill(cpu, xc["input_ids"], xc["pixel_values"], Method())
        pg = prefill(gpu, xg["input_ids"], xg["pixel_values"], Method())
        assert pg.logits.device == device
        assert_fp32_close(pg.logits.cpu(), pc.logits,
                          decoder_reduction(cpu.language_model.config, xc["input_ids"].shape[1]), depth=depth)
