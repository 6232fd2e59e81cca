"""Accuracy of a model on the embedded benchmark by question *form*, not just type: whether it
answers by reading the thing at a named position, or by finding the thing a question describes.

    python -m tools.question_forms [--model embedded] [--start 600] [--samples 420] [--method baseline]
                                   [--budget 16] [--setting K=1 ...]

Prints, per form, the sample count, the accuracy and the most frequent answers (greedy decoding).
Samples start-(start + samples - 1) of the split; describe and text questions are left out.
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


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="embedded")
    ap.add_argument("--split", default="test", choices=syn.SPLITS)
    ap.add_argument("--start", type=int, default=600, help="first sample index (600+: no test uses them)")
    ap.add_argument("--samples", type=int, default=420)
    ap.add_argument("--method", default="baseline")
    ap.add_argument("--budget", type=float, default=None, help="tokens (>= 1) or pruning ratio (< 1)")
    ap.add_argument("--setting", action="append", default=[], help="a method setting, NAME=INT (repeatable)")
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
            if s.qtype in ("describe", "text"):
                continue
            x = adapter.inputs(s.image, s.question)
            rec = generate(adapter, x["input_ids"], x["pixel_values"], method, 8, sample=s)
            form = question_form(s)
            scores[form].append(syn.score(s.qtype, rec.text, s.answer))
            answers[form][rec.text] += 1
    for form in sorted(scores):
        v = scores[form]
        print(f"{form:54} n={len(v):3}  accuracy {sum(v) / len(v):.2f}  answers {answers[form].most_common(3)}")


if __name__ == "__main__":
    main()
