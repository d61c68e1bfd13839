"""``embed``: folder or gallery.jsonl -> Lance store; resumable, bad images counted, any backbone."""

import json

import pytest
from PIL import Image
from typer.testing import CliRunner

from cirkit.cli import app
from cirkit.embed import EmbedConfig, run
from cirkit.errors import ImageError
from cirkit.io.embeddings import read_embeddings


@pytest.fixture
def photos(tmp_path):
    folder = tmp_path / "photos"
    (folder / "sub").mkdir(parents=True)
    for name, colour in [("red", "red"), ("blue", "blue"), ("sub/green", "green")]:
        Image.new("RGB", (16, 16), colour).save(folder / f"{name}.png")
    (folder / "broken.png").write_bytes(b"not a png")
    return folder


def test_folder_is_embedded_and_bad_images_are_counted(photos, tmp_path):
    out = tmp_path / "g.lance"
    r = run(EmbedConfig(input=photos, output=out, backbone="fake", num_workers=0, batch_size=2))
    assert r.counts == {"images": 4, "embedded": 3, "already_stored": 0, "failed": 1}
    assert len(r.skipped) == 1 and "broken" in r.skipped[0][0]
    manifest, ids, images, vecs = read_embeddings(out)
    assert sorted(ids) == ["blue", "red", "sub/green"]
    assert manifest.backbone == "fake" and manifest.dim == vecs.shape[1] == 32
    assert all(p.endswith(".png") for p in images)


def test_rerun_skips_what_is_stored(photos, tmp_path):
    out = tmp_path / "g.lance"
    run(EmbedConfig(input=photos, output=out, backbone="fake", num_workers=0))
    (photos / "yellow.png").write_bytes(b"")
    Image.new("RGB", (16, 16), "yellow").save(photos / "yellow.png")
    r = run(EmbedConfig(input=photos, output=out, backbone="fake", num_workers=0))
    assert r.counts["embedded"] == 1 and r.counts["already_stored"] == 3
    assert len(read_embeddings(out)[1]) == 4


def test_strict_stops_at_the_first_bad_image(photos, tmp_path):
    with pytest.raises(ImageError, match="broken"):
        run(EmbedConfig(input=photos, output=tmp_path / "g.lance", backbone="fake", num_workers=0, strict=True))


def test_gallery_jsonl_paths_resolve_relative_to_the_file(photos, tmp_path):
    gallery = tmp_path / "bench" / "gallery.jsonl"
    gallery.parent.mkdir()
    gallery.write_text("".join(json.dumps({"id": f"g{i}", "image": f"../photos/{n}.png"}) + "\n"
                               for i, n in enumerate(["red", "blue"])))
    r = run(EmbedConfig(input=gallery, output=tmp_path / "g.lance", backbone="fake", num_workers=0))
    assert r.counts["embedded"] == 2
    assert sorted(read_embeddings(tmp_path / "g.lance")[1]) == ["g0", "g1"]


def test_cli_with_a_vit_checkpoint(photos, tmp_path):
    from cirkit.backbones.vit import build_model, save_checkpoint

    model, _, _ = build_model({"model": "cirkit-tiny"})
    save_checkpoint(model, tmp_path / "ckpt")
    out = tmp_path / "v.lance"
    res = CliRunner().invoke(app, ["embed", str(photos), "--model", str(tmp_path / "ckpt"), "-o", str(out),
                                   "--num-workers", "0", "--json"])
    assert res.exit_code == 0, res.output
    summary = json.loads(res.stdout.strip().splitlines()[-1])
    assert summary["counts"]["embedded"] == 3 and summary["skipped"] == 1
    manifest = read_embeddings(out)[0]
    assert manifest.backbone == "vit" and manifest.dim == 32
    # a store made by another model is refused, in one line
    res = CliRunner().invoke(app, ["embed", str(photos), "--backbone", "fake", "-o", str(out), "--num-workers", "0"])
    assert res.exit_code == 1 and "write to a new file" in res.output


