"""Visual reports of query answers: a self-contained HTML contact sheet and a PNG grid.

Both take the typed answers ``query`` returns (:class:`cirkit.records.Result`, hits as
:class:`cirkit.records.Hit`). The HTML embeds every thumbnail as a base64 data URI (so the
file can be mailed around), links each result to its image file (relative to the HTML's
folder when possible), and lists each hit's metadata columns. Everything from the data
is escaped, and only URLs of the :data:`SAFE_SCHEMES` become links (a ``javascript:`` or
``data:`` path is shown, never linked). Missing or unreadable images become grey
placeholders rather than errors.
"""

from __future__ import annotations

import base64
import html
import io
import os
import re
from collections.abc import Sequence
from pathlib import Path
from urllib.parse import quote, urlsplit

from cirkit.records import Hit, Result

THUMB = 160
PLACEHOLDER = (200, 200, 200)
# URL schemes written into href: web and file links, and object-store URIs a browser ignores.
SAFE_SCHEMES = frozenset({"http", "https", "file", "s3", "gs", "gcs", "az", "abfs", "hf"})


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


def url_scheme(target: str) -> str:
    """The scheme a browser would read from ``target`` (it drops leading blanks and tabs/newlines)."""
    cleaned = re.sub(r"[\t\n\r]", "", target).lstrip("".join(map(chr, range(33))))
    return urlsplit(cleaned).scheme.lower()


