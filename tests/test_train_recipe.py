"""The neutral training recipe's pieces (issue 11): position gaps keep every visual token, the
grounding targets point at the question's objects (or none), the CLS targets name what is present,
and nothing in a neutral batch drops a token."""
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from harness.data import synthetic as syn
from harness.models import embedded
from tools import train_embedded as te


def test_position_gaps_keep_every_token_and_spread_their_positions():
    S, start, M = 200, 3, syn.NUM_PATCHES
    is_image = torch.zeros(2, S, dtype=torch.bool)
    is_image[:, start:start + M] = True
    mask = torch.ones(2, S, dtype=torch.long)
    assert te.position_gaps(0, mask, is_image, 0, 0.0) is None
    pos = te.position_gaps(5, mask, is_image, 0, 1.0, stretch=2.0)
    for b in range(2):
        p = pos[b]
        assert torch.equal(p[:start], torch.arange(start))  # text before the image untouched
        vis = p[start:start + M]
        assert (vis[1:] > vis[:-1]).all() and vis[0] >= start  # increasing, every token kept
        span = int(p[start + M]) - start  # text after continues past the whole (stretched) range
        assert M <= span <= 2 * M and int(vis[-1]) < start + span
        assert torch.equal(p[start + M:] - p[start + M], torch.arange(S - start - M))
    assert not torch.equal(pos, te.position_gaps(6, mask, is_image, 0, 1.0))  # drawn per step


def test_grounding_targets_name_the_questions_objects_or_none():
    s = next(syn.make_sample("train", i) for i in range(100) if syn.make_sample("train", i).qtype == "position")
    t = te.grounding_target(s.question, s.answer, s.relevant, s.objects)
    rel = s.patch_relevance()
    assert t[-1] == 0 and np.isclose(t.sum(), 1) and np.allclose(t[:-1], rel / rel.sum())
    assert te.grounding_target("is there a red cross ?", "no", [0], s.objects)[-1] == 1.0
    assert te.grounding_target("how many red objects are there ?", "zero", [], s.objects)[-1] == 1.0
    assert te.grounding_target("describe the image .", "...", list(range(len(s.objects))), s.objects) is None


def test_cls_targets_and_a_neutral_batch():
    s = syn.make_sample("train", 3)
    t = te.ImageHead.targets(s.objects)
    names = {n for n, v in zip(te.ImageHead.LABELS, t) if v}
    assert {o.color for o in s.objects if o.kind == "shape"} <= names
    assert {f"letter-{o.letter}" for o in s.objects if o.kind == "letter"} <= names
    assert len(names) == len({o.color for o in s.objects if o.kind == "shape"} | {o.shape for o in s.objects
                                                                                  if o.kind == "shape"}) + 1
    tok = embedded.build_processor().tokenizer
    image_id = embedded.build_config().image_token_id
    pv, ids, labels, weights, mask, patch, keep = te.batch_of(7, 4, tok, image_id, 0, turn_mean=True)
    assert keep is None and (ids == image_id).sum(1).eq(syn.NUM_PATCHES).all()  # nothing dropped
    q = patch["queries"]
    assert len(q) == len(patch["ground"]) > 0
    assistant = tok.get_vocab()["ASSISTANT:"]
    assert (ids[q[:, 0], q[:, 1]] == assistant).all()  # each query is a question's last prompt token
    assert torch.allclose(patch["ground"].sum(1), torch.ones(len(q)))
    g = te.Grounding(embedded.build_config().text_config.hidden_size)
    hidden = torch.randn(ids.shape[0], ids.shape[1], 128)
    rows = (ids == image_id).nonzero()[:, 1].view(ids.shape[0], -1)
    loss = g.loss(hidden, rows, q, patch["ground"])
    assert loss.ndim == 0 and loss > 0
    loss.backward()
    assert g.q.weight.grad is not None and g.none.grad is not None


def test_single_turn_batches_hold_one_question_each():
    tok = embedded.build_processor().tokenizer
    image_id = embedded.build_config().image_token_id
    _, ids, _, _, _, patch, _ = te.batch_of(5, 6, tok, image_id, 0, max_turns=1)
    assistant = tok.get_vocab()["ASSISTANT:"]
    assert (ids == assistant).sum(1).eq(1).all()
    _, ids4, *_ = te.batch_of(5, 6, tok, image_id, 0)
    assert (ids4 == assistant).sum(1).max() > 1  # the default mixes in follow-up questions


