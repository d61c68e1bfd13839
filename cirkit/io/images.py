"""Safe image decoding: EXIF orientation, RGB, decompression-bomb limit, clear failures."""

from __future__ import annotations

import os
import struct
import warnings
from pathlib import Path

from cirkit.errors import CirkitError, ImageError

IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff"})
# Limits checked on the header, before anything is decoded or resized:
# 89.5 Mpx is PIL's own warning threshold; anything larger is refused.
MAX_PIXELS = 89_478_485
# The largest side JPEG and WebP can store; with the pixel limit it bounds the decode buffers.
MAX_SIDE = 65_535
# The decoders cirkit lets PIL use, whatever a file's name says. PIL can also open EPS (through
# Ghostscript, an external interpreter), PSD, ICNS, FITS and others: a file renamed to .png
# must not reach them.
FORMATS = ("JPEG", "PNG", "WEBP", "BMP", "DIB", "GIF", "TIFF")  # JPEG includes MPO (camera multi-picture)
# Models resize the shorter side to their input size (224-896 px), so the longer side grows by
# this ratio: a 2,000,000x1 PNG (2 KB, under the pixel limit) would need ~16 GB once resized.
# 100:1 keeps long screenshots and comic strips, and bounds one resized image to ~240 MB.
MAX_ASPECT = 100


def check_size(w: int, h: int, max_pixels: int = MAX_PIXELS) -> str | None:
    """Why a ``w`` x ``h`` image is refused before decoding, or None."""
    if w * h > max_pixels:
        return f"{w}x{h} = {w * h} pixels exceeds the {max_pixels}-pixel limit"
    if max(w, h) > MAX_SIDE:
        return f"{w}x{h}: the longest side exceeds the {MAX_SIDE}-pixel limit"
    if max(w, h) > MAX_ASPECT * max(min(w, h), 1):
        return f"{w}x{h}: the aspect ratio exceeds {MAX_ASPECT}:1, too long to resize for a model"
    return None


def display_path(path: str | Path) -> str:
    """``path`` as printable text: bytes that are not UTF-8 (Linux file names) shown as ``\\xe9``."""
    return os.fsencode(path).decode("utf-8", "backslashreplace")


def _text_ok(path: str | Path) -> bool:
    try:
        str(path).encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


# What PIL raises on files it cannot decode (besides its own errors): corrupt headers and
# chunks surface as these. Anything else is a bug and keeps its traceback.
_DECODE_ERRORS = (OSError, SyntaxError, ValueError, EOFError, IndexError, KeyError, TypeError, ZeroDivisionError,
                  struct.error)


def open_image(path, max_pixels: int = MAX_PIXELS, min_side: int | None = None):
    """Decode ``path`` to an RGB PIL image with EXIF orientation applied.

    ``path`` is a file path, the encoded bytes of an image, or an object with an
    ``image_source()`` method returning either (a dataset row's image,
    :class:`cirkit.io.datasets.DatasetImage`): every image cirkit reads, whatever holds it,
    passes the same checks here.

    Raises :class:`ImageError` (with the reason) for missing, empty, truncated,
    non-image, or oversized files (pixels, longest side, aspect ratio: see :func:`check_size`);
    transparency is flattened onto white and 16-bit and float images are scaled to 8 bits
    rather than clipped. Multi-frame files (animated GIF/PNG/WebP, multi-page TIFF) give
    their first frame. ``min_side``: the caller only needs
    images whose shorter side is at least this; JPEGs are then decoded at the smallest
    DCT scale (1/2, 1/4, 1/8) that still gives that, which is several times faster for
    photos much larger than a model's input.
    """
    import io

    shown = str(path)
    if hasattr(path, "image_source"):
        path = path.image_source()
    if isinstance(path, (bytes, bytearray, memoryview)):
        if not len(path):
            raise ImageError(shown, "empty image (0 bytes)")
        return _decode(io.BytesIO(path), shown, max_pixels, min_side)
    path = Path(path)
    if "\x00" in str(path):  # a path from the data (an index row, a JSONL field) that no file can have
        raise ImageError(display_path(path).replace("\x00", "\\x00"), "the path contains a NUL character")
    shown = display_path(path)
    try:
        if path.is_dir():
            raise ImageError(shown, "is a folder, not an image file")
        if path.stat().st_size == 0:
            raise ImageError(shown, "empty file (0 bytes)")
    except FileNotFoundError:
        raise ImageError(shown, "no such file") from None
    except PermissionError:
        raise ImageError(shown, "permission denied; make the file readable") from None
    except OSError as e:  # a name too long, a loop of links, ...
        raise ImageError(shown, f"cannot decode ({e})") from None
    return _decode(path, shown, max_pixels, min_side)


