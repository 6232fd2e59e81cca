"""Evaluate a trained embedded model on the test split and install it, with its model card, as the
project's embedded default.

    python -m tools.publish_embedded build/train-embedded/final

Accuracy per question type (through the engine, greedy) is written next to two floors: always
answering the train split's most frequent answer of that type, and the same model with every
visual token removed (`blind`).
"""
from __future__ import annotations

import argparse
import collections
import json
import math
import shutil
import statistics
from pathlib import Path

import torch
from safetensors import safe_open

from harness.data import synthetic as syn
from harness.engine.generate import generate
from harness.models.adapter import load_model
from harness.models.embedded import EMBEDDED_DIR
from methods import ModelShape, build_method
from tools import train_embedded

FILES = ("config.json", "generation_config.json", "model.safetensors", "processor_config.json",
         "tokenizer.json", "tokenizer_config.json")


def majority_answers(n: int = 3000) -> dict[str, str]:
    counts = collections.defaultdict(collections.Counter)
    for i in range(n):
        s = syn.make_sample("train", i)
        if s.qtype != "describe":
            counts[s.qtype][s.answer] += 1
    return {t: c.most_common(1)[0][0] for t, c in counts.items()}


def evaluate(model_dir: str, per_type: int) -> dict:
    adapter = load_model(model_dir)
    shape = ModelShape(adapter.num_layers, adapter.num_visual)
    majority = majority_answers()
    samples = [syn.make_sample("test", i) for i in range(per_type * len(syn.QUESTION_TYPES))]
    scores = {"model": collections.defaultdict(list), "blind": collections.defaultdict(list),
              "majority": collections.defaultdict(list)}
    for name in ("model", "blind"):
        method = build_method("baseline" if name == "model" else "blind")
        method.configure(shape)
        for s in samples:
            x = adapter.inputs(s.image, s.question)
            rec = generate(adapter, x["input_ids"], x["pixel_values"], method, 64, sample=s)
            scores[name][s.qtype].append(syn.score(s.qtype, rec.text, s.answer))
    for s in samples:
        guess = majority.get(s.qtype, "")
        scores["majority"][s.qtype].append(syn.score(s.qtype, guess, s.answer))
    return {k: {t: statistics.fmean(v) for t, v in d.items()} for k, d in scores.items()}


def history(src: Path) -> list[dict]:
    """Every training record behind a model directory, oldest first: its own training.json, then
    the one of each directory it was continued from (`--init-from`), down to a from-scratch run or an
    installed model's recorded stages."""
    record = json.loads((src / "training.json").read_text())
    chain = record.get("stages", [record])
    while chain[0]["args"].get("init_from") and "stages" not in record:
        record = json.loads((Path(chain[0]["args"]["init_from"]) / "training.json").read_text())
        stages = record.get("stages", [record])
        if chain[0] in stages:  # an installed directory since overwritten by a model continued from it
            stages = stages[:stages.index(chain[0])]
        chain = stages + chain
    return chain


def where(stage: dict) -> str:
    a = stage["args"]
    if "hardware" in stage:
        return stage["hardware"]
    return "a GPU" if a.get("device") == "cuda" else f"{a['threads']} CPU threads"