def test_object_heads_name_the_one_object_a_question_is_about():
    tok = embedded.build_processor().tokenizer
    image_id = embedded.build_config().image_token_id
    _, ids, _, _, _, patch, _ = te.batch_of(9, 8, tok, image_id, 0)
    about, queries = patch["about"], patch["queries"]
    assert about.shape == (len(queries), len(te.ObjectHeads.FIELDS))
    convs = [syn.make_conversation(9 * 8 + b) for b in range(8)]
    turns = [(turn, hits, objects) for _, ts, objects, rel in convs for turn, hits in zip(ts, rel)
             if not turn[0].startswith("describe")]
    assert len(turns) == len(about)
    for (turn, hits, objects), row in zip(turns, about.tolist()):
        if len(hits) != 1:
            assert row == [-100] * 4, turn
            continue
        o = objects[hits[0]]
        names = [classes[i] for classes, i in zip(te.ObjectHeads.FIELDS.values(), row)]
        assert names == [o.color, o.shape, o.size or "none", o.letter or "none"], turn
    assert (about[:, 0] == -100).any() and (about[:, 0] >= 0).any()
    heads = te.ObjectHeads(128)
    hidden = torch.randn(ids.shape[0], ids.shape[1], 128, requires_grad=True)
    loss = heads.loss(hidden, queries, about)
    loss.backward()
    assert loss > 0 and heads.heads["size"].weight.grad is not None
    ignored = [q for q, r in zip(queries.tolist(), about.tolist()) if r[0] == -100]
    assert all(hidden.grad[b, p].abs().sum() == 0 for b, p in ignored)  # questions about none or several
    assert te.ObjectHeads(128).loss(hidden, queries[:0], about[:0]) == 0


def test_text_only_rows_ask_without_the_image_and_have_no_image_targets():
    tok = embedded.build_processor().tokenizer
    image_id = embedded.build_config().image_token_id
    _, ids, labels, _, mask, patch, _ = te.batch_of(6, 12, tok, image_id, 0, text_only=0.5)
    blind = patch["text_only"]
    assert 0 < int(blind.sum()) < 12  # drawn per row
    has_image = (ids == image_id).any(1)
    assert torch.equal(has_image, ~blind) and (ids[has_image] == image_id).sum(1).eq(syn.NUM_PATCHES).all()
    assert not bool(blind[patch["queries"][:, 0]].any())  # no grounding or object target without the image
    assert ((labels != -100).sum(1) > 0).all()  # every row still has answers to learn
    _, same, *_ = te.batch_of(6, 12, tok, image_id, 0)
    for b in range(12):  # the same conversations, with or without the image
        n = int(mask[b].sum())
        words = ids[b, :n][ids[b, :n] != image_id]
        assert torch.equal(words, same[b][(same[b] != image_id) & (same[b] != tok.pad_token_id)])
    assert not bool(te.batch_of(6, 12, tok, image_id, 0)[5]["text_only"].any())


def test_canvas_batches_hold_every_token_of_a_stretched_canvas():
    import argparse

    assert te.canvas_of(3, 0, None) == (96, 96)
    drawn = {te.canvas_of(step, 0, [72, 96, 120]) for step in range(40)}
    assert drawn <= {(w, h) for w in (72, 96, 120) for h in (72, 96, 120)} and len(drawn) > 4
    assert te.canvas_of(11, 0, [72, 120]) == te.canvas_of(11, 0, [72, 120])  # a step's canvas is fixed
    tok = embedded.build_processor().tokenizer
    config = embedded.build_config()
    pv, ids, labels, weights, mask, patch, keep = te.batch_of(4, 3, tok, config.image_token_id, 0, size=(72, 120))
    n = 9 * 15
    assert pv.shape == (3, 3, 120, 72) and keep is None
    assert (ids == config.image_token_id).sum(1).eq(n).all()
    assert patch["color"].shape == (3, n) and patch["ground"].shape[1] == n + 1
    assert torch.allclose(patch["ground"].sum(1), torch.ones(len(patch["ground"])))
    from transformers import LlavaForConditionalGeneration

    torch.manual_seed(0)
    model = LlavaForConditionalGeneration(config).eval()
    with torch.no_grad():
        feats = te.vision_features(model, pv)
        square = te.vision_features(model, torch.zeros(1, 3, 96, 96))  # the tower's own size: no interpolation
    assert feats.shape == (3, n, config.vision_config.hidden_size) and square.shape[1] == 144
    with pytest.raises(ValueError, match="visual dropout needs the 96 x 96 canvas"):
        te.batch_of(4, 2, tok, config.image_token_id, 0, drop=True, size=(72, 72))
    for bad in ("72,100", "16", "a,b"):
        with pytest.raises(argparse.ArgumentTypeError, match="canvas side|integers"):
            te.parse_sides(bad)
    with pytest.raises(SystemExit):  # the legacy recipe's visual dropout is built for 96 x 96
        te.parse_args(["--canvas-sides", "72,96"])


