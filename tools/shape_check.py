"""The engine at real size: a random-weight model of LLaVA-1.5-7B's shape (CLIP ViT-L/14-336 tower,
576 visual tokens, 32 Llama layers of 4096) through baseline, FastV and TwigVLM TTP prefill.

    python -m tools.shape_check [--budgets 192 128 64] [--samples 8] [--repeats 3]   # on a GPU
    python -m tools.shape_check --tiny           # anywhere (the default without a GPU)

Random weights say nothing about accuracy; the point is the physical figure beside the speed:
prefill time (median of repeats, CUDA synchronised) next to the measured tokens per layer and the
analytic prefill FLOPs of each method, at the sizes where the speedups are claimed. The twig
(K = 2, T = 3) is grown from the backbone's own layers, as TwigVLM initialises it.
"""
from __future__ import annotations

import argparse
import statistics
import tempfile
import time

import torch

from harness import measure
from harness.data import synthetic as syn
from harness.engine.generate import prefill, sync
from harness.models import embedded
from harness.models.adapter import ModelAdapter
from methods import ModelShape, build_method

SHAPES = {
    # LLaVA-1.5-7B: CLIP ViT-L/14 at 336 px (24 x 24 patches), Vicuna-7B (Llama-2 7B)
    "llava-1.5-7b": dict(v_hidden=1024, v_layers=24, v_heads=16, v_ffn=4096, image=336, patch=14,
                         hidden=4096, layers=32, heads=32, kv_heads=32, ffn=11008, vocab=32064),
    # the same proportions, small enough for a CPU
    "tiny": dict(v_hidden=64, v_layers=2, v_heads=4, v_ffn=128, image=96, patch=8,
                 hidden=64, layers=8, heads=4, kv_heads=4, ffn=128, vocab=128),
}


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
    return ModelAdapter(model, processor, f"{shape} (random weights)", str(dtype).split(".")[-1], "sdpa")


def run(shape: str = "llava-1.5-7b", budgets=(192, 128, 64), samples: int = 8, repeats: int = 3,
        dtype: str = "float16", device: str | None = None) -> list[dict]:
    from methods.twigvlm.twig import Twig, save_twig

    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    adapter = build(shape, getattr(torch, dtype), device)
    mshape = ModelShape(adapter.num_layers, adapter.num_visual)
    twig_dir = tempfile.mkdtemp(prefix="twig-")
    save_twig(Twig.grow(adapter.model, 2, 3, "copy"), twig_dir, {"init": "copy"})

    def method(name, b=None, **kw):
        m = build_method(name, b, **kw)
        m.bind(adapter)
        m.configure(mshape)
        return m

    rows = [("baseline", None, method("baseline"))]
    for b in budgets:
        rows += [("fastv[K=2]", b, method("fastv", b, K=2)), ("twigvlm", b, method("twigvlm", b, twig=twig_dir))]
    data = [syn.make_sample("test", i) for i in range(samples)]
    inputs = [adapter.inputs(s.image, s.question) for s in data]
    text = measure.text_shape(adapter.model.config)
    with torch.no_grad():
        for x in inputs[:2]:  # warm-up
            prefill(adapter, x["input_ids"], x["pixel_values"], rows[0][2])
        times = {i: [] for i in range(len(rows))}
        tokens, flops = {}, {}
        for _ in range(repeats):  # rows interleaved per repeat
            for i, (name, b, m) in enumerate(rows):
                per = []
                for s, x in zip(data, inputs):
                    sync(adapter.device)
                    t0 = time.perf_counter()
                    pre = prefill(adapter, x["input_ids"], x["pixel_values"], m, s)
                    sync(adapter.device)
                    per.append((time.perf_counter() - t0) * 1e3 - pre.vision_ms)
                    tokens[i] = sum(pre.visual_per_layer) / len(pre.visual_per_layer)
                    twig = m.T if getattr(m, "twig", None) is not None else 0
                    flops[i] = measure.prefill_gflops(pre.visual_per_layer, x["input_ids"].shape[1] - adapter.num_visual,
                                                      text, twig, adapter.num_visual)
                times[i].append(statistics.median(per))
    out = []
    base = statistics.median(times[0])
    name_dev = torch.cuda.get_device_name() if adapter.device.type == "cuda" else "cpu"
    print(f"{adapter.name}, {dtype}, {name_dev}: {adapter.num_layers} layers, {adapter.num_visual} visual tokens; "
          f"prefill = LLM prompt pass incl. pruning and the twig, vision excluded; median of {repeats} repeats "
          f"of the per-sample median over {samples} samples")
    print(f"{'method':12} {'budget':>6} {'tokens/layer':>12} {'GFLOPs':>8} {'prefill ms':>10} {'speedup':>8} "
          f"{'FLOP ratio':>10}")
    for i, (name, b, m) in enumerate(rows):
        ms = statistics.median(times[i])
        r = {"method": name, "budget": b, "tokens_per_layer": tokens[i], "gflops": flops[i], "prefill_ms": ms,
             "speedup": base / ms, "flop_ratio": flops[0] / flops[i]}
        out.append(r)
        print(f"{name:12} {b or 'all':>6} {tokens[i]:12.1f} {flops[i]:8.3g} {ms:10.2f} {r['speedup']:7.2f}x "
              f"{r['flop_ratio']:9.2f}x")
    return out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tiny", action="store_true", help="a small model of the same proportions (CPU)")
    ap.add_argument("--budgets", type=int, nargs="+", default=None)
    ap.add_argument("--samples", type=int, default=8)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--dtype", default=None, help="default: float16 on GPU, float32 on CPU")
    a = ap.parse_args(argv)
    dtype = a.dtype or ("float16" if torch.cuda.is_available() else "float32")
    if not a.tiny and not torch.cuda.is_available():
        print("no GPU here: the small model of the same proportions instead (--tiny); a 7B in fp32 needs 28 GB")
        a.tiny = True
    if a.tiny:
        run("tiny", a.budgets or (96, 72, 48), a.samples, a.repeats, dtype)
    else:
        run("llava-1.5-7b", a.budgets or (192, 128, 64), a.samples, a.repeats, dtype)


if __name__ == "__main__":
    main()
