"""tools.diagnose_embedded: its decoding matches transformers' generate, its conditions collapse to
the full image when every token is kept, and its probe reads what is linearly there and only that."""
import numpy as np
import pytest
import torch

from harness.data import synthetic as syn
from harness.models import embedded
from tools import diagnose_embedded as de


def test_answer_with_every_token_is_transformers_greedy_decoding(tiny_llava_dir):
    model, processor = de.load(tiny_llava_dir)
    for i in range(3):
        s = syn.make_sample("val", i)
        x = processor(images=s.image, text=embedded.prompt(s.question), return_tensors="pt")
        ref = model.generate(**x, max_new_tokens=3, do_sample=False)[0, x["input_ids"].shape[1]:]
        ref = processor.tokenizer.decode([t for t in ref.tolist() if t != processor.tokenizer.eos_token_id],
                                         skip_special_tokens=True)
        _, proj = de.visual_features(model, processor, s.image)
        assert de.answer(model, processor.tokenizer, s.question, proj, torch.arange(len(proj))) == ref


def test_fill_conditions_equal_the_full_image_when_every_token_is_kept(tiny_llava_dir, capsys):
    model, processor = de.load(tiny_llava_dir)
    out = de.fill(model, processor, syn.NUM_PATCHES, 4)
    full = [p for _, p, _ in out["full"]]
    for c in ("oracle kept", "oracle kept+fill", "oracle kept+as many", "oracle packed", "random kept",
              "random kept+fill"):
        assert [p for _, p, _ in out[c]] == full, c
    de.main(["fill", "--model", tiny_llava_dir, "--tokens", "8", "--samples", "3"])
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 2 + len(de.CONDITIONS) and lines[2].startswith("full")


def test_pad_spans_the_kept_tokens_to_the_filled_image(tiny_llava_dir, capsys):
    model, processor = de.load(tiny_llava_dir)
    whole = de.pad(model, processor, syn.NUM_PATCHES, 3, pads=(0,))  # every token kept, none added
    assert [p for _, p, _ in whole[0]] == [p for _, p, _ in whole["full"]]
    out = de.pad(model, processor, 16, 4, pads=(0, 16, syn.NUM_PATCHES - 16))
    filled = de.fill(model, processor, 16, 4)  # every removed position padded: fill's kept+fill
    assert [p for _, p, _ in out[syn.NUM_PATCHES - 16]] == [p for _, p, _ in filled["oracle kept+fill"]]
    assert [p for _, p, _ in out[16]] == [p for _, p, _ in filled["oracle kept+as many"]]  # same draws
    assert [p for _, p, _ in out[0]] == [p for _, p, _ in filled["oracle kept"]]
    de.main(["pad", "--model", tiny_llava_dir, "--samples", "2", "--pads", "0,8"])
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 5 and lines[3].startswith("oracle + 0 empty")
    with pytest.raises(SystemExit, match="--pads 0,200: each from 0 to 128"):
        de.main(["pad", "--model", tiny_llava_dir, "--pads", "0,200"])
    with pytest.raises(SystemExit):
        de.main(["pad", "--model", tiny_llava_dir, "--pads", "0,a"])
    assert "--pads '0,a': whole numbers separated by commas" in capsys.readouterr().err


def test_linear_probe_reads_separable_labels_and_not_noise():
    g = torch.Generator().manual_seed(0)
    y = torch.randint(0, 4, (600,), generator=g)
    x = torch.randn(600, 16, generator=g)
    signal = x.clone()
    signal[:, :4] += 4 * torch.nn.functional.one_hot(y, 4)
    assert de.linear_probe(signal, y) > 0.95
    assert de.linear_probe(x, y) < 0.4  # chance is 0.25


def test_probe_names_every_stage(tiny_llava_dir):
    model, processor = de.load(tiny_llava_dir)
    table = de.probe(model, processor, 4)
    assert list(table)[:2] == ["tower", "projector"] and "decoder layer 3" in table
    assert all(0.0 <= v <= 1.0 for row in table.values() for v in row.values())
    assert all(list(row) == [*de.PATCH_FIELDS, *de.PLACE_FIELDS] for row in table.values())