def test_stop_step_ends_a_run_early_with_a_final_model_and_its_record(tmp_path):
    import json

    argv = ["--recipe", "neutral", "--out", str(tmp_path), "--vision-steps", "1", "--steps", "5",
            "--batch", "2", "--eval-n", "0", "--threads", "1", "--device", "cpu",
             "--canvas-sides", "72,104", "--proj-aux-weight", "0.3", "--object-weight", "0.5", "--object-layer", "1",
            "--text-only", "0.5", "--where-weight", "0.3"]  # (seed 0: full steps 1-3 hold mixed and all-text batches)
    te.main(argv + ["--stop-step", "3"])
    record = json.loads((tmp_path / "final" / "training.json").read_text())
    assert (record["steps"], record["planned_steps"]) == (3, 6)
    assert record["args"]["canvas_sides"] == [72, 104]
    assert (tmp_path / "final" / "model.safetensors").exists()
    saved = torch.load(tmp_path / "ckpt.pt", weights_only=False)
    assert saved["state"]["step"] == 3 and {"proj_aux", "object_heads", "where"} <= set(saved)
    te.main(argv + ["--stop-step", "4"])  # resumes: the optimiser holds the same heads as the checkpoint
    assert torch.load(tmp_path / "ckpt.pt", weights_only=False)["state"]["step"] == 4


def test_a_recorded_run_renders_as_a_command_that_repeats_it():
    argv = ["--recipe", "neutral", "--out", "x", "--steps", "2600", "--lr", "5e-4", "--pos-gaps", "0",
            "--type-weights", "count=3,exist=2", "--max-turns", "1", "--device", "cuda", "--threads", "7",
            "--init-from", "somewhere/final", "--canvas-sides", "72,96,120", "--attribute-forms", "shape-at=3,size=0.5",
            "--precision", "fp32", "--rope-theta", "1e5"]
    recorded = vars(te.parse_args(argv))
    cmd = te.command(recorded, "build/embedded-2", "build/embedded-1/final", stopped_at=900)
    words = cmd.split()
    assert words[:3] == ["python", "-m", "tools.train_embedded"] and "--threads" not in words
    assert words[words.index("--stop-step") + 1] == "900"
    again = vars(te.parse_args(words[3:]))
    for key, value in recorded.items():
        if key not in te.NOT_IN_COMMAND:
            assert again[key] == value, key
    assert (again["out"], again["init_from"]) == ("build/embedded-2", "build/embedded-1/final")
    assert te.command(vars(te.parse_args(["--recipe", "neutral"])), "o") == \
        "python -m tools.train_embedded --recipe neutral --out o"  # the recipe's defaults need no flags


def test_publish_history_follows_the_init_from_chain(tmp_path):
    import json

    from tools import publish_embedded as pe

    first, second, third = tmp_path / "a", tmp_path / "b", tmp_path / "c"
    for d, init, steps, planned in ((first, None, 900, 4400), (second, first, 2600, 2600), (third, second, 10, 10)):
        d.mkdir()
        extra = ["--canvas-sides", "72,96", "--proj-aux-weight", "0.3", "--object-weight", "1",
                 "--turn-mean-from", "100000", "--text-only", "0.05"] if d is third else []
        args = vars(te.parse_args(["--recipe", "neutral"] + (["--init-from", str(init)] if init else []) + extra))
        (d / "training.json").write_text(json.dumps({"args": args, "steps": steps, "planned_steps": planned,
                                                     "minutes": 1.0}))
    chain = pe.history(third)
    assert [st["steps"] for st in chain] == [900, 2600, 10]
    text = pe.stage_text(chain[0], 1)
    assert "--stop-step 900" in text and "stopped by a time budget; 4400 planned" in text
    chain[0]["args"]["stop_step"] = 900  # a run stopped on purpose (a snapshot), not by --max-minutes
    assert "stopped by --stop-step; 4400 planned" in pe.stage_text(chain[0], 1)
    last = pe.stage_text(chain[2], 3)
    assert "--init-from build/embedded-2/final" in last and "--canvas-sides 72,96" in last
    assert "drawn from 72, 96 px" in last and "object heads at decoder layer 8 x 1" in last
    assert "every answer token weighs the same" in last and "turn weighs" not in last
    assert "rotary base" not in last
    chain[2]["args"]["rope_theta"] = 100000.0
    assert "the decoder's rotary base set to 100000" in pe.stage_text(chain[2], 3)
    assert "5 % of conversations asked with no image" in last and "--text-only 0.05" in last
    assert "every answer turn weighs the same from full step 1500" in pe.stage_text(chain[1], 2)


