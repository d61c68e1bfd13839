"""The instruction scorer: synth's own texts all score correct; wrong ones fail on the right count."""

from __future__ import annotations

import json

import pytest

from cirkit.instruction_score import (
    InstructionScore,
    edit_between,
    parse_caption,
    score_instruction,
    score_triplet,
    summarize,
)
from cirkit.synth import Edit, Obj, Scene, apply_edit

STAR = Obj("star", "red", "small", "left")
CIRCLE = Obj("circle", "white", "large", "top right")
STAR2 = Obj("star", "green", "large", "bottom")
TWO = Scene.make("navy", [STAR, CIRCLE])
THREE = Scene.make("navy", [STAR, CIRCLE, STAR2])
ONE = Scene.make("gray", [STAR])


def score(text, scene, edit):
    s = score_instruction(text, scene, edit)
    return s.value, s.object, s.kind, s.correct


@pytest.mark.parametrize("text,scene,edit,expected", [
    # colour: value, object, kind
    ("make the star blue", TWO, Edit("colour", "left", "blue"), (True, True, True, True)),
    ("make it blue", ONE, Edit("colour", "left", "blue"), (True, True, True, True)),
    ("make it blue", TWO, Edit("colour", "left", "blue"), (True, False, True, False)),  # which one?
    ("make the star green", TWO, Edit("colour", "left", "blue"), (False, True, True, False)),
    ("make the circle blue", TWO, Edit("colour", "left", "blue"), (True, False, True, False)),
    ("make the star blue", THREE, Edit("colour", "left", "blue"), (True, False, True, False)),  # two stars
    ("make the red star blue", THREE, Edit("colour", "left", "blue"), (True, True, True, True)),
    ("make the star on the left blue", THREE, Edit("colour", "left", "blue"), (True, True, True, True)),
    ("make the small star blue", THREE, Edit("colour", "left", "blue"), (True, True, True, True)),
    ("make the large star blue", THREE, Edit("colour", "left", "blue"), (True, False, True, False)),
    ("move the star to the right and make it blue", TWO, Edit("colour", "left", "blue"), (True, True, False, False)),
    ("make the star blue on a gray background", TWO, Edit("colour", "left", "blue"), (True, True, False, False)),
    # an LLM's reply that names the object but describes another change
    ("move the small red star to the left, on a navy background", TWO, Edit("colour", "left", "blue"),
     (False, True, False, False)),
    # shape
    ("turn the star into a circle", ONE, Edit("shape", "left", "circle"), (True, True, True, True)),
    ("turn the star into a hexagon", ONE, Edit("shape", "left", "circle"), (False, True, True, False)),
    # size: direction words
    ("make the star bigger", TWO, Edit("size", "left", "large"), (True, True, True, True)),
    ("scale the small star up", THREE, Edit("size", "left", "large"), (True, True, True, True)),
    ("shrink the star", TWO, Edit("size", "left", "large"), (False, True, True, False)),
    ("make the star bigger", TWO, Edit("colour", "left", "blue"), (False, True, False, False)),
    # move: the destination
    ("move the star to the top left", TWO, Edit("move", "left", "top left"), (True, True, True, True)),
    ("move the star to the top", TWO, Edit("move", "left", "top left"), (False, True, True, False)),
    ("put the star in the upper left", TWO, Edit("move", "left", "top left"), (True, True, True, True)),
    ("move the circle to the top left", TWO, Edit("move", "left", "top left"), (True, False, True, False)),
    # add: the new object's colour and shape
    ("add a small blue hexagon at the bottom", TWO, Edit("add", None, Obj("hexagon", "blue", "small", "bottom")),
     (True, True, True, True)),
    ("add a blue star", TWO, Edit("add", None, Obj("hexagon", "blue", "small", "bottom")), (False, True, True, False)),
    ("remove the star", TWO, Edit("add", None, Obj("hexagon", "blue", "small", "bottom")), (False, True, False, False)),
    # remove
    ("remove the circle", TWO, Edit("remove", "top right"), (True, True, True, True)),
    ("take the white circle in the top right away", TWO, Edit("remove", "top right"), (True, True, True, True)),
    ("remove the star", TWO, Edit("remove", "top right"), (True, False, True, False)),
    ("add a circle", TWO, Edit("remove", "top right"), (False, True, False, False)),
    # background
    ("change the background to beige", TWO, Edit("background", None, "beige"), (True, True, True, True)),
    ("change the background to brown", TWO, Edit("background", None, "beige"), (False, True, True, False)),
    ("make it beige", TWO, Edit("background", None, "beige"), (False, True, True, False)),
    ("", TWO, Edit("background", None, "beige"), (False, True, True, False)),
])
def test_score_instruction(text, scene, edit, expected):
    assert score(text, scene, edit) == expected


