"""Every awkward image users have: each decodes correctly or fails with a clear reason."""

import io

import numpy as np
import pytest
from PIL import Image

from cirkit.errors import CirkitError, ImageError
from cirkit.io.images import list_images, open_image


def _jpeg_bytes(img, **kw):
    buf = io.BytesIO()
    img.save(buf, "JPEG", **kw)
    return buf.getvalue()


def test_truncated_jpeg_is_an_image_error(tmp_path):
    data = _jpeg_bytes(Image.new("RGB", (64, 64), "red"))
    p = tmp_path / "cut.jpg"
    p.write_bytes(data[: len(data) // 2])
    with pytest.raises(ImageError, match="cut.jpg: cannot decode"):
        open_image(p)


def test_zero_byte_file(tmp_path):
    p = tmp_path / "empty.jpg"
    p.write_bytes(b"")
    with pytest.raises(ImageError, match=r"empty file \(0 bytes\)"):
        open_image(p)


def test_text_file_named_jpg(tmp_path):
    p = tmp_path / "notes.jpg"
    p.write_text("these are not pixels\n")
    with pytest.raises(ImageError, match="not an image PIL can identify"):
        open_image(p)


def test_missing_file(tmp_path):
    with pytest.raises(ImageError, match="no such file"):
        open_image(tmp_path / "nope.png")


def test_cmyk_jpeg_becomes_rgb(tmp_path):
    p = tmp_path / "cmyk.jpg"
    Image.new("CMYK", (16, 16), (0, 255, 255, 0)).save(p)  # pure red in CMYK
    im = open_image(p)
    assert im.mode == "RGB"
    r, g, b = im.getpixel((8, 8))
    assert r > 200 and g < 60 and b < 60


def test_16bit_png_is_scaled_not_clipped(tmp_path):
    p = tmp_path / "deep.png"
    arr = np.full((8, 8), 32768, dtype=np.uint16)  # mid grey in 16 bits
    Image.fromarray(arr).save(p)
    assert Image.open(p).mode.startswith("I")
    im = open_image(p)
    assert im.mode == "RGB"
    assert 120 <= im.getpixel((0, 0))[0] <= 135  # clipping would give 255


def test_palette_png_with_transparency_flattens_on_white(tmp_path):
    p = tmp_path / "pal.png"
    im = Image.new("P", (4, 4), 0)
    im.putpalette([0, 0, 0, 255, 0, 0] + [0] * 762)
    im.putpixel((0, 0), 1)
    im.save(p, transparency=0)
    out = open_image(p)
    assert out.mode == "RGB"
    assert out.getpixel((0, 0)) == (255, 0, 0)
    assert out.getpixel((3, 3)) == (255, 255, 255)  # transparent -> white, not black


def test_exif_orientation_is_honoured(tmp_path):
    p = tmp_path / "rot.jpg"
    img = Image.new("RGB", (40, 20), "blue")  # stored landscape
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 CW on display -> portrait
    img.save(p, exif=exif.tobytes())
    assert Image.open(p).size == (40, 20)
    assert open_image(p).size == (20, 40)


def test_decompression_bomb_refused_before_decoding(tmp_path):
    p = tmp_path / "bomb.png"
    Image.new("1", (10_000, 9_000)).save(p)  # 90 Mpx, a few KB on disk
    assert p.stat().st_size < 200_000
    with pytest.raises(ImageError, match="exceeds the 89478485-pixel limit"):
        open_image(p)


def test_list_images_ids_are_relative_paths(tmp_path):
    (tmp_path / "a").mkdir()
    Image.new("RGB", (4, 4)).save(tmp_path / "a" / "x.png")
    Image.new("RGB", (4, 4)).save(tmp_path / "y.JPG")
    (tmp_path / "notes.txt").write_text("x")
    assert [k for k, _ in list_images(tmp_path)] == ["a/x", "y"]


def test_list_images_empty_folder_is_a_user_error(tmp_path):
    with pytest.raises(CirkitError, match="no images found"):
        list_images(tmp_path)


def test_list_images_duplicate_ids(tmp_path):
    Image.new("RGB", (4, 4)).save(tmp_path / "x.png")
    Image.new("RGB", (4, 4)).save(tmp_path / "x.jpg")
    with pytest.raises(CirkitError, match="share the id 'x'"):
        list_images(tmp_path)




def test_min_side_decodes_big_jpegs_smaller_but_never_below_it(tmp_path):
    img = Image.new("RGB", (800, 600), (200, 30, 30))
    exif = Image.Exif()
    exif[0x0112] = 6  # portrait on display
    img.save(tmp_path / "big.jpg", exif=exif.tobytes())
    img.save(tmp_path / "big.png")
    full = open_image(tmp_path / "big.jpg")
    small = open_image(tmp_path / "big.jpg", min_side=128)
    assert full.size == (600, 800)
    assert small.size == (150, 200)  # 1/4 scale: shorter side 150 >= 128; 1/8 would give 75
    assert np.abs(np.asarray(small, dtype=int).mean((0, 1)) - np.asarray(full, dtype=int).mean((0, 1))).max() < 2
    assert open_image(tmp_path / "big.jpg", min_side=400).size == full.size  # no smaller scale fits
    assert open_image(tmp_path / "big.png", min_side=128).size == (800, 600)  # only JPEG has DCT scales
