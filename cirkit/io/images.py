"""Safe image decoding: EXIF orientation, RGB, decompression-bomb limit, clear failures."""

from __future__ import annotations

import warnings
from pathlib import Path

from cirkit.errors import CirkitError, ImageError

IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff"})
# 89.5 Mpx is PIL's own warning threshold; anything larger is refused before decoding.
MAX_PIXELS = 89_478_485


def open_image(path: str | Path, max_pixels: int = MAX_PIXELS, min_side: int | None = None):
    """Decode ``path`` to an RGB PIL image with EXIF orientation applied.

    Raises :class:`ImageError` (with the reason) for missing, empty, truncated,
    non-image, or oversized files; transparency is flattened onto white and 16-bit
    images are scaled to 8 bits rather than clipped. ``min_side``: the caller only needs
    images whose shorter side is at least this; JPEGs are then decoded at the smallest
    DCT scale (1/2, 1/4, 1/8) that still gives that, which is several times faster for
    photos much larger than a model's input.
    """
    from PIL import Image, ImageOps, UnidentifiedImageError

    path = Path(path)
    if not path.exists():
        raise ImageError(path, "no such file")
    if path.stat().st_size == 0:
        raise ImageError(path, "empty file (0 bytes)")
    try:
        with warnings.catch_warnings():
            # We check the size ourselves right after the header is read, with a clearer message.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(path) as im:
                w, h = im.size
                if w * h > max_pixels:
                    raise ImageError(path, f"{w}x{h} = {w * h} pixels exceeds the {max_pixels}-pixel limit")
                if min_side and im.format == "JPEG" and min(w, h) > 2 * min_side:
                    # draft keeps both sides >= the request; scale it so the shorter side is min_side.
                    im.draft("RGB", (max(1, w * min_side // min(w, h)), max(1, h * min_side // min(w, h))))
                im.load()
                im = ImageOps.exif_transpose(im)
                return _to_rgb(im)
    except ImageError:
        raise
    except Image.DecompressionBombError as e:
        raise ImageError(path, f"exceeds the {max_pixels}-pixel limit, refused as a decompression bomb ({e})") from None
    except UnidentifiedImageError:
        raise ImageError(path, "not an image PIL can identify") from None
    except (OSError, SyntaxError, ValueError) as e:
        raise ImageError(path, f"cannot decode ({e})") from None


def _to_rgb(im):
    from PIL import Image

    if im.mode in ("I;16", "I;16B", "I;16L", "I"):
        import numpy as np

        arr = np.asarray(im, dtype=np.float64)
        top = 65535.0 if im.mode.startswith("I;16") or arr.max() > 255 else 255.0
        im = Image.fromarray((arr / top * 255.0).clip(0, 255).astype("uint8"), "L")
    if im.mode == "P" and "transparency" in im.info:
        im = im.convert("RGBA")
    if im.mode in ("RGBA", "LA", "PA"):
        im = im.convert("RGBA")
        bg = Image.new("RGBA", im.size, (255, 255, 255, 255))
        return Image.alpha_composite(bg, im).convert("RGB")
    if im.mode != "RGB":
        im = im.convert("RGB")
    return im


def list_images(folder: str | Path) -> list[tuple[str, Path]]:
    """All images under ``folder`` (recursive, sorted) as ``(id, path)``; id = relative path sans suffix."""
    folder = Path(folder)
    if not folder.is_dir():
        raise CirkitError(f"{folder}: not a folder of images")
    items = [
        (p.relative_to(folder).with_suffix("").as_posix(), p)
        for p in sorted(folder.rglob("*"))
        if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file() and not p.name.startswith(".")
    ]
    if not items:
        raise CirkitError(f"{folder}: no images found (looked for {', '.join(sorted(IMAGE_EXTENSIONS))})")
    seen: dict[str, Path] = {}
    for key, p in items:
        if key in seen:
            raise CirkitError(f"{folder}: two images share the id {key!r} ({seen[key].name}, {p.name}); rename one")
        seen[key] = p
    return items
