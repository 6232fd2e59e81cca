"""Why does an embedded model fail? The checks behind issue 11's recipe changes.

    python -m tools.diagnose_embedded probe --model DIR [--samples 80]
    python -m tools.diagnose_embedded fill --model DIR [--tokens 16] [--samples 120]
    python -m tools.diagnose_embedded sinks --model DIR [--samples 40] [--read]
    python -m tools.diagnose_embedded depth --model DIR [--tokens 16] [--samples 120]
    python -m tools.diagnose_embedded pad --model DIR [--tokens 16] [--samples 120] [--pads 0,4,16,48,128]
    python -m tools.diagnose_embedded lookup --model DIR [--samples 25]

`probe`: can a linear classifier read each object patch's colour, shape and letter, and its place
(cell of the 3 x 3 grid, row and column of the 12 x 12 patch grid), from the tower's features, the
projector's output and the decoder's states at the visual tokens? Held-out accuracy per stage
(70/30 split over patches, samples from test 700 on). A stage where one falls is where the model
loses it: the neutral candidate's projector dropped colour (1.00 -> 0.65), and
the model answered "orange" for every colour.

`fill`: at --tokens kept visual tokens, chosen as the oracle control chooses (the question's
objects first: Sample.patch_priority) or at random, is a wrong answer for want of evidence or for
the shorter sequence? Each is run twice: `kept` (the other tokens removed, the kept ones at their
own positions, as a pruning method leaves them) and `kept+fill` (every position present, the
removed ones holding the features of an empty canvas of the scene's background shade). If
kept+fill answers as the full image does while kept does not, the evidence was there and the
model breaks on the shorter sequence; `oracle kept+as many` adds only as many empty-canvas
tokens again, at random removed positions (the candidate: 16 of them bring 63 % to 88 %);
`oracle packed` (the oracle's tokens at consecutive
positions, the text right after them) tells whether it is the gaps in the position ids or the
missing background (the neutral candidate: packed 55.8 %, kept 62.5 %, kept+fill 97.5 %, so the
background); `blank` (the empty canvas's features at the random selection's positions) is the floor.

`sinks`: where does the question's last token look? Per decoder layer, its attention (mean over
heads and samples) on the first token (<s>), on visual tokens an object touches, on the other
(background) visual tokens, and on the rest of the text. Language models park the attention a
head does not need on the first token (an attention sink; LLaVA's Vicuna does so). The neutral
candidate parks it on the background instead: 40-64 % at layers 1-15, about 1 % on <s>.
Moving it onto <s> (train_embedded --sink-weight: 26-69 % at layers 2 and 5-15) left the
oracle's 16 tokens at 59 %, so the sink alone is not why pruning breaks it.
`--read` gives the scene as words where the image would be, for a language stage's model.

`depth`: how deep into the decoder does a question still need the whole image? The oracle and
random controls keep --tokens visual tokens from decoder layer K on (layers 0..K-1 see all of
them), for K = 0, 1, 2, 4, 8, 12, through the harness's engine; accuracy per question type. A
miniature whose patches arrive contextualised, as CLIP's do, holds up at K = 0; the neutral
candidate's oracle scores 61 % at K = 0, 72 % at 2 and 89 % at 8 (baseline 96 %), and position
is still at 62 % at K = 12 (88 % unpruned): the decoder reads where an object is late, and from
more than the object's own patches.

`pad`: the oracle's tokens plus N empty-canvas tokens (fill's `oracle kept+as many` is N = 16), for
several N. An empty-canvas token shows no object, so a model that counts its evidence answers "how
many" the same at every N. The candidate does not (400 samples): count climbs from 32 % (N = 0)
through 48, 72 and 90 to 98 % (N = 128), and its wrong answers are one too many, as if it read
"how many" as a share of the visual tokens, which a pruned image inflates. Position climbs too,
14 -> 100 %, but there the empty tokens do tell something: where the object is not.

`lookup`: does a question find its object by what it names? For each form of attribute question
(the object named by its place alone, by colour and place, by shape and place, by colour and
shape), per decoder layer, the share of the last prompt token's image attention that lands on the
question's object, for the head that puts the most there (mean over samples), next to the object's
share of the image (uniform attention, 0.06-0.08). The current model (25 samples per form) finds
an object named by colour and shape at 0.98 (layer 3), by colour and place at 0.93 (layer 2), by
shape and place at 0.90 (layer 5), but one named by its place alone at 0.70 at best (layer 5),
though a linear probe reads every object patch's cell at 0.96-0.99 all the way through (`probe`):
it looks objects up by colour and shape, hardly by place. Its wrong answers to "what shape is at the <place> ?" are all
another object's shape (45 of 45), and its descriptions name exactly 48 % of the objects whose
colour another object shares against 93 % of the others (`tools.question_forms --describe`,
360 samples: 42 and 130 objects; the misses are shapes of other objects at the right place).

probe, fill, pad, sinks and lookup run the model's own modules in float32 on the CPU; 3 new tokens, greedy, no cache.
"""
from __future__ import annotations

