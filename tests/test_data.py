"""The embedded benchmark: deterministic, balanced where it claims to be, and scored correctly."""
import collections

import numpy as np
import pytest

from harness.data import DatasetError, load_samples
from harness.data import synthetic as syn


def test_samples_are_deterministic_by_split_and_index():
    a, b = syn.make_sample("test", 7), syn.make_sample("test", 7)
    assert (a.question, a.answer) == (b.question, b.answer)
    assert np.array_equal(np.asarray(a.image), np.asarray(b.image))
    assert np.asarray(syn.make_sample("val", 7).image).tobytes() != np.asarray(a.image).tobytes()


def test_a_training_canvas_stretches_the_grid_and_keeps_the_objects_sizes():
    for index in range(12):
        image, turns, objects, _ = syn.make_conversation(index, size=(120, 72))
        assert image.size == (120, 72) and len(objects[0].patch_pixels) == 15 * 9
        for o in objects:  # each object's pixels sit in its cell of the stretched 3x3 grid
            pix = o.patch_pixels.reshape(9, 15)
            ys, xs = np.nonzero(pix)
            cy = (ys * pix[ys, xs]).sum() / pix.sum() * 8 + 4
            cx = (xs * pix[ys, xs]).sum() / pix.sum() * 8 + 4
            row, col = divmod(o.cell, syn.GRID)
            assert int(cx // 40) == col and int(cy // 24) == row, (index, o)
    share, area = {}, {}  # objects keep their pixel sizes: a larger canvas adds background patches only
    for size in ((72, 72), (96, 96), (120, 120)):
        objs = [syn.make_conversation(i, size=size)[2] for i in range(40)]
        share[size] = np.mean([(sum(o.patch_pixels for o in ob) == 0).mean() for ob in objs])
        area[size] = {(o.shape, o.size): o.patch_pixels.sum() for ob in objs for o in ob if o.kind == "shape"}
    assert area[(120, 120)] == area[(96, 96)] and len(area[(96, 96)]) == 8
    for key, pixels in area[(72, 72)].items():  # 24-pixel cells: a 25-pixel shape at the border loses a row
        assert 0.9 * area[(96, 96)][key] <= pixels <= area[(96, 96)][key], key
    assert share[(72, 72)] + 0.1 < share[(96, 96)] < share[(120, 120)] - 0.05, share
    with pytest.raises(ValueError, match="canvas 100x96.*multiples of the 8-pixel patch"):
        syn.make_conversation(0, size=(100, 96))


def test_question_types_cycle_and_answers_are_balanced():
    samples = load_samples("shapes", "test", samples_per_type=100)
    by_type = collections.defaultdict(collections.Counter)
    for s in samples:
        by_type[s.qtype][s.answer] += 1
    assert set(by_type) == set(syn.QUESTION_TYPES)
    assert 40 <= by_type["exist"]["yes"] <= 60
    for t in ("attribute", "count", "position", "text"):
        majority = by_type[t].most_common(1)[0][1] / 100
        assert majority <= 0.45, (t, by_type[t].most_common(3))


def test_every_question_points_at_patches_that_hold_its_objects():
    for i in range(60):
        s = syn.make_sample("val", i)
        rel = s.patch_relevance()
        if s.qtype in ("attribute", "position", "text", "describe") or s.answer == "yes":
            assert rel.sum() > 0
            assert (rel > 0).sum() <= syn.NUM_PATCHES // 2
        # the relevant patches are a subset of the patches that hold any object
        assert np.all(s.patch_objectness()[rel > 0] > 0)


def test_oracle_priority_lets_every_relevant_object_take_turns():
    checked = 0
    for i in range(120):
        s = syn.make_sample("val", i)
        if len(s.relevant) < 3:
            continue
        prio = s.patch_priority()
        k = len(s.relevant)
        top = set(np.argsort(-prio, kind="stable")[:k].tolist())
        # the first k patches are one per relevant object: each object's best-covered patch
        for j in s.relevant:
            pix = s.objects[j].patch_pixels
            assert pix[list(top)].max() == pix.max(), (s.uid, j)
        # every relevant object's patches outrank every other patch
        rel = s.patch_relevance() > 0
        assert prio[rel].min() > prio[~rel].max()
        checked += 1
    assert checked >= 10


def test_patch_labels_mark_the_object_cells():
    s = syn.make_sample("val", 3)
    labels = syn.patch_labels(s.objects)
    for o in s.objects:
        best = int(o.patch_pixels.argmax())
        assert syn.PATCH_SHAPE_CLASSES[labels["shape"][best]] == o.shape


def test_scoring():
    assert syn.score("attribute", "Red", "red") == 1.0
    assert syn.score("exist", "no", "yes") == 0.0
    ref = "letter k at top ; large red circle at center"
    assert syn.description_f1(ref, ref) == 1.0
    assert syn.description_f1("large red circle at center", ref) == pytest.approx(2 / 3)
    assert syn.description_f1("large blue circle at center", ref) == 0.0
    assert syn.description_f1("", ref) == 0.0


def test_bad_dataset_arguments_are_one_clear_error():
    with pytest.raises(DatasetError, match="unknown dataset 'coco'.*allowed: shapes"):
        load_samples("coco")
    with pytest.raises(DatasetError, match="unknown split 'dev'"):
        load_samples("shapes", "dev")


def test_question_forms_tool_splits_types_by_how_the_question_names_its_object(tiny_llava_dir, capsys):
    from tools import question_forms

    forms = {question_forms.question_form(syn.make_sample("test", i)) for i in range(600, 900)}
    assert {"position: of the letter", "position: of a colour+shape", "exist: answer yes", "exist: answer no",
            "attribute: size of a colour+shape", "attribute: shape at a position"} <= forms
    question_forms.main(["--model", tiny_llava_dir, "--split", "val", "--start", "0", "--samples", "6"])
    out = capsys.readouterr().out.splitlines()
    assert len(out) == 4 and all("accuracy" in line for line in out)  # 6 samples, describe and text left out


def test_question_forms_scores_a_descriptions_objects_by_whether_their_colour_is_shared():
    from tools import question_forms

    s = next(s for s in (syn.make_sample("test", i, "describe") for i in range(600, 700))
             if len({o.color for o in s.objects if o.kind == "shape"}) < sum(o.kind == "shape" for o in s.objects))
    shapes = [o for o in s.objects if o.kind == "shape"]
    shared = {id(o) for o in shapes if sum(p.color == o.color for p in shapes) > 1}
    assert shared
    full = question_forms.describe_objects(s, s.answer)
    assert len(full) == len(shapes) and all(ok for _, ok in full)
    assert [f.endswith("shares") for f, _ in full] == [id(o) in shared for o in shapes]
    # one object's shape wrong: that object alone is missed
    wrong = shapes[0]
    other = next(x for x in syn.SHAPES if x != wrong.shape)
    text = s.answer.replace(wrong.phrase(), wrong.phrase().replace(wrong.shape, other))
    assert [ok for _, ok in question_forms.describe_objects(s, text)] == [o is not wrong for o in shapes]
