"""The committed embedded model: stock transformers loads it offline, its answers come from the
image (far above the majority answer; at the majority's level once every visual token is gone)."""
import collections
import statistics

import pytest
import torch

from harness.data import synthetic as syn
from harness.engine.generate import generate
from harness.models.adapter import load_model
from harness.models.embedded import EMBEDDED_DIR
from tools.publish_embedded import majority_answers
from methods import ModelShape, build_method

SHORT_TYPES = ("attribute", "count", "exist", "position", "text")


def test_weights_are_small_safetensors_and_load_offline_with_stock_classes():
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    weights = EMBEDDED_DIR / "model.safetensors"
    assert weights.is_file() and weights.stat().st_size <= 20 * 2**20
    model = LlavaForConditionalGeneration.from_pretrained(EMBEDDED_DIR, local_files_only=True)
    processor = AutoProcessor.from_pretrained(EMBEDDED_DIR, local_files_only=True)
    s = syn.make_sample("test", 0)
    x = processor(images=s.image, text=f"USER: <image>\n{s.question} ASSISTANT:", return_tensors="pt")
    assert int((x["input_ids"] == model.config.image_token_id).sum()) == syn.NUM_PATCHES
    assert model.config.text_config.num_hidden_layers == 16


# The targets (issue 11): >= 85 % on every short-answer type and description F1 >= 0.9. The
# committed model meets them on its card's samples (attribute 87 %, describe 0.917) and on this
# test's 30 per type (test 5000-5179: attribute 86.7 %, describe 0.937), narrowly for attribute: an
# object named by its place alone is the form it misreads most. A type listed in BELOW_TARGET is a
# strict xfail, for a model that misses it; a model that then meets it fails here until the list
# is updated.
TARGET = {"describe": 0.9}  # 0.85 for the others
BELOW_TARGET: set[str] = set()
PER_TYPE = 30


@pytest.fixture(scope="module")
def accuracy(device):
    adapter = load_model("embedded", device=device)
    shape = ModelShape(adapter.num_layers, adapter.num_visual)
    samples = [syn.make_sample("test", 5000 + i) for i in range(PER_TYPE * len(syn.QUESTION_TYPES))]
    acc = {name: collections.defaultdict(list) for name in ("baseline", "blind", "oracle", "random")}
    for name in acc:
        method = build_method(name, 16 if name in ("oracle", "random") else None)  # 88.9 % pruned
        method.configure(shape)
        for s in samples:
            x = adapter.inputs(s.image, s.question)
            rec = generate(adapter, x["input_ids"], x["pixel_values"], method, 64, sample=s)
            acc[name][s.qtype].append(syn.score(s.qtype, rec.text, s.answer))
    majority = majority_answers(1000)
    floor = {t: statistics.fmean(float(s.answer == majority[t]) for s in samples if s.qtype == t)
             for t in SHORT_TYPES}
    floor["describe"] = 0.0
    return {k: {t: statistics.fmean(v) for t, v in d.items()} for k, d in acc.items()}, floor


@pytest.mark.slow
@pytest.mark.parametrize("qtype", [
    pytest.param(t, marks=pytest.mark.xfail(strict=True, reason="below target in the committed model"))
    if t in BELOW_TARGET else t for t in syn.QUESTION_TYPES])
def test_accuracy_meets_the_target(accuracy, qtype):
    mean, floor = accuracy
    target = TARGET.get(qtype, 0.85)
    assert mean["baseline"][qtype] >= target and mean["baseline"][qtype] >= floor[qtype] + 0.3, mean


@pytest.mark.slow
@pytest.mark.parametrize("qtype", syn.QUESTION_TYPES)
def test_without_visual_tokens_answers_fall_to_the_prior(accuracy, qtype):
    """The answers come from the image: with every visual token removed they sit near the
    majority answer (attribute questions keep some prior from their wording) and far below the
    model's answers with the image."""
    mean, floor = accuracy
    assert mean["blind"][qtype] <= floor[qtype] + 0.25, mean
    assert mean["blind"][qtype] <= mean["baseline"][qtype] - 0.5, mean


@pytest.mark.slow
def test_the_benchmark_tells_good_token_selection_from_bad(accuracy):
    """At 88.9 % pruning (16 of 144 tokens before the LLM) the oracle, which keeps the patches of
    the objects the question is about, stays close to the unpruned model; random selection of as
    many tokens falls clearly below it. Short answers only: a description needs every object, and
    every description sample here has more object patches than 16 (18 to 64, 37 on average), so its
    F1 under any 16-token selection measures the budget, not the selection."""
    mean, _ = accuracy
    overall = {k: statistics.fmean(v[t] for t in SHORT_TYPES) for k, v in mean.items()}
    assert overall["oracle"] >= overall["baseline"] - 0.08, overall
    assert overall["random"] <= overall["baseline"] - 0.10, overall
    assert overall["oracle"] - overall["random"] >= 0.10, overall
