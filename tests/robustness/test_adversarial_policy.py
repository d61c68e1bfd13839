"""Policies an attacker tries to walk around: pickle by another name or another road, unsafe links
in the HTML report, model code from the hub. Every road goes through the real CLI.

Pickle: weights named anything (``.PT``, no suffix, protocol-0 text pickles), named by a
checkpoint's ``config.json`` (``weights``), by an index's manifest (``query`` without
``--model`` loads what the index names), or in a ``local-dir:`` folder. ``torch.load`` is
replaced by a probe that fails the test, so "refused" means nothing was unpickled.
HTML: image paths stored in an index (the data, not cirkit) with every scheme trick; only
safe links may come out.
"""

from __future__ import annotations

import json
import pickle
import re
import shutil
from pathlib import Path

import numpy as np
import pytest

from .conftest import fails, ok, refused

torch = pytest.importorskip("torch")


@pytest.fixture
def no_unpickling(monkeypatch):
    def refuse(*a, **k):
        raise AssertionError(f"torch.load called on {a[:1]}")

    monkeypatch.setattr(torch, "load", refuse)


def _pickles(folder: Path) -> dict[str, Path]:
    """The same weights pickled every way: torch zip, legacy torch, protocol 0 text, protocol 2; odd names."""
    folder.mkdir(parents=True, exist_ok=True)
    out = {}
    torch.save({"w": torch.zeros(2)}, folder / "zip.PT")
    out["torch_zip_PT"] = folder / "zip.PT"
    torch.save({"w": torch.zeros(2)}, folder / "legacy", _use_new_zipfile_serialization=False)
    out["torch_legacy_no_suffix"] = folder / "legacy"
    (folder / "text.pkl").write_bytes(pickle.dumps({"w": [0.0, 0.0]}, protocol=0))
    out["protocol0_pkl"] = folder / "text.pkl"
    (folder / "p2.safetensors").write_bytes(pickle.dumps({"w": [0.0]}, protocol=2))
    out["protocol2_named_safetensors"] = folder / "p2.safetensors"
    return out


PICKLES = ["torch_zip_PT", "torch_legacy_no_suffix", "protocol0_pkl", "protocol2_named_safetensors"]


def _index_naming(tmp_path: Path, source: str, pretrained: str | None) -> Path:
    from cirkit.io.embeddings import EmbeddingStore
    from cirkit.records import EmbeddingManifest

    m = EmbeddingManifest(backbone="clip", checkpoint=f"{source}@{pretrained}", dim=32, source=source,
                          pretrained=pretrained)
    store = tmp_path / "s.lance"
    EmbeddingStore.open_for_append(store, m).append(["a", "b"], ["a.png", "b.png"], np.eye(2, 32, dtype=np.float32))
    ok(["index", str(store), "-o", str(tmp_path / "idx")])
    return tmp_path / "idx"


@pytest.mark.parametrize("name", PICKLES)
def test_an_index_that_names_pickle_weights_is_refused_at_query(tmp_path, no_unpickling, name):
    weights = _pickles(tmp_path / "w")[name]
    idx = _index_naming(tmp_path, "cirkit-tiny", str(weights))
    line = refused(["query", "--text", "red", "--index", str(idx)], [tmp_path], cwd=tmp_path)
    assert line.startswith(f"error: {weights}: ") and ("--allow-pickle" in line or "not a safetensors file" in line)


def test_an_index_that_names_a_local_dir_of_pickle_weights_is_refused_in_one_line(tmp_path, no_unpickling):
    _pickles(tmp_path / "w")
    idx = _index_naming(tmp_path, f"local-dir:{tmp_path / 'w'}", None)
    line = refused(["query", "--text", "red", "--index", str(idx)], [tmp_path], cwd=tmp_path)
    assert "pickle" in line or "safetensors" in line  # and no 'WARNING:root:' line from open_clip beside it


@pytest.mark.parametrize("name", PICKLES)
@pytest.mark.parametrize("allow", [False, True], ids=["default", "allow-pickle"])
def test_a_checkpoint_config_naming_pickle_weights_is_refused_by_every_reader(world, tmp_path, no_unpickling, name,
                                                                               allow):
    ck = tmp_path / "ck"
    shutil.copytree(world / "ck", ck)
    weights = _pickles(ck)[name]
    (ck / "model.safetensors").unlink()
    cfg = json.loads((ck / "config.json").read_text())
    (ck / "config.json").write_text(json.dumps({**cfg, "weights": weights.name}))
    flag = ["--allow-pickle"] if allow else []
    for args in (["embed", str(world / "synth" / "images"), "--model", str(ck), "-o", str(tmp_path / "g.lance"),
                  "--num-workers", "0", *flag],
                 ["evaluate", "generic", "-d", str(world / "synth" / "benchmark" / "test"), "-m", str(ck),
                  "--num-workers", "0", *flag],
                 ["train", str(world / "synth" / "triplets.jsonl"), "--stage", "2", "--init", str(ck), "-o",
                  str(tmp_path / "run"), "--max-steps", "1", "--num-workers", "0", *flag]):
        line = refused(args, [tmp_path, world], cwd=tmp_path)
        assert str(weights) in line and "safetensors" in line, line


