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


# -- limits read from the header, before any decode or resize --------------------------------------
def _png_header(w: int, h: int, bit_depth: int = 8, colour: int = 2) -> bytes:
    """A PNG of only IHDR + IEND: a few dozen bytes that claim a ``w`` x ``h`` image."""
    import struct
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", w, h, bit_depth, colour, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IEND", b"")


@pytest.mark.parametrize("w,h,why", [
    (2_000_000, 1, "2000000x1: the longest side exceeds the 65535-pixel limit"),
    (1, 2_000_000, "1x2000000: the longest side exceeds the 65535-pixel limit"),
    (65_000, 10, "65000x10: the aspect ratio exceeds 100:1"),
    (50_000, 499, "50000x499: the aspect ratio exceeds 100:1"),
    (70_000, 1_000, "70000x1000: the longest side exceeds"),
    (9_000, 9_999, "9000x9999 = 89991000 pixels exceeds the 89478485-pixel limit"),
    (20_000, 20_000, "exceeds the 89478485-pixel limit, refused as a decompression bomb"),  # PIL's own, at open
])
def test_header_limits_refuse_before_decoding(tmp_path, monkeypatch, w, h, why):
    from PIL import ImageFile

    p = tmp_path / "long.png"
    p.write_bytes(_png_header(w, h))
    assert p.stat().st_size < 100
    decoded = []
    monkeypatch.setattr(ImageFile.ImageFile, "load", lambda self: decoded.append(1))
    with pytest.raises(ImageError) as e:
        open_image(p)
    assert str(e.value) == f"{p}: {why}" or str(e.value).startswith(f"{p}: {why}")
    assert not decoded


def test_aspect_ratio_at_the_limit_is_accepted(tmp_path):
    p = tmp_path / "strip.png"
    Image.new("RGB", (400, 4), "red").save(p)  # exactly 100:1
    assert open_image(p).size == (400, 4)
    Image.new("RGB", (401, 4), "red").save(p)
    with pytest.raises(ImageError, match="aspect ratio exceeds 100:1"):
        open_image(p)


def test_check_size_is_the_documented_bound():
    from cirkit.io.images import MAX_ASPECT, MAX_PIXELS, MAX_SIDE, check_size

    assert check_size(MAX_SIDE, MAX_SIDE // MAX_ASPECT + 1) is None
    assert check_size(MAX_SIDE + 1, 1000) and check_size(MAX_ASPECT * 10 + 1, 10)
    assert check_size(9459, 9459) is None and check_size(9460, 9460)  # sqrt(MAX_PIXELS) = 9459.3
    assert MAX_PIXELS == 89_478_485


# -- formats with frames, depths, palettes, orientation, truncation --------------------------------
def test_animated_gif_gives_its_first_frame(tmp_path):
    p = tmp_path / "anim.gif"
    frames = [Image.new("RGB", (8, 8), c) for c in ((255, 0, 0), (0, 0, 255), (0, 255, 0))]
    frames[0].save(p, save_all=True, append_images=frames[1:], duration=50, loop=0)
    assert Image.open(p).n_frames == 3
    im = open_image(p)
    assert im.mode == "RGB" and im.size == (8, 8) and im.getpixel((4, 4)) == (255, 0, 0)


def test_animated_png_and_webp_give_their_first_frame(tmp_path):
    frames = [Image.new("RGB", (8, 8), c) for c in ((0, 255, 0), (255, 0, 0))]
    for name in ("anim.png", "anim.webp"):
        p = tmp_path / name
        frames[0].save(p, save_all=True, append_images=frames[1:], duration=50, lossless=True)
        r, g, b = open_image(p).getpixel((4, 4))
        assert g > 200 and r < 40, name


def test_multipage_tiff_gives_its_first_page(tmp_path):
    p = tmp_path / "pages.tif"
    pages = [Image.new("RGB", (6, 6), (0, 0, 255)), Image.new("RGB", (12, 12), (255, 0, 0))]
    pages[0].save(p, save_all=True, append_images=pages[1:])
    im = open_image(p)
    assert im.size == (6, 6) and im.getpixel((1, 1)) == (0, 0, 255)


def test_gif_with_a_transparent_index_flattens_on_white(tmp_path):
    p = tmp_path / "t.gif"
    im = Image.new("P", (4, 4), 0)
    im.putpalette([0, 0, 0, 255, 0, 0] + [0] * 762)
    im.putpixel((0, 0), 1)
    im.save(p, transparency=0)
    out = open_image(p)
    assert out.getpixel((0, 0)) == (255, 0, 0) and out.getpixel((3, 3)) == (255, 255, 255)


def test_16_bit_rgba_and_la_pngs(tmp_path):
    # 16-bit greyscale + alpha, written by hand (PIL saves LA as 8-bit): half transparent grey
    import struct
    import zlib

    w = h = 2
    row = b"\x00" + struct.pack(">HH", 0, 32768) * w  # black at 50% alpha
    raw = zlib.compress(row * h)

    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    p = tmp_path / "la16.png"
    p.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 16, 4, 0, 0, 0))
                  + chunk(b"IDAT", raw) + chunk(b"IEND", b""))
    v = open_image(p).getpixel((0, 0))
    assert v[0] == v[1] == v[2] and 120 <= v[0] <= 135  # black over white at 50%