def neutral_text(stage: dict, i: int) -> str:
    """A stage of the neutral recipe (or any recipe but the first model's): its exact command, from
    the recorded options, and what it did."""
    a = stage["args"]
    out, init = f"build/embedded-{i}", (f"build/embedded-{i - 1}/final" if a.get("init_from") else None)
    planned = stage.get("planned_steps", stage["steps"])
    cmd = train_embedded.command(a, out, init, stage["steps"] if stage["steps"] < planned else None)
    weights = ", ".join(f"{k} x{v:g}" for k, v in (a.get("type_weights") or {}).items())
    precision = "fp32" if a.get("precision") == "fp32" else "bf16 autocast"
    what = ("continuing the stage above" + (", its training-only heads too" if a.get("carry_heads") else "")
            if init else "from scratch" + ("" if a.get("language_stage") else f" ({a['vision_steps']} vision-only steps first)"))
    if a.get("language_stage"):
        return (f"{i}. `{cmd}`\n\n   Seed {a['seed']}, {stage['steps']} steps, batch {a['batch']}, lr {a['lr']:g}, AdamW, "
                f"warm-up then cosine, {precision}, {stage['minutes']} minutes on {where(stage)}; {what}; a language "
                f"stage: the decoder alone, every conversation reading its scene as words where the image would be "
                f"(its description), the tower and projector neither run nor changed"
                + ("; next-token loss on every token, as a language model is pretrained" if a.get("all_tokens") else
                   "; loss on the answers") + ".\n")
    what += (f"; the vision tower taken from `{a['vision_from']}` at the start" if a.get("vision_from") else "")
    what += (f"; frozen: {', '.join(a['freeze'])}" if a.get("freeze") else "")
    what += (f"; a tower of {a['tower_layers']} layers" if a.get("tower_layers") else "")
    what += (f"; weight decay {a['weight_decay']:g}" if a.get("weight_decay", 0.01) != 0.01 else "")
    what += (f"; the decoder's rotary base set to {a['rope_theta']:g}" if a.get("rope_theta") else "")
    what += (f"; {100 * a['textures']:g} % of the images on textured backgrounds" if a.get("textures") else "")
    what += (f"; the sink prior: every head from decoder layer {a['sink_layer']} on keeps at least "
             f"{a['sink_floor']:g} of each query's attention on <s>, x {a['sink_weight']:g}" if a.get("sink_weight") else "")
    forms = ", ".join(f"{k} x{v:g}" for k, v in (a.get("attribute_forms") or {}).items())
    tower_learns = "tower" not in (a.get("freeze") or [])
    what += (f"; no token dropout; position-id gaps in {100 * a['pos_gaps']:.0f} % of conversations"
             + (f", the CLIP-like CLS objective x {a['cls_weight']:g}" if a["cls_weight"] and tower_learns else "")
             + (f", grounding at decoder layer {a['ground_layer']} x {a['ground_weight']:g}" if a["ground_weight"] else "")
             + f"; questions per conversation up to {a.get('max_turns', 4)}"
             + (f"; question mix {weights} (others x1)" if weights else "")
             + (f"; attribute forms {forms} (others x1)" if forms else "")
             + (f"; every answer turn weighs the same from full step {a.get('turn_mean_from', 0)}"
                if a.get("turn_mean") and a.get("turn_mean_from", 0) < a["steps"] else "; every answer token weighs the same")
             + (f"; each batch's canvas width and height drawn from {', '.join(map(str, a['canvas_sides']))} px "
                f"(objects at their pixel sizes, every token kept)" if a.get("canvas_sides") else "")
             + (f"; per-patch heads on the projector's output x {a['proj_aux_weight']:g}"
                if a.get("proj_aux_weight") else "")
             + (f"; object heads at decoder layer {a['object_layer']} x {a['object_weight']:g}"
                if a.get("object_weight") else "")
             + (f"; {100 * a['text_only']:g} % of conversations asked with no image" if a.get("text_only") else "")
             + (f"; {100 * a['text_scenes']:g} % read their scene as words instead of seeing it"
                if a.get("text_scenes") else "")
             + (f"; every patch names its grid cell from the tower's features and the projector's output "
                f"x {a['where_weight']:g}" + (" (object and background patches weighing half each)"
                                              if a.get("where_balance") else "") if a.get("where_weight") else ""))
    why = "by --stop-step" if a.get("stop_step") else "by a time budget"
    stop = f" (stopped {why}; {planned} planned)" if stage["steps"] < planned else ""
    return (f"{i}. `{cmd}`\n\n   Seed {a['seed']}, {stage['steps']} steps{stop}, batch {a['batch']}, lr {a['lr']:g}, "
            f"AdamW, warm-up then cosine, {precision}, {stage['minutes']} minutes on {where(stage)}; {what}.\n")


def stage_text(stage: dict, i: int) -> str:
    a = stage["args"]
    if a.get("recipe", "legacy") != "legacy":
        return neutral_text(stage, i)
    if not a.get("init_from"):
        cmd = (f"python -m tools.train_embedded --out build/train-embedded --vision-steps "
               f"{a['vision_steps']} --steps {a['steps']} --batch {a['batch']} --lr {a['lr']} "
               f"--aux-weight {a['aux_weight']} --drop-from {a['drop_from']} --seed {a['seed']}")
        what = (f"from scratch: {a['vision_steps']} vision-only steps with auxiliary per-patch "
                f"colour/shape/letter heads, then full-model steps on multi-turn conversations (next-token "
                f"loss on answers plus the auxiliary loss x {a['aux_weight']}); from full step "
                f"{a['drop_from']} on, half of the conversations lose a random fraction of their visual tokens")
    else:
        weights = ",".join(f"{k}={v:g}" for k, v in (a.get("type_weights") or {}).items())
        cmd = (f"python -m tools.train_embedded --out build/finetune-embedded --init-from "
               f"build/train-embedded/final --steps {a['steps']} --lr {a['lr']} --warmup {a['warmup']} "
               f"--drop-from {a['drop_from']} --object-drop {a['object_drop']}"
               + (f" --type-weights {weights}" if weights else "") + (" --turn-mean" if a.get("turn_mean") else "")
               + f" --seed {a['seed']}")
        what = ("fine-tuning the stage above: every answer turn weighs the same in the loss"
                + (f", question mix {weights} (others 1)" if weights else "")
                + f"; half of the conversations lose visual tokens, and {100 * a['object_drop']:.0f} % of those "
                f"keep an oracle-like subset instead (most of the first question's object patches plus a few "
                f"random others) and are cut to that question, so that pruned inputs that keep the right "
                f"patches stay in distribution")
    return (f"{i}. `{cmd}`\n\n   Seed {a['seed']}, {stage['steps']} steps, batch {a['batch']}, AdamW, warm-up then "
            f"cosine, bf16 autocast, {stage['minutes']} minutes on 2 CPU cores; {what}.\n")