@pytest.mark.slow
def test_index_remembers_where_its_model_lives(photos, tmp_path, monkeypatch):
    """embed -> index -> query with no --model loads the checkpoint recorded in the index,
    from any working directory; re-saving the same weights keeps the checkpoint identity."""
    from cirkit.backbones.vit import build_model, read_checkpoint, save_checkpoint

    model, _, _ = build_model({"model": "cirkit-tiny"})
    save_checkpoint(model, tmp_path / "ckpt")
    first_id = read_checkpoint(tmp_path / "ckpt")[0]["weights_id"]
    save_checkpoint(model, tmp_path / "ckpt")
    assert read_checkpoint(tmp_path / "ckpt")[0]["weights_id"] == first_id
    monkeypatch.chdir(tmp_path)
    run_ = CliRunner().invoke
    assert run_(app, ["embed", "photos", "--model", "ckpt", "-o", "g.lance", "--num-workers", "0"]).exit_code == 0
    assert run_(app, ["index", "g.lance", "-o", "idx"]).exit_code == 0
    assert read_embeddings(tmp_path / "g.lance")[0].source == str((tmp_path / "ckpt").resolve())
    monkeypatch.chdir(photos)
    res = run_(app, ["query", "red.png", "make it blue", "--index", str(tmp_path / "idx"), "-k", "2", "--json"])
    assert res.exit_code == 0, res.output
    hits = json.loads(res.stdout.strip().splitlines()[-1])
    assert len(str(hits)) and "red" in json.dumps(hits)
    found = hits["details"]["hits"]
    assert [h["rank"] for h in found] == [1, 2] and found[0]["score"] >= found[1]["score"]
    assert {h["id"] for h in found} <= {p.relative_to(photos).with_suffix("").as_posix() for p in photos.rglob("*.*")}


def test_batch_size_must_be_positive(photos, tmp_path):
    res = CliRunner().invoke(app, ["embed", str(photos), "--backbone", "fake", "-o", str(tmp_path / "g.lance"),
                                   "--batch-size", "0"])
    assert res.exit_code == 1 and "--batch-size must be at least 1" in res.output


# -- a store kept in step with its folder (issue 14) ---------------------------------------------------
def test_a_changed_file_is_embedded_again_and_vanished_ids_stay_unless_sync(photos, tmp_path, caplog):
    out = tmp_path / "g.lance"
    run(EmbedConfig(input=photos, output=out, backbone="fake", num_workers=0))
    before = dict(zip(*read_embeddings(out)[1:4:2], strict=True))
    Image.new("RGB", (16, 16), "white").save(photos / "red.png")  # same name, other content
    (photos / "blue.png").unlink()
    with caplog.at_level("INFO", logger="cirkit"):
        r = run(EmbedConfig(input=photos, output=out, backbone="fake", num_workers=0))
    assert (r.counts["changed"], r.counts["embedded"], "removed" in r.counts) == (1, 1, False)
    assert "1 stored ids have no image in" in caplog.text and "--sync removes them" in caplog.text
    _, ids, _, vecs = read_embeddings(out)
    now = dict(zip(ids, vecs, strict=True))
    assert sorted(now) == ["blue", "red", "sub/green"] and not (now["red"] == before["red"]).all()
    r = run(EmbedConfig(input=photos, output=out, backbone="fake", num_workers=0, sync=True))
    assert r.counts["removed"] == 1 and sorted(read_embeddings(out)[1]) == ["red", "sub/green"]


def test_an_id_that_names_another_file_is_embedded_again(tmp_path):
    for colour in ("red", "blue"):
        Image.new("RGB", (16, 16), colour).save(tmp_path / f"{colour}.png")
    gallery = tmp_path / "gallery.jsonl"
    gallery.write_text(json.dumps({"id": "x", "image": "red.png"}) + "\n")
    out = tmp_path / "g.lance"
    run(EmbedConfig(input=gallery, output=out, backbone="fake", num_workers=0))
    gallery.write_text(json.dumps({"id": "x", "image": "blue.png"}) + "\n")
    r = run(EmbedConfig(input=gallery, output=out, backbone="fake", num_workers=0))
    assert r.counts["changed"] == 1 and read_embeddings(out)[2] == [str(tmp_path / "blue.png")]


def test_a_store_from_before_signatures_gets_them_and_then_notices_changes(photos, tmp_path):
    from cirkit.backbones import load_backbone
    from cirkit.backbones.base import BackboneSpec
    from cirkit.encode import encode_images
    from cirkit.io.embeddings import SIGNATURE, create_table, row_schema, rows_table

    bb = load_backbone(BackboneSpec(backbone="fake", model="fake"))
    items = [(k, photos / f"{k}.png") for k in ("red", "blue")]
    enc = encode_images(bb, items, num_workers=0)
    schema = row_schema(bb.manifest().__class__.from_dict({**bb.manifest().to_dict(), "mode": "image"}))
    create_table(str(tmp_path), "old", schema, rows_table(enc.ids, [str(p) for _, p in items], enc.vectors.numpy(),
                                                          schema))  # the old layout: no signature column
    out = tmp_path / "old.lance"
    r = run(EmbedConfig(input=photos, output=out, backbone="fake", num_workers=0))
    assert r.counts["embedded"] == 1 and "changed" not in r.counts  # sub/green is new; red and blue are trusted
    import lancedb

    sigs = lancedb.connect(str(tmp_path)).open_table("old").to_arrow().column(SIGNATURE).to_pylist()
    assert None not in sigs  # recorded now
    Image.new("RGB", (16, 16), "white").save(photos / "blue.png")
    assert run(EmbedConfig(input=photos, output=out, backbone="fake", num_workers=0)).counts["changed"] == 1
