"""Bad inputs through the CLI end to end: the exact user-visible outcome of each.

Either a counted skip in the ``--json`` summary (``skipped``/``skipped_items``, exit 0),
or one ``error:`` line on stderr naming the file (and line and field) with exit 1.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from .conftest import fails, ok

pytest.importorskip("torch")

GOOD = ["good", "cmyk", "sixteen", "palette", "rotated"]
SKIPPED = {
    "truncated": "cannot decode",
    "zero": "empty file (0 bytes)",
    "text": "not an image PIL can identify",
    "bomb": "10000x10000 = 100000000 pixels exceeds the 89478485-pixel limit",
}


def make_images(folder: Path) -> Path:
    """One file per defect (and per tricky-but-valid format) under ``folder``."""
    folder.mkdir(parents=True)
    Image.new("RGB", (16, 16), "red").save(folder / "good.png")
    buf = folder.parent / "whole.jpg"
    Image.effect_noise((64, 64), 40).convert("RGB").save(buf, quality=90)
    data = buf.read_bytes()
    (folder / "truncated.jpg").write_bytes(data[: len(data) // 2])
    (folder / "zero.jpg").write_bytes(b"")
    (folder / "text.jpg").write_text("this is not a JPEG\n")
    Image.new("CMYK", (16, 16), (0, 255, 255, 0)).save(folder / "cmyk.jpg", quality=95)  # red in CMYK
    Image.fromarray(np.full((16, 16), 40000, np.uint16)).save(folder / "sixteen.png")
    pal = Image.new("P", (16, 16), 0)
    pal.putpalette([0, 0, 0, 0, 255, 0] + [0] * 762)
    for x in range(8):
        for y in range(16):
            pal.putpixel((x, y), 1)  # left half green, right half index 0 = transparent
    pal.save(folder / "palette.png", transparency=0)
    rot = Image.new("RGB", (20, 10), "blue")
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 CW to display"
    rot.save(folder / "rotated.jpg", exif=exif, quality=95)
    # 10000 x 10000 one-bit PNG: 12 KB on disk, 100 Mpx decoded.
    Image.new("1", (10000, 10000)).save(folder / "bomb.png")
    return folder


@pytest.fixture(scope="module")
def embedded(tmp_path_factory):
    """``cirkit embed`` over the folder of defects, with every decoded file recorded."""
    from PIL import ImageFile

    root = tmp_path_factory.mktemp("bad")
    folder = make_images(root / "imgs")
    loaded: list[str] = []
    real_load = ImageFile.ImageFile.load

    def load(self):
        loaded.append(Path(getattr(self, "filename", "") or "?").name)
        return real_load(self)

    mp = pytest.MonkeyPatch()
    mp.setattr(ImageFile.ImageFile, "load", load)
    try:
        summary = ok(["embed", str(folder), "--backbone", "fake", "-o", str(root / "g.lance"), "--num-workers", "0"])
    finally:
        mp.undo()
    return folder, root / "g.lance", summary, loaded


def test_embed_summary_counts_every_bad_file(embedded):
    folder, out, summary, _ = embedded
    assert summary["counts"] == {"images": 9, "embedded": 5, "already_stored": 0, "failed": 4}
    assert summary["skipped"] == 4 == len(summary["skipped_items"])
    from cirkit.io.embeddings import read_embeddings

    assert sorted(read_embeddings(out)[1]) == sorted(GOOD)


@pytest.mark.parametrize("name", sorted(SKIPPED))
def test_bad_image_is_a_counted_skip_naming_the_file(embedded, name):
    folder, _, summary, _ = embedded
    reasons = {Path(s["item"]).stem: s["reason"] for s in summary["skipped_items"]}
    assert SKIPPED[name] in reasons[name]
    item = next(s["item"] for s in summary["skipped_items"] if Path(s["item"]).stem == name)
    assert Path(item).parent == folder.resolve()


def test_decompression_bomb_is_refused_before_decoding(embedded):
    *_, loaded = embedded
    assert "good.png" in loaded  # the probe sees decodes
    assert "bomb.png" not in loaded


@pytest.mark.parametrize("name", ["truncated", "zero", "text", "bomb"])
def test_strict_stops_at_a_bad_image_with_one_line(embedded, tmp_path, name):
    folder, *_ = embedded
    one = tmp_path / "one"
    one.mkdir()
    src = next(folder.glob(f"{name}.*"))
    (one / src.name).write_bytes(src.read_bytes())
    line = fails(["embed", str(one), "--backbone", "fake", "-o", str(tmp_path / "g.lance"), "--num-workers", "0",
                  "--strict"])
    assert f"{one.resolve() / src.name}: {SKIPPED[name]}" in line


def test_cmyk_jpeg_loads_as_rgb(embedded):
    from cirkit.io import open_image

    im = open_image(embedded[0] / "cmyk.jpg")
    assert im.mode == "RGB" and im.size == (16, 16)
    r, g, b = im.getpixel((8, 8))
    assert r > 200 and g < 60 and b < 60


def test_16_bit_png_is_scaled_not_clipped(embedded):
    from cirkit.io import open_image

    im = open_image(embedded[0] / "sixteen.png")
    assert im.mode == "RGB"
    assert im.getpixel((3, 3)) == (155, 155, 155)  # 40000 / 65535 * 255, not 255


def test_palette_png_transparency_is_flattened_on_white(embedded):
    from cirkit.io import open_image

    im = open_image(embedded[0] / "palette.png")
    assert im.mode == "RGB"
    assert im.getpixel((2, 2)) == (0, 255, 0) and im.getpixel((12, 2)) == (255, 255, 255)


def test_exif_orientation_is_honoured(embedded):
    from cirkit.io import open_image

    im = open_image(embedded[0] / "rotated.jpg")
    assert im.size == (10, 20)  # stored 20x10, displayed rotated


# -- JSONL defects -----------------------------------------------------------------------------
GOOD_LINE = {"id": "a", "image": "imgs/good.png", "caption": "a red square"}
DEFECTS = {
    "malformed": (b'{"id": "b", "image": "imgs/good.png"\n', "malformed JSON"),
    "missing_field": (b'{"id": "b", "caption": "x"}\n', "field 'image': missing"),
    "wrong_type": (b'{"id": "b", "image": 5, "caption": "x"}\n', "field 'image': expected str"),
    "not_utf8": (b'{"id": "b", "image": "caf\xe9.png", "caption": "x"}\n', "not valid UTF-8"),
}


def _jsonl(folder: Path, defect: str, name: str) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (16, 16), "red").save((folder / "imgs").mkdir() or folder / "imgs" / "good.png")
    path = folder / name
    path.write_bytes(json.dumps(GOOD_LINE).encode() + b"\n" + DEFECTS[defect][0])
    return path


@pytest.mark.parametrize("defect", sorted(DEFECTS))
def test_gallery_jsonl_defect_names_file_line_and_field(tmp_path, defect):
    path = _jsonl(tmp_path / "d", defect, "gallery.jsonl")
    line = fails(["embed", str(path), "--backbone", "fake", "-o", str(tmp_path / "g.lance"), "--num-workers", "0"])
    assert line.startswith(f"error: {path}:2: ") and DEFECTS[defect][1] in line
    assert not (tmp_path / "g.lance").exists()


def test_malformed_line_column_points_into_that_line(tmp_path):
    path = tmp_path / "gallery.jsonl"
    path.write_bytes(b'{"id": "a", "image": "a.png"}\n{"id": "b", "image": \n')
    line = fails(["embed", str(path), "--backbone", "fake", "-o", str(tmp_path / "g.lance")])
    assert line == f"error: {path}:2: malformed JSON (Expecting value at column 22)"


@pytest.mark.parametrize("defect", sorted(DEFECTS))
def test_training_data_defect_names_file_line_and_field(tmp_path, defect):
    path = _jsonl(tmp_path / "d", defect, "captions.jsonl")
    line = fails(["train", str(path), "--stage", "1", "--model", "cirkit-tiny", "-o", str(tmp_path / "ck"),
                  "--max-steps", "1", "--batch-size", "1", "--num-workers", "0"])
    assert line.startswith(f"error: {path}:2: ") and DEFECTS[defect][1] in line


@pytest.mark.parametrize("defect", ["malformed", "not_utf8"])
def test_index_metadata_defect_names_file_and_line(tmp_path, defect):
    from cirkit.io.embeddings import EmbeddingStore
    from cirkit.records import EmbeddingManifest

    emb = tmp_path / "e.lance"
    EmbeddingStore.open_for_append(emb, EmbeddingManifest(backbone="fake", checkpoint="fake", dim=4)).append(
        ["a", "b"], ["a.png", "b.png"], np.eye(2, 4, dtype=np.float32))
    meta = tmp_path / "meta.jsonl"
    meta.write_bytes(b'{"id": "a", "colour": "red"}\n' + DEFECTS[defect][0])
    line = fails(["index", str(emb), "-o", str(tmp_path / "idx"), "--metadata", str(meta)])
    assert line.startswith(f"error: {meta}:2: ") and DEFECTS[defect][1] in line


def test_missing_image_paths_are_counted_skips(tmp_path):
    folder = tmp_path / "d"
    (folder / "imgs").mkdir(parents=True)
    Image.new("RGB", (16, 16), "red").save(folder / "imgs" / "good.png")
    gallery = folder / "gallery.jsonl"
    gallery.write_text(json.dumps({"id": "a", "image": "imgs/good.png"}) + "\n"
                       + json.dumps({"id": "b", "image": "imgs/gone.png"}) + "\n")
    summary = ok(["embed", str(gallery), "--backbone", "fake", "-o", str(tmp_path / "g.lance"), "--num-workers", "0"])
    assert summary["counts"]["embedded"] == 1 and summary["counts"]["failed"] == 1
    assert summary["skipped_items"] == [{"item": str((folder / "imgs" / "gone.png").resolve()), "reason": "no such file"}]


def test_input_that_does_not_exist(tmp_path):
    line = fails(["embed", str(tmp_path / "nowhere"), "--backbone", "fake", "-o", str(tmp_path / "g.lance")])
    assert line == f"error: {tmp_path / 'nowhere'}: no such folder or file"


def test_empty_input_folder(tmp_path):
    (tmp_path / "empty").mkdir()
    line = fails(["embed", str(tmp_path / "empty"), "--backbone", "fake", "-o", str(tmp_path / "g.lance")])
    assert line.startswith(f"error: {tmp_path / 'empty'}: no images found")


def test_wrong_dimension_for_an_existing_index(tmp_path):
    from cirkit.io.embeddings import EmbeddingStore
    from cirkit.records import EmbeddingManifest

    for name, dim in [("d16", 16), ("d8", 8)]:
        EmbeddingStore.open_for_append(tmp_path / f"{name}.lance", EmbeddingManifest("fake", "fake", dim)).append(
            ["a", "b"], ["a.png", "b.png"], np.eye(2, dim, dtype=np.float32))
    ok(["index", str(tmp_path / "d16.lance"), "-o", str(tmp_path / "idx")])
    line = fails(["index", str(tmp_path / "d8.lance"), "-o", str(tmp_path / "idx")])
    assert line == (f"error: {tmp_path / 'idx'}: holds dim-16 vectors but {tmp_path / 'd8.lance'} gives dim 8; "
                    "re-embed with the same model or index into a new location")


def test_wrong_dimension_appended_to_an_existing_store(tmp_path):
    from cirkit.io.embeddings import EmbeddingStore
    from cirkit.records import EmbeddingManifest

    (tmp_path / "imgs").mkdir()
    Image.new("RGB", (16, 16), "red").save(tmp_path / "imgs" / "a.png")
    store = tmp_path / "g.lance"
    EmbeddingStore.open_for_append(store, EmbeddingManifest("fake", "fake", 16))
    line = fails(["embed", str(tmp_path / "imgs"), "--backbone", "fake", "-o", str(store), "--num-workers", "0"])
    assert line.startswith(f"error: {store}: holds vectors from fake fake (dim 16), not fake fake (dim 32)")


def _copy_without(src: Path, dst: Path, missing: str) -> Path:
    dst.mkdir()
    (dst.parent / "imgs").mkdir()
    Image.new("RGB", (16, 16), "red").save(dst.parent / "imgs" / "a.png")
    for p in src.iterdir():
        if p.name != missing:
            (dst / p.name).write_bytes(p.read_bytes())
    return dst


def test_checkpoint_missing_weights(vit_checkpoint, tmp_path):
    ck = _copy_without(vit_checkpoint, tmp_path / "ck", "model.safetensors")
    line = fails(["embed", str(tmp_path / "imgs"), "--model", str(ck), "-o", str(tmp_path / "g.lance")])
    assert line == f"error: {ck}: missing model.safetensors; the checkpoint is incomplete"


def test_checkpoint_missing_config(vit_checkpoint, tmp_path):
    ck = _copy_without(vit_checkpoint, tmp_path / "ck", "config.json")
    line = fails(["embed", str(tmp_path / "imgs"), "--backbone", "vit", "--model", str(ck), "-o", str(tmp_path / "g.lance")])
    assert line == f"error: {ck}: a folder without config.json is not a cirkit checkpoint"


def test_checkpoint_with_corrupt_config(vit_checkpoint, tmp_path):
    ck = _copy_without(vit_checkpoint, tmp_path / "ck", "config.json")
    (ck / "config.json").write_text('{"backbone": "vit",\n')
    line = fails(["embed", str(tmp_path / "imgs"), "--model", str(ck), "-o", str(tmp_path / "g.lance")])
    assert line.startswith(f"error: {ck / 'config.json'}: not valid JSON")


def test_resume_with_nothing_to_resume(tmp_path):
    captions = _jsonl(tmp_path / "d", "missing_field", "captions.jsonl")
    line = fails(["train", str(captions), "--stage", "1", "--model", "cirkit-tiny", "-o", str(tmp_path / "ck"),
                  "--resume"])
    assert line.startswith(f"error: {tmp_path / 'ck'}: nothing to resume")
