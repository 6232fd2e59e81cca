"""Accuracy of a model on the embedded benchmark by question *form*, not just type: whether it
answers by reading the thing at a named position, or by finding the thing a question describes.

    python -m tools.question_forms [--model embedded] [--start 600] [--samples 420] [--method baseline]
                                   [--budget 16] [--setting K=1 ...] [--describe]

Prints, per form, the sample count, the accuracy and the most frequent answers (greedy decoding).
Samples start-(start + samples - 1) of the split; describe and text questions are left out.
`--describe` adds the descriptions among them, scored per shape object (is its whole phrase in the
description?) and split by whether another object of the scene has its colour: a model that finds
objects by colour and not by place names the wrong shape where the colour is shared.
"""
from __future__ import annotations

import argparse
import collections

import torch

import methods  # noqa: F401  (registers the methods)
from harness.contract import ModelShape, build_method
from harness.data import synthetic as syn
from harness.engine.generate import generate
from harness.models.adapter import load_model


def question_form(s) -> str:
    q = s.question
    if s.qtype == "attribute":
        if q.startswith("what color"):
            return "attribute: colour of the shape at a position"
        if "object at" in q:
            return "attribute: shape of the coloured object at a position"
        if q.startswith("what size"):
            return "attribute: size of a colour+shape"
        return "attribute: shape at a position"
    if s.qtype == "exist":
        return f"exist: answer {s.answer}"
    if s.qtype == "position":
        return "position: of the letter" if "letter" in q else "position: of a colour+shape"
    if s.qtype == "count":
        return f"count: by {'colour' if 'objects' in q else 'shape'}, answer {s.answer}"
    return s.qtype


def describe_objects(s, text: str) -> list[tuple[str, bool]]:
    """(form, named exactly) for each shape object of a description sample: the form says whether
    another shape of the scene has its colour."""
    said = {syn.normalize(t) for t in text.split(";")}
    shapes = [o for o in s.objects if o.kind == "shape"]
    return [("describe: an object whose colour another shares" if any(p.color == o.color for p in shapes if p is not o)
             else "describe: an object with a colour of its own", syn.normalize(o.phrase()) in said) for o in shapes]


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="embedded")
    ap.add_argument("--split", default="test", choices=syn.SPLITS)
    ap.add_argument("--start", type=int, default=600, help="first sample index (600+: no test uses them)")
    ap.add_argument("--samples", type=int, default=420)
    ap.add_argument("--method", default="baseline")
    ap.add_argument("--budget", type=float, default=None, help="tokens (>= 1) or pruning ratio (< 1)")
    ap.add_argument("--setting", action="append", default=[], help="a method setting, NAME=INT (repeatable)")
    ap.add_argument("--describe", action="store_true", help="score the descriptions' objects too (64 new tokens each)")
    a = ap.parse_args(argv)
    adapter = load_model(a.model)
    budget = None if a.budget is None else (int(a.budget) if a.budget >= 1 else a.budget)
    method = build_method(a.method, budget, **{k: int(v) for k, v in (s.split("=", 1) for s in a.setting)})
    method.bind(adapter)
    method.configure(ModelShape(adapter.num_layers, adapter.num_visual))
    scores, answers = collections.defaultdict(list), collections.defaultdict(collections.Counter)
    with torch.no_grad():
        for i in range(a.start, a.start + a.samples):
            s = syn.make_sample(a.split, i)
            if s.qtype == "text" or (s.qtype == "describe" and not a.describe):
                continue
            x = adapter.inputs(s.image, s.question)
            if s.qtype == "describe":
                text = generate(adapter, x["input_ids"], x["pixel_values"], method, 64, sample=s).text
                for form, ok in describe_objects(s, text):
                    scores[form].append(ok)
                continue
            rec = generate(adapter, x["input_ids"], x["pixel_values"], method, 8, sample=s)
            form = question_form(s)
            scores[form].append(syn.score(s.qtype, rec.text, s.answer))
            answers[form][rec.text] += 1
    for form in sorted(scores):
        v = scores[form]
        print(f"{form:54} n={len(v):3}  accuracy {sum(v) / len(v):.2f}"
              + (f"  answers {answers[form].most_common(3)}" if answers[form] else ""))


if __name__ == "__main__":
    main()
