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