import argparse

import numpy as np
import torch
from PIL import Image

from harness.data import synthetic as syn
from harness.models import embedded

PATCH_FIELDS = ("color", "shape", "letter")
# where a patch is: its cell of the 3 x 3 grid (what position questions ask) and its row and column
# of the patch grid (what tells two touching objects from one); the same for every image
PLACE_FIELDS = ("cell", "row", "column")


def patch_places() -> dict[str, np.ndarray]:
    """{place field: (patches,) labels} of the test canvas's patches, in the tower's order."""
    from tools.train_embedded import patch_cells

    index = np.arange(syn.NUM_PATCHES)
    return {"cell": patch_cells((syn.IMAGE_SIZE, syn.IMAGE_SIZE)), "row": index // syn.PATCHES_PER_SIDE,
            "column": index % syn.PATCHES_PER_SIDE}


def load(path: str, attn: str | None = None):
    from transformers import LlavaForConditionalGeneration

    extra = {"attn_implementation": attn} if attn else {}
    model = LlavaForConditionalGeneration.from_pretrained(path, dtype=torch.float32, **extra).eval()
    return model, embedded.build_processor()


@torch.no_grad()
def visual_features(model, processor, image) -> tuple[torch.Tensor, torch.Tensor]:
    """(tower features at the feature layer, projector output), each (patches, dim)."""
    pv = processor.image_processor(image, return_tensors="pt")["pixel_values"]
    feats = model.model.vision_tower(pv, output_hidden_states=True).hidden_states[
        model.config.vision_feature_layer][0, 1:]
    return feats, model.model.multi_modal_projector(feats)


def linear_probe(x: torch.Tensor, y: torch.Tensor, steps: int = 300) -> float:
    """Held-out accuracy of a softmax-linear classifier (first 70 % of rows to fit, the rest to test)."""
    x = (x - x.mean(0)) / (x.std(0) + 1e-5)
    fit = torch.arange(len(y)) < int(0.7 * len(y))
    w = torch.zeros(x.shape[1], int(y.max()) + 1, requires_grad=True)
    opt = torch.optim.Adam([w], lr=0.05)
    for _ in range(steps):
        opt.zero_grad()
        torch.nn.functional.cross_entropy(x[fit] @ w, y[fit]).backward()
        opt.step()
    with torch.no_grad():
        return float(((x[~fit] @ w).argmax(1) == y[~fit]).float().mean())