def test_patch_places_name_each_patchs_cell_row_and_column():
    places = {f: v.reshape(12, 12) for f, v in de.patch_places().items()}
    assert (places["row"] == np.arange(12)[:, None]).all() and (places["column"] == np.arange(12)[None, :]).all()
    # the 96-px canvas's 3 x 3 grid: 4 x 4 patches per cell, row-major
    assert (places["cell"] == np.kron(np.arange(9).reshape(3, 3), np.ones((4, 4), int))).all()


def test_sinks_split_each_layers_attention_into_parts_that_sum_to_one(tiny_llava_dir, capsys):
    model, processor = de.load(tiny_llava_dir, "eager")
    table = de.sinks(model, processor, 3)
    assert table.shape == (model.config.text_config.num_hidden_layers, len(de.SINK_PARTS))
    assert np.allclose(table.sum(1), 1.0, atol=1e-4) and (table >= 0).all()
    de.main(["sinks", "--model", tiny_llava_dir, "--samples", "2"])
    assert len(capsys.readouterr().out.splitlines()) == 2 + model.config.text_config.num_hidden_layers


def test_sinks_read_the_scene_as_words(tiny_llava_dir):
    model, processor = de.load(tiny_llava_dir, "eager")
    s = syn.short_answer_samples("test", 600, 1)[0]
    x, on_object, other = de.read_prompt(processor, s)
    words = processor.tokenizer.convert_ids_to_tokens(x["input_ids"][0])
    scene = " ".join(w for w, a, b in zip(words, on_object, other) if a or b)
    assert scene == syn.describe(s.objects) and not bool((on_object & other).any())
    assert " ".join(w for w, a in zip(words, on_object) if a) == " ".join(s.objects[i].phrase() for i in s.relevant)
    table = de.sinks(model, processor, 3, read=True)
    assert np.allclose(table.sum(1), 1.0, atol=1e-4) and (table >= 0).all()


def test_depth_keeps_the_same_tokens_after_each_layer(tiny_llava_dir, capsys):
    table = de.depth(tiny_llava_dir, 16, 6, depths=(0, 2, 8))  # (8: beyond the 4-layer model, left out)
    assert list(table) == ["baseline", "oracle[K=0]", "random[K=0]", "oracle[K=2]", "random[K=2]"]
    assert all(0 <= v <= 1 for row in table.values() for v in row.values())
    whole = de.depth(tiny_llava_dir, syn.NUM_PATCHES, 6, depths=(0, 2))  # every token kept: the baseline's
    assert all(row == whole["baseline"] for row in whole.values())
    de.main(["depth", "--model", tiny_llava_dir, "--samples", "3"])
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 2 + 7 and lines[2].startswith("baseline")  # K = 0, 1, 2 on 4 layers: 1 + 3 x 2 rows


def test_lookup_under_uniform_attention_gives_each_object_its_share_of_the_image(tiny_llava_dir, capsys):
    model, processor = de.load(tiny_llava_dir, "eager")
    with torch.no_grad():  # every query the zero vector: each query attends uniformly to the tokens before it
        for layer in model.model.language_model.layers:
            layer.self_attn.q_proj.weight.zero_()
            if layer.self_attn.q_proj.bias is not None:
                layer.self_attn.q_proj.bias.zero_()
    table, chance = de.lookup(model, processor, 3)
    assert set(table) == set(de.LOOKUP_FORMS) == set(chance)
    for form, row in table.items():
        assert row.shape == (model.config.text_config.num_hidden_layers,)
        assert np.allclose(row, chance[form], atol=1e-5), form
        assert 0 < chance[form] < 0.25
    # with its own (random) queries the shares move off uniform: the table reads the attention
    model, processor = de.load(tiny_llava_dir, "eager")
    table, same = de.lookup(model, processor, 3)
    assert same == chance and not np.allclose(table["place"], chance["place"], atol=1e-3)
    de.main(["lookup", "--model", tiny_llava_dir, "--samples", "2"])
    assert len(capsys.readouterr().out.splitlines()) == 2 + len(de.LOOKUP_FORMS)
