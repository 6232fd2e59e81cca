"""Does the model's answer depend on the object a question names? The monitor of the binding
failure (issue 11): on one image with two shapes A and B, the first answer token's distribution
over position words for "where is the <A>?" against "where is the <B>?" (total variation; near 0:
the model ignores the colour and shape words), beside the same question on another image and the
position-named control ("what color is the shape at <cell of A>?" against "<cell of B>").

    python -m tools.question_sensitivity [--model embedded] [--pairs 20] [--start 8000]
"""
from __future__ import annotations

import argparse
import statistics

import torch

from harness.data import synthetic as syn
from harness.models.adapter import load_model

POSITION_WORDS = ("top", "bottom", "left", "right", "center")


def first_token_distribution(adapter, image, question: str, words) -> torch.Tensor:
    """Probabilities of `words` (single tokens) as the first answer token."""
    vocab = adapter.processor.tokenizer.get_vocab()
    x = adapter.inputs(image, question)
    with torch.no_grad():
        p = adapter.model(input_ids=x["input_ids"], pixel_values=x["pixel_values"]).logits[0, -1].float().softmax(-1)
    return p[[vocab[w] for w in words]]


def total_variation(p: torch.Tensor, q: torch.Tensor) -> float:
    return 0.5 * float((p - q).abs().sum())


def sensitivity(adapter, pairs: int = 20, start: int = 8000) -> dict[str, float]:
    named, other_image, by_position = [], [], []
    for i in range(pairs):
        s = syn.make_sample("test", start + i, "position")
        other = syn.make_sample("test", start + 100 + i, "position")
        a, b = [o for o in s.objects if o.kind == "shape"][:2]
        where = lambda o: f"where is the {o.color} {o.shape} ?"  # noqa: E731
        colour_at = lambda o: f"what color is the shape at the {o.position} ?"  # noqa: E731
        pa = first_token_distribution(adapter, s.image, where(a), POSITION_WORDS)
        named.append(total_variation(pa, first_token_distribution(adapter, s.image, where(b), POSITION_WORDS)))
        other_image.append(total_variation(pa, first_token_distribution(adapter, other.image, where(a),
                                                                         POSITION_WORDS)))
        by_position.append(total_variation(first_token_distribution(adapter, s.image, colour_at(a), list(syn.COLORS)),
                                           first_token_distribution(adapter, s.image, colour_at(b), list(syn.COLORS))))
    return {"where A vs where B (same image)": statistics.fmean(named),
            "where A, other image": statistics.fmean(other_image),
            "colour at cell of A vs of B (control)": statistics.fmean(by_position)}


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="embedded")
    ap.add_argument("--pairs", type=int, default=20)
    ap.add_argument("--start", type=int, default=8000)
    args = ap.parse_args(argv)
    adapter = load_model(args.model)
    for name, tv in sensitivity(adapter, args.pairs, args.start).items():
        print(f"{name:<40} total variation {tv:.3f}")


if __name__ == "__main__":
    main()
