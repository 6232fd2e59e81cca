"""lmms-eval `--model_args` -> one experiment cell, validated like an experiment file's.

    pretrained=DIR|embedded, checkpoint=HUB_ID, dtype=float32, attn_implementation=sdpa, engine=eager|graphs,
    method=fastv, budget=64 (tokens) | 0.889 (pruning ratio), max_new_tokens=48,
    decoding=greedy|ssd, ssd_twig=DIR, delta=5, theta=0.6,
    any other key: a setting of the method (K=2, twig=DIR, score_layer=1, ...)

With decoding=ssd, `twig` (a TwigVLM setting) is also SSD's draft twig unless ssd_twig is given.
"""
from __future__ import annotations

from harness.experiment import Cell, ExperimentError, parse_experiment, validate

MODEL_KEYS = {"pretrained": "path", "checkpoint": "checkpoint", "dtype": "dtype",
              "attn_implementation": "attn_implementation", "engine": "engine"}
SSD_KEYS = {"ssd_twig": "twig", "delta": "delta", "theta": "theta"}


def cell_from_args(args: dict) -> Cell:
    """The cell `args` describe; ExperimentError (one line naming the value and what is allowed)
    for anything an experiment file would refuse."""
    args = dict(args)
    model = {MODEL_KEYS[k]: args.pop(k) for k in list(args) if k in MODEL_KEYS}
    model.setdefault("path", "embedded")
    method = args.pop("method", "baseline")
    budget = args.pop("budget", None)
    max_new = args.pop("max_new_tokens", None)
    decoding = args.pop("decoding", "greedy")
    ssd = {SSD_KEYS[k]: args.pop(k) for k in list(args) if k in SSD_KEYS}
    if decoding not in ("greedy", "ssd"):
        raise ExperimentError(f"model_args: decoding={decoding!r}; allowed: greedy, ssd")
    if decoding == "greedy" and ssd:
        raise ExperimentError(f"model_args: {', '.join(sorted(ssd))} apply to decoding=ssd only; allowed with "
                              "greedy: pretrained, checkpoint, dtype, attn_implementation, engine, method, budget, "
                              "max_new_tokens and the method's settings")
    if decoding == "ssd" and "twig" not in ssd and "twig" in args:
        ssd["twig"] = args["twig"]
    entry = {"name": method, "settings": args}
    if decoding == "ssd":
        entry["decoding"] = {"name": "ssd", **ssd}
    if budget is not None:
        entry["budgets"] = [budget]
    raw = {"experiment": "lmms-eval", "model": model, "methods": [entry]}
    if max_new is not None:
        raw["generation"] = {"max_new_tokens": max_new}
    exp = parse_experiment(raw, "model_args")
    validate(exp, "model_args")
    return exp.cells[0]
