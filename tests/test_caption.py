"""`caption`: tiny LLaVA/BLIP runs, unreadable images, resume, sharded parts, and `--from` imports."""

from __future__ import annotations

import csv
import json

import pytest

torch = pytest.importorskip("torch")
from PIL import Image  # noqa: E402
from typer.testing import CliRunner  # noqa: E402

from cirkit.caption import CaptionConfig, import_captions, merge_parts, part_path, run  # noqa: E402
from cirkit.device import ProcessInfo  # noqa: E402
from cirkit.errors import CirkitError, ImageError  # noqa: E402
from cirkit.io import read_records  # noqa: E402
from cirkit.records import Caption  # noqa: E402
from cirkit.testing import build_tiny_blip, build_tiny_llava  # noqa: E402

COLOURS = [(255, 0, 0), (0, 255, 0), (0, 0, 255), (255, 255, 0), (0, 255, 255), (90, 90, 90)]


@pytest.fixture(scope="module")
def llava(tmp_path_factory):
    return str(build_tiny_llava(tmp_path_factory.mktemp("llava")))


@pytest.fixture
def folder(tmp_path):
    root = tmp_path / "photos"
    for i, c in enumerate(COLOURS):
        sub = root / ("shoes" if i % 2 else "bags")
        sub.mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (40 + 4 * i, 36), c).save(sub / f"im{i}.png")
    (root / "bags" / "broken.jpg").write_bytes(b"not a jpeg at all")
    return root


def cfg(images, out, model, **kw):
    return CaptionConfig(images=images, output=out, model=model, max_new_tokens=4, batch_size=2, num_workers=0,
                         device="cpu", **kw)


@pytest.mark.slow
def test_llava_folder_run_skips_broken_and_records_settings(folder, llava, tmp_path):
    out = tmp_path / "out" / "captions.jsonl"
    r = run(cfg(folder, out, llava, prompt="describe the image"))
    caps = read_records(out, Caption)
    assert r.counts["captioned"] == len(caps) == len(COLOURS)
    assert [s[0] for s in r.skipped] == ["bags/broken"]
    for c in caps:
        assert c.model == llava and c.prompt == "describe the image"
        assert c.settings["max_new_tokens"] == 4 and c.settings["decoding"] == "greedy"
        assert c.group in ("bags", "shoes")
        assert (out.parent / c.image).resolve() == (folder / f"{c.id}.png").resolve()
    with pytest.raises(ImageError, match="broken"):
        run(cfg(folder, tmp_path / "strict.jsonl", llava, strict=True))


def test_default_prompt_for_chat_models(folder, llava, tmp_path):
    from cirkit.caption import DEFAULT_PROMPT

    out = tmp_path / "c.jsonl"
    run(cfg(folder, out, llava, limit=2))
    assert {c.prompt for c in read_records(out, Caption)} == {DEFAULT_PROMPT}


@pytest.mark.slow
def test_resume_writes_each_id_once(folder, llava, tmp_path):
    out = tmp_path / "c.jsonl"
    run(cfg(folder, out, llava, limit=3))
    with open(out, "ab") as fh:  # a torn line, as after kill -9 mid-write
        fh.write(b'{"id": "shoes/im5", "ima')
    r = run(cfg(folder, out, llava))
    caps = read_records(out, Caption)
    # limit=3 took bags/broken (skipped, retried now), bags/im0 and bags/im2
    assert r.counts["already_done"] == 2 and r.counts["captioned"] == len(COLOURS) - 2
    assert sorted(c.id for c in caps) == sorted({c.id for c in caps}) and len(caps) == len(COLOURS)
    ref = tmp_path / "ref.jsonl"
    run(cfg(folder, ref, llava))
    assert {c.id: c.caption for c in caps} == {c.id: c.caption for c in read_records(ref, Caption)}
    with pytest.raises(CirkitError, match="new -o file"):
        run(cfg(folder, out, llava, prompt="another prompt"))