def link_to(target: str | Path, html_dir: Path) -> str | None:
    """An href from the HTML's folder to ``target``: relative when possible, else a file:// URI.

    A URL (``scheme://...``) is kept only when its scheme is in :data:`SAFE_SCHEMES`; any
    other gives None (no link). A local path is percent-encoded, so its text can never be
    read as a scheme (``javascript:x`` becomes ``javascript%3Ax``, a relative file name).
    """
    if "://" in str(target):
        return str(target) if url_scheme(str(target)) in SAFE_SCHEMES else None
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
.meta{color:#555;overflow:hidden;text-overflow:ellipsis;white-space:nowrap}
.missing{color:#a00}
"""


# What marks a file as a report cirkit wrote, so a re-run may replace it and nothing else is
# (a mistyped --html or --grid must never land on a user's page, photo or config file).
GENERATOR = "<meta name='generator' content='cirkit'>"
_LEGACY_HTML = b"<!doctype html><html><head><meta charset='utf-8'>\n<title>"
PNG_SOFTWARE = ("Software", "cirkit")


def is_report_html(path: Path) -> bool:
    """Whether ``path`` is a contact sheet cirkit wrote (this version or one before the generator tag)."""
    from cirkit.io.atomic import read_head

    head = read_head(path, 4096)
    return GENERATOR.encode() in head or (head.startswith(_LEGACY_HTML) and b"body{font-family:system-ui" in head)


def is_report_png(path: Path) -> bool:
    """Whether ``path`` is a PNG grid cirkit wrote (it carries a ``Software: cirkit`` text chunk)."""
    from cirkit.io.atomic import read_head

    head = read_head(path, 4096)
    return head.startswith(b"\x89PNG\r\n\x1a\n") and b"tEXtSoftware\x00cirkit" in head


def _attr(value: object) -> str:
    return html.escape(str(value), quote=True)


def _linked_image(target: str | None, html_dir: Path, alt: str, uri: str) -> str:
    href = link_to(target, html_dir) if target else None
    img = f"<img alt='{_attr(alt)}' src='{uri}'>"  # uri: a data: URI made here, never from the data
    return f"<a href='{_attr(href)}'>{img}</a>" if href else img


def _hit_html(h: Hit, html_dir: Path, size: int) -> str:
    im, ok = thumbnail(h.image, size)
    label = f"#{h.rank} {float(h.score):.3f} {h.id}" + ("" if ok else " (missing)")
    meta = "".join(f"<div class='meta'>{html.escape(str(k))}: {html.escape(str(v))}</div>"
                   for k, v in h.metadata.items() if v is not None)
    return (f"<figure>{_linked_image(h.image, html_dir, h.id, data_uri(im))}"
            f"<figcaption title='{_attr(h.image or '')}'>{html.escape(label)}</figcaption>{meta}</figure>")


def write_html(path: str | Path, answers: Sequence[Result], title: str = "cirkit query results", size: int = THUMB) -> Path:
    """Write the contact sheet for ``answers`` atomically; returns its path."""
    from cirkit.io.atomic import atomic_write

    path = Path(path)
    html_dir = path.parent if str(path.parent) else Path(".")
    parts = [
        f"<!doctype html><html><head><meta charset='utf-8'>{GENERATOR}",
        f"<title>{html.escape(title)}</title><style>{_CSS % {'t': size}}</style></head><body>",
        f"<h1>{html.escape(title)}</h1>",
    ]
    for a in answers:
        parts.append(f"<section class='q' id='{_attr(a.id)}'><div class='query'>")
        if a.reference:
            im, ok = thumbnail(a.reference, size)
            cls = "" if ok else " class='missing'"
            parts.append(f"{_linked_image(a.reference, html_dir, 'query image', data_uri(im))}"
                         f"<div{cls}>{html.escape(Path(str(a.reference)).name)}</div>")
        else:
            parts.append("<div><em>text-only query</em></div>")
        if a.text:
            parts.append(f"<div class='text'>“{html.escape(str(a.text))}”</div>")
        parts.append("</div><div class='hits'>")
        parts.extend(_hit_html(h, html_dir, size) for h in a.hits)
        parts.append("</div></section>")
    parts.append("</body></html>\n")
    with atomic_write(path, kind="HTML report", owned=is_report_html) as fh:
        fh.write("\n".join(parts))
    return path


def _fit(draw, text: str, font, width: int) -> str:
    """``text`` cut with an ellipsis to at most ``width`` pixels in ``font``."""
    if draw.textlength(text, font=font) <= width:
        return text
    while text and draw.textlength(text + "…", font=font) > width:
        text = text[:-1]
    return text + "…"


def _rank_and_score(draw, font, hit: Hit, x: int, y: int, width: int) -> None:
    """Rank at the left of the cell, score at its right: the default font's 2 px space made
    ``#1 0.612`` read as ``#10.612``."""
    rank, score = f"#{hit.rank}", f"{float(hit.score):.3f}"
    room = width - draw.textlength(rank, font=font) - draw.textlength(score, font=font)
    if room < 10:  # a tiny cell: one line with a visible separator
        draw.text((x, y), _fit(draw, f"{rank} | {score}", font, width), fill=(0, 0, 0), font=font)
        return
    draw.text((x, y), rank, fill=(0, 0, 0), font=font)
    draw.text((x + width - draw.textlength(score, font=font), y), score, fill=(0, 0, 0), font=font)


def write_grid(path: str | Path, answers: Sequence[Result], size: int = 128) -> Path:
    """A PNG: one row per query (query image + text, then the results with rank, score and id)."""
    from PIL import Image, ImageDraw, ImageFont

    from cirkit.io.atomic import atomic_write

    font = ImageFont.load_default()
    label_h, pad = 30, 6
    cols = 1 + max((len(a.hits) for a in answers), default=0)
    width = pad + cols * (size + pad)
    row_h = size + label_h + pad
    sheet = Image.new("RGB", (width, pad + max(1, len(answers)) * row_h), (255, 255, 255))
    draw = ImageDraw.Draw(sheet)

    def text(x: int, y: int, value: str, fill) -> None:
        draw.text((x, y), _fit(draw, value, font, size), fill=fill, font=font)

    for r, a in enumerate(answers):
        y = pad + r * row_h
        im, _ = thumbnail(a.reference, size) if a.reference else (Image.new("RGB", (size, size), (235, 235, 250)), False)
        sheet.paste(im, (pad, y))
        draw.rectangle([pad - 2, y - 2, pad + size + 1, y + size + 1], outline=(40, 90, 200), width=2)
        text(pad, y + size + 2, f"query: {a.id}", (0, 0, 0))
        text(pad, y + size + 14, str(a.text or ""), (40, 90, 200))
        for c, h in enumerate(a.hits, start=1):
            x = pad + c * (size + pad)
            im, _ = thumbnail(h.image, size)
            sheet.paste(im, (x, y))
            _rank_and_score(draw, font, h, x, y + size + 2, size)
            text(x, y + size + 14, str(h.id), (90, 90, 90))
    from PIL.PngImagePlugin import PngInfo

    info = PngInfo()
    info.add_text(*PNG_SOFTWARE)
    path = Path(path)
    with atomic_write(path, "wb", kind="PNG grid", owned=is_report_png) as fh:
        sheet.save(fh, format="PNG", pnginfo=info)
    return path
