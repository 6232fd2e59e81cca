"""Train the embedded tiny LLaVA from scratch on the synthetic benchmark's train split.

    python -m tools.train_embedded --out build/train-embedded --steps 6000
    python -m tools.train_embedded --recipe neutral --out build/neutral-embedded   # issue 11's recipe

`--recipe neutral` (the miniature that ranks methods for the reasons real models do) drops every
token-dropout pattern (no visual dropout, no oracle-like subsets: nothing a method or control
selects is ever shown in training) and adds, all training-only:
- position gaps: a fraction of conversations keep every visual token but spread their position
  ids over a longer range (sorted random positions), the text after the image continuing past it,
  as a pruned prompt's positions do; no token is removed, so no selection rule is taught;
- a CLIP-like image-level objective on the tower's last-layer CLS (post-layernorm pooled output:
  which colours, shapes and letters the image holds), so that the CLS query at the feature layer
  is trained as in CLIP, through the last layer;
- a grounding loss: at decoder layer --ground-layer (2), the state of each question's last token
  scores the visual tokens (and a "none" slot) through two small projections, with the
  question's objects' pixels per patch as the target distribution ("none" for a "no" answer or a
  count of zero; descriptions left out). It ties the words that name an object to its patches,
  the binding the previous model lacked (it answered where/is there/how many from the image
  alone);
- binding question forms weighed up (count, exist, position x2) and every answer turn weighing
  the same (--turn-mean).
`--canvas-sides 72,80,...` draws each batch's canvas
width and height from the list: the 3x3 grid stretches, objects keep their pixel sizes, so the
number of background tokens varies from batch to batch while every token of the image is kept.
A decoder that has only seen 144 tokens reads its evidence as shares of the image (it answers
"three" from the one square's patches when the background is gone); one that has seen the
background's share vary must read it in absolute terms. No method's selection is mimicked: no
token of an image is ever removed, and no image is downsampled (the pooling control's inputs).

Two stages, both resumable from `<out>/ckpt.pt` (written every --ckpt-every steps; rerun the same
command after an interruption):
1. vision: the CLIP tower alone with auxiliary per-patch heads (colour, shape, letter of the
   object covering the patch). Without them the visual features collapse and the decoder
   answers from the language prior.
2. full: every weight, next-token cross-entropy on the answers of multi-turn conversations
   (several independent questions about one image; the first turn has exactly the evaluation
   prompt), plus the auxiliary loss at a lower weight. From full step --drop-from on, half of
   the conversations lose a random fraction of their visual tokens (all of them 5 % of the time;
   the rest keep their original position ids): without this the model, having only ever seen all
   144 tokens, breaks whenever any token is pruned (even the oracle's), and answers gibberish
   rather than its language prior when none is left.
`--proj-aux-weight` puts a second set of the per-patch heads on the projector's output. Without it
the neutral recipe's projector lost colour (a linear probe of an object patch's colour: 1.00 on the
tower's features, 0.65 after the projector, 0.41 at the last decoder layer; the shipped model 1.00
throughout), and the candidate answered "orange" for every colour. With the projector mended the
decoder still named one colour for every object for 600 steps (presumably because the circuit
that reads an object's colour never formed while the projector dropped it, and neither of its
halves had a gradient without the other): `--object-weight` adds heads that read
a question's state at decoder layer --object-layer (8) and name the colour, shape, size and letter
of the one object the question is about, so that the question's state must gather it.
`--text-only F` asks a fraction F of the conversations with no image (LLaVA-1.5's instruction mix
has text-only conversations too): their answers teach the language prior, so that a prompt with
no visual token left is answered from it rather than with gibberish.
`--where-weight` makes every patch name its cell of the 3 x 3 grid from the tower's features and
the projector's output, so that a visual token carries its own place, as a CLIP patch feature does.
LLaVA's own order of stages: `--language-stage` trains the decoder alone on conversations that
read their scene as words where the image would be (with `--all-tokens` every token is a label, as
a language model is pretrained); `--vision-from DIR` takes another model's tower, and `--freeze`
keeps parts fixed (LLaVA-1.5 aligns the projector alone, then tunes projector and decoder, the tower
always frozen); `--text-scenes F` mixes the reading form into an image stage. Two options aimed at
the attention sink (the candidate's question parks its attention on the background, not on <s>):
`--textures F` paints a fraction of the images on textured grey backgrounds, and `--sink-weight`
asks every head from `--sink-layer` on to keep `--sink-floor` of each query's attention on <s>
(a training-only prior; eager attention). Measured on the candidate: neither made pruned prompts
work, and the sink prior moved the attention onto <s> without helping them (the notes of issue 11).
The auxiliary heads are training-only and are not saved with the model; a continued run
(`--init-from`) starts them fresh, and their first large losses shake the model for 100-200
steps, unless `--carry-heads` takes them from the checkpoint beside the directory it continues.
At the end the model, processor and a training record are written to `<out>/final/` in float16.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import random
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from harness.data import synthetic as syn
from harness.models import embedded


class AuxHeads(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.heads = nn.ModuleDict({
            "color": nn.Linear(dim, len(syn.PATCH_COLOR_CLASSES)),
            "shape": nn.Linear(dim, len(syn.PATCH_SHAPE_CLASSES)),
            "letter": nn.Linear(dim, len(syn.PATCH_LETTER_CLASSES)),
        })

    def loss(self, feats: torch.Tensor, labels: dict[str, torch.Tensor]) -> torch.Tensor:
        return sum(F.cross_entropy(h(feats).flatten(0, 1).float(), labels[k].flatten())
                   for k, h in self.heads.items())


def patch_cells(size: tuple[int, int]) -> np.ndarray:
    """(patches,) each patch's cell of the 3 x 3 grid (row * 3 + column) on a (width, height) canvas,
    the grid stretched over it as render_scene places the objects; the cell of the patch's centre."""
    width, height = size
    cell_w, cell_h = width // syn.GRID, height // syn.GRID
    centre = np.arange(0, max(width, height), syn.PATCH) + syn.PATCH // 2
    cols = np.minimum(centre[:width // syn.PATCH] // cell_w, syn.GRID - 1)
    rows = np.minimum(centre[:height // syn.PATCH] // cell_h, syn.GRID - 1)
    return (rows[:, None] * syn.GRID + cols[None, :]).flatten().astype(np.int64)


class WhereHeads(nn.Module):
    """Each patch names its grid cell from the tower's features and from the projector's output, so
    that a visual token carries where it is, as a CLIP patch feature does (without it the tower kept
    an object patch's cell poorly: a linear probe read 0.37 at the tower, 0.26 at the projector, and
    the decoder took the cell from the sequence around the object, which pruning removes)."""

    def __init__(self, vision_dim: int, text_dim: int):
        super().__init__()
        self.tower = nn.Linear(vision_dim, syn.GRID * syn.GRID)
        self.projector = nn.Linear(text_dim, syn.GRID * syn.GRID)

    def loss(self, feats: torch.Tensor, image: torch.Tensor | None, cells: torch.Tensor,
             on_object: torch.Tensor | None = None) -> torch.Tensor:
        """Cross-entropy of every patch's cell from the tower's features (but for a frozen tower,
        feats None) and (but in the vision-only stage, image None) from the projector's output.
        With `on_object` (B, patches: the patches an object covers) the object patches and the
        background ones weigh half each: a plain mean is the background's (most patches), and
        the candidate's heads then read the cell of 99 % of background patches and 14-22 % of
        object patches, whose content had overwritten their place."""
        target = cells.expand(len(feats if feats is not None else image), -1)
        if on_object is None:
            weight = torch.full(target.shape, 1.0 / target.numel(), device=target.device)
        else:
            obj = on_object.float()
            weight = 0.5 * obj / obj.sum().clamp(min=1) + 0.5 * (1 - obj) / (1 - obj).sum().clamp(min=1)
        return sum((F.cross_entropy(h(x).flatten(0, 1).float(), target.flatten(), reduction="none")
                    * weight.flatten()).sum()
                   for h, x in ((self.tower, feats), (self.projector, image)) if x is not None)


class ImageHead(nn.Module):
    """CLIP-like image-level target on the tower's pooled CLS: which colours, shapes and letters
    are present (multi-label)."""
    LABELS = (*syn.COLORS, *syn.SHAPES, *(f"letter-{c}" for c in syn.LETTERS))

    def __init__(self, dim: int):
        super().__init__()
        self.head = nn.Linear(dim, len(self.LABELS))

    @classmethod
    def targets(cls, objects) -> np.ndarray:
        present = {o.color for o in objects if o.kind == "shape"} | {o.shape for o in objects if o.kind == "shape"}
        present |= {f"letter-{o.letter}" for o in objects if o.kind == "letter"}
        return np.array([name in present for name in cls.LABELS], dtype=np.float32)

    def loss(self, pooled: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return F.binary_cross_entropy_with_logits(self.head(pooled).float(), targets)


class Grounding(nn.Module):
    """Training-only: the state of a question's last token at one decoder layer scores the visual
    tokens and a "none" slot; cross-entropy against where the question's objects are."""

    def __init__(self, dim: int, key_dim: int = 64):
        super().__init__()
        self.q, self.k = nn.Linear(dim, key_dim), nn.Linear(dim, key_dim)
        self.none = nn.Parameter(torch.zeros(key_dim))

    def loss(self, hidden: torch.Tensor, visual_rows: torch.Tensor, queries: torch.Tensor,
             targets: torch.Tensor) -> torch.Tensor:
        """hidden (B, S, D); visual_rows (B, M); queries (n, 2) = (batch row, position);
        targets (n, M + 1) distributions over the visual tokens and none (last)."""
        if len(queries) == 0:
            return hidden.new_zeros(())
        vis = torch.gather(hidden, 1, visual_rows[..., None].expand(-1, -1, hidden.shape[2]))  # (B, M, D)
        keys = self.k(vis)
        keys = torch.cat([keys, self.none.expand(keys.shape[0], 1, -1)], dim=1)  # (B, M + 1, kd)
        q = self.q(hidden[queries[:, 0], queries[:, 1]])  # (n, kd)
        logits = (keys[queries[:, 0]] @ q[..., None])[..., 0].float() / keys.shape[-1] ** 0.5
        return -(targets * logits.log_softmax(-1)).sum(-1).mean()


class ObjectHeads(nn.Module):
    """Training-only: from the state of a question's last token at one decoder layer, the colour,
    shape, size and letter of the one object the question is about (questions about none or
    several objects are left out). It writes what the question's object looks like into the
    question's state, so that the answer can read it."""
    FIELDS = {"color": syn.PATCH_COLOR_CLASSES, "shape": syn.PATCH_SHAPE_CLASSES,
              "size": ("none", *syn.SIZES), "letter": syn.PATCH_LETTER_CLASSES}

    def __init__(self, dim: int):
        super().__init__()
        self.heads = nn.ModuleDict({k: nn.Linear(dim, len(v)) for k, v in self.FIELDS.items()})

    @classmethod
    def targets(cls, hits: list[int], objects) -> list[int]:
        """Class ids per field, or -100 (ignored) unless the question is about exactly one object."""
        if len(hits) != 1:
            return [-100] * len(cls.FIELDS)
        o = objects[hits[0]]
        return [classes.index(getattr(o, k) or "none") for k, classes in cls.FIELDS.items()]

    def loss(self, hidden: torch.Tensor, queries: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """hidden (B, S, D); queries (n, 2) = (batch row, position); targets (n, fields)."""
        keep = targets[:, 0] >= 0
        if not bool(keep.any()):
            return hidden.new_zeros(())
        state = hidden[queries[keep, 0], queries[keep, 1]]
        return sum(F.cross_entropy(h(state).float(), targets[keep, i]) for i, h in enumerate(self.heads.values()))


def grounding_target(question: str, answer: str, hits: list[int], objects) -> np.ndarray | None:
    """Where a question's objects are, as a distribution over the patches and none (last), or
    None for a question about the whole image (a description)."""
    if question.startswith("describe"):
        return None
    n = len(objects[0].patch_pixels)  # the canvas's patches
    out = np.zeros(n + 1, dtype=np.float32)
    rel = sum((objects[i].patch_pixels for i in hits), np.zeros(n, np.float32))
    if answer == "no" or rel.sum() == 0:
        out[-1] = 1.0
    else:
        out[:-1] = rel / rel.sum()
    return out


def position_gaps(step: int, mask: torch.Tensor, is_image: torch.Tensor, seed: int, p: float,
                  stretch: float = 2.0) -> torch.Tensor | None:
    """(B, S) position ids: with probability p a row keeps every visual token but places them at
    sorted random positions within a range up to `stretch` times longer, the text after continuing
    past that range; other rows count 0, 1, 2, ... None when p is 0."""
    if p <= 0:
        return None
    g = torch.Generator().manual_seed(seed * 9_000_011 + step)
    B, S = mask.shape
    pos = torch.arange(S).expand(B, S).clone()
    for b in range(B):
        if float(torch.rand((), generator=g)) >= p or not bool(is_image[b].any()):
            continue
        rows = is_image[b].nonzero().flatten()
        m, start = len(rows), int(rows[0])
        span = m + int(float(torch.rand((), generator=g)) * (stretch - 1) * m)
        slots = torch.randperm(span, generator=g)[:m].sort().values
        pos[b, rows] = start + slots
        pos[b, rows[-1] + 1:] = torch.arange(S - int(rows[-1]) - 1) + start + span
    return pos


def pixels(images) -> torch.Tensor:
    """Same normalisation as the processor (checked against it at start-up)."""
    x = np.stack([np.asarray(im, dtype=np.float32) / 255.0 for im in images])
    x = (x - np.array(embedded.CLIP_MEAN, np.float32)) / np.array(embedded.CLIP_STD, np.float32)
    return torch.from_numpy(x).permute(0, 3, 1, 2).contiguous()


def encode_conversation(tok, turns, image_token_id, n_image, turn_mean: bool = False):
    """Token ids, labels (answers and their </s> only) and label weights of a multi-turn LLaVA-1.5
    conversation. Weights are 1 per answer token, or 1/len per answer token with `turn_mean`
    (every turn then weighs the same, whether its answer is one word or a description)."""
    return encode_turns(tok, turns, image_token_id, n_image, turn_mean)[:3]


def encode_turns(tok, turns, image_token_id, n_image, turn_mean: bool = False, scene: str | None = None,
                 all_tokens: bool = False):
    """encode_conversation, plus the position of each turn's last prompt token (its "ASSISTANT:",
    whose state predicts the answer's first word). With `scene` (a description in words) the first
    turn holds it where the image would be: the conversation reads the scene instead of seeing it.
    With `all_tokens` every token after <s> but the image's is a label weighing 1, as in a language
    model's pretraining (`turn_mean` then has no effect)."""
    vocab = tok.get_vocab()
    ids, labels, weights, queries = [tok.bos_token_id], [-100], [0.0], []

    def words(text):
        return [vocab[w] for w in text.split()]

    for t, (q, a) in enumerate(turns):
        shown = (words(scene) if scene else [image_token_id] * n_image) if t == 0 else []
        head = words("USER:") + shown + words(q + " ASSISTANT:")
        ans = words(a) + [tok.eos_token_id]
        ids += head
        queries.append(len(ids) - 1)
        ids += ans
        if all_tokens:
            labels += [-100 if i == image_token_id else i for i in head] + ans
            weights += [0.0 if i == image_token_id else 1.0 for i in head] + [1.0] * len(ans)
        else:
            labels += [-100] * len(head) + ans
            weights += [0.0] * len(head) + [1.0 / len(ans) if turn_mean else 1.0] * len(ans)
    return ids, labels, weights, queries


def visual_dropout(step: int, batch: int, num_visual: int, seed: int, p: float = 0.5,
                   p_all: float = 0.05) -> torch.Tensor:
    """(batch, M) keep masks: each row, with probability p, keeps a uniform-random fraction of its
    visual tokens (none with probability p_all); otherwise all of them."""
    g = torch.Generator().manual_seed(seed * 1_000_003 + step)
    keep = torch.ones(batch, num_visual, dtype=torch.bool)
    for b in range(batch):
        if torch.rand((), generator=g) < p:
            frac = 0.0 if torch.rand((), generator=g) < p_all / p else float(torch.rand((), generator=g))
            n = round(frac * num_visual)
            keep[b] = False
            keep[b, torch.randperm(num_visual, generator=g)[:n]] = True
    return keep


def object_keep(relevance: np.ndarray, g: torch.Generator) -> torch.Tensor:
    """An oracle-like keep mask: most of the patches that hold the question's objects (each
    object's best-covered patches first), plus a uniform-random fraction of the others."""
    rel = torch.from_numpy(relevance)
    order = rel.argsort(descending=True)[: int((rel > 0).sum())]
    n_rel = len(order)
    keep = torch.zeros(len(rel), dtype=torch.bool)
    if n_rel:
        lo = max(1, (n_rel + 1) // 2)
        keep[order[: int(torch.randint(lo, n_rel + 1, (), generator=g))]] = True
    others = (~keep).nonzero().flatten()
    frac = float(torch.rand((), generator=g)) ** 2  # mostly few extra tokens
    keep[others[torch.randperm(len(others), generator=g)[: round(frac * len(others))]]] = True
    return keep


def canvas_of(step: int, seed: int, sides) -> tuple[int, int]:
    """The (width, height) of one batch's images: each side drawn from `sides` (None: 96 x 96)."""
    if not sides:
        return syn.IMAGE_SIZE, syn.IMAGE_SIZE
    rng = random.Random(f"canvas-{seed}-{step}")
    return rng.choice(sides), rng.choice(sides)


def batch_of(step: int, batch: int, tok, image_token_id: int, seed: int, *, drop: bool = False,
             object_drop: float = 0.0, type_weights=None, turn_mean: bool = False, max_turns: int = 4,
             size: tuple[int, int] = (syn.IMAGE_SIZE, syn.IMAGE_SIZE), text_only: float = 0.0,
             text_scenes: float = 0.0, all_tokens: bool = False, textures: float = 0.0, attribute_forms=None):
    """One training batch, every image on a `size` canvas (width, height). With `drop`, rows lose
    visual tokens (see visual_dropout); of the rows that do, a fraction `object_drop` instead keeps
    an oracle-like subset around the first question's objects (object_keep) and is cut to that one
    question. A fraction `text_only` of the rows (drawn per row) asks its questions with no image,
    as LLaVA-1.5's text-only conversations do: their answers teach the language prior, and they
    have no grounding or object targets (patch["text_only"] marks them). Of the other rows, a
    fraction `text_scenes` reads its scene as words (syn.describe) where the image would be: a
    language model's reading comprehension, no image either (patch["text_only"] marks them too).
    `all_tokens`: every token is a label (encode_turns). A fraction `textures` of the images (drawn
    per row) has a textured background (syn.textured_background) under the same objects.
    `attribute_forms` skews the forms of the attribute questions (syn.ask)."""
    if drop and tuple(size) != (syn.IMAGE_SIZE, syn.IMAGE_SIZE):
        raise ValueError(f"visual dropout needs the {syn.IMAGE_SIZE} x {syn.IMAGE_SIZE} canvas, got {size}")
    g_tex = torch.Generator().manual_seed(seed * 4_000_037 + step)
    textured = [textures > 0 and float(torch.rand((), generator=g_tex)) < textures for _ in range(batch)]
    convs = [syn.make_conversation(seed * 10_000_000 + step * batch + b, max_turns=max_turns,
                                   type_weights=type_weights, size=size, texture=textured[b],
                                   attribute_forms=attribute_forms) for b in range(batch)]
    n_image = (size[0] // syn.PATCH) * (size[1] // syn.PATCH)
    g_text = torch.Generator().manual_seed(seed * 5_000_011 + step)
    blind = [text_only > 0 and float(torch.rand((), generator=g_text)) < text_only for _ in range(batch)]
    g_read = torch.Generator().manual_seed(seed * 6_000_007 + step)
    read = [text_scenes > 0 and not blind[b] and float(torch.rand((), generator=g_read)) < text_scenes
            for b in range(batch)]
    keep = visual_dropout(step, batch, syn.NUM_PATCHES, seed) if drop else None
    if drop and object_drop > 0:
        g = torch.Generator().manual_seed(seed * 7_000_009 + step)
        for b, (_, turns, objects, relevant) in enumerate(convs):
            if not bool(keep[b].all()) and float(torch.rand((), generator=g)) < object_drop:
                rel = sum((objects[i].patch_pixels for i in relevant[0]), np.zeros(syn.NUM_PATCHES, np.float32))
                keep[b] = object_keep(rel, g)
                convs[b] = (convs[b][0], turns[:1], objects, relevant[:1])
    images, seqs, labs, wts, patch = [], [], [], [], {k: [] for k in ("color", "shape", "letter")}
    image_targets, queries, ground, about = [], [], [], []
    for b, (image, turns, objects, relevant) in enumerate(convs):
        ids, lab, w, qpos = encode_turns(tok, turns, image_token_id, 0 if blind[b] or read[b] else n_image,
                                         turn_mean, syn.describe(objects) if read[b] else None, all_tokens)
        images.append(image)
        seqs.append(ids)
        labs.append(lab)
        wts.append(w)
        for k, v in syn.patch_labels(objects).items():
            patch[k].append(v)
        image_targets.append(ImageHead.targets(objects))
        for (q, a), hits, pos in zip(turns, relevant, qpos):
            target = grounding_target(q, a, hits, objects)
            if target is not None and not (blind[b] or read[b]):
                queries.append((b, pos))
                ground.append(target)
                about.append(ObjectHeads.targets(hits, objects))
    n = max(map(len, seqs))
    input_ids = torch.full((batch, n), tok.pad_token_id)
    labels = torch.full((batch, n), -100)
    weights = torch.zeros((batch, n))
    mask = torch.zeros((batch, n), dtype=torch.long)
    for i, (s, l, w) in enumerate(zip(seqs, labs, wts)):
        input_ids[i, :len(s)] = torch.tensor(s)
        labels[i, :len(l)] = torch.tensor(l)
        weights[i, :len(w)] = torch.tensor(w)
        mask[i, :len(s)] = 1
    patch = {k: torch.from_numpy(np.stack(v)) for k, v in patch.items()}
    patch["image"] = torch.from_numpy(np.stack(image_targets))
    patch["queries"] = torch.tensor(queries, dtype=torch.long).view(-1, 2)
    patch["about"] = torch.tensor(about, dtype=torch.long).view(-1, len(ObjectHeads.FIELDS))
    patch["text_only"] = torch.tensor([a or r for a, r in zip(blind, read)], dtype=torch.bool)
    patch["cell"] = torch.from_numpy(patch_cells(size))
    patch["ground"] = torch.from_numpy(np.stack(ground)) if ground else torch.zeros(0, n_image + 1)
    return pixels(images), input_ids, labels, weights, mask, patch, keep


def vision_features(model, pixel_values, pooled: bool = False):
    """The projector's input (feature layer, CLS dropped); with `pooled` also the last layer's
    post-layernorm CLS (the CLIP-like objective's input). A canvas other than the tower's own size
    gets CLIP's position embeddings interpolated to its patch grid."""
    other = tuple(pixel_values.shape[-2:]) != (syn.IMAGE_SIZE, syn.IMAGE_SIZE)
    out = model.model.vision_tower(pixel_values, output_hidden_states=True, interpolate_pos_encoding=other)
    feats = out.hidden_states[model.config.vision_feature_layer][:, 1:]
    return (feats, out.pooler_output) if pooled else feats


def lm_loss(model, image, input_ids, labels, weights, mask, visual_keep=None, positions=None, states=False,
            attentions=False):
    """Next-token loss on the answers, `image` being the projector's output; with `states` also
    every layer's hidden states, (lm loss, hidden states); with `attentions` also every layer's
    attention probabilities (eager attention), (lm loss, hidden states or None, attentions)."""
    emb = model.get_input_embeddings()(input_ids)
    is_image = input_ids == model.config.image_token_id
    if image is not None:  # (None: no row holds an image)
        emb = emb.masked_scatter(is_image.unsqueeze(-1).expand_as(emb), image.to(emb.dtype))
    if visual_keep is not None:  # drop visual tokens; the rest keep their original positions
        rows = mask.bool().clone()
        rows[is_image] = visual_keep.flatten()  # M image slots per row, in order
        n = int(rows.sum(1).max())
        new_emb = emb.new_zeros(emb.shape[0], n, emb.shape[2])
        new_labels = labels.new_full((labels.shape[0], n), -100)
        new_weights = weights.new_zeros(labels.shape[0], n)
        positions = torch.zeros(labels.shape[0], n, dtype=torch.long)
        new_mask = torch.zeros(labels.shape[0], n, dtype=mask.dtype)
        for b in range(emb.shape[0]):
            idx = rows[b].nonzero().flatten()
            new_emb[b, :len(idx)], new_labels[b, :len(idx)] = emb[b, idx], labels[b, idx]
            new_weights[b, :len(idx)] = weights[b, idx]
            positions[b, :len(idx)], new_mask[b, :len(idx)] = idx, 1
        emb, labels, weights, mask = new_emb, new_labels, new_weights, new_mask
    # (an explicit 2D mask also stops transformers from reading position gaps as packed sequences)
    out = model.model.language_model(inputs_embeds=emb, attention_mask=mask, position_ids=positions,
                                     output_hidden_states=states, output_attentions=attentions)
    hidden = out.last_hidden_state
    logits = model.lm_head(hidden[:, :-1])
    ce = F.cross_entropy(logits.flatten(0, 1).float(), labels[:, 1:].flatten(), ignore_index=-100,
                         reduction="none")
    w = weights[:, 1:].flatten()
    lm = (ce * w).sum() / w.sum()
    if attentions:
        return lm, out.hidden_states, out.attentions
    return (lm, out.hidden_states) if states else lm


def sink_loss(attentions, mask: torch.Tensor, floor: float, first_layer: int) -> torch.Tensor:
    """How far each head's attention on the first token (<s>) falls below `floor`, mean over the
    layers from `first_layer` on, the heads and every real query position after <s>: a trained
    language model's attention sink (Vicuna's heads park most of their attention on <s> from
    layer 2 on), asked of a decoder whose idle heads otherwise spread theirs over every token."""
    rows = mask[:, 1:].float()  # (B, S - 1)
    short = [F.relu(floor - a[:, :, 1:, 0].float()).mean(1) for a in attentions[first_layer:]]  # (B, S - 1) each
    return sum((x * rows).sum() for x in short) / (rows.sum() * len(short))


@torch.no_grad()
def evaluate(model, processor, n_per_type: int = 20, split: str = "val") -> dict[str, float]:
    model.eval()
    scores = {}
    for t, qtype in enumerate(syn.QUESTION_TYPES):
        vals = []
        for i in range(n_per_type):
            s = syn.make_sample(split, i * len(syn.QUESTION_TYPES) + t)
            x = processor(images=s.image, text=embedded.prompt(s.question), return_tensors="pt").to(model.device)
            out = model.generate(**x, max_new_tokens=48, do_sample=False)
            pred = processor.tokenizer.decode(out[0, x["input_ids"].shape[1]:], skip_special_tokens=True)
            vals.append(syn.score(qtype, pred, s.answer))
        scores[qtype] = float(np.mean(vals))
    model.train()
    return scores


HEADS = ("aux", "cls_head", "grounding", "proj_aux", "object_heads", "where")


def carried_heads(init_from: str) -> dict:
    """The training-only heads' states at the end of the run whose final model is `init_from`: its
    checkpoint (`<run>/ckpt.pt`, written when it ended) must exist and have stopped where the model did."""
    final = Path(init_from)
    ckpt = final.parent / "ckpt.pt"
    if not ckpt.exists():
        raise SystemExit(f"--carry-heads: no {ckpt} beside {final} (the heads are only in the run's checkpoint)")
    saved = torch.load(ckpt, weights_only=False, map_location="cpu")
    record = json.loads((final / "training.json").read_text())
    if saved["state"]["step"] != record["steps"]:
        raise SystemExit(f"--carry-heads: {ckpt} is at step {saved['state']['step']}, {final} at step "
                         f"{record['steps']}; they must be the same run's end")
    return {k: saved[k] for k in HEADS if k in saved}


def lr_at(step: int, total: int, peak: float, warmup: int) -> float:
    if step < warmup:
        return peak * (step + 1) / warmup
    p = (step - warmup) / max(1, total - warmup)
    return peak * (0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * min(1.0, p))))


def parse_sides(text: str) -> list[int]:
    """'72,96,120' -> [72, 96, 120]: canvas sides in pixels, multiples of the patch."""
    try:
        sides = [int(v) for v in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"canvas sides must be integers separated by commas, got {text!r}")
    bad = [v for v in sides if v < 3 * syn.PATCH or v % syn.PATCH]
    if bad:
        raise argparse.ArgumentTypeError(
            f"canvas side {bad[0]} of {text!r}: sides must be multiples of {syn.PATCH} from {3 * syn.PATCH} up")
    return sides


PARTS = ("tower", "projector", "decoder")


def parse_parts(text: str) -> list[str]:
    """'tower,decoder' -> ['tower', 'decoder'] (parts of the model, PARTS)."""
    parts = [v for v in text.split(",") if v]
    bad = [v for v in parts if v not in PARTS]
    if bad:
        raise argparse.ArgumentTypeError(f"unknown part {bad[0]!r} in {text!r}; allowed: {', '.join(PARTS)}")
    return parts


def part_parameters(model, part: str) -> list:
    """The parameters of one of PARTS (the decoder: embeddings, layers, final norm and LM head)."""
    if part == "tower":
        return list(model.model.vision_tower.parameters())
    if part == "projector":
        return list(model.model.multi_modal_projector.parameters())
    return list(model.model.language_model.parameters()) + list(model.lm_head.parameters())


def parse_weights(text: str, names=syn.QUESTION_TYPES, what: str = "question type") -> dict[str, float]:
    """'count=2,exist=0.5' -> {'count': 2.0, 'exist': 0.5}, every name one of `names`."""
    out = {}
    for part in text.split(","):
        name, _, value = part.partition("=")
        if name not in names:
            raise argparse.ArgumentTypeError(f"unknown {what} {name!r}; allowed: {', '.join(names)}")
        try:
            out[name] = float(value)
        except ValueError:
            raise argparse.ArgumentTypeError(f"weight of {name!r} must be a number, got {value!r}")
    return out


RECIPES = {
    # the shipped model's first stage (its fine-tune: see the model card)
    "legacy": {},
    # issue 11: no token dropout of any kind; position gaps, the CLS objective and grounding instead
    # (grounding at layer 2, answers token-weighted for the first 1500 full steps: the runs behind the
    # first stage of the embedded model; read at layer 8, the grounding loss stalled near 2.55)
    "neutral": dict(steps=4000, drop_from=None, object_drop=0.0, turn_mean=True, turn_mean_from=1500, pos_gaps=0.5,
                    cls_weight=0.5, ground_weight=1.0, ground_layer=2,
                    type_weights={"count": 2.0, "exist": 2.0, "position": 2.0}),
}


class Batches(torch.utils.data.IterableDataset):
    """The training batches from `start` on, made by DataLoader workers (worker w makes steps
    w, w + W, ...; the loader hands them out in step order). Each batch depends on its step alone,
    so a resumed run sees the same data whatever the worker count."""

    def __init__(self, start: int, total: int, make):
        self.start, self.total, self.make = start, total, make

    def __iter__(self):
        info = torch.utils.data.get_worker_info()
        w, n = (info.id, info.num_workers) if info else (0, 1)
        for step in range(self.start + w, self.total, n):
            yield step, self.make(step)


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--recipe", choices=tuple(RECIPES), default="legacy",
                    help="defaults for the options below (explicit options still win); neutral = issue 11's")
    ap.add_argument("--out", default="build/train-embedded")
    ap.add_argument("--vision-steps", type=int, default=400)
    ap.add_argument("--steps", type=int, default=3000, help="full-model steps")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--aux-weight", type=float, default=0.3)
    ap.add_argument("--tower-layers", type=int, default=None,
                    help="layers of a new model's CLIP tower (default 4; features from the one before last); a "
                         "deeper tower can hand the decoder patches already put in context, as CLIP's 24 layers do")
    ap.add_argument("--weight-decay", type=float, default=0.01,
                    help="AdamW's weight decay (LLaMA's pretraining used 0.1)")
    ap.add_argument("--drop-from", type=lambda v: None if v in ("none", "None") else int(v), default=1800,
                    help="full step from which half the conversations lose random visual tokens (none: never)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--ckpt-every", type=int, default=200)
    ap.add_argument("--eval-every", type=int, default=500)
    ap.add_argument("--eval-n", type=int, default=20, help="validation samples per question type (0: no validation)")
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    ap.add_argument("--init-from", default=None,
                    help="continue from a saved model directory (fine-tuning; no vision stage)")
    ap.add_argument("--carry-heads", action="store_true",
                    help="with --init-from: start the training-only heads where the run that wrote that directory "
                         "ended (its ckpt.pt beside it) instead of fresh, so they do not shake the model at first")
    ap.add_argument("--warmup", type=int, default=300, help="full-stage warm-up steps")
    ap.add_argument("--type-weights", default=None, type=parse_weights,
                    help="question-type mix, e.g. count=2,exist=2 (others 1); default uniform")
    ap.add_argument("--attribute-forms", default=None,
                    type=lambda v: parse_weights(v, syn.ATTRIBUTE_FORMS, "attribute form"),
                    help="mix of the attribute questions' forms, e.g. shape-at=3,size=0.3 (others 1; "
                         f"forms: {', '.join(syn.ATTRIBUTE_FORMS)}); default uniform, as the test split")
    ap.add_argument("--turn-mean", action="store_true",
                    help="every answer turn weighs the same in the loss (default: every token)")
    ap.add_argument("--turn-mean-from", type=int, default=0,
                    help="with --turn-mean: the full step from which it applies (tokens weigh the same before)")
    ap.add_argument("--object-drop", type=float, default=0.0,
                    help="fraction of the dropped rows that keep an oracle-like subset instead")
    ap.add_argument("--pos-gaps", type=float, default=0.0,
                    help="fraction of conversations whose visual tokens get gaps in their position ids")
    ap.add_argument("--proj-aux-weight", type=float, default=0.0,
                    help="weight of the per-patch heads on the projector's output (full stage): the projector "
                         "must pass on the colour, shape and letter the tower sees")
    ap.add_argument("--object-weight", type=float, default=0.0,
                    help="weight of the object heads: a question's state at --object-layer names the colour, "
                         "shape, size and letter of the one object it is about")
    ap.add_argument("--object-layer", type=int, default=8, help="decoder layer whose output the object heads read")
    ap.add_argument("--where-weight", type=float, default=0.0,
                    help="weight of the where heads: every patch names its grid cell from the tower's features "
                         "(both stages) and the projector's output (full stage), as CLIP patch features carry place")
    ap.add_argument("--where-balance", action="store_true",
                    help="the where heads' object patches and background patches weigh half each (a plain mean is "
                         "the background's, and object patches then lose their place)")
    ap.add_argument("--sink-weight", type=float, default=0.0,
                    help="weight of the sink prior: every head from --sink-layer on keeps at least --sink-floor of "
                         "each query's attention on <s> (eager attention in training)")
    ap.add_argument("--sink-floor", type=float, default=0.5, help="the sink prior's share of attention on <s>")
    ap.add_argument("--sink-layer", type=int, default=2, help="the first decoder layer the sink prior applies to")
    ap.add_argument("--cls-weight", type=float, default=0.0, help="weight of the CLIP-like CLS objective")
    ap.add_argument("--ground-weight", type=float, default=0.0, help="weight of the grounding loss")
    ap.add_argument("--ground-layer", type=int, default=8, help="decoder layer whose output the grounding loss reads")
    ap.add_argument("--canvas-sides", type=parse_sides, default=None,
                    help="e.g. 72,80,88,96,104,112,120: each batch's canvas width and height drawn from these "
                         "(objects keep their pixel sizes, so the background's share of the tokens varies; "
                         "every token of the image is kept); default 96 x 96")
    ap.add_argument("--text-only", type=float, default=0.0,
                    help="fraction of full-stage conversations asked with no image (the language prior, "
                         "as in LLaVA-1.5's text-only data); default none")
    ap.add_argument("--text-scenes", type=float, default=0.0,
                    help="fraction of full-stage conversations that read their scene as words (its description "
                         "where the image would be) instead of seeing it; default none")
    ap.add_argument("--language-stage", action="store_true",
                    help="a text-only language-model stage, as an LLM is trained before it meets images: every "
                         "conversation reads its scene in words (or, with --text-only, has none); the tower and "
                         "projector are neither run nor changed; no vision stage")
    ap.add_argument("--textures", type=float, default=0.0,
                    help="fraction of the images (both stages) painted on a textured grey background (blobs, "
                         "stripes, gradients, as a photograph's background has structure) instead of a flat shade: "
                         "the background's tokens then differ from image to image, so attention parked on them "
                         "no longer adds a constant; default none")
    ap.add_argument("--all-tokens", action="store_true",
                    help="with --language-stage: next-token loss on every token (the scene's words and the questions "
                         "too), as a language model is pretrained; its heads then need a place to park attention "
                         "at every position, and the one token every position sees is <s> (an attention sink)")
    ap.add_argument("--vision-from", default=None,
                    help="a saved model directory whose vision tower replaces this model's at the start (as LLaVA "
                         "takes a pretrained CLIP)")
    ap.add_argument("--freeze", type=parse_parts, default=[],
                    help="parts that do not learn, of " + ", ".join(PARTS) + " (LLaVA-1.5: the tower always; "
                         "the decoder too while the projector alone aligns)")
    ap.add_argument("--max-turns", type=int, default=4,
                    help="questions per training conversation, at most (1: single-turn, no answer in context)")
    ap.add_argument("--max-minutes", type=float, default=None,
                    help="stop after this much training time (checkpoint and final/ written; the record says so)")
    ap.add_argument("--stop-step", type=int, default=None,
                    help="stop after this global step, the schedule still planned for the full run "
                         "(replays a run that --max-minutes stopped: its training.json gives the step)")
    ap.add_argument("--device", default=None, help="cpu or cuda (default: cuda when there is one)")
    ap.add_argument("--rope-theta", type=float, default=None,
                    help="the decoder's rotary base (default: the continued model's, or 10000 for a new one). Tried at "
                         "100000 on the embedded model: accuracy unchanged, but FastV's layer-1 selection moved off "
                         "the question's objects (issue 11 notes)")
    ap.add_argument("--precision", choices=("bf16", "fp32"), default="bf16",
                    help="bf16 autocast, or fp32 throughout (for a CPU without bf16 matrix units: there, "
                         "bf16 runs several times slower than fp32)")
    ap.add_argument("--workers", type=int, default=None,
                    help="DataLoader workers making batches (default: 0 on CPU, 6 on a GPU)")
    return ap


def parse_args(argv=None) -> argparse.Namespace:
    """The options, with the chosen recipe's defaults under the explicit ones."""
    ap = parser()
    pre, _ = ap.parse_known_args(argv)
    ap.set_defaults(**RECIPES[pre.recipe])
    args = ap.parse_args(argv)
    if (args.ground_weight or args.object_weight) and args.drop_from is not None:
        ap.error("--ground-weight and --object-weight need --drop-from none (they read every visual token's row)")
    if args.text_only and args.drop_from is not None:
        ap.error(f"--text-only {args.text_only:g} needs --drop-from none (visual dropout expects every row's image)")
    if args.language_stage and (args.ground_weight or args.object_weight or args.proj_aux_weight
                                or args.where_weight or args.cls_weight or args.pos_gaps):
        ap.error("--language-stage sees no image: it takes none of --ground-weight, --object-weight, "
                 "--proj-aux-weight, --where-weight, --cls-weight, --pos-gaps (give them as 0)")
    if args.tower_layers is not None and (args.init_from or args.tower_layers < 2):
        ap.error(f"--tower-layers {args.tower_layers}: a new model's tower, 2 layers or more (a continued stage "
                 f"keeps the tower of the model it continues)")
    if args.all_tokens and not args.language_stage:
        ap.error("--all-tokens needs --language-stage (a conversation with an image learns its answers alone)")
    if args.language_stage and args.drop_from is not None:
        ap.error("--language-stage needs --drop-from none (no row holds an image to drop tokens from)")
    for flag in ("text_scenes", "text_only", "textures"):
        if not 0 <= getattr(args, flag) <= 1:
            ap.error(f"--{flag.replace('_', '-')} {getattr(args, flag):g}: a fraction from 0 to 1")
    if args.text_scenes and args.drop_from is not None:
        ap.error(f"--text-scenes {args.text_scenes:g} needs --drop-from none (visual dropout expects every row's image)")
    if args.carry_heads and not args.init_from:
        ap.error("--carry-heads needs --init-from (the heads come from the run that wrote that directory)")
    if args.rope_theta is not None and args.rope_theta <= 1:
        ap.error(f"--rope-theta {args.rope_theta:g}: a rotary base above 1 (10000 is the usual one)")
    if args.canvas_sides and args.drop_from is not None:
        ap.error(f"--canvas-sides {','.join(map(str, args.canvas_sides))} needs --drop-from none "
                 f"(visual dropout is built for the {syn.IMAGE_SIZE} x {syn.IMAGE_SIZE} canvas)")
    return args


# options that change neither the data nor the weights (where and how fast a run goes)
NOT_IN_COMMAND = ("out", "threads", "workers", "eval_every", "eval_n", "ckpt_every", "max_minutes", "stop_step",
                  "init_from", "recipe")


def command(args: dict, out: str, init_from: str | None = None, stopped_at: int | None = None) -> str:
    """The shortest command line that repeats a run recorded as `args` (vars of its options):
    its recipe and every option that differs from that recipe's default, writing to `out`,
    continuing `init_from`, and stopping where it stopped (`stopped_at`, for a run a time budget ended)."""
    recipe = args.get("recipe", "legacy")
    default = vars(parse_args(["--recipe", recipe]))
    parts = ["python -m tools.train_embedded"] + ([f"--recipe {recipe}"] if recipe != "legacy" else [])
    parts.append(f"--out {out}")
    if init_from:
        parts.append(f"--init-from {init_from}")
    for key, value in args.items():
        if key in NOT_IN_COMMAND or key not in default or value == default[key]:
            continue
        if key == "vision_steps" and init_from:  # a continued run has no vision stage
            continue
        flag = "--" + key.replace("_", "-")
        if isinstance(value, bool):
            parts.append(flag if value else "")
        elif isinstance(value, dict):
            parts.append(f"{flag} " + ",".join(f"{k}={v:g}" for k, v in value.items()))
        elif isinstance(value, list):
            parts.append(f"{flag} " + ",".join(map(str, value)))
        else:
            parts.append(f"{flag} {'none' if value is None else value}")
    if stopped_at is not None:
        parts.append(f"--stop-step {stopped_at}")
    return " ".join(p for p in parts if p)


def main(argv=None):
    args = parse_args(argv)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    workers = args.workers if args.workers is not None else (6 if device.type == "cuda" else 0)
    if args.init_from or args.language_stage:
        args.vision_steps = 0

    from transformers import AutoConfig, LlavaForConditionalGeneration

    torch.set_num_threads(args.threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    processor = embedded.build_processor()
    tok = processor.tokenizer
    probe = syn.make_sample("train", 0).image
    ref = processor.image_processor(probe, return_tensors="pt")["pixel_values"]
    assert torch.allclose(pixels([probe]), ref, atol=1e-5), "training normalisation drifted from the processor"

    torch.manual_seed(args.seed)
    random.seed(args.seed)
    config = embedded.build_config(vision_layers=args.tower_layers or 4)
    config.text_config._attn_implementation = "sdpa"
    if args.init_from:
        loaded = AutoConfig.from_pretrained(args.init_from)
        if args.rope_theta is not None:
            loaded.text_config.rope_parameters["rope_theta"] = args.rope_theta
        model = LlavaForConditionalGeneration.from_pretrained(args.init_from, config=loaded, dtype=torch.float32)
        model.config.text_config._attn_implementation = "sdpa"
    else:
        if args.rope_theta is not None:
            config.text_config.rope_parameters["rope_theta"] = args.rope_theta
        model = LlavaForConditionalGeneration(config)
    if args.sink_weight:  # (the prior reads the attention probabilities)
        model.config.text_config._attn_implementation = "eager"
    if args.vision_from:
        donor = LlavaForConditionalGeneration.from_pretrained(args.vision_from, dtype=torch.float32)
        model.model.vision_tower.load_state_dict(donor.model.vision_tower.state_dict())
        del donor
    frozen = {id(p) for part in args.freeze for p in part_parameters(model, part)}
    for p in model.parameters():
        p.requires_grad_(id(p) not in frozen)
    tower_learns = "tower" not in args.freeze and not args.language_stage
    aux = AuxHeads(config.vision_config.hidden_size)
    proj_aux = AuxHeads(config.text_config.hidden_size)
    object_heads = ObjectHeads(config.text_config.hidden_size)
    cls_head = ImageHead(config.vision_config.hidden_size)
    where = WhereHeads(config.vision_config.hidden_size, config.text_config.hidden_size)
    grounding = Grounding(config.text_config.hidden_size)
    # the optimiser holds the heads a checkpoint of the same options holds (the later heads only when used)
    heads = (aux, cls_head, grounding) + ((proj_aux,) if args.proj_aux_weight else ()) + \
        ((object_heads,) if args.object_weight else ()) + ((where,) if args.where_weight else ())
    model.to(device)
    for h in heads:
        h.to(device)
    params = [p for p in model.parameters() if p.requires_grad] + [p for h in heads for p in h.parameters()]
    opt = torch.optim.AdamW(params, lr=args.lr, betas=(0.9, 0.98), weight_decay=args.weight_decay)
    named = dict(zip(HEADS, (aux, cls_head, grounding, proj_aux, object_heads, where)))
    if args.carry_heads:
        carried = carried_heads(args.init_from)
        for k, v in carried.items():
            named[k].load_state_dict(v)
        print(f"training-only heads carried over from {Path(args.init_from).parent / 'ckpt.pt'}"
              + "".join(f"; {k} fresh (not in it)" for k in HEADS if k not in carried), flush=True)
    total = args.vision_steps + args.steps
    state = {"step": 0, "seconds": 0.0, "log": []}
    ckpt = out / "ckpt.pt"
    if ckpt.exists():
        saved = torch.load(ckpt, weights_only=False, map_location=device)
        model.load_state_dict(saved["model"])
        for k, h in named.items():  # (an older checkpoint lacks the heads added after it)
            if k in saved:
                h.load_state_dict(saved[k])
        opt.load_state_dict(saved["opt"])
        state = saved["state"]
        print(f"resumed at step {state['step']} ({state['seconds'] / 60:.1f} min trained)", flush=True)
    model.train()

    def save():
        tmp = out / "ckpt.pt.tmp"
        torch.save({"model": model.state_dict(), **{k: h.state_dict() for k, h in named.items()},
                    "opt": opt.state_dict(), "state": state, "args": vars(args)}, tmp)
        os.replace(tmp, ckpt)

    t0 = time.time() - state["seconds"]
    running = []

    def make(step):
        vision_only = step < args.vision_steps
        drop = not vision_only and args.drop_from is not None and step - args.vision_steps >= args.drop_from
        return batch_of(step, args.batch * (2 if vision_only else 1), tok, config.image_token_id, args.seed,
                        drop=drop, object_drop=args.object_drop, type_weights=args.type_weights,
                        turn_mean=args.turn_mean and step - args.vision_steps >= args.turn_mean_from,
                        max_turns=args.max_turns, size=canvas_of(step, args.seed, args.canvas_sides),
                        text_only=0.0 if vision_only else args.text_only,
                        text_scenes=0.0 if vision_only else 1.0 if args.language_stage else args.text_scenes,
                        all_tokens=args.all_tokens, textures=0.0 if args.language_stage else args.textures,
                        attribute_forms=args.attribute_forms)

    batches = torch.utils.data.DataLoader(Batches(state["step"], total, make), batch_size=None,
                                          num_workers=workers, prefetch_factor=4 if workers else None)
    for step, batch in batches:
        assert step == state["step"], (step, state["step"])
        vision_only = step < args.vision_steps
        for g in opt.param_groups:
            g["lr"] = lr_at(step if vision_only else step - args.vision_steps,
                            args.vision_steps if vision_only else args.steps, args.lr, 100 if vision_only else args.warmup)
        pv, ids, labels, weights, mask, patch, keep = batch
        is_image = ids == config.image_token_id
        positions = None if vision_only else position_gaps(step, mask, is_image, args.seed, args.pos_gaps)
        pv, ids, labels, weights, mask = (t.to(device) for t in (pv, ids, labels, weights, mask))
        patch = {k: v.to(device) for k, v in patch.items()}
        keep = keep.to(device) if keep is not None else None
        positions = positions.to(device) if positions is not None else None
        gl = cl = pl = al = wl = sl = aux_loss = torch.zeros((), device=device)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.precision == "bf16"):
            if args.language_stage:  # no image anywhere: the decoder alone
                lm = lm_loss(model, None, ids, labels, weights, mask, attentions=bool(args.sink_weight))
                if args.sink_weight:
                    lm, _, attn = lm
                    sl = sink_loss(attn, mask, args.sink_floor, args.sink_layer)
                loss = lm + args.sink_weight * sl
            else:
                with torch.set_grad_enabled(tower_learns):
                    feats, pooled = vision_features(model, pv, pooled=True)
                if tower_learns:  # (a frozen tower's losses would train their heads alone)
                    aux_loss = aux.loss(feats, patch)
                    if args.cls_weight:
                        cl = cls_head.loss(pooled, patch["image"])
            if vision_only:  # (never in a language stage)
                lm = torch.zeros((), device=device)
                if args.where_weight:
                    wl = where.loss(feats, None, patch["cell"], patch["color"] > 0 if args.where_balance else None)
                loss = aux_loss + args.cls_weight * cl + args.where_weight * wl
            elif not args.language_stage:
                image = model.model.multi_modal_projector(feats)
                seen = ~patch["text_only"]  # rows whose conversation holds its image
                states = bool(args.ground_weight or args.object_weight)
                lm = lm_loss(model, image[seen], ids, labels, weights, mask, keep, positions, states,
                             attentions=bool(args.sink_weight))
                if args.sink_weight:
                    lm, hidden, attn = lm
                    sl = sink_loss(attn, mask, args.sink_floor, args.sink_layer)
                elif states:  # (no visual dropout with these: every row holds all of its image's tokens)
                    lm, hidden = lm
                if args.ground_weight:
                    visual_rows = torch.zeros(len(ids), image.shape[1], dtype=torch.long, device=device)
                    visual_rows[seen] = is_image[seen.cpu()].nonzero()[:, 1].view(-1, image.shape[1]).to(device)
                    gl = grounding.loss(hidden[args.ground_layer + 1], visual_rows, patch["queries"], patch["ground"])
                if args.object_weight:
                    al = object_heads.loss(hidden[args.object_layer + 1], patch["queries"], patch["about"])
                if args.proj_aux_weight:
                    pl = proj_aux.loss(image, patch)  # every row's image, seen by the decoder or not
                if args.where_weight:
                    wl = where.loss(feats if tower_learns else None, image, patch["cell"],
                                    patch["color"] > 0 if args.where_balance else None)
                loss = lm + args.aux_weight * aux_loss + args.cls_weight * cl + args.ground_weight * gl + \
                    args.proj_aux_weight * pl + args.object_weight * al + args.where_weight * wl + args.sink_weight * sl
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        state["step"] += 1
        state["seconds"] = time.time() - t0
        running.append((lm.item(), aux_loss.item(), cl.item(), gl.item(), pl.item(), al.item(), wl.item(), sl.item()))
        if state["step"] % 50 == 0:
            lm_m, aux_m, cl_m, gl_m, pl_m, al_m, wl_m, sl_m = np.mean(running, axis=0)
            running = []
            rec = {"step": state["step"], "lm": round(float(lm_m), 4), "aux": round(float(aux_m), 4),
                   "minutes": round(state["seconds"] / 60, 2)}
            if args.cls_weight or args.ground_weight:
                rec.update(cls=round(float(cl_m), 4), ground=round(float(gl_m), 4))
            if args.proj_aux_weight:
                rec["proj_aux"] = round(float(pl_m), 4)
            if args.object_weight:
                rec["object"] = round(float(al_m), 4)
            if args.where_weight:
                rec["where"] = round(float(wl_m), 4)
            if args.sink_weight:
                rec["sink"] = round(float(sl_m), 4)
            state["log"].append(rec)
            print(json.dumps(rec), flush=True)
        stopped = not vision_only and (args.max_minutes is not None and state["seconds"] > 60 * args.max_minutes
                                       or args.stop_step is not None and state["step"] >= args.stop_step)
        done = state["step"] == total or stopped
        if not vision_only and (state["step"] - args.vision_steps) % args.eval_every == 0 or done:
            if not vision_only and args.eval_n:
                scores = evaluate(model, processor, args.eval_n)
                state["log"].append({"step": state["step"], "val": scores})
                print(json.dumps({"step": state["step"], "val": scores}), flush=True)
        if state["step"] % args.ckpt_every == 0 or done:
            save()
        if stopped:
            print(f"stopped at step {state['step']} of {total}", flush=True)
            break

    final = out / "final"
    model.eval()
    model.cpu().half()
    model.save_pretrained(final)
    processor.save_pretrained(final)
    (final / "training.json").write_text(json.dumps(
        {"args": vars(args), "steps": state["step"], "planned_steps": total,
         "hardware": torch.cuda.get_device_name(device) if device.type == "cuda" else f"{args.threads} CPU threads",
         "minutes": round(state["seconds"] / 60, 1),
         "log": state["log"]}, indent=1))
    print(f"wrote {final}", flush=True)


if __name__ == "__main__":
    main()
