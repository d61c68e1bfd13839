"""Every fixture annotation file parses through its adapter, quirks included."""

import pytest

from cirkit.benchmarks import detect_benchmark, load_benchmark
from cirkit.benchmarks.fashioniq import join_captions
from cirkit.errors import CirkitError, RecordError


def test_every_fixture_file_is_read_by_an_adapter(fixtures, tmp_path):
    read = set()
    for split in ("val", "test"):
        fiq = load_benchmark("fashioniq", fixtures / "fashioniq", tmp_path)
        for t in fiq.load(split):
            read.update({t.details["captions"], t.details["image_split"]})
    cirr = load_benchmark("cirr", fixtures / "cirr", tmp_path)
    for split in ("val", "test1"):
        task = cirr.load(split)[0]
        read.update(task.details.values())
        ext = cirr.caption_extensions(split)
        assert set(ext) == {q.id for q in task.queries}
        read.add(str(fixtures / "cirr" / "captions_ext" / f"cap.ext.rc2.{split}.json"))
    (tmp_path / "coco").mkdir()
    (tmp_path / "coco" / "000000000001.jpg").write_bytes(b"x")
    circo = load_benchmark("circo", fixtures / "circo", tmp_path / "coco")
    for split in ("val", "test"):
        read.add(circo.load(split)[0].details["annotations"])
    gen = load_benchmark("genecis", fixtures / "genecis", tmp_path)
    read.update(t.details["file"] for t in gen.load("val"))
    # the rest are the official submission examples, read by tests/test_submission.py
    others = {"submission_examples", "demo_files"}
    every = {
        str(p) for p in fixtures.rglob("*.json") if not any(part in others for part in p.parts)
    }
    assert every == read


def test_fashioniq(fixtures, tmp_path, load_json):
    fiq = load_benchmark("fashioniq", fixtures / "fashioniq", tmp_path)
    tasks = fiq.load("val")
    assert [t.name for t in tasks] == ["dress", "shirt", "toptee"]
    assert [len(t.queries) for t in tasks] == [30, 31, 32]
    assert [len(t.gallery) for t in tasks] == [69, 75, 75]
    dress = tasks[0]
    q0 = dress.queries[0]
    assert q0.text == "is shiny and silver with shorter sleeves and fit and flare"
    assert q0.targets == ["B0084Y8XIU"] and q0.reference_id == "B005X4PL1G"
    assert q0.reference == str(tmp_path / "B005X4PL1G.png")
    # real records with an empty first caption: the empty part is dropped, no leading "and"
    shirt_empty = tasks[1].queries[30]
    assert shirt_empty.text == "is grey with a design on the back"
    assert all(q.text and not q.text.startswith("and") for t in tasks for q in t.queries)
    assert not any(t.exclude_reference for t in tasks)
    test = fiq.load("test")
    assert all(not t.has_ground_truth for t in test) and [len(t.queries) for t in test] == [10, 10, 10]


def test_fashioniq_caption_join_modes():
    caps = ["Is shiny.", " fit and flare? "]
    assert join_captions(caps) == "Is shiny and fit and flare"
    assert join_captions(caps, "first") == "Is shiny"
    assert join_captions(caps, "second") == "fit and flare"
    assert join_captions(["", "is grey"], "and") == "is grey"
    with pytest.raises(CirkitError):
        join_captions(caps, "or")


def test_cirr(fixtures, tmp_path):
    cirr = load_benchmark("cirr", fixtures / "cirr", tmp_path)
    (val,) = cirr.load("val")
    assert len(val.queries) == 56 and len(val.gallery) == 41
    assert val.exclude_reference and val.subset_ks == (1, 2, 3)
    assert val.gallery["dev-244-0-img0"] == tmp_path / "./dev/dev-244-0-img0.png"
    q = {q.id: q for q in val.queries}
    assert q["12060"].targets == ["dev-1028-1-img1"] and len(q["12060"].subset) == 6
    assert q["12130"].targets  # target_hard missing from target_soft still counts
    (test,) = cirr.load("test1")
    assert not test.has_ground_truth and len(test.queries) == 38
    assert {x.id: x.text for x in test.queries}["27098"] == " "  # real caption of one space
    assert cirr.load("test")[0].name == "test1"


