"""cirkit.report: self-contained HTML contact sheet and PNG grid."""

from __future__ import annotations

import base64
import io
import re
from pathlib import Path
from urllib.parse import unquote

from PIL import Image

from cirkit.records import Hit, Result
from cirkit.report import link_to, write_grid, write_html


def entries(tmp_path: Path):
    imgs = tmp_path / "imgs"
    imgs.mkdir()
    for name, rgb in (("a b", (255, 0, 0)), ("c", (0, 0, 255))):
        Image.new("RGB", (40, 20), rgb).save(imgs / f"{name}.png")
    hits = [
        Hit(1, "a b", 0.91, str(imgs / "a b.png")),
        Hit(2, "gone", 0.5, str(imgs / "gone.png")),
    ]
    return [
        Result(id="q1", reference=str(imgs / "c.png"), text="make it <red> & shiny", hits=hits),
        Result(id="q2", reference=None, text="text only", hits=hits[:1]),
    ]


def test_html_is_self_contained_and_links_resolve(tmp_path):
    out = tmp_path / "out" / "sheet.html"
    write_html(out, entries(tmp_path))
    text = out.read_text(encoding="utf-8")
    assert "&lt;red&gt; &amp; shiny" in text and "<red>" not in text
    datas = re.findall(r"src='data:image/jpeg;base64,([^']+)'", text)
    assert len(datas) == 4  # q1 ref + 2 hits, q2 one hit
    for d in datas:
        Image.open(io.BytesIO(base64.b64decode(d))).verify()
    hrefs = re.findall(r"href='([^']+)'", text)
    assert "src='http" not in text and "src='/" not in text
    resolved = [(out.parent / unquote(h)).resolve() for h in hrefs]
    assert sum(p.is_file() for p in resolved) == 3 and "(missing)" in text  # gone.png is a placeholder


def test_link_to_is_relative():
    assert link_to("/data/imgs/x y.png", Path("/data/report")) == "../imgs/x%20y.png"
    assert link_to("s3://bucket/a.png", Path("/tmp")) == "s3://bucket/a.png"


def test_grid_png(tmp_path):
    out = tmp_path / "grid.png"
    write_grid(out, entries(tmp_path), size=64)
    with Image.open(out) as im:
        assert im.format == "PNG" and im.size[0] >= 3 * 64 and im.size[1] >= 2 * 64


def test_only_safe_url_schemes_become_links(tmp_path):
    """A crafted image path or URL in the index never becomes a javascript:/data: link."""
    imgs = tmp_path / "imgs"
    imgs.mkdir()
    Image.new("RGB", (8, 8), (0, 255, 0)).save(imgs / "ok.png")
    evil = ["javascript://%0aalert(document.cookie)", " JavaScript://x%0aalert(1)", "java\tscript://x",
            "data://text/html,<script>alert(1)</script>", "vbscript://x"]
    hits = [Hit(i + 1, f"h{i}", 0.5, p) for i, p in enumerate(evil)]
    hits.append(Hit(len(evil) + 1, "web", 0.4, "https://example.com/a.png?x='y'"))
    hits.append(Hit(len(evil) + 2, "local", 0.3, "javascript:alert(1)"))  # no '//': a local file name
    hits.append(Hit(len(evil) + 3, "fine", 0.2, str(imgs / "ok.png")))
    out = tmp_path / "sheet.html"
    write_html(out, [Result(id="q", reference="javascript://x%0aalert(2)", text="t", hits=hits)])
    text = out.read_text(encoding="utf-8")
    hrefs = re.findall(r"href='([^']*)'", text)
    assert len(hrefs) == 3 and hrefs[0] == "https://example.com/a.png?x=&#x27;y&#x27;"
    assert hrefs[1].endswith("javascript%3Aalert%281%29") and ":" not in hrefs[1]  # a relative file name
    assert (out.parent / unquote(hrefs[2])).resolve() == (imgs / "ok.png").resolve()
    assert "<script>" not in text and "href='javascript:" not in text.lower().replace(" ", "")
    assert "src='data:image/jpeg;base64," in text and not re.search(r"src='(?!data:image/)", text)


def test_metadata_columns_are_shown_and_escaped(tmp_path):
    h = Hit(1, "a<b", 0.9, str(tmp_path / "none.png"), {"brand": "<b>acme</b>", "year": 2020, "gone": None})
    out = tmp_path / "m.html"
    write_html(out, [Result(id="q'><x", text="t", hits=[h])])
    text = out.read_text(encoding="utf-8")
    assert "brand: &lt;b&gt;acme&lt;/b&gt;" in text and "year: 2020" in text and "gone" not in text
    assert "<b>acme" not in text and "id='q&#x27;&gt;&lt;x'" in text and "a&lt;b" in text


def test_grid_labels_keep_rank_and_score_apart(tmp_path):
    """'#1 0.612' rendered as '#10.612' in the default font (its space is 2 px wide)."""
    import numpy as np

    size, pad = 64, 6
    out = tmp_path / "grid.png"
    hits = [Hit(r, f"id{r}", 0.612, None) for r in range(1, 11)]
    write_grid(out, [Result(id="q", text="a text far longer than one thumbnail is wide, cut", hits=hits)], size=size)
    with Image.open(out) as im:
        assert im.size == (pad + 11 * (size + pad), pad + size + 30 + pad)
        ink = np.asarray(im.convert("L"))
    for c in (1, 10):  # rank 1 and rank 10 cells: the label row under the thumbnail
        x = pad + c * (size + pad)
        row = ink[pad + size + 2 : pad + size + 14, x : x + size] < 128
        cols = np.flatnonzero(row.any(axis=0))
        gaps = np.diff(cols)
        assert gaps.max() >= 10, (c, cols)  # rank and score stand apart, not one narrow space