def probe(model, processor, samples: int, start: int = 700) -> dict[str, dict[str, float]]:
    """{stage: {field: held-out accuracy}} over the object patches of `samples` test images: what
    the patch shows (PATCH_FIELDS) and where it is (PLACE_FIELDS)."""
    layers = model.config.text_config.num_hidden_layers
    picks = sorted({0, 2, layers // 2, layers - 1})
    stages = {"tower": [], "projector": [], **{f"decoder layer {i}": [] for i in picks}}
    labels = {f: [] for f in PATCH_FIELDS + PLACE_FIELDS}
    places = {f: torch.from_numpy(v) for f, v in patch_places().items()}
    with torch.no_grad():
        for i in range(start, start + samples):
            s = syn.make_sample("test", i)
            x = processor(images=s.image, text=embedded.prompt(s.question), return_tensors="pt")
            out = model(**x, output_hidden_states=True)
            feats, proj = visual_features(model, processor, s.image)
            is_image = x["input_ids"][0] == model.config.image_token_id
            stages["tower"].append(feats)
            stages["projector"].append(proj)
            for layer in picks:
                stages[f"decoder layer {layer}"].append(out.hidden_states[layer + 1][0][is_image])
            for f, v in syn.patch_labels(s.objects).items():
                labels[f].append(torch.from_numpy(v))
            for f, v in places.items():
                labels[f].append(v)
    labels = {f: torch.cat(v) for f, v in labels.items()}
    on_object = labels["color"] > 0
    return {stage: {f: linear_probe(torch.cat(rows)[on_object], labels[f][on_object]) for f in labels}
            for stage, rows in stages.items()}


def blank_like(image: Image.Image, seed: int = 0) -> Image.Image:
    """An empty canvas of the image's background shade (its median pixel) with the scene's noise."""
    shade = float(np.median(np.asarray(image, dtype=np.float32)))
    noise = np.random.default_rng(seed).normal(0, 6, (image.height, image.width, 3))
    return Image.fromarray(np.clip(shade + noise, 0, 255).astype(np.uint8))


@torch.no_grad()
def answer(model, tokenizer, question: str, visual: torch.Tensor, positions: torch.Tensor,
           new_tokens: int = 3, n_image: int = syn.NUM_PATCHES) -> str:
    """Greedy answer with `visual` (m, dim) projected tokens at image slots `positions` (m,) of the
    image's `n_image`; the text after the image starts where the whole image would end."""
    ids = tokenizer(embedded.prompt(question), return_tensors="pt")["input_ids"][0]
    first = int((ids == model.config.image_token_id).nonzero().flatten()[0])  # the prompt's one <image>
    before, after = ids[:first], ids[first + 1:]
    embed = model.get_input_embeddings()
    emb = torch.cat([embed(before), visual, embed(after)])
    pos = torch.cat([torch.arange(first), first + positions, first + n_image + torch.arange(len(after))])
    out = []
    for _ in range(new_tokens):
        h = model.model.language_model(inputs_embeds=emb[None], position_ids=pos[None]).last_hidden_state
        t = int(model.lm_head(h[0, -1]).argmax())
        if t == tokenizer.eos_token_id:
            break
        out.append(t)
        emb = torch.cat([emb, embed(torch.tensor([t]))])
        pos = torch.cat([pos, pos[-1:] + 1])
    return tokenizer.decode(out, skip_special_tokens=True)


def oracle_tokens(s: syn.Sample, tokens: int) -> np.ndarray:
    """The oracle control's `tokens` patches (Sample.patch_priority's first), in image order."""
    return np.sort(np.argsort(-s.patch_priority(), kind="stable")[:tokens])


def with_empty(filled: torch.Tensor, keep: np.ndarray, order: np.ndarray, k: int):
    """(visual tokens, their image slots): the kept slots plus the first `k` of `order` (removed
    slots), read from `filled` (the kept slots' own features, the rest the empty canvas's)."""
    slots = torch.from_numpy(np.sort(np.concatenate([keep, order[:k]])))
    return filled[slots], slots


CONDITIONS = ("full", "oracle kept", "oracle kept+fill", "oracle kept+as many", "oracle packed", "random kept",
              "random kept+fill", "blank")


def fill(model, processor, tokens: int, samples: int, start: int = 600, seed: int = 0):
    """{condition: [(sample, prediction, score)]} on the first `samples` short-answer test samples
    from `start` on (those tools.fidelity uses)."""
    rng, extra = np.random.default_rng(seed), np.random.default_rng(seed + 1)  # (the second: "as many")
    data = syn.short_answer_samples("test", start, samples)
    out = {c: [] for c in CONDITIONS}
    for s in data:
        _, proj = visual_features(model, processor, s.image)
        _, empty = visual_features(model, processor, blank_like(s.image))
        n = len(proj)
        every = torch.arange(n)
        oracle = torch.from_numpy(oracle_tokens(s, tokens))
        chance = torch.from_numpy(rng.permutation(n)[:tokens]).sort().values
        # (visual tokens, their image slots, the image's length: the text starts after it)
        runs = {"full": (proj, every, n), "blank": (empty[chance], chance, n),
                "oracle packed": (proj[oracle], torch.arange(tokens), tokens)}
        for name, keep in (("oracle", oracle), ("random", chance)):
            filled = empty.clone()
            filled[keep] = proj[keep]
            runs[f"{name} kept"] = (proj[keep], keep, n)
            runs[f"{name} kept+fill"] = (filled, every, n)
            if name == "oracle":  # as many empty-canvas tokens again, at random removed positions
                order = extra.permutation(np.setdiff1d(np.arange(n), keep.numpy()))
                runs["oracle kept+as many"] = (*with_empty(filled, keep.numpy(), order, tokens), n)
        for c in CONDITIONS:
            visual, positions, n_image = runs[c]
            pred = answer(model, processor.tokenizer, s.question, visual, positions, n_image=n_image)
            out[c].append((s, pred, syn.score(s.qtype, pred, s.answer)))
    return out


PADS = (0, 4, 16, 48, 128)


def pad(model, processor, tokens: int, samples: int, pads=PADS, start: int = 600, seed: int = 1):
    """{N: [(sample, prediction, score)]}: the oracle's `tokens` visual tokens at their own
    positions plus N empty-canvas tokens at random removed positions (the first N of one random
    order per sample, so each N adds to the smaller one's), "full" the whole image. An empty token
    shows no object: if "how many" still climbs with N, the model reads its evidence relative to
    how many visual tokens there are."""
    extra = np.random.default_rng(seed)
    out = {"full": [], **{n: [] for n in pads}}
    for s in syn.short_answer_samples("test", start, samples):
        _, proj = visual_features(model, processor, s.image)
        _, empty = visual_features(model, processor, blank_like(s.image))
        n = len(proj)
        keep = oracle_tokens(s, tokens)
        filled = empty.clone()
        filled[keep] = proj[keep]
        order = extra.permutation(np.setdiff1d(np.arange(n), keep))
        runs = {"full": (proj, torch.arange(n)), **{k: with_empty(filled, keep, order, k) for k in pads}}
        for key, (visual, positions) in runs.items():
            pred = answer(model, processor.tokenizer, s.question, visual, positions, n_image=n)
            out[key].append((s, pred, syn.score(s.qtype, pred, s.answer)))
    return out


SINK_PARTS = ("<s>", "object", "background", "text")


@torch.no_grad()
def read_prompt(processor, s: syn.Sample) -> tuple[dict, torch.Tensor, torch.Tensor]:
    """The sample's scene as words where its image would be (a language stage's reading form):
    the model's inputs, and masks of the words naming the question's objects and of the other
    words of the description."""
    words = syn.describe(s.objects).split()  # each object's phrase, ";" between them
    about = [i in s.relevant and w != ";" for i, o in enumerate(s.objects)
             for w in o.phrase().split() + [";"]][:len(words)]
    x = processor.tokenizer("USER: " + " ".join(words) + f" {s.question} ASSISTANT:", return_tensors="pt")
    n = x["input_ids"].shape[1]
    scene = torch.zeros(n, dtype=torch.bool)
    scene[2:2 + len(words)] = True  # after <s> and USER:
    on_object = torch.zeros(n, dtype=torch.bool)
    on_object[2:2 + len(words)] = torch.tensor(about)
    return x, on_object, scene & ~on_object


@torch.no_grad()
def sinks(model, processor, samples: int, start: int = 600, read: bool = False) -> np.ndarray:
    """(layers, 4) the last prompt token's attention on SINK_PARTS, mean over heads and the first
    `samples` short-answer test samples from `start` on (needs eager attention). With `read` the
    scene is given in words (read_prompt): "object" is then the words naming the question's
    objects and "background" the description's other words."""
    rows = []
    for s in syn.short_answer_samples("test", start, samples):
        if read:
            x, on_object, off_object = read_prompt(processor, s)
        else:
            x = processor(images=s.image, text=embedded.prompt(s.question), return_tensors="pt")
            is_visual = x["input_ids"][0] == model.config.image_token_id
            on_object = is_visual.clone()
            on_object[is_visual] = torch.from_numpy(s.patch_objectness() > 0)
            off_object = is_visual & ~on_object
        attentions = model(**x, output_attentions=True).attentions
        text = ~(on_object | off_object)
        text[0] = False
        per_layer = []
        for a in attentions:
            last = a[0, :, -1].mean(0)  # over heads: (sequence,)
            per_layer.append((float(last[0]), float(last[on_object].sum()),
                              float(last[off_object].sum()), float(last[text].sum())))
        rows.append(per_layer)
    return np.mean(rows, axis=0)


# the forms of an attribute question, by what names its object (words only that form's question has)
LOOKUP_FORMS = {"place": "what shape is at the", "colour and place": "object at the",
                "shape and place": "what color is the", "colour and shape": "what size is the"}


@torch.no_grad()
def lookup(model, processor, samples: int, start: int = 600) -> tuple[dict[str, np.ndarray], dict[str, float]]:
    """({form: (layers,) mean over `samples` attribute questions of that form of the largest share,
    over heads, of the last prompt token's image attention on the question's object}, {form: the
    object's mean share of the image's patches}): LOOKUP_FORMS, test samples from `start` on (needs
    eager attention)."""
    shares = {f: [] for f in LOOKUP_FORMS}
    chance = {f: [] for f in LOOKUP_FORMS}
    i = start
    while min(map(len, shares.values())) < samples:
        s = syn.make_sample("test", i, "attribute")
        i += 1
        form = next(f for f, words in LOOKUP_FORMS.items() if words in s.question)
        if len(shares[form]) == samples:
            continue
        x = processor(images=s.image, text=embedded.prompt(s.question), return_tensors="pt")
        is_visual = x["input_ids"][0] == model.config.image_token_id
        target = torch.from_numpy(s.objects[s.relevant[0]].patch_pixels > 0)
        attentions = model(**x, output_attentions=True).attentions
        image = [a[0, :, -1][:, is_visual] for a in attentions]  # per layer (heads, patches)
        shares[form].append([float((a[:, target].sum(1) / a.sum(1)).max()) for a in image])
        chance[form].append(float(target.float().mean()))
    return {f: np.mean(v, axis=0) for f, v in shares.items()}, {f: float(np.mean(v)) for f, v in chance.items()}


DEPTHS = (0, 1, 2, 4, 8, 12)


def depth(model_dir: str, tokens: int, samples: int, depths=DEPTHS) -> dict[str, dict[str, float]]:
    """{series: {question type or "all": accuracy}}: the baseline, then the oracle and random
    controls keeping `tokens` visual tokens from each decoder layer K in `depths` on (K = 0: before
    the decoder), run by tools.fidelity on its samples. The budget given to a K >= 1 control is the
    equal-token one under which it keeps `tokens` after layer K."""
    from methods.base import tokens_after_layer
    from tools import fidelity

    data = syn.short_answer_samples("test", 600, samples)
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(embedded.EMBEDDED_DIR if model_dir == "embedded" else model_dir)
    layers, visual = config.text_config.num_hidden_layers, syn.NUM_PATCHES
    out = {}
    for k in (d for d in depths if d < layers):
        budget = round((tokens * (layers - k) + k * visual) / layers)
        if k and tokens_after_layer(budget, k, layers, visual) != tokens:
            raise SystemExit(f"depth: no budget keeps {tokens} tokens after layer {k} of {layers}")
        _, _, records = fidelity.run_inline(model_dir, budget, samples,
                                            ["oracle", "random"] if k == 0 else [f"oracle:K={k}", f"random:K={k}"])
        for series, rows in records.items():
            if series == "baseline" and k:
                continue
            scores = [r.score for r in rows]
            table = {t: float(np.mean([v for v, s in zip(scores, data) if s.qtype == t]))
                     for t in sorted({s.qtype for s in data})}
            out[series if k or series == "baseline" else f"{series}[K=0]"] = {"all": float(np.mean(scores)), **table}
    return out


def parse_pads(text: str) -> tuple[int, ...]:
    """'0,4,16' -> (0, 4, 16)."""
    try:
        return tuple(int(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"--pads {text!r}: whole numbers separated by commas, e.g. 0,4,16") from None


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="check", required=True)
    p = sub.add_parser("probe", help="where along the model an object patch's colour, shape, letter, place are lost")
    p.add_argument("--model", default=str(embedded.EMBEDDED_DIR))
    p.add_argument("--samples", type=int, default=80)
    f = sub.add_parser("fill", help="missing evidence or a shorter sequence?")
    f.add_argument("--model", default=str(embedded.EMBEDDED_DIR))
    f.add_argument("--tokens", type=int, default=16)
    f.add_argument("--samples", type=int, default=120)
    k = sub.add_parser("sinks", help="where the question's attention goes: <s>, objects, background, text")
    k.add_argument("--model", default=str(embedded.EMBEDDED_DIR))
    k.add_argument("--samples", type=int, default=40)
    k.add_argument("--read", action="store_true",
                   help="give the scene in words where the image would be (a language stage's reading form)")
    q = sub.add_parser("pad", help="the oracle's tokens plus N empty-canvas tokens: does the evidence count, or its share?")
    q.add_argument("--model", default=str(embedded.EMBEDDED_DIR))
    q.add_argument("--tokens", type=int, default=16)
    q.add_argument("--samples", type=int, default=120)
    q.add_argument("--pads", type=parse_pads, default=PADS,
                   help="numbers of empty-canvas tokens added, comma-separated (default %(default)s)")
    u = sub.add_parser("lookup", help="does a question's attention find its object by place, colour, shape?")
    u.add_argument("--model", default=str(embedded.EMBEDDED_DIR))
    u.add_argument("--samples", type=int, default=25, help="questions per form")
    d = sub.add_parser("depth", help="the oracle's and random's tokens kept from decoder layer K on")
    d.add_argument("--model", default=str(embedded.EMBEDDED_DIR))
    d.add_argument("--tokens", type=int, default=16)
    d.add_argument("--samples", type=int, default=120)
    a = ap.parse_args(argv)
    if a.check in ("fill", "depth") and not 1 <= a.tokens <= syn.NUM_PATCHES:
        ap.error(f"--tokens {a.tokens}: must be from 1 to {syn.NUM_PATCHES}")
    if a.check == "depth":
        table = depth(a.model, a.tokens, a.samples)
        types = [t for t in next(iter(table.values())) if t != "all"]
        print(f"{a.model}: {a.tokens} visual tokens kept from decoder layer K on, {a.samples} samples; accuracy %")
        print(f"{'series':16s} {'all':>5s} " + " ".join(f"{t[:9]:>9s}" for t in types))
        for series, row in table.items():
            print(f"{series:16s} {100 * row['all']:5.1f} " + " ".join(f"{100 * row[t]:9.0f}" for t in types))
        return
    if a.check == "pad" and not all(0 <= k <= syn.NUM_PATCHES - a.tokens for k in a.pads):
        raise SystemExit(f"pad: --pads {','.join(map(str, a.pads))}: each from 0 to "
                         f"{syn.NUM_PATCHES - a.tokens} (the positions the oracle's {a.tokens} tokens leave)")
    model, processor = load(a.model, "eager" if a.check in ("sinks", "lookup") else None)
    if a.check == "lookup":
        table, chance = lookup(model, processor, a.samples)
        print(f"{a.model}: the last prompt token's image attention on the question's object, the most any "
              f"head puts there, mean over {a.samples} attribute questions per form; by layer")
        layers = len(next(iter(table.values())))
        print(f"{'object named by':17s} {'uniform':>7s} " + " ".join(f"{i:>4d}" for i in range(layers)) + "  peak")
        for form, row in table.items():
            print(f"{form:17s} {chance[form]:7.2f} " + " ".join(f"{v:4.2f}" for v in row)
                  + f"  {row.max():.2f} (layer {int(row.argmax())})")
        return
    if a.check == "sinks":
        table = sinks(model, processor, a.samples, read=a.read)
        print(f"{a.model}: the last prompt token's attention, mean over heads and {a.samples} samples"
              + ("; the scene read as words" if a.read else ""))
        print("layer " + " ".join(f"{p:>10s}" for p in SINK_PARTS))
        for i, row in enumerate(table):
            print(f"{i:5d} " + " ".join(f"{v:10.2f}" for v in row))
        return
    if a.check == "probe":
        table = probe(model, processor, a.samples)
        print(f"{a.model}: linear probe of object patches, held-out accuracy ({a.samples} images)")
        print(f"{'stage':18s} " + " ".join(f"{f:>7s}" for f in PATCH_FIELDS + PLACE_FIELDS))
        for stage, acc in table.items():
            print(f"{stage:18s} " + " ".join(f"{acc[f]:7.2f}" for f in PATCH_FIELDS + PLACE_FIELDS))
        return
    if a.check == "pad":
        out = {(k if k == "full" else f"oracle + {k} empty"): v
               for k, v in pad(model, processor, a.tokens, a.samples, a.pads).items()}
        title = f"{a.tokens} oracle tokens plus N empty-canvas tokens"
    else:
        out = fill(model, processor, a.tokens, a.samples)
        title = f"{a.tokens} of {syn.NUM_PATCHES} visual tokens"
    types = sorted({s.qtype for s, _, _ in out["full"]})
    print(f"{a.model}: {title}, {a.samples} samples; accuracy %")
    print(f"{'condition':18s} {'all':>5s} " + " ".join(f"{t[:9]:>9s}" for t in types))
    for c, rows in out.items():
        by = {t: [v for s, _, v in rows if s.qtype == t] for t in types}
        print(f"{c:18s} {100 * np.mean([v for *_, v in rows]):5.1f} "
              + " ".join(f"{100 * np.mean(by[t]):9.0f}" for t in types))


if __name__ == "__main__":
    main()
