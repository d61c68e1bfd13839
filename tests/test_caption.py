"""`caption`: tiny LLaVA/BLIP runs, unreadable images, resume, sharded parts, and `--from` imports."""

from __future__ import annotations

import csv
import json

import pytest

torch = pytest.importorskip("torch")
from PIL import Image  # noqa: E402
from typer.testing import CliRunner  # noqa: E402

from cirkit.caption import CaptionConfig, import_captions, merge_parts, part_path, run  # noqa: E402
from cirkit.errors import CirkitError, ImageError  # noqa: E402
from cirkit.generation import ProcessInfo, build_tiny_blip, build_tiny_llava  # noqa: E402
from cirkit.io import read_records  # noqa: E402
from cirkit.records import Caption  # noqa: E402

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
    import cirkit.generation as gen

    out = tmp_path / "c.jsonl"
    monkeypatch.setattr(gen, "process_info", lambda: ProcessInfo(rank=1, world=2))
    r1 = run(cfg(folder, out, llava))
    assert not out.exists() and part_path(out, 1).exists()
    monkeypatch.setattr(gen, "process_info", lambda: ProcessInfo(rank=0, world=2))
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
    assert res.exit_code == 1
