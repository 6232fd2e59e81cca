"""Train a TwigVLM twig on a frozen LLaVA: next-token cross-entropy of the truncated model
(backbone layers 0..K-1, then the twig's T layers, norm and head). Only the twig learns; there is
no distillation loss, as in TwigVLM.

    # the embedded model, on CPU, from the synthetic benchmark's train split
    python -m tools.train_twig --model embedded --K 1 --T 2 --steps 600 \
        --out methods/twigvlm/twigs/embedded-K1-T2

    # a 7B checkpoint on a GPU, from LLaVA-format instruction data (the paper's settings are the
    # defaults: 1 epoch of LLaVA-665K, lr 1e-4 cosine, warm-up 3 %, batch 128)
    python -m tools.train_twig --model /models/llava-1.5-7b-hf --dtype bfloat16 \
        --K 2 --T 3 --data /data/llava_v1_5_mix665k.json --image-root /data \
        --batch 16 --grad-accum 8 --out twigs/llava-1.5-7b-K2-T3

Resumable: a checkpoint is written to <out>/ckpt.pt every --ckpt-every steps; rerun the same
command after an interruption. A checkpoint of another backbone (the model was retrained since)
is set aside as ckpt.pt.stale and training starts over. The finished twig is
<out>/twig.safetensors + twig.json.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import random
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from harness.models.adapter import load_model
from methods.twigvlm.twig import INITS, Twig, save_twig


def additive_mask(pad_mask: torch.Tensor, dtype) -> torch.Tensor:
    """(B, 1, S, S) causal + padding mask for the model's own decoder layers."""
    b, n = pad_mask.shape
    allowed = torch.ones(n, n, dtype=torch.bool, device=pad_mask.device).tril()[None] & pad_mask.bool()[:, None, :]
    return torch.zeros(b, 1, n, n, dtype=dtype, device=pad_mask.device).masked_fill(
        ~allowed[:, None], torch.finfo(dtype).min)


@torch.no_grad()
def shallow(adapter, input_ids, pixel_values, pad_mask, K: int):
    """Hidden states after backbone layers 0..K-1, with the position embeddings and mask."""
    model = adapter.model
    emb = adapter.embed(input_ids)
    feats = model.model.get_image_features(
        pixel_values=pixel_values, vision_feature_layer=model.config.vision_feature_layer,
        vision_feature_select_strategy=model.config.vision_feature_select_strategy).pooler_output
    feats = torch.cat(list(feats)) if isinstance(feats, (list, tuple)) else feats.flatten(0, 1)
    is_image = (input_ids == adapter.image_token_id).unsqueeze(-1).expand_as(emb)
    hidden = emb.masked_scatter(is_image, feats.to(emb.dtype))
    positions = torch.arange(input_ids.shape[1], device=input_ids.device)[None].expand(input_ids.shape[0], -1)
    pe = adapter.rotary(hidden, positions)
    mask = additive_mask(pad_mask, hidden.dtype)
    for layer in adapter.layers[:K]:
        hidden = layer(hidden, attention_mask=mask, position_ids=positions, position_embeddings=pe)
    return hidden, positions, pe, mask


def twig_loss(twig: Twig, hidden, positions, pe, mask, labels) -> torch.Tensor:
    for layer in twig.layers:
        hidden = layer(hidden, attention_mask=mask, position_ids=positions, position_embeddings=pe)
    logits = twig.logits(hidden[:, :-1])
    return F.cross_entropy(logits.flatten(0, 1).float(), labels[:, 1:].flatten(), ignore_index=-100)


# ------------------------------------------------------------------------------ data

def shapes_batches(adapter, batch: int, seed: int):
    """Synthetic multi-turn conversations of the embedded benchmark's train split."""
    from tools import train_embedded as te

    tok = adapter.processor.tokenizer
    step = 0
    while True:
        pv, ids, labels, _w, mask, _patch, _keep = te.batch_of(step, batch, tok, adapter.image_token_id, seed)
        yield pv.to(adapter.device, adapter.model.dtype), ids.to(adapter.device), labels.to(adapter.device), mask.to(adapter.device)
        step += 1