@pytest.mark.slow
def test_resume_after_a_crash_during_the_first_write(folder, llava, tmp_path):
    out = tmp_path / "c.jsonl"
    out.write_bytes(b'{"id": "bags/im0", "ima')  # killed before the first line was complete
    r = run(cfg(folder, out, llava))
    ids = [c.id for c in read_records(out, Caption)]
    assert r.counts["already_done"] == 0 and r.counts["captioned"] == len(COLOURS)
    assert sorted(ids) == sorted(set(ids)) and len(ids) == len(COLOURS)


def test_resuming_an_output_of_non_objects_is_a_user_error(folder, llava, tmp_path):
    from cirkit.errors import RecordError

    out = tmp_path / "c.jsonl"
    out.write_text("[1, 2]\n")
    with pytest.raises(RecordError, match=r"c.jsonl:1: expected a JSON object"):
        run(cfg(folder, out, llava))


def test_blip_from_gallery_jsonl(folder, tmp_path):
    blip = str(build_tiny_blip(tmp_path / "blip"))
    gallery = folder / "gallery.jsonl"
    gallery.write_text("".join(json.dumps({"id": f"g{i}", "image": f"shoes/im{i}.png"}) + "\n" for i in (1, 3, 5)))
    out = tmp_path / "c.jsonl"
    r = run(cfg(gallery, out, blip))
    caps = read_records(out, Caption)
    assert r.counts["captioned"] == 3 and [c.id for c in caps] == ["g1", "g3", "g5"]
    assert all(c.prompt is None for c in caps)


def test_sharded_processes_write_parts_then_merge(folder, llava, tmp_path, monkeypatch):
    import cirkit.device as dev

    out = tmp_path / "c.jsonl"
    monkeypatch.setattr(dev, "process_info", lambda: ProcessInfo(rank=1, world=2))
    r1 = run(cfg(folder, out, llava))
    assert not out.exists() and part_path(out, 1).exists()
    monkeypatch.setattr(dev, "process_info", lambda: ProcessInfo(rank=0, world=2))
    r0 = run(cfg(folder, out, llava))
    assert r0.counts["captioned"] + r1.counts["captioned"] == len(COLOURS)
    assert r0.counts["merged_from_parts"] == len(COLOURS)
    ids = [c.id for c in read_records(out, Caption)]
    assert sorted(ids) == sorted(set(ids)) and len(ids) == len(COLOURS)
    assert not list(tmp_path.glob("c.jsonl.part-*"))


def test_merge_parts_is_exactly_once(tmp_path):
    out = tmp_path / "c.jsonl"
    rec = lambda k: json.dumps({"id": k, "image": f"{k}.png", "caption": k}) + "\n"  # noqa: E731
    out.write_text(rec("a"))
    part_path(out, 0).write_text(rec("a") + rec("b") + '{"id": "torn"')
    part_path(out, 3).write_text(rec("c"))
    assert merge_parts(out) == 2
    assert [c.id for c in read_records(out, Caption)] == ["a", "b", "c"]
    assert merge_parts(out) == 0