@pytest.mark.parametrize("name", PICKLES)
def test_pretrained_pickle_by_any_name_for_every_stage(world, tmp_path, no_unpickling, name):
    weights = _pickles(tmp_path / "w")[name]
    for args in (["embed", str(world / "synth" / "images"), "--backbone", "clip", "-m", "cirkit-tiny", "--pretrained",
                  str(weights), "-o", str(tmp_path / "g.lance"), "--num-workers", "0"],
                 ["evaluate", "generic", "-d", str(world / "synth" / "benchmark" / "test"), "--backbone", "clip", "-m",
                  "cirkit-tiny", "--pretrained", str(weights), "--num-workers", "0"],
                 ["train", str(world / "synth" / "captions.jsonl"), "--stage", "1", "-m", "cirkit-tiny",
                  "--pretrained", str(weights), "-o", str(tmp_path / "run"), "--max-steps", "1", "--num-workers", "0"]):
        line = refused(args, [tmp_path, world], cwd=tmp_path)
        assert line.startswith(f"error: {weights}: ") and ("--allow-pickle" in line or "not a safetensors" in line), line


@pytest.mark.parametrize("name", ["hf-hub:evil/model", "hf-hub:../../etc", "hf-hub:", "local-dir:/nonexistent",
                                  "local-dir:", "ViT-B-32-quickgelu\x7f"])
def test_odd_model_names_are_one_line_and_never_reach_the_network(tmp_path, name, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    png = tmp_path / "i"
    png.mkdir()
    from PIL import Image

    Image.new("RGB", (8, 8)).save(png / "a.png")
    line = fails(["embed", str(png), "--backbone", "clip", "-m", name, "-o", str(tmp_path / "g.lance"),
                  "--num-workers", "0"])
    assert line.startswith("error: ")


# -- HTML: links from the data ---------------------------------------------------------------------------
EVIL = ["javascript:alert(1)", "JaVaScRiPt:alert(1)", " javascript:alert(1)", "\tjava\nscript:alert(1)",
        "javascript&colon;alert(1)", "&#106;avascript:alert(1)", "java&#x09;script:alert(1)",
        "data:text/html,<script>alert(1)</script>", "DATA:image/svg+xml,<svg onload=alert(1)>", "vbscript:msgbox(1)",
        "VbScRiPt:x", "javascript://%0aalert(1)", "\u2028javascript:alert(1)",
        "feed:javascript:alert(1)", "blob:https://x/y", "view-source:http://x", "jar:http://x!/",
        "http://x'onmouseover='alert(1)", "https://a.b/\"><script>alert(1)</script>", "//evil.com/x.png",
        "\\\\evil.com\\x.png", "x.png\" onerror=\"alert(1)", "</a><script>alert(1)</script>"]


def test_html_report_from_an_index_of_evil_paths_links_nothing_unsafe(tmp_path):
    from cirkit.io.embeddings import EmbeddingStore
    from cirkit.records import EmbeddingManifest
    from cirkit.report import SAFE_SCHEMES

    ids = [f"i{n}<b>'\"" for n in range(len(EVIL))]
    store = tmp_path / "s.lance"
    vec = np.random.default_rng(0).standard_normal((len(EVIL), 32)).astype(np.float32)
    EmbeddingStore.open_for_append(store, EmbeddingManifest("fake", "fake", 32)).append(ids, EVIL, vec)
    ok(["index", str(store), "-o", str(tmp_path / "idx")])
    ref = tmp_path / "q.png"
    from PIL import Image

    Image.new("RGB", (8, 8), "red").save(ref)
    page = tmp_path / "r.html"
    ok(["query", str(ref), "--index", str(tmp_path / "idx"), "-k", str(len(EVIL)), "--html", str(page)])
    tags = _parse(page.read_text())
    assert {t for t, _ in tags} <= {"html", "head", "meta", "title", "style", "body", "h1", "section", "div", "a",
                                    "img", "figure", "figcaption", "em"}, {t for t, _ in tags}
    hrefs = [v for t, attrs in tags for k, v in attrs if k == "href"]
    assert hrefs, "no links at all: the test proves nothing"
    for tag, attrs in tags:
        for k, v in attrs:
            assert not k.startswith("on"), (tag, k, v)  # no event handler attribute survived escaping
            if k == "href":
                cleaned = re.sub(r"[\t\n\r]", "", v or "").lstrip("".join(map(chr, range(33))))
                scheme = re.match(r"^([A-Za-z][A-Za-z0-9+.-]*):", cleaned)  # as a browser reads it
                assert scheme is None or scheme.group(1).lower() in SAFE_SCHEMES, v
            if k == "src":
                assert v.startswith("data:image/jpeg;base64,"), v[:60]


def _parse(text: str) -> list[tuple[str, list[tuple[str, str | None]]]]:
    """Every start tag with its attributes, decoded the way a browser decodes them."""
    from html.parser import HTMLParser

    found: list[tuple[str, list[tuple[str, str | None]]]] = []

    class Collect(HTMLParser):
        def handle_starttag(self, tag, attrs):
            found.append((tag, attrs))

    Collect(convert_charrefs=True).feed(text)
    return found


def test_an_image_path_with_a_nul_in_a_store_is_one_line_naming_the_row(tmp_path):
    from cirkit.io.embeddings import EmbeddingStore
    from cirkit.records import EmbeddingManifest

    store = tmp_path / "s.lance"
    EmbeddingStore.open_for_append(store, EmbeddingManifest("fake", "fake", 32)).append(
        ["a", "b"], ["a.png", "\x00javascript:alert(1)"], np.eye(2, 32, dtype=np.float32))
    line = refused(["index", str(store), "-o", str(tmp_path / "idx")], [tmp_path], cwd=tmp_path)
    assert line == f"error: {store}: row 'b' has an image path with a NUL character; fix the gallery and re-embed"
