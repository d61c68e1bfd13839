"""`cirkit synth`: a deterministic, leak-free procedural CIR benchmark in the documented layout."""

import json
from pathlib import Path

import pytest
from PIL import Image
from typer.testing import CliRunner

from cirkit.errors import CirkitError
from cirkit.io import read_records
from cirkit.records import Caption, GalleryItem, Query, Triplet, resolve_path
from cirkit.synth import (
    DEFAULT_HELD_OUT,
    EDIT_TYPES,
    PLACE,
    TEMPLATES,
    Edit,
    Obj,
    Scene,
    SynthConfig,
    apply_edit,
    edit_text,
    parse_held_out,
    referring_expressions,
    run,
)

SMALL = dict(train_triplets=21, test_queries=14, distractors=5, image_size=32)
SPLITS = ("test", "compositional")


def _files(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def _scenes(out: Path) -> dict[str, Scene]:
    return {c.id: Scene.from_dict(c.extra["scene"]) for c in read_records(out / "all_captions.jsonl", Caption)}


def _train_ids(out: Path) -> set[str]:
    ids = {c.id for c in read_records(out / "captions.jsonl", Caption)}
    for t in read_records(out / "triplets.jsonl", Triplet):
        ids |= {Path(t.reference).stem, Path(t.target).stem}
    return ids


# ------------------------------------------------------------------ layout and records


def test_layout_and_every_record_parses(synth_dir):
    for name in ("images", "captions.jsonl", "all_captions.jsonl", "triplets.jsonl", "benchmark/meta.json"):
        assert (synth_dir / name).exists(), name
    for file, cls in (("captions.jsonl", Caption), ("all_captions.jsonl", Caption), ("triplets.jsonl", Triplet)):
        recs = read_records(synth_dir / file, cls)
        assert recs
        for r in recs:
            for field in ("image", "reference", "target"):
                if hasattr(r, field):
                    assert resolve_path(getattr(r, field), synth_dir).is_file()
    for c in read_records(synth_dir / "captions.jsonl", Caption):
        assert c.model == "synth" and c.prompt is None
    for t in read_records(synth_dir / "triplets.jsonl", Triplet):
        assert t.source == "synth" and t.reference_caption and t.target_caption
    for split in SPLITS:
        folder = synth_dir / "benchmark" / split
        gallery = read_records(folder / "gallery.jsonl", GalleryItem)  # unique ids enforced
        queries = read_records(folder / "queries.jsonl", Query)
        assert len(queries) == 28
        for g in gallery:
            assert resolve_path(g.image, folder).is_file()
        for q in queries:
            assert resolve_path(q.reference, folder).is_file() and q.text


def test_images_have_the_requested_size(synth_dir):
    first = next((synth_dir / "images").glob("*.png"))
    with Image.open(first) as im:
        assert im.size == (64, 64) and im.mode == "RGB"


def test_meta(synth_dir):
    meta = json.loads((synth_dir / "benchmark" / "meta.json").read_text())
    assert meta["name"] == "synth" and meta["splits"] == list(SPLITS) and meta["seed"] == 0
    assert meta["held_out"] == list(DEFAULT_HELD_OUT)
    assert meta["exclude_reference"] is False
    assert meta["counts"]["test"]["queries"] == 28


# ------------------------------------------------------------------ benchmark properties


def test_targets_references_and_hard_negatives_are_in_the_gallery(synth_dir):
    for split in SPLITS:
        folder = synth_dir / "benchmark" / split
        gallery = {g.id: g.image for g in read_records(folder / "gallery.jsonl", GalleryItem)}
        for q in read_records(folder / "queries.jsonl", Query):
            assert len(q.targets) == 1 and q.targets[0] in gallery
            assert q.reference_id in gallery and gallery[q.reference_id] == q.reference
            assert q.reference_id != q.targets[0]
            negs = q.extra["hard_negatives"]
            assert set(negs) <= set(gallery) and q.targets[0] not in negs and q.reference_id not in negs
        assert sum(len(q.extra["hard_negatives"]) > 0 for q in read_records(folder / "queries.jsonl", Query)) > 20


def test_held_out_combinations_never_appear_in_training(synth_dir):
    scenes, held = _scenes(synth_dir), set(DEFAULT_HELD_OUT)
    train = _train_ids(synth_dir)
    assert train
    for i in train:
        assert not scenes[i].combos() & held, scenes[i].caption()
    for c in read_records(synth_dir / "captions.jsonl", Caption):
        assert not any(h in c.caption for h in held), c.caption
    for t in read_records(synth_dir / "triplets.jsonl", Triplet):
        assert not any(h in t.reference_caption + t.target_caption for h in held)
    # ... while every compositional target holds one, and the in-distribution test split has none
    for q in read_records(synth_dir / "benchmark/compositional/queries.jsonl", Query):
        assert scenes[q.targets[0]].combos() & held
    for g in read_records(synth_dir / "benchmark/test/gallery.jsonl", GalleryItem):
        assert not scenes[g.id].combos() & held


def test_train_and_test_images_are_disjoint(synth_dir):
    scenes, train = _scenes(synth_dir), _train_ids(synth_dir)
    train_captions = {scenes[i].caption() for i in train}
    for split in SPLITS:
        for g in read_records(synth_dir / "benchmark" / split / "gallery.jsonl", GalleryItem):
            assert g.id not in train and scenes[g.id].caption() not in train_captions


def test_every_edit_type_is_present(synth_dir):
    assert {t.extra["edit"] for t in read_records(synth_dir / "triplets.jsonl", Triplet)} == set(EDIT_TYPES)
    for split in SPLITS:
        edits = {q.extra["edit"] for q in read_records(synth_dir / "benchmark" / split / "queries.jsonl", Query)}
        assert edits == set(EDIT_TYPES)


def test_target_is_the_edit_applied_to_the_reference(synth_dir):
    scenes = _scenes(synth_dir)
    for c in read_records(synth_dir / "all_captions.jsonl", Caption):
        assert scenes[c.id].caption() == c.caption and scenes[c.id].valid()
    for t in read_records(synth_dir / "triplets.jsonl", Triplet):
        ref, tgt = scenes[Path(t.reference).stem], scenes[Path(t.target).stem]
        assert ref.caption() == t.reference_caption and tgt.caption() == t.target_caption
        assert apply_edit(ref, Edit.from_dict(t.extra["edit_args"])).caption() == t.target_caption
    for split in SPLITS:
        for q in read_records(synth_dir / "benchmark" / split / "queries.jsonl", Query):
            ref = scenes[q.reference_id]
            tgt = apply_edit(ref, Edit.from_dict(q.extra["edit_args"]))
            assert tgt.image_id == q.targets[0] and tgt.caption() == q.extra["target_caption"]


# ------------------------------------------------------------------ captions and texts


def test_caption_grammar():
    s = Scene.make("gray", [Obj("star", "blue", "small", "right"), Obj("circle", "red", "large", "left")])
    assert s.caption() == "a large red circle on the left and a small blue star on the right, on a gray background"
    one = Scene.make("navy", [Obj("hexagon", "orange", "small", "center")])
    assert one.caption() == "a small orange hexagon in the center, on a navy background"


def test_referring_expressions_are_unique():
    s = Scene.make("black", [
        Obj("circle", "red", "large", "left"), Obj("circle", "red", "large", "right"), Obj("star", "red", "small", "top"),
    ])
    assert referring_expressions(s, "left") == ["the circle on the left"]
    assert "the star" in referring_expressions(s, "top") and "the red one" not in referring_expressions(s, "top")


def _resolve(scene, expression):
    """A literal reader of referring expressions: which objects does it describe?"""
    words = expression.removeprefix("the ")
    for pos, phrase in PLACE.items():
        if words.endswith(" " + phrase):
            words, hits = words.removesuffix(" " + phrase), [o for o in scene.objects if o.position == pos]
            break
    else:
        hits = list(scene.objects)
    for w in words.split():
        if w != "one":
            hits = [o for o in hits if w in (o.shape, o.colour, o.size)]
    return hits


def test_referring_expressions_pick_exactly_their_object():
    import random

    from cirkit.synth import _Sampler

    rng = random.Random(1)
    sampler = _Sampler(rng, {f"{c} {s}" for c in ("red", "blue") for s in ("circle", "star")}, 3)
    for _ in range(300):
        scene = sampler.scene()
        for o in scene.objects:
            for e in referring_expressions(scene, o.position):
                assert _resolve(scene, e) == [o], (scene.caption(), e)


def test_templates_are_varied_and_texts_name_the_value():
    import random

    assert all(len(v) >= 5 for v in TEMPLATES.values())
    rng = random.Random(0)
    s = Scene.make("gray", [Obj("circle", "red", "large", "left"), Obj("star", "blue", "small", "right")])
    for _ in range(30):
        assert "green" in edit_text(rng, s, Edit("colour", "left", "green"))
        assert "triangle" in edit_text(rng, s, Edit("shape", "right", "triangle"))
        assert "white" in edit_text(rng, s, Edit("background", None, "white"))
        text = edit_text(rng, s, Edit("add", None, Obj("diamond", "pink", "small", "center")))
        assert "a small pink diamond" in text and "in the center" in text


def test_parse_held_out():
    assert parse_held_out(["Purple Star, green triangle", "purple star"]) == ("purple star", "green triangle")
    with pytest.raises(CirkitError, match="COLOUR SHAPE"):
        parse_held_out(["violet star"])


# ------------------------------------------------------------------ determinism, safety


def test_same_seed_same_bytes_other_seed_other_bytes(tmp_path):
    a, b, c = tmp_path / "a", tmp_path / "b", tmp_path / "c"
    run(SynthConfig(out=a, seed=3, **SMALL))
    run(SynthConfig(out=b, seed=3, **SMALL))
    run(SynthConfig(out=c, seed=4, **SMALL))
    fa, fb, fc = _files(a), _files(b), _files(c)
    assert fa == fb
    assert fa["triplets.jsonl"] != fc["triplets.jsonl"] and set(fa) != set(fc)


def test_a_failed_run_leaves_nothing(tmp_path, monkeypatch):
    import cirkit.synth as synth

    calls = []

    def boom(scene, size):
        calls.append(1)
        if len(calls) > 10:
            raise RuntimeError("killed")
        return b""

    monkeypatch.setattr(synth, "png_bytes", boom)
    with pytest.raises(RuntimeError):
        run(SynthConfig(out=tmp_path / "out", **SMALL))
    assert list(tmp_path.iterdir()) == []


def test_bad_sizes_are_user_errors(tmp_path):
    with pytest.raises(CirkitError, match="--image-size"):
        run(SynthConfig(out=tmp_path / "x", image_size=4))
    with pytest.raises(CirkitError, match="--train-triplets"):
        run(SynthConfig(out=tmp_path / "x", train_triplets=-1))


# ------------------------------------------------------------------ CLI


def _cli(args):
    from cirkit.cli import app

    return CliRunner().invoke(app, ["-q", "synth", *args])


def test_cli_json_summary(tmp_path):
    out = tmp_path / "bench"
    res = _cli([str(out), "--train-triplets", "14", "--test-queries", "7", "--distractors", "3",
                "--image-size", "32", "--seed", "5", "--held-out", "red circle,blue star", "--json"])
    assert res.exit_code == 0, res.output
    summary = json.loads(res.stdout)
    assert summary["stage"] == "synth"
    counts = summary["counts"]
    assert counts["train_triplets"] == 14 and counts["test_queries"] == 7 and counts["compositional_queries"] == 7
    assert counts["images"] == len(list((out / "images").glob("*.png")))
    assert {"train_captions", "test_gallery", "compositional_gallery"} <= set(counts)
    meta = json.loads((out / "benchmark/meta.json").read_text())
    assert meta["held_out"] == ["red circle", "blue star"] and meta["seed"] == 5


def test_cli_refuses_to_overwrite(tmp_path):
    out = tmp_path / "bench"
    args = [str(out), "--train-triplets", "7", "--test-queries", "7", "--distractors", "0", "--image-size", "32"]
    assert _cli(args).exit_code == 0
    before = _files(out)
    res = _cli([*args, "--seed", "9"])
    assert res.exit_code == 1 and "--overwrite" in res.output
    assert _files(out) == before
    res = _cli([*args, "--seed", "9", "--overwrite"])
    assert res.exit_code == 0 and _files(out) != before
    other = tmp_path / "mine"
    other.mkdir()
    (other / "notes.txt").write_text("keep me")
    res = _cli([str(other), "--overwrite"])
    assert res.exit_code == 1 and (other / "notes.txt").read_text() == "keep me"


def test_cli_recipe_then_flags(tmp_path):
    recipe = tmp_path / "synth.yaml"
    recipe.write_text("synth:\n  train-triplets: 7\n  test-queries: 7\n  distractors: 0\n  image-size: 32\n  seed: 2\n")
    res = _cli([str(tmp_path / "out"), "-c", str(recipe), "--seed", "8", "--json"])
    assert res.exit_code == 0, res.output
    assert json.loads(res.stdout)["counts"]["train_triplets"] == 7
    assert json.loads((tmp_path / "out/benchmark/meta.json").read_text())["seed"] == 8
    bad = _cli([str(tmp_path / "out2"), "--held-out", "violet star"])
    assert bad.exit_code == 1 and "violet star" in bad.output