def _decode(source, shown: str, max_pixels: int, min_side: int | None):
    """Decode a file path or a binary file object (see :func:`open_image`); ``shown`` names it in errors."""
    from PIL import Image, ImageOps, UnidentifiedImageError

    try:
        with warnings.catch_warnings():
            # We check the size ourselves right after the header is read, with a clearer message.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(source, formats=FORMATS) as im:
                w, h = im.size
                refused = check_size(w, h, max_pixels)
                if refused:
                    raise ImageError(shown, refused)
                if min_side and im.format == "JPEG" and min(w, h) > 2 * min_side:
                    # draft keeps both sides >= the request; scale it so the shorter side is min_side.
                    im.draft("RGB", (max(1, w * min_side // min(w, h)), max(1, h * min_side // min(w, h))))
                im.load()
                im = ImageOps.exif_transpose(im)
                return _to_rgb(im)
    except ImageError:
        raise
    except FileNotFoundError:  # also when it vanished between listing and decoding
        raise ImageError(shown, "no such file") from None
    except PermissionError:
        raise ImageError(shown, "permission denied; make the file readable") from None
    except Image.DecompressionBombError as e:
        raise ImageError(shown, f"exceeds the {max_pixels}-pixel limit, refused as a decompression bomb ({e})") from None
    except UnidentifiedImageError:
        raise ImageError(shown, "not an image PIL can identify (cirkit reads JPEG, PNG, WebP, BMP, "
                                "GIF and TIFF)") from None
    except _DECODE_ERRORS as e:
        raise ImageError(shown, f"cannot decode ({e})") from None


def _to_rgb(im):
    from PIL import Image

    if im.mode.startswith("I") or im.mode == "F":  # 16/32-bit integer or float greyscale
        import numpy as np

        arr = np.nan_to_num(np.asarray(im, dtype=np.float64))
        peak = float(arr.max()) if arr.size else 0.0
        if im.mode.startswith("I;16") or peak > 255:
            top = 65535.0
        elif im.mode == "F" and peak <= 1.0:  # float images usually hold 0..1
            top = 1.0
        else:
            top = 255.0
        im = Image.fromarray((arr / top * 255.0).clip(0, 255).astype("uint8"), "L")
    if im.mode == "P" and "transparency" in im.info:
        im = im.convert("RGBA")
    if im.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        im = im.convert("RGBA")
        bg = Image.new("RGBA", im.size, (255, 255, 255, 255))
        return Image.alpha_composite(bg, im).convert("RGB")
    if im.mode != "RGB":
        im = im.convert("RGB")
    return im


NOT_UTF8_NAME = "the file name is not valid UTF-8, so it cannot be written to a JSONL file; rename it (e.g. with convmv)"


def list_images(folder: str | Path, skipped: list[tuple[str, str]] | None = None) -> list[tuple[str, Path]]:
    """All images under ``folder`` (recursive, sorted) as ``(id, path)``; id = relative path sans suffix.

    Files whose names are not UTF-8 (possible on Linux) cannot become ids or JSONL paths: with a
    ``skipped`` list they are appended to it as ``(printable path, reason)``, together with
    image-named links whose target is gone; without one, the first is a one-line error.
    """
    folder = Path(folder)
    if not folder.is_dir():
        if folder.exists():
            raise CirkitError(f"{display_path(folder)}: is a file, not a folder of images")
        raise CirkitError(f"{display_path(folder)}: not a folder of images")
    if not _text_ok(folder):
        raise CirkitError(f"{display_path(folder)}: the folder name is not valid UTF-8; rename it (e.g. with convmv)")
    items = []
    for p in sorted(folder.rglob("*")):
        if p.suffix.lower() not in IMAGE_EXTENSIONS or p.name.startswith("."):
            continue
        if not p.is_file():
            if skipped is not None and p.is_symlink() and not p.exists():
                skipped.append((display_path(p), "a symbolic link whose target is gone"))
            continue
        if not _text_ok(p):
            if skipped is None:
                raise CirkitError(f"{display_path(p)}: {NOT_UTF8_NAME}")
            skipped.append((display_path(p), NOT_UTF8_NAME))
            continue
        items.append((p.relative_to(folder).with_suffix("").as_posix(), p))
    if not items and not skipped:
        raise CirkitError(f"{folder}: no images found (looked for {', '.join(sorted(IMAGE_EXTENSIONS))})")
    seen: dict[str, Path] = {}
    for key, p in items:
        if key in seen:
            raise CirkitError(f"{folder}: two images share the id {key!r} ({seen[key].name}, {p.name}); rename one")
        seen[key] = p
    return items
