"""Visual reports of query results: a self-contained HTML contact sheet and a PNG grid.

An *entry* is one answered query: ``{"id", "reference" (image path or None), "text",
"hits": [{"rank", "id", "score", "image"}, ...]}``. The HTML embeds every thumbnail as a
base64 data URI (so the file can be mailed around) and links each result to its image
file, relative to the HTML's folder when possible. Missing or unreadable images become
grey placeholders rather than errors.
"""

from __future__ import annotations

import base64
import html
import io
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any
from urllib.parse import quote

THUMB = 160
PLACEHOLDER = (200, 200, 200)


def thumbnail(path: str | Path | None, size: int = THUMB):
    """A ``size`` x ``size`` RGB thumbnail (letterboxed), or a grey placeholder; returns (image, ok)."""
    from PIL import Image

    from cirkit.errors import ImageError
    from cirkit.io.images import open_image

    canvas = Image.new("RGB", (size, size), (255, 255, 255))
    if path is None:
        return Image.new("RGB", (size, size), PLACEHOLDER), False
    try:
        im = open_image(path)
    except ImageError:
        return Image.new("RGB", (size, size), PLACEHOLDER), False
    im.thumbnail((size, size))
    canvas.paste(im, ((size - im.width) // 2, (size - im.height) // 2))
    return canvas, True


def data_uri(image, fmt: str = "JPEG") -> str:
    """A PIL image as a ``data:`` URI."""
    buf = io.BytesIO()
    image.save(buf, format=fmt, quality=85) if fmt == "JPEG" else image.save(buf, format=fmt)
    mime = "image/jpeg" if fmt == "JPEG" else f"image/{fmt.lower()}"
    return f"data:{mime};base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def link_to(target: str | Path, html_dir: Path) -> str:
    """An href from the HTML's folder to ``target`` (relative when possible, else file:// URI)."""
    if "://" in str(target):
        return str(target)
    p = Path(target).expanduser().absolute()
    try:
        return quote(Path(os.path.relpath(p, html_dir.absolute())).as_posix())
    except ValueError:  # another drive on Windows
        return p.as_uri()


_CSS = """
body{font-family:system-ui,sans-serif;margin:1.5em;background:#fafafa;color:#222}
.q{display:flex;gap:1em;align-items:flex-start;margin-bottom:2em;border-bottom:1px solid #ddd;padding-bottom:1em}
.query{flex:0 0 auto;width:%(t)dpx}.query .text{font-weight:600;margin-top:.3em}
.hits{display:flex;flex-wrap:wrap;gap:.6em}
figure{margin:0;width:%(t)dpx;font-size:12px}figure img,.query img{width:%(t)dpx;height:%(t)dpx;border:1px solid #ccc}
figcaption{overflow:hidden;text-overflow:ellipsis;white-space:nowrap}
.missing{color:#a00}
"""


def write_html(path: str | Path, entries: Sequence[dict[str, Any]], title: str = "cirkit query results", size: int = THUMB) -> Path:
    """Write the contact sheet for ``entries`` atomically; returns its path."""
    from cirkit.io.atomic import atomic_write

    path = Path(path)
    html_dir = path.parent if str(path.parent) else Path(".")
    parts = [
        "<!doctype html><html><head><meta charset='utf-8'>",
        f"<title>{html.escape(title)}</title><style>{_CSS % {'t': size}}</style></head><body>",
        f"<h1>{html.escape(title)}</h1>",
    ]
    for e in entries:
        parts.append(f"<section class='q' id='{html.escape(str(e.get('id', '')), quote=True)}'><div class='query'>")
        ref = e.get("reference")
        if ref:
            im, ok = thumbnail(ref, size)
            cls = "" if ok else " class='missing'"
            parts.append(
                f"<a href='{html.escape(link_to(ref, html_dir), quote=True)}'><img alt='query image' src='{data_uri(im)}'></a>"
                f"<div{cls}>{html.escape(Path(str(ref)).name)}</div>"
            )
        else:
            parts.append("<div><em>text-only query</em></div>")
        if e.get("text"):
            parts.append(f"<div class='text'>“{html.escape(str(e['text']))}”</div>")
        parts.append("</div><div class='hits'>")
        for h in e.get("hits", []):
            im, ok = thumbnail(h.get("image"), size)
            href = html.escape(link_to(h["image"], html_dir), quote=True) if h.get("image") else "#"
            label = f"#{h['rank']} {float(h['score']):.3f} {h['id']}" + ("" if ok else " (missing)")
            parts.append(
                f"<figure><a href='{href}'><img alt='{html.escape(str(h['id']), quote=True)}' src='{data_uri(im)}'></a>"
                f"<figcaption title='{html.escape(str(h.get('image', '')), quote=True)}'>{html.escape(label)}</figcaption></figure>"
            )
        parts.append("</div></section>")
    parts.append("</body></html>\n")
    with atomic_write(path) as fh:
        fh.write("\n".join(parts))
    return path


def write_grid(path: str | Path, entries: Sequence[dict[str, Any]], size: int = 128) -> Path:
    """A PNG: one row per query (query image + text, then the results with rank/score/id)."""
    from PIL import Image, ImageDraw, ImageFont

    from cirkit.io.atomic import atomic_write

    font = ImageFont.load_default()
    label_h, pad = 30, 6
    cols = 1 + max((len(e.get("hits", [])) for e in entries), default=0)
    width = pad + cols * (size + pad)
    row_h = size + label_h + pad
    sheet = Image.new("RGB", (width, pad + max(1, len(entries)) * row_h), (255, 255, 255))
    draw = ImageDraw.Draw(sheet)

    def clip(text: str, n: int = 22) -> str:
        return text if len(text) <= n else text[: n - 1] + "…"

    for r, e in enumerate(entries):
        y = pad + r * row_h
        im, _ = thumbnail(e.get("reference"), size) if e.get("reference") else (Image.new("RGB", (size, size), (235, 235, 250)), False)
        sheet.paste(im, (pad, y))
        draw.rectangle([pad - 2, y - 2, pad + size + 1, y + size + 1], outline=(40, 90, 200), width=2)
        draw.text((pad, y + size + 2), clip(f"Q {e.get('id', '')}"), fill=(0, 0, 0), font=font)
        draw.text((pad, y + size + 14), clip(str(e.get("text") or "")), fill=(40, 90, 200), font=font)
        for c, h in enumerate(e.get("hits", []), start=1):
            x = pad + c * (size + pad)
            im, _ = thumbnail(h.get("image"), size)
            sheet.paste(im, (x, y))
            draw.text((x, y + size + 2), f"#{h['rank']} {float(h['score']):.3f}", fill=(0, 0, 0), font=font)
            draw.text((x, y + size + 14), clip(str(h["id"])), fill=(90, 90, 90), font=font)
    path = Path(path)
    with atomic_write(path, "wb") as fh:
        sheet.save(fh, format="PNG")
    return path