def card(result: dict, stages: list[dict], per_type: int, vocab_size, candidate: bool = False,
         tower_layers: int = 4, millions: int = 4) -> str:
    rows = "".join(
        f"| {t} | {100 * result['model'][t]:.1f} | {100 * result['majority'][t]:.1f} | "
        f"{100 * result['blind'][t]:.1f} |\n" for t in syn.QUESTION_TYPES)
    history = "\n".join(stage_text(st, i + 1) for i, st in enumerate(stages))
    role = ("A candidate for the harness's embedded default (not used unless a model entry names this\n"
            "directory as its path), in training" if candidate else "It is the harness's embedded default")
    legacy = all(st["args"].get("recipe", "legacy") == "legacy" for st in stages)
    how = ("`make train-embedded` runs these in order; each resumes after an interruption" if legacy or not candidate
           else "each stage resumes after an interruption: rerun its command")
    return f"""# llava-tiny-shapes

A {millions} M-parameter LLaVA-1.5 (transformers `LlavaForConditionalGeneration`) trained from scratch on
the project's synthetic `shapes` benchmark (train split). {role}:
the same code path as a 7B checkpoint, small enough for a laptop CPU.

- Vision: CLIP ViT, 96 px images, 8 px patches (144 visual tokens + CLS), {tower_layers} layers x 128 wide,
  features from layer -2, CLS dropped ("default"), two-layer GELU projector.
- Language: Llama, 16 layers x 128 wide, 4 heads (2 KV heads, GQA), MLP 384, word-level vocabulary
  of {vocab_size} words, LLaVA-1.5 prompt `USER: <image>\\n<question> ASSISTANT:`.
- Weights: float16 safetensors; load with `LlavaForConditionalGeneration.from_pretrained(dir)` and
  `AutoProcessor.from_pretrained(dir)`, offline.

## Training ({how})

{history}
The auxiliary heads are not part of the saved model. `training.json` holds every stage's arguments
and loss/validation log.

## Test accuracy (%), {per_type} samples per type, greedy through the harness engine

| type | model | majority answer | model, no visual tokens |
|---|---|---|---|
{rows}
"describe" is per-object F1 (an object counts when size, colour, shape and cell all match).
Majority answer: always the train split's most frequent answer of that type.
"""


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("final_dir", help="the training run's final/ directory")
    ap.add_argument("--per-type", type=int, default=100)
    ap.add_argument("--dest", default=str(EMBEDDED_DIR))
    args = ap.parse_args(argv)
    torch.set_num_threads(2)
    src = Path(args.final_dir)
    stages = history(src)
    config = json.loads((src / "config.json").read_text())
    vocab_size, tower_layers = config["text_config"]["vocab_size"], config["vision_config"]["num_hidden_layers"]
    with safe_open(src / "model.safetensors", "pt") as f:
        millions = round(sum(math.prod(f.get_slice(k).get_shape()) for k in f.keys()) / 1e6)
    result = evaluate(str(src), args.per_type)
    dest = Path(args.dest)
    dest.mkdir(parents=True, exist_ok=True)
    for f in FILES:
        shutil.copy2(src / f, dest / f)
    candidate = dest.resolve() != Path(EMBEDDED_DIR).resolve()
    (dest / "README.md").write_text(card(result, stages, args.per_type, vocab_size, candidate, tower_layers, millions))
    (dest / "eval.json").write_text(json.dumps(result, indent=1))
    summary = {k: {t: round(v, 3) for t, v in d.items()} for k, d in result.items()}
    (dest / "training.json").write_text(json.dumps({"stages": stages}))
    (dest / "training_log.json").unlink(missing_ok=True)
    print(json.dumps(summary, indent=1))
    print(f"installed in {dest}")


if __name__ == "__main__":
    main()