def test_synth_texts_all_score_correct(synth_dir):
    """Every human-like text synth writes (train triplets and both query splits) names its edit."""
    recs = [json.loads(x) for x in (synth_dir / "triplets.jsonl").read_text().splitlines()]
    for split in ("test", "compositional"):
        for q in (synth_dir / "benchmark" / split / "queries.jsonl").read_text().splitlines():
            q = json.loads(q)
            recs.append({"instruction": q["text"], "reference_caption": q["reference_caption"],
                         "target_caption": q["target_caption"], "edit_args": q["edit_args"]})
    scores = [score_triplet(r) for r in recs]
    assert len(scores) > 100 and all(s is not None and s.correct for s in scores), \
        [r["instruction"] for r, s in zip(recs, scores, strict=True) if s is None or not s.correct]
    assert {s.edit for s in scores} == {"colour", "shape", "size", "move", "add", "remove", "background"}


def test_parse_caption_round_trips_and_is_strict(synth_dir):
    for line in (synth_dir / "all_captions.jsonl").read_text().splitlines():
        rec = json.loads(line)
        scene = parse_caption(rec["caption"])
        assert scene == Scene.from_dict(rec["scene"])
    good = TWO.caption()
    for bad in ("", "a red star", good.replace("navy", "teal"), good.replace(" and ", " & "), good + ".",
                good.replace("small red star", "small red blob"), "a small red star on the left and a small "
                "red star on the left, on a navy background"):
        assert parse_caption(bad) is None, bad


def test_edit_between_finds_one_edit_or_none():
    edits = [Edit("colour", "left", "blue"), Edit("shape", "left", "circle"), Edit("size", "left", "large"),
             Edit("move", "left", "center"), Edit("remove", "top right"), Edit("background", None, "black"),
             Edit("add", None, Obj("diamond", "pink", "small", "bottom right"))]
    for e in edits:
        assert edit_between(TWO, apply_edit(TWO, e)) == e
    assert edit_between(TWO, TWO) is None
    two_changes = apply_edit(apply_edit(TWO, edits[0]), edits[5])
    assert edit_between(TWO, two_changes) is None
    assert edit_between(TWO, apply_edit(apply_edit(TWO, edits[0]), edits[1])) is None  # two attributes
    assert edit_between(ONE, TWO) is None  # another background and another object


def test_score_triplet_uses_edit_args_or_the_captions():
    tgt = apply_edit(TWO, Edit("colour", "left", "blue"))
    rec = {"instruction": "make the star blue", "reference_caption": TWO.caption(), "target_caption": tgt.caption()}
    assert score_triplet(rec).correct
    assert score_triplet({**rec, "extra": {"edit_args": Edit("colour", "left", "pink").to_dict()}}).value is False
    assert score_triplet({**rec, "target_caption": TWO.caption()}) is None  # no edit
    assert score_triplet({**rec, "reference_caption": "a photo of a dog"}) is None  # not a synth caption


def test_summarize_rates():
    a = InstructionScore("colour", True, True, True)
    b = InstructionScore("colour", True, False, True)
    c = InstructionScore("move", False, True, False)
    s = summarize([a, b, c, None])
    assert s["scored"] == 3 and s["not_one_edit"] == 1
    assert s["correct"] == round(1 / 3, 4) and s["value"] == round(2 / 3, 4) and s["object"] == round(2 / 3, 4)
    assert s["correct_by_edit"] == {"colour": 0.5, "move": 0.0}
    assert summarize([None])["correct"] is None
    assert a.to_dict()["correct"] is True and b.to_dict()["correct"] is False