def test_carry_heads_starts_a_continued_run_with_the_heads_its_source_ended_with(tmp_path, monkeypatch):
    import json

    first, second = tmp_path / "a", tmp_path / "b"
    common = ["--recipe", "neutral", "--batch", "2", "--eval-n", "0", "--threads", "1", "--device", "cpu",
              "--proj-aux-weight", "0.3", "--object-weight", "0.5", "--object-layer", "1"]
    te.main(common + ["--out", str(first), "--vision-steps", "1", "--steps", "2"])
    ended = torch.load(first / "ckpt.pt", weights_only=False)
    seen = {}
    real = te.ObjectHeads.loss

    def spy(self, *a, **k):  # the object heads' weights at the continued run's first step
        seen.setdefault("w", self.heads["color"].weight.detach().clone())
        return real(self, *a, **k)

    monkeypatch.setattr(te.ObjectHeads, "loss", spy)
    argv = common + ["--out", str(second), "--init-from", str(first / "final"), "--steps", "1"]
    te.main(argv + ["--carry-heads"])
    assert torch.equal(seen["w"], ended["object_heads"]["heads.color.weight"])
    assert json.loads((second / "final" / "training.json").read_text())["args"]["carry_heads"]
    assert "--carry-heads" in te.command(vars(te.parse_args(argv + ["--carry-heads"])), "o", "i")
    seen.clear()
    te.main([w if w != str(second) else str(tmp_path / "c") for w in argv])  # default: fresh heads
    assert not torch.equal(seen["w"], ended["object_heads"]["heads.color.weight"])
    from transformers import AutoConfig

    te.main([w if w != str(second) else str(tmp_path / "e") for w in argv] + ["--rope-theta", "1e5"])
    theta = {d: AutoConfig.from_pretrained(d / "final").text_config.rope_parameters["rope_theta"]
             for d in (first, tmp_path / "e")}
    assert theta == {first: 10000.0, tmp_path / "e": 100000.0}  # a continued stage may change the rotary base
    with pytest.raises(SystemExit):
        te.parse_args(common + ["--rope-theta", "1"])
    with pytest.raises(SystemExit):  # nothing to carry from without --init-from
        te.parse_args(common + ["--carry-heads"])
    (first / "ckpt.pt").unlink()
    with pytest.raises(SystemExit, match="ckpt.pt"):
        te.main(argv[:-2] + ["--out", str(tmp_path / "d"), "--steps", "1", "--carry-heads"])