def test_circo(fixtures, tmp_path, solid):
    for i in (1, 355099):
        solid(tmp_path / f"{i:012d}.jpg")
    (tmp_path / "notes.txt").write_text("ignored")
    (tmp_path / "abc.jpg").write_bytes(b"ignored: not a numeric id")
    circo = load_benchmark("circo", fixtures / "circo", tmp_path)
    (val,) = circo.load("val")
    assert list(val.gallery) == ["1", "355099"]
    q0 = val.queries[0]
    assert q0.targets == ["355099", "528417", "534704"] and q0.reference_id == "271520"
    assert q0.reference == str(tmp_path / "000000271520.jpg")
    assert val.map_ks == (5, 10, 25, 50) and val.recall_first_target_only
    assert not val.exclude_reference
    (test,) = circo.load("test")
    assert not test.has_ground_truth and [q.id for q in test.queries] == [str(i) for i in range(20)]
    # the official layout below the images root is found too
    nested = tmp_path / "root" / "COCO2017_unlabeled" / "unlabeled2017"
    solid(nested / "000000000007.jpg")
    assert list(load_benchmark("circo", fixtures / "circo", tmp_path / "root").load("val")[0].gallery) == ["7"]


def test_genecis(fixtures, tmp_path, load_json):
    gen = load_benchmark("genecis", fixtures / "genecis", tmp_path)
    tasks = gen.load("val")
    assert [t.name for t in tasks] == ["focus_object", "change_object"]
    for t in tasks:
        assert len(t.queries) == 30  # duplicates are kept, as upstream scores them
        assert all(len(q.candidates) == 15 and q.candidates[0] == q.targets[0] for q in t.queries)
        assert t.details["dropped_records"] == 0
    rec19 = tasks[1].queries[19]
    assert rec19.text == "toaster" and rec19.targets == ["175364"]
    assert rec19.candidates.count("175364") == 2  # the real target-in-gallery quirk
    raw = load_json("genecis/genecis/focus_object.json")
    assert tasks[0].queries[0].text == raw[0]["condition"]
    assert tasks[0].queries[1].reference == str(tmp_path / "000000189213.jpg")


def test_genecis_drops_records_with_an_odd_gallery_length(tmp_path, load_json):
    import json

    recs = load_json("genecis/genecis/change_object.json")[:5]
    recs[2] = dict(recs[2], gallery=recs[2]["gallery"][:3])
    (tmp_path / "change_object.json").write_text(json.dumps(recs))
    (task,) = load_benchmark("genecis", tmp_path, tmp_path).load("val")
    assert len(task.queries) == 4 and task.details["dropped_records"] == 1


def test_detect_benchmark(fixtures):
    assert detect_benchmark(fixtures / "fashioniq") == "fashioniq"
    assert detect_benchmark(fixtures / "cirr") == "cirr"
    assert detect_benchmark(fixtures / "circo") == "circo"
    assert detect_benchmark(fixtures / "genecis") == "genecis"
    with pytest.raises(CirkitError):
        detect_benchmark(fixtures / "cirr" / "captions")


def test_bad_annotation_files_name_the_file_and_record(tmp_path):
    (tmp_path / "captions").mkdir()
    (tmp_path / "image_splits").mkdir()
    (tmp_path / "captions" / "cap.rc2.val.json").write_text('[{"pairid": 1, "reference": "a"}]')
    (tmp_path / "image_splits" / "split.rc2.val.json").write_text('{"a": "./dev/a.png"}')
    with pytest.raises(RecordError, match=r"cap.rc2.val.json: field .caption.: record 0"):
        load_benchmark("cirr", tmp_path, tmp_path).load("val")
    (tmp_path / "captions" / "cap.rc2.val.json").write_text("[{")
    with pytest.raises(RecordError, match="malformed JSON"):
        load_benchmark("cirr", tmp_path, tmp_path).load("val")
    with pytest.raises(CirkitError, match="unknown benchmark"):
        load_benchmark("nope", tmp_path)
