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
from harness.models.publish_embedded import majority_answers
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


@pytest.mark.slow
def test_answers_come_from_the_image():
    adapter = load_model("embedded")
    shape = ModelShape(adapter.num_layers, adapter.num_visual)
    majority = majority_answers(1000)
    samples = [syn.make_sample("test", 5000 + i) for i in range(20 * len(syn.QUESTION_TYPES))]
    acc = {"baseline": collections.defaultdict(list), "blind": collections.defaultdict(list)}
    for name in acc:
        method = build_method(name)
        method.configure(shape)
        for s in samples:
            x = adapter.inputs(s.image, s.question)
            rec = generate(adapter, x["input_ids"], x["pixel_values"], method, 64, sample=s)
            acc[name][s.qtype].append(syn.score(s.qtype, rec.text, s.answer))
    mean = {k: {t: statistics.fmean(v) for t, v in d.items()} for k, d in acc.items()}
    for t in SHORT_TYPES:
        floor = statistics.fmean(float(s.answer == majority[t]) for s in samples if s.qtype == t)
        assert mean["baseline"][t] >= MIN_SHORT_ACCURACY and mean["baseline"][t] >= floor + 0.3, (t, mean)
        assert mean["blind"][t] <= floor + 0.2, (t, mean)
    assert mean["baseline"]["describe"] >= MIN_DESCRIBE_F1
    assert mean["blind"]["describe"] <= 0.3