def test_patch_cells_are_the_grid_cells_render_scene_places_objects_in():
    import random

    assert (te.patch_cells((96, 96)).reshape(12, 12) == np.kron(np.arange(9).reshape(3, 3), np.ones((4, 4)))).all()
    for size in ((72, 120), (168, 88), (96, 96)):
        cells = te.patch_cells(size)
        assert cells.shape == ((size[0] // syn.PATCH) * (size[1] // syn.PATCH),)
        for k in range(20):
            _, objects = syn.render_scene(random.Random(k), size)
            for o in objects:  # the patch an object covers most lies in the object's cell
                assert cells[int(np.argmax(o.patch_pixels))] == o.cell, (size, o)


def test_publish_history_survives_an_installed_directory_overwritten_by_a_descendant(tmp_path):
    import json

    from tools import publish_embedded as pe

    installed, later = tmp_path / "installed", tmp_path / "later"
    installed.mkdir()
    later.mkdir()
    def rec(init, seed):
        argv = ["--recipe", "neutral", "--seed", str(seed)] + (["--init-from", str(init)] if init else [])
        return {"args": vars(te.parse_args(argv)), "steps": 10, "minutes": 1.0}

    first = rec(None, 1)
    second = rec(installed, 2)  # continued from the installed model (first) ...
    (later / "training.json").write_text(json.dumps(second))
    # ... which was then replaced in place by `second` itself (installed with its history)
    (installed / "training.json").write_text(json.dumps({"stages": [first, second]}))
    assert [st["args"]["seed"] for st in pe.history(later)] == [1, 2]


def test_text_scene_rows_read_their_description_where_the_image_would_be():
    tok = embedded.build_processor().tokenizer
    image_id = embedded.build_config().image_token_id
    _, ids, labels, _, mask, patch, _ = te.batch_of(8, 10, tok, image_id, 0, text_scenes=1.0)
    assert not bool((ids == image_id).any()) and bool(patch["text_only"].all())
    assert len(patch["queries"]) == 0  # no grounding or object target without the image
    _, seen, seen_labels, *_ = te.batch_of(8, 10, tok, image_id, 0)
    vocab = tok.get_vocab()
    for b in range(10):
        _, turns, objects, _ = syn.make_conversation(8 * 10 + b)
        scene = [vocab[w] for w in syn.describe(objects).split()]
        n = int(mask[b].sum())
        assert ids[b, 2:2 + len(scene)].tolist() == scene  # <s> USER: <the scene in words> <question> ...
        assert ids[b, 2 + len(scene):n].tolist() == [t for t in seen[b].tolist()[2:]
                                                     if t not in (image_id, tok.pad_token_id)]
        assert sorted(labels[b][labels[b] != -100].tolist()) == sorted(seen_labels[b][seen_labels[b] != -100].tolist())
    _, same, every, weights, *_ = te.batch_of(8, 10, tok, image_id, 0, text_scenes=1.0, all_tokens=True)
    assert torch.equal(same, ids)  # a language model's labels: every token after <s>, weighing 1
    real = mask.bool() & (torch.arange(ids.shape[1]) > 0)
    assert torch.equal(every[real], ids[real]) and bool((every[~real] == -100).all())
    assert torch.equal(weights, real.float())
    _, _, image_labels, *_ = te.batch_of(8, 3, tok, image_id, 0, all_tokens=True)
    assert not bool((image_labels == image_id).any())  # an image placeholder is never a label
    mixed = te.batch_of(8, 12, tok, image_id, 0, text_scenes=0.5)[5]["text_only"]
    assert 0 < int(mixed.sum()) < 12
    with pytest.raises(SystemExit):  # a language stage takes no image-side objective
        te.parse_args(["--recipe", "neutral", "--language-stage"])
    for bad in (["--text-scenes", "1.5"], ["--freeze", "tower,eyes"], ["--all-tokens"]):
        with pytest.raises(SystemExit):
            te.parse_args(["--recipe", "neutral"] + bad)


LANGUAGE = ["--language-stage", "--pos-gaps", "0", "--cls-weight", "0", "--ground-weight", "0"]


def test_llava_stages_train_only_the_parts_they_name(tmp_path, monkeypatch):
    """A language stage never runs the tower; --vision-from takes another model's tower; --freeze
    tower,decoder (LLaVA-1.5's alignment stage) changes the projector alone, and a continued stage
    starts from the model it continues (with the sink prior's eager attention too)."""
    from safetensors.torch import load_file
    from transformers import LlavaForConditionalGeneration

    common = ["--recipe", "neutral", "--batch", "2", "--eval-n", "0", "--threads", "1", "--device", "cpu"]
    real = te.vision_features

    def forbidden(*a, **k):
        raise AssertionError("a language stage ran the vision tower")

    monkeypatch.setattr(te, "vision_features", forbidden)
    te.main(common + LANGUAGE + ["--all-tokens", "--out", str(tmp_path / "a"), "--steps", "2"])
    monkeypatch.setattr(te, "vision_features", real)
    torch.manual_seed(5)
    LlavaForConditionalGeneration(embedded.build_config()).half().save_pretrained(tmp_path / "clip")
    te.main(common + ["--out", str(tmp_path / "b"), "--init-from", str(tmp_path / "a" / "final"), "--steps", "2",
                      "--vision-from", str(tmp_path / "clip"), "--freeze", "tower,decoder", "--sink-weight", "1"])
    a, b, clip = (load_file(tmp_path / d / "model.safetensors") for d in ("a/final", "b/final", "clip"))
    tower = [k for k in b if "vision_tower" in k]
    projector = [k for k in b if "multi_modal_projector" in k]
    decoder = [k for k in b if k not in tower and k not in projector]
    assert tower and projector and decoder
    assert all(torch.equal(b[k], clip[k]) for k in tower)
    assert all(torch.equal(b[k], a[k]) for k in decoder)
    assert not all(torch.equal(b[k], a[k]) for k in projector)


def test_textured_backgrounds_change_the_background_alone():
    flat_image, turns, objects, relevant = syn.make_conversation(7)
    image, turns2, objects2, relevant2 = syn.make_conversation(7, texture=True)
    assert (turns2, relevant2) == (turns, relevant)
    assert all(np.array_equal(a.patch_pixels, b.patch_pixels) for a, b in zip(objects, objects2))
    flat, tex = np.asarray(flat_image, np.float64), np.asarray(image, np.float64)
    same = (flat == tex).all(2)
    cover = sum(o.patch_pixels for o in objects).reshape(12, 12)
    background = np.kron(cover == 0, np.ones((8, 8), bool))
    assert not same[background].any()  # the background differs ...
    assert tex[background].max() <= 150 and (tex[background][:, 0] == tex[background][:, 2]).all()  # ... in greys
    patch_means = tex[background].reshape(-1, 3)[:, 0]
    assert patch_means.std() > 8  # structure beyond the flat shade's pixel noise (sigma 6)
    tok = embedded.build_processor().tokenizer
    image_id = embedded.build_config().image_token_id
    _, ids, *_ = te.batch_of(2, 8, tok, image_id, 0, textures=0.5)
    _, same, *_ = te.batch_of(2, 8, tok, image_id, 0)
    assert torch.equal(ids, same)  # the same conversations
    with pytest.raises(SystemExit):
        te.parse_args(["--recipe", "neutral", "--textures", "2"])


def test_sink_prior_measures_each_heads_shortfall_of_attention_on_the_first_token():
    B, H, S = 2, 3, 5
    on_first = torch.zeros(B, H, S, S)
    on_first[..., 0] = 1.0
    uniform = torch.full((B, H, S, S), 1 / S)
    mask = torch.ones(B, S, dtype=torch.long)
    assert te.sink_loss([uniform, on_first, on_first], mask, 0.5, 1) == 0  # layer 0 is left out
    assert torch.isclose(te.sink_loss([on_first, uniform], mask, 0.5, 1), torch.tensor(0.5 - 1 / S))
    mixed = uniform.clone()
    mixed[1, :, 3:] = on_first[1, :, 3:]  # row 1's last two queries park on <s>; its padding is not counted
    short_mask = mask.clone()
    short_mask[0, 3:] = 0
    expected = (0.5 - 1 / S) * (2 + 2) / (2 + 4)  # row 0: both real queries short; row 1: two of four
    assert torch.isclose(te.sink_loss([mixed], short_mask, 0.5, 0), torch.tensor(expected))


def test_a_new_model_can_have_a_deeper_tower(tmp_path):
    import json

    te.main(["--recipe", "neutral", "--out", str(tmp_path / "a"), "--vision-steps", "1", "--steps", "1",
             "--batch", "2", "--eval-n", "0", "--threads", "1", "--device", "cpu", "--tower-layers", "6",
             "--where-weight", "0.3", "--where-balance"])
    config = json.loads((tmp_path / "a" / "final" / "config.json").read_text())
    assert config["vision_config"]["num_hidden_layers"] == 6 and config["vision_feature_layer"] == -2
    for bad in (["--tower-layers", "1"], ["--tower-layers", "6", "--init-from", "x"]):
        with pytest.raises(SystemExit):
            te.parse_args(["--recipe", "neutral"] + bad)


def test_card_text_names_a_language_stage_and_the_llava_options():
    from tools import publish_embedded as pe

    lang = vars(te.parse_args(["--recipe", "neutral"] + LANGUAGE + ["--all-tokens"]))
    text = pe.stage_text({"args": lang, "steps": 600, "planned_steps": 600, "minutes": 13.0}, 1)
    assert "--language-stage" in text and "--all-tokens" in text and "a language stage" in text
    assert "next-token loss on every token" in text and "vision-only steps" not in text
    later = vars(te.parse_args(["--recipe", "neutral", "--init-from", "a/final", "--vision-from", "clip",
                                "--freeze", "tower,decoder", "--textures", "0.5", "--sink-weight", "2"]))
    text = pe.stage_text({"args": later, "steps": 10, "planned_steps": 10, "minutes": 1.0}, 2)
    assert "--freeze tower,decoder" in text and "frozen: tower, decoder" in text
    assert "tower taken from `clip`" in text and "50 % of the images on textured backgrounds" in text
    assert "keeps at least 0.5 of each query's attention on <s>, x 2" in text
    card = pe.card({k: {t: 0.5 for t in syn.QUESTION_TYPES} for k in ("model", "majority", "blind")}, [], 10, 63,
                   tower_layers=8, millions=5)
    assert "A 5 M-parameter" in card and "8 layers x 128 wide" in card


def test_where_balance_weighs_object_patches_as_much_as_the_background():
    torch.manual_seed(0)
    heads = te.WhereHeads(8, 8)
    feats, image = torch.randn(2, 144, 8), torch.randn(2, 144, 8)
    cells = torch.from_numpy(te.patch_cells((96, 96)))
    plain = heads.loss(feats, image, cells)
    ref = sum(F.cross_entropy(h(x).flatten(0, 1), cells.expand(2, -1).flatten())
              for h, x in ((heads.tower, feats), (heads.projector, image)))
    assert torch.isclose(plain, ref, rtol=1e-5)  # unbalanced: the plain mean over every patch
    on_object = torch.zeros(2, 144, dtype=torch.bool)
    on_object[:, :8] = True
    ce = F.cross_entropy(heads.tower(feats).flatten(0, 1), cells.expand(2, -1).flatten(), reduction="none").view(2, 144)
    expected = 0.5 * ce[on_object].mean() + 0.5 * ce[~on_object].mean()
    assert torch.isclose(heads.loss(feats, None, cells, on_object), expected, rtol=1e-5)
    from tools import publish_embedded as pe

    args = vars(te.parse_args(["--recipe", "neutral", "--where-weight", "0.3", "--where-balance"]))
    assert "half each" in pe.stage_text({"args": args, "steps": 1, "planned_steps": 1, "minutes": 0.1}, 1)


def test_attribute_forms_skew_the_training_mix_and_leave_the_splits_alone():
    forms = {"color-at": "what color is the", "shape-of-color-at": "object at the", "size": "what size is",
             "shape-at": "what shape is at the"}
    only = {f: 0.0 for f in syn.ATTRIBUTE_FORMS}
    for form, words in forms.items():
        questions = [q for i in range(40) for q, _ in
                     syn.make_conversation(i, type_weights={"attribute": 1.0, **{t: 0.0 for t in syn.QUESTION_TYPES
                                                                               if t != "attribute"}},
                                           attribute_forms={**only, form: 1.0})[1]]
        assert questions and all(words in q for q in questions), form
    # the test split draws its forms uniformly: all four appear, none of them dominates
    drawn = [syn.make_sample("test", i, "attribute").question for i in range(200)]
    counts = [sum(words in q for q in drawn) for words in forms.values()]
    assert min(counts) >= 30, counts
    with pytest.raises(SystemExit):
        te.parse_args(["--recipe", "neutral", "--attribute-forms", "shape-at-the=2"])


def test_make_train_embedded_runs_the_stages_of_the_installed_models_card():
    """`make train-embedded` repeats the installed model: its stage rules run the card's commands,
    in the card's order, and the target is the last stage."""
    import re
    from pathlib import Path

    from harness.models import embedded

    card = (Path(embedded.EMBEDDED_DIR) / "README.md").read_text()
    stages = re.findall(r"^(\d+)\. `(python -m tools\.train_embedded [^`]+)`", card, re.M)
    make = (Path(__file__).resolve().parents[1] / "Makefile").read_text()
    rules = re.findall(r"^build/embedded-(\d+)/final/model\.safetensors:.*\n\t\$\(BIN\)/(python -m [^\n]+)", make, re.M)
    assert stages and rules == stages
    assert f"train-embedded: build/embedded-{stages[-1][0]}/final/model.safetensors" in make