def test_float_tiff_in_0_1_is_scaled(tmp_path):
    p = tmp_path / "f.tif"
    Image.fromarray(np.full((4, 4), 0.5, np.float32), "F").save(p)
    assert open_image(p).getpixel((0, 0)) == (127, 127, 127)


@pytest.mark.parametrize("orientation,size", [(1, (40, 20)), (3, (40, 20)), (6, (20, 40)), (8, (20, 40))])
def test_every_exif_rotation(tmp_path, orientation, size):
    p = tmp_path / "rot.jpg"
    img = Image.new("RGB", (40, 20), "white")
    img.paste((255, 0, 0), (0, 0, 10, 10))  # a red top-left corner as stored
    exif = Image.Exif()
    exif[0x0112] = orientation
    img.save(p, exif=exif.tobytes(), quality=95)
    out = open_image(p)
    assert out.size == size
    corner = {1: (0, 0), 3: (39, 19), 6: (19, 0), 8: (0, 39)}[orientation]
    r, g, b = out.getpixel(corner)
    assert r > 200 and g < 60, (orientation, out.getpixel(corner))


@pytest.mark.parametrize("cut", [0.9, 0.5, 0.1])
def test_truncated_png_and_gif_are_image_errors(tmp_path, cut):
    for ext in ("png", "gif"):
        full = tmp_path / f"full.{ext}"
        Image.effect_noise((64, 64), 50).convert("RGB").save(full)
        data = full.read_bytes()
        p = tmp_path / f"cut.{ext}"
        p.write_bytes(data[: max(20, int(len(data) * cut))])
        with pytest.raises(ImageError, match=r"cut\.\w+: (cannot decode|not an image)"):
            open_image(p)


def test_folder_and_vanished_file_are_image_errors(tmp_path, monkeypatch):
    (tmp_path / "dir.png").mkdir()
    with pytest.raises(ImageError, match="dir.png: is a folder, not an image file"):
        open_image(tmp_path / "dir.png")
    p = tmp_path / "gone.png"
    Image.new("RGB", (4, 4)).save(p)
    import PIL.Image

    real = PIL.Image.open

    def vanish(path, *a, **k):  # removed between the listing (and stat) and the decode
        p.unlink()
        return real(path, *a, **k)

    monkeypatch.setattr(PIL.Image, "open", vanish)
    with pytest.raises(ImageError, match="gone.png: no such file"):
        open_image(p)


# -- file names that are not UTF-8 ----------------------------------------------------------------
def _latin1_name(folder):
    import os

    name = os.fsdecode(b"caf\xe9.png")
    try:
        Image.new("RGB", (4, 4)).save(folder / name)
    except (OSError, UnicodeEncodeError):
        pytest.skip("this file system refuses non-UTF-8 names")
    return folder / name


def test_non_utf8_names_are_skipped_and_named_or_one_line(tmp_path):
    Image.new("RGB", (4, 4)).save(tmp_path / "ok.png")
    _latin1_name(tmp_path)
    skipped: list = []
    assert [k for k, _ in list_images(tmp_path, skipped=skipped)] == ["ok"]
    assert skipped == [(f"{tmp_path}/caf\\xe9.png", skipped[0][1])] and "not valid UTF-8" in skipped[0][1]
    with pytest.raises(CirkitError) as e:
        list_images(tmp_path)
    assert str(e.value).startswith(f"{tmp_path}/caf\\xe9.png: the file name is not valid UTF-8")
    str(e.value).encode("utf-8")  # printable on any terminal


def test_a_file_given_as_the_folder_and_broken_links(tmp_path):
    Image.new("RGB", (4, 4)).save(tmp_path / "a.png")
    with pytest.raises(CirkitError, match="a.png: is a file, not a folder of images"):
        list_images(tmp_path / "a.png")
    (tmp_path / "dangling.png").symlink_to(tmp_path / "nowhere.png")
    skipped: list = []
    assert [k for k, _ in list_images(tmp_path, skipped)] == ["a"]
    assert skipped == [(str(tmp_path / "dangling.png"), "a symbolic link whose target is gone")]