def test_import_jsonl_csv_json_rewrites_paths(tmp_path):
    src = tmp_path / "synth"
    (src / "images").mkdir(parents=True)
    for k in ("x", "y"):
        Image.new("RGB", (8, 8)).save(src / "images" / f"{k}.png")
    (src / "captions.jsonl").write_text(
        json.dumps({"id": "x", "image": "images/x.png", "caption": "a red x", "model": "synth", "scene": {"n": 1}}) + "\n"
        + json.dumps({"id": "y", "image": "images/y.png", "caption": "a blue y", "model": "synth"}) + "\n"
        + json.dumps({"id": "z", "image": "images/missing.png", "caption": "gone"}) + "\n")
    out = tmp_path / "work" / "captions.jsonl"
    r = import_captions(src / "captions.jsonl", out)
    caps = read_records(out, Caption)
    assert r.counts["imported"] == 2 and [s[0] for s in r.skipped] == ["z"]
    assert caps[0].image == "../synth/images/x.png" and caps[0].model == "synth" and caps[0].extra["scene"] == {"n": 1}
    assert import_captions(src / "captions.jsonl", out).counts["imported"] == 0  # resumable
    with pytest.raises(ImageError):
        import_captions(src / "captions.jsonl", tmp_path / "strict.jsonl", strict=True)

    with open(src / "caps.csv", "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["image", "caption"])
        w.writerow(["images/x.png", "a red x"])
    out2 = tmp_path / "c2.jsonl"
    import_captions(src / "caps.csv", out2)
    (c,) = read_records(out2, Caption)
    assert (c.id, c.image, c.model) == ("images/x", "synth/images/x.png", "imported")

    (src / "map.json").write_text(json.dumps({"images/y.png": "a blue y"}))
    out3 = tmp_path / "c3.jsonl"
    import_captions(src / "map.json", out3)
    assert read_records(out3, Caption)[0].caption == "a blue y"

    (src / "bad.csv").write_text("path,text\nimages/x.png,hi\n")
    with pytest.raises(CirkitError, match="caption"):
        import_captions(src / "bad.csv", tmp_path / "c4.jsonl")


def test_cli_import_json_summary(tmp_path):
    from cirkit.cli import app

    (tmp_path / "i.png").write_bytes(b"")
    Image.new("RGB", (8, 8)).save(tmp_path / "i.png")
    src = tmp_path / "caps.jsonl"
    src.write_text(json.dumps({"id": "i", "image": "i.png", "caption": "a thing"}) + "\n")
    res = CliRunner().invoke(app, ["caption", "--from", str(src), "-o", str(tmp_path / "o" / "c.jsonl"), "--json"])
    assert res.exit_code == 0, res.output
    assert json.loads(res.stdout.strip().splitlines()[-1])["counts"]["imported"] == 1
    res = CliRunner().invoke(app, ["caption", "-o", str(tmp_path / "x.jsonl")])
    assert res.exit_code == 2  # no IMAGES: a missing argument, a usage error (issue 14; was 1)


# -- nothing to do: no model is loaded --------------------------------------------------------------
def _no_load(*a, **k):
    raise AssertionError("a captioning model was loaded for a run with nothing to caption")


def test_a_finished_run_reruns_without_loading_the_model(folder, llava, tmp_path, monkeypatch):
    import cirkit.generation as gen

    out = tmp_path / "c.jsonl"
    first = run(cfg(folder, out, llava))
    assert "nothing_to_do" not in first.details and first.counts["captioned"] == len(COLOURS)
    before = out.read_bytes()
    monkeypatch.setattr(gen, "load_captioner", _no_load)
    again = run(cfg(folder, out, llava))
    assert again.details["nothing_to_do"] and again.counts["captioned"] == 0
    assert again.counts["already_done"] == len(COLOURS) and [s[0] for s in again.skipped] == ["bags/broken"]
    assert out.read_bytes() == before


def test_no_op_rerun_through_the_cli_with_the_model_gone(folder, llava, tmp_path):
    import shutil

    model = tmp_path / "model"
    shutil.copytree(llava, model)
    out = tmp_path / "c.jsonl"
    run(cfg(folder, out, str(model)))
    shutil.rmtree(model)  # loading it now would fail
    from cirkit.cli import app

    res = CliRunner().invoke(app, ["-q", "caption", str(folder), "-o", str(out), "-m", str(model), "--device", "cpu",
                                   "--num-workers", "0", "--max-new-tokens", "4", "--batch-size", "2", "--json"])
    assert res.exit_code == 0, (res.stdout, res.stderr)
    summary = json.loads(res.stdout.strip().splitlines()[-1])
    assert summary["details"]["nothing_to_do"] is True and summary["counts"]["captioned"] == 0


# -- names, paths and inputs that go wrong -----------------------------------------------------------
def test_non_utf8_file_names_are_skipped_named_and_do_not_block_reruns(folder, llava, tmp_path, monkeypatch):
    import os

    import cirkit.generation as gen

    bad = folder / "shoes" / os.fsdecode(b"caf\xe9.png")
    try:
        Image.new("RGB", (8, 8), "red").save(bad)
    except (OSError, UnicodeEncodeError):
        pytest.skip("this file system refuses non-UTF-8 names")
    out = tmp_path / "c.jsonl"
    r = run(cfg(folder, out, llava))
    assert r.counts["captioned"] == len(COLOURS)
    reasons = dict(r.skipped)
    assert "not valid UTF-8" in reasons[f"{folder}/shoes/caf\\xe9.png"]
    out.read_text(encoding="utf-8")  # the output stays UTF-8
    monkeypatch.setattr(gen, "load_captioner", _no_load)
    again = run(cfg(folder, out, llava))  # the same file again: skipped again, nothing loaded
    assert again.details["nothing_to_do"] and f"{folder}/shoes/caf\\xe9.png" in dict(again.skipped)


def test_an_image_that_vanishes_after_listing_is_a_counted_skip(folder, llava, tmp_path, monkeypatch):
    import cirkit.caption as caption_mod

    real = caption_mod.list_images

    def listing_then_delete(images, skipped=None):
        items = real(images, skipped)
        (folder / "shoes" / "im1.png").unlink()
        return items

    monkeypatch.setattr(caption_mod, "list_images", listing_then_delete)
    r = run(cfg(folder, tmp_path / "c.jsonl", llava))
    assert dict(r.skipped)["shoes/im1"] == "no such file"
    assert r.counts["captioned"] == len(COLOURS) - 1


def test_output_equal_to_an_input_is_refused_before_work(folder, tmp_path):
    gallery = folder / "gallery.jsonl"
    gallery.write_text(json.dumps({"id": "g1", "image": "shoes/im1.png"}) + "\n")
    before = gallery.read_bytes()
    with pytest.raises(CirkitError, match="gallery.jsonl: is also an input of this run"):
        run(cfg(gallery, gallery, "/no/model/needed"))
    with pytest.raises(CirkitError, match="gallery.jsonl: is also an input of this run"):
        import_captions(gallery, folder / "." / "gallery.jsonl")
    assert gallery.read_bytes() == before


def test_wrong_kinds_of_input_and_output_are_one_line(folder, tmp_path):
    with pytest.raises(CirkitError, match=r"im1.png: is an image; give the folder that holds it"):
        run(cfg(folder / "shoes" / "im1.png", tmp_path / "c.jsonl", "/no/model"))
    with pytest.raises(CirkitError, match="is a folder; --from takes a captions file"):
        import_captions(folder, tmp_path / "c.jsonl")
    (tmp_path / "out.jsonl").mkdir()
    with pytest.raises(CirkitError, match="out.jsonl: is a folder, but a file is written here; choose a file path"):
        run(cfg(folder, tmp_path / "out.jsonl", "/no/model"))
    gallery = folder / "gallery.jsonl"
    gallery.write_text(json.dumps({"id": "g1", "image": {"path": "x.png"}}) + "\n")
    with pytest.raises(CirkitError, match=r"gallery.jsonl:1: field 'image': expected a non-empty string"):
        run(cfg(gallery, tmp_path / "c.jsonl", "/no/model"))


def test_merge_touches_only_rank_parts_and_never_drops_a_bad_line(tmp_path):
    from cirkit.errors import RecordError

    out = tmp_path / "c.jsonl"
    rec = lambda k: json.dumps({"id": k, "image": f"{k}.png", "caption": k}) + "\n"  # noqa: E731
    mine = tmp_path / "c.jsonl.part-backup"  # a user's file that merely looks like a part
    mine.write_text(rec("u"))
    part_path(out, 0).write_text(rec("a"))
    assert merge_parts(out) == 1 and mine.read_text() == rec("u")
    part_path(out, 1).write_text(rec("b") + "[1, 2]\n")
    with pytest.raises(RecordError, match=r"c.jsonl.part-1:2: expected a JSON object with an 'id'"):
        merge_parts(out)
    assert part_path(out, 1).exists()  # kept until every line can be moved


def test_an_output_under_a_file_is_one_line(folder, tmp_path):
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(CirkitError, match=r"notes.txt is a file, not a folder"):
        run(cfg(folder, tmp_path / "notes.txt" / "a" / "c.jsonl", "/no/model"))
    src = tmp_path / "caps.jsonl"
    src.write_text(json.dumps({"id": "i", "image": "i.png", "caption": "x"}) + "\n")
    with pytest.raises(CirkitError, match=r"notes.txt is a file, not a folder"):
        run(CaptionConfig(from_file=src, output=tmp_path / "notes.txt" / "a" / "c.jsonl"))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["caps.jsonl", "notes.txt", "photos"]