def llava_json_batches(adapter, path: str, image_root: str, batch: int, seed: int, max_len: int = 2048):
    """LLaVA-format instruction data: [{"image": rel_path, "conversations": [{"from": "human",
    "value": "<image>\\n..."}, {"from": "gpt", "value": ...}, ...]}, ...]; one epoch, shuffled.
    Records without an image are skipped (the twig is trained on image conversations)."""
    from PIL import Image

    records = [r for r in json.loads(Path(path).read_text()) if "image" in r]
    random.Random(seed).shuffle(records)
    proc, tok = adapter.processor, adapter.processor.tokenizer
    for i in range(0, len(records) - batch + 1, batch):
        rows, pixels = [], []
        for r in records[i:i + batch]:
            image = Image.open(Path(image_root) / r["image"]).convert("RGB")
            pixels.append(proc.image_processor(image, return_tensors="pt")["pixel_values"][0])
            ids, labels = [tok.bos_token_id], [-100]
            turns = r["conversations"]
            for q, a in zip(turns[0::2], turns[1::2]):
                question = q["value"].replace("<image>", "").strip()
                head = ("USER: <image>\n" if len(ids) == 1 else " USER: ") + question + " ASSISTANT:"
                head_ids = proc(text=head, images=image if len(ids) == 1 else None,
                                add_special_tokens=False)["input_ids"]
                head_ids = head_ids[0] if head_ids and isinstance(head_ids[0], list) else head_ids
                ans = tok(" " + a["value"].strip(), add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
                ids += list(head_ids) + ans
                labels += [-100] * len(head_ids) + ans
            rows.append((ids[:max_len], labels[:max_len]))
        n = max(len(r[0]) for r in rows)
        input_ids = torch.full((len(rows), n), tok.pad_token_id)
        lab = torch.full((len(rows), n), -100)
        mask = torch.zeros((len(rows), n), dtype=torch.long)
        for j, (ids, labels) in enumerate(rows):
            input_ids[j, :len(ids)], lab[j, :len(labels)], mask[j, :len(ids)] = \
                torch.tensor(ids), torch.tensor(labels), 1
        yield (torch.stack(pixels).to(adapter.device, adapter.model.dtype), input_ids.to(adapter.device),
               lab.to(adapter.device), mask.to(adapter.device))


# ------------------------------------------------------------------------------ main

def fingerprint(model: torch.nn.Module, per_tensor: int = 4096) -> str:
    """A short hash of a model's weights (up to `per_tensor` evenly strided values of every tensor):
    the same weights give the same string on any machine, retrained ones another."""
    h = hashlib.sha256()
    for name, p in model.state_dict().items():
        flat = p.detach().flatten()
        h.update(name.encode())
        h.update(flat[:: max(1, flat.numel() // per_tensor)].float().cpu().numpy().tobytes())
    return h.hexdigest()[:16]


def lr_at(step: int, total: int, peak: float, warmup: int) -> float:
    if step < warmup:
        return peak * (step + 1) / warmup
    return peak * 0.5 * (1 + math.cos(math.pi * min(1.0, (step - warmup) / max(1, total - warmup))))


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="embedded")
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--K", type=int, default=2)
    ap.add_argument("--T", type=int, default=3)
    ap.add_argument("--init", default="copy", choices=INITS)
    ap.add_argument("--data", default="shapes", help="'shapes' or a LLaVA-format JSON file")
    ap.add_argument("--image-root", default=".")
    ap.add_argument("--steps", type=int, default=None, help="default: one epoch of --data (shapes: 600)")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--grad-accum", type=int, default=1)
    ap.add_argument("--lr", type=float, default=1e-4)
    ap.add_argument("--warmup", type=float, default=0.03, help="fraction of the steps")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--ckpt-every", type=int, default=100)
    ap.add_argument("--out", required=True)
    ap.add_argument("--precision", choices=("bf16", "fp32"), default="bf16",
                    help="on CPU, the twig's pass under bf16 autocast or in fp32 (a CPU without bf16 matrix "
                         "units runs bf16 several times slower); on a GPU, --dtype decides")
    args = ap.parse_args(argv)

    torch.manual_seed(args.seed)
    adapter = load_model(args.model, args.dtype)
    for p in adapter.model.parameters():
        p.requires_grad_(False)
    twig = Twig.grow(adapter.model, args.K, args.T, args.init, seed=args.seed).float().to(adapter.device)
    twig.train()
    if args.data == "shapes":
        steps = args.steps or 600
        batches = shapes_batches(adapter, args.batch, seed=1000 + args.seed)
    else:
        n = sum(1 for r in json.loads(Path(args.data).read_text()) if "image" in r)
        steps = args.steps or max(1, n // (args.batch * args.grad_accum))
        batches = llava_json_batches(adapter, args.data, args.image_root, args.batch, args.seed)
    opt = torch.optim.AdamW(twig.parameters(), lr=args.lr, weight_decay=0.0)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    ckpt = out / "ckpt.pt"
    state = {"step": 0, "seconds": 0.0, "log": []}
    backbone = fingerprint(adapter.model)
    saved = torch.load(ckpt, weights_only=False) if ckpt.exists() else None
    if saved is not None and saved.get("backbone") != backbone:
        os.replace(ckpt, out / "ckpt.pt.stale")
        print(f"{ckpt} was trained on another backbone: set aside as ckpt.pt.stale, starting over", flush=True)
        saved = None
    if saved is not None:
        twig.load_state_dict(saved["twig"])
        opt.load_state_dict(saved["opt"])
        state = saved["state"]
        for _ in range(state["step"] * args.grad_accum):  # skip the batches already seen
            next(batches)
        print(f"resumed at step {state['step']}", flush=True)
    t0 = time.time() - state["seconds"]
    running = []
    while state["step"] < steps:
        for g in opt.param_groups:
            g["lr"] = lr_at(state["step"], steps, args.lr, max(1, round(args.warmup * steps)))
        opt.zero_grad(set_to_none=True)
        total = 0.0
        for _ in range(args.grad_accum):
            pv, ids, labels, mask = next(batches)
            hidden, pos, pe, m = shallow(adapter, ids, pv, mask, args.K)
            cpu_bf16 = adapter.device.type == "cpu" and args.precision == "bf16"
            with torch.autocast(adapter.device.type, dtype=torch.bfloat16, enabled=cpu_bf16):
                loss = twig_loss(twig, hidden.float(), pos, tuple(x.float() for x in pe), m.float(), labels)
            (loss / args.grad_accum).backward()
            total += loss.item() / args.grad_accum
        torch.nn.utils.clip_grad_norm_(twig.parameters(), 1.0)
        opt.step()
        state["step"] += 1
        state["seconds"] = time.time() - t0
        running.append(total)
        if state["step"] % 25 == 0 or state["step"] == steps:
            rec = {"step": state["step"], "loss": round(sum(running) / len(running), 4),
                   "minutes": round(state["seconds"] / 60, 2)}
            running = []
            state["log"].append(rec)
            print(json.dumps(rec), flush=True)
        if state["step"] % args.ckpt_every == 0 or state["step"] == steps:
            tmp = out / "ckpt.pt.tmp"
            torch.save({"twig": twig.state_dict(), "opt": opt.state_dict(), "state": state, "backbone": backbone}, tmp)
            os.replace(tmp, ckpt)
    twig.eval()
    save_twig(twig.to(adapter.model.dtype), out, {
        "init": args.init, "model": args.model, "data": args.data, "steps": steps, "batch": args.batch,
        "grad_accum": args.grad_accum, "lr": args.lr, "seed": args.seed, "precision": args.precision,
        "minutes": round(state["seconds"] / 60, 1), "log": state["log"]})
    print(f"wrote {out / 'twig.safetensors'}", flush=True)


if __name__ == "__main__":
    main()
