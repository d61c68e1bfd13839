"""cirkit serve's HTTP API through FastAPI's TestClient, on a fake-backbone index (exact ranks)."""

from __future__ import annotations

import io
import json
import re
import struct
import zlib
from pathlib import Path

import pytest

from cirkit.serve.app import ASSETS

from .conftest import GALLERY, ODD_IDS, build_gallery, make_client, png


def upload(path: Path, name="ref.png", mime="image/png"):
    return {"image": (name, path.read_bytes(), mime)}


def png_header(w: int, h: int) -> bytes:
    """A tiny PNG whose header claims ``w`` x ``h`` pixels (refused before any decoding)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b""))


def ids(response) -> list[str]:
    assert response.status_code == 200, response.text
    return [h["id"] for h in response.json()["hits"]]


def healthy(client) -> None:
    """The server still answers health checks and real queries."""
    assert client.get("/api/health").json() == {"status": "ok"}
    assert ids(client.get("/api/search", params={"text": "a red thing", "k": 1})) == ["red"]


# -- answers ---------------------------------------------------------------------------------------
def test_composed_upload_finds_the_target_with_scores_and_timing(client, gallery):
    r = client.post("/api/search", files=upload(gallery / "images" / "blue.png"), data={"text": "make it red", "k": "3"})
    body = r.json()
    assert ids(r)[0] == "red" and [h["rank"] for h in body["hits"]] == [1, 2, 3]
    assert body["hits"][0]["score"] > body["hits"][1]["score"]
    assert body["hits"][0]["metadata"] == {"warm": True}
    assert all("image" not in h for h in body["hits"])  # no server file paths in answers
    assert body["query"]["kind"] == "composed" and body["query"]["upload"] is True
    assert {"decode", "queue", "embedding", "search", "total"} <= set(body["timing_ms"])
    assert body["version"] >= 1 and body["batch"] >= 1


def test_answers_equal_cirkit_query(client, gallery):
    """The served ranking is the in-process query's: same model, same exact search."""
    from cirkit.query import QueryConfig, run

    ref = gallery / "images" / "blue.png"
    for text in ("make it red", None):
        local = run(QueryConfig(image=ref, text=text, index=str(gallery / "idx"), k=5))
        served = client.post("/api/search", files=upload(ref), data={"k": "5", **({"text": text} if text else {})})
        assert ids(served) == [h.id for h in local.hits]
        assert [h["score"] for h in served.json()["hits"]] == pytest.approx([h.score for h in local.hits], abs=1e-5)
    local = run(QueryConfig(text="something yellow", index=str(gallery / "idx"), k=4, where="warm = true"))
    served = client.get("/api/search", params={"text": "something yellow", "k": 4, "where": "warm = true"})
    assert ids(served) == [h.id for h in local.hits]


def test_image_only_by_indexed_id_and_exclude_reference(client):
    assert ids(client.get("/api/search", params={"reference_id": "blue", "k": 2}))[0] == "blue"
    r = client.get("/api/search", params={"reference_id": "blue", "k": 2, "exclude_reference": "true"})
    assert "blue" not in ids(r) and len(ids(r)) == 2 and r.json()["query"]["kind"] == "image"
    # the same through the multipart form
    r = client.post("/api/search", data={"reference_id": "blue", "text": "make it yellow", "k": "1"})
    assert ids(r) == ["yellow"] and r.json()["query"]["kind"] == "composed"


def test_text_only_and_where(client):
    r = client.get("/api/search", params={"text": "something blue", "k": 3, "where": "warm = true"})
    assert set(ids(r)) <= {"red", "yellow", "orange", "pink"} and len(ids(r)) == 3
    assert r.json()["query"]["kind"] == "text"


@pytest.mark.parametrize("odd", list(ODD_IDS))
def test_ids_are_taken_literally(client, odd):
    """Quotes, '..', slashes and non-ASCII in ids: a reference and a thumbnail by id, never a path."""
    r = client.get("/api/search", params={"reference_id": odd, "k": 3, "exclude_reference": "true"})
    assert odd not in ids(r)
    assert client.get("/api/thumb", params={"id": odd}).headers["content-type"] == "image/jpeg"


# -- bad input: a clear 4xx JSON error, and the server stays healthy --------------------------------
BAD = [
    ("non-image upload", "post", {"files": {"image": ("x.png", b"this is not an image", "image/png")}}, 400,
     "the uploaded file: not an image"),
    ("empty upload", "post", {"files": {"image": ("x.png", b"", "image/png")}}, 400, "empty"),
    ("truncated png", "post", {"files": {"image": ("x.png", png_header(40, 40)[:30], "image/png")}}, 400,
     "the uploaded file"),
    ("huge image (pixels)", "post", {"files": {"image": ("x.png", png_header(20_000, 20_000), "image/png")}}, 413,
     "pixel limit"),
    ("too long for a model (aspect)", "post", {"files": {"image": ("x.png", png_header(30_000, 2), "image/png")}},
     413, "aspect ratio"),
    ("unknown reference id", "get", {"params": {"reference_id": "no-such-id"}}, 404, "unknown id 'no-such-id'"),
    ("sql in a reference id", "get", {"params": {"reference_id": "x' OR '1'='1"}}, 404, "unknown id"),
    ("control characters in an id", "get", {"params": {"reference_id": "red\n"}}, 404, "unknown id"),
    ("bad filter", "get", {"params": {"text": "red", "where": "warm = = true"}}, 400, "where 'warm = = true'"),
    ("unknown filter column", "get", {"params": {"text": "red", "where": "colour = 'red'"}}, 400, "where"),
    ("k zero", "get", {"params": {"text": "red", "k": 0}}, 400, "k must be between 1 and 100, got 0"),
    ("k too big", "get", {"params": {"text": "red", "k": 101}}, 400, "k must be between 1 and 100, got 101"),
    ("k not a number", "get", {"params": {"text": "red", "k": "ten"}}, 422, "k:"),
    ("nothing to search", "get", {"params": {"k": 3}}, 400, "nothing to search for"),
    ("blank text only", "get", {"params": {"text": "   "}}, 400, "nothing to search for"),
    ("upload and id", "post", {"files": {"image": ("x.png", b"x", "image/png")}, "data": {"reference_id": "red"}},
     400, "not both"),
    ("text too long", "get", {"params": {"text": "red " * 600}}, 400, "at most 2000"),
]


@pytest.mark.parametrize("name, method, kwargs, status, message", BAD, ids=[b[0] for b in BAD])
def test_bad_input_is_a_clear_json_4xx_and_the_server_stays_healthy(client, name, method, kwargs, status, message):
    r = getattr(client, method)("/api/search", **kwargs)
    assert r.status_code == status, r.text
    assert r.headers["content-type"].startswith("application/json")
    assert message in r.json()["error"]
    assert "\n" not in r.json()["error"] and "/tmp" not in r.json()["error"]  # one line, no server paths
    healthy(client)


def test_pixel_limit_is_the_servers_setting(gallery):
    c, service = make_client(gallery / "idx", max_pixels=30 * 30)
    with c:
        r = c.post("/api/search", files=upload(png(gallery / "big.png", (255, 0, 0), (40, 40))))
        assert r.status_code == 413 and "900-pixel limit" in r.json()["error"]
        healthy(c)
    service.close()


def test_body_over_the_limit_is_refused_declared_or_streamed(client):
    big = b"\0" * 2_100_000  # the test app's limit is 2 MB
    r = client.post("/api/search", files={"image": ("x.png", big, "image/png")}, data={"text": "red"})
    assert r.status_code == 413 and "larger than 2000000 bytes" in r.json()["error"]

    def chunks():  # no Content-Length: refused once the stream passes the limit
        for _ in range(30):
            yield b"\0" * 100_000

    r = client.post("/api/search", content=chunks(), headers={"content-type": "multipart/form-data; boundary=x"})
    assert r.status_code == 413 and "larger than" in r.json()["error"]
    r = client.post("/api/search", content=b"abc", headers={"content-length": "12abc"})
    assert r.status_code == 400
    healthy(client)


def test_unknown_routes_and_methods_are_json(client):
    r = client.get("/api/nope")
    assert r.status_code == 404 and "no such page or API route: /api/nope" in r.json()["error"]
    r = client.delete("/api/search")
    assert r.status_code == 405 and "DELETE is not allowed" in r.json()["error"]
    healthy(client)


# -- thumbnails: only images that are rows of the index --------------------------------------------
def test_thumbnails_only_for_indexed_ids(client, gallery):
    from PIL import Image

    r = client.get("/api/thumb", params={"id": "red", "size": 64})
    assert r.status_code == 200 and r.headers["content-type"] == "image/jpeg"
    im = Image.open(io.BytesIO(r.content))
    assert max(im.size) <= 64 and im.getpixel((5, 5))[0] > 200
    for bad in ("images/red.png", str(gallery / "images" / "red.png"), "../images/red", "/etc/passwd", "red.png",
                "file:///etc/passwd"):
        r = client.get("/api/thumb", params={"id": bad})
        assert r.status_code == 404 and "not in the index" in r.json()["error"], bad
    r = client.get("/api/thumb", params={"id": "red", "size": 5000})
    assert r.status_code == 400 and "size must be one of" in r.json()["error"]
    assert client.get("/api/thumb").status_code == 422


def test_thumbnails_are_bounded_and_cached(tmp_path):
    from PIL import Image

    root = tmp_path / "g"
    idx = build_gallery(root, names=["red", "blue"], odd=False)
    png(root / "images" / "red.png", (250, 10, 10), (1200, 800))  # the indexed file, now large
    c, service = make_client(idx)
    opened = []
    real = service._open
    service._open = lambda path, what: opened.append(path) or real(path, what)
    with c:
        first = c.get("/api/thumb", params={"id": "red", "size": 128})
        assert max(Image.open(io.BytesIO(first.content)).size) == 128
        assert c.get("/api/thumb", params={"id": "red", "size": 128}).content == first.content
        assert len(opened) == 1  # the second came from the cache
        png(root / "images" / "red.png", (10, 250, 10), (300, 200))  # changed on disk: read again
        again = c.get("/api/thumb", params={"id": "red", "size": 128})
        assert len(opened) == 2 and Image.open(io.BytesIO(again.content)).getpixel((60, 40))[1] > 200
        (root / "images" / "blue.png").unlink()
        r = c.get("/api/thumb", params={"id": "blue"})
        assert r.status_code == 404 and "missing on the server" in r.json()["error"]
        r = c.get("/api/search", params={"reference_id": "blue"})
        assert r.status_code == 404 and "the image of id 'blue': no such file" == r.json()["error"]
        assert c.get("/api/health").json() == {"status": "ok"}
    service.close()


# -- the index changes while serving -----------------------------------------------------------------
def test_new_index_versions_are_picked_up(tmp_path):
    from cirkit.backbones import load_backbone
    from cirkit.backbones.base import BackboneSpec
    from cirkit.encode import encode_images
    from cirkit.index import IndexConfig, run
    from cirkit.io.embeddings import EmbeddingStore

    root = tmp_path / "g"
    idx = build_gallery(root, names=["red", "blue", "green"], odd=False)
    c, service = make_client(idx)
    with c:
        info = c.get("/api/info").json()
        assert info["rows"] == 3 and info["search"] == "exact" and info["model"]["backbone"] == "fake"
        assert ids(c.get("/api/search", params={"text": "orange", "k": 1})) != ["orange"]
        assert c.get("/api/thumb", params={"id": "orange"}).status_code == 404
        # `cirkit index` adds a row and deletes one while the server runs
        bb = load_backbone(BackboneSpec(backbone="fake", model="fake"))
        item = ("orange", png(root / "images" / "orange.png", (255, 128, 0)))
        enc = encode_images(bb, [item], num_workers=0)
        store = EmbeddingStore.open_for_append(root / "more.lance", bb.manifest())
        store.append(enc.ids, [str(item[1])], enc.vectors.numpy())
        run(IndexConfig(embeddings=root / "more.lance", output=str(idx), delete="blue"))
        r = c.get("/api/search", params={"text": "orange", "k": 3})
        assert ids(r)[0] == "orange" and "blue" not in ids(r) and r.json()["version"] > info["version"]
        assert c.get("/api/info").json()["rows"] == 3
        assert c.get("/api/thumb", params={"id": "orange"}).status_code == 200
        assert c.get("/api/thumb", params={"id": "blue"}).status_code == 404
        assert c.get("/api/search", params={"reference_id": "blue"}).status_code == 404
    service.close()


def test_a_model_that_did_not_build_the_index_is_refused(gallery):
    from cirkit.backbones.fake import FakeBackbone
    from cirkit.errors import CirkitError
    from cirkit.search import open_index
    from cirkit.serve.service import Service

    class Other(FakeBackbone):
        def checkpoint_id(self):
            return "another-fake"

    with pytest.raises(CirkitError, match="built with fake fake .* the served model is fake another-fake"):
        Service(open_index(gallery / "idx"), Other())


# -- safe by default -------------------------------------------------------------------------------
def test_token_is_required_when_set(gallery, monkeypatch):
    c, service = make_client(gallery / "idx", token="s3cret")
    with c:
        for path, params in (("/api/search", {"text": "red"}), ("/api/info", {}), ("/api/thumb", {"id": "red"})):
            r = c.get(path, params=params)
            assert r.status_code == 401 and "Authorization: Bearer" in r.json()["error"], path
            assert r.headers["www-authenticate"] == "Bearer"
            for wrong in ("Bearer s3cre", "Bearer s3cret2", "Basic s3cret", "s3cret", "Bearer", ""):
                assert c.get(path, params=params, headers={"Authorization": wrong}).status_code == 401, wrong
            assert c.get(path, params=params, headers={"Authorization": "Bearer s3cret"}).status_code == 200
        r = c.post("/api/search", data={"text": "red"})
        assert r.status_code == 401
        assert c.get("/api/health").status_code == 200  # liveness needs no token
        assert c.get("/").status_code == 200  # the page holds no data; it asks for the token
    service.close()
    monkeypatch.setenv("CIRKIT_SERVE_TOKEN", "from-env")
    c, service = make_client(gallery / "idx")
    with c:
        assert c.get("/api/info").status_code == 401
        assert c.get("/api/info", headers={"Authorization": "Bearer from-env"}).status_code == 200
    service.close()


def test_security_headers_everywhere_and_no_cors_unless_asked(client, gallery):
    for path in ("/", "/static/app.js", "/api/health", "/api/nope", "/openapi.json"):
        r = client.get(path, headers={"Origin": "https://evil.example"})
        assert r.headers["x-content-type-options"] == "nosniff", path
        assert r.headers["referrer-policy"] == "no-referrer"
        assert "script-src 'self'" in r.headers["content-security-policy"]
        assert "unsafe-inline" not in r.headers["content-security-policy"]
        assert "access-control-allow-origin" not in r.headers
    c, service = make_client(gallery / "idx", cors_origin=["https://ok.example"])
    with c:
        r = c.get("/api/health", headers={"Origin": "https://ok.example"})
        assert r.headers["access-control-allow-origin"] == "https://ok.example"
        r = c.options("/api/search", headers={"Origin": "https://ok.example", "Access-Control-Request-Method": "POST"})
        assert r.status_code == 200
        assert "access-control-allow-origin" not in c.get("/api/health", headers={"Origin": "https://evil.example"}).headers
    service.close()


def test_page_assets_are_fixed_files_without_inline_code(client):
    page = client.get("/").text
    assert "/static/app.js" in page
    for name, mime in ASSETS.items():
        r = client.get(f"/static/{name}")
        assert r.status_code == 200 and r.headers["content-type"] == mime
        text = r.text
        if name.endswith(".html"):
            assert not re.search(r"<script(?![^>]*\bsrc=)", text), f"{name}: inline script"
            assert "<style" not in text and " style=" not in text and not re.search(r"\son\w+=", text), name
            assert "http://" not in text.replace("http://127.0.0.1:8000", "") and "https://" not in text, name
        if name.endswith(".js"):
            # data reaches the page only as text, properties and blob: URLs
            for sink in ("innerHTML", "outerHTML", "insertAdjacentHTML", "document.write", "eval(", "new Function"):
                assert sink not in text, f"{name} uses {sink}"
    for bad in ("/static/nope.js", "/static/..%2F__init__.py", "/static/%2e%2e/service.py", "/static/__init__.py"):
        assert client.get(bad).status_code == 404, bad


def test_openapi_schema_and_docs_page(client):
    spec = client.get("/openapi.json").json()
    assert {"/api/search", "/api/info", "/api/health", "/api/thumb"} <= set(spec["paths"])
    assert {"get", "post"} <= set(spec["paths"]["/api/search"])
    assert "docs.js" in client.get("/docs").text


def test_every_gallery_image_is_searchable_by_id(client):
    for name in set(GALLERY) - {"black"}:  # the fake backbone embeds black as a near-zero vector
        assert ids(client.get("/api/search", params={"reference_id": name, "k": 1})) == [name]


def test_images_the_index_stores_as_urls_are_never_fetched(tmp_path):
    """A row whose image is a URL (s3://, http://): its thumbnail and reference are a 404, not a fetch."""
    import numpy as np

    from cirkit.backbones.fake import FakeBackbone
    from cirkit.index import IndexConfig, run
    from cirkit.io.embeddings import EmbeddingStore

    root = tmp_path / "g"
    idx = build_gallery(root, names=["red"], odd=False)
    store = EmbeddingStore.open_for_append(root / "remote.lance", FakeBackbone().manifest())
    vec = np.eye(1, 32, dtype=np.float32)
    store.append(["s3", "web"], ["s3://bucket/x.jpg", "http://169.254.169.254/latest"], np.repeat(vec, 2, 0))
    run(IndexConfig(embeddings=root / "remote.lance", output=str(idx)))
    c, service = make_client(idx)
    with c:
        for item in ("s3", "web"):
            r = c.get("/api/thumb", params={"id": item})
            assert r.status_code == 404 and "is not a local file" in r.json()["error"], r.text
            assert c.get("/api/search", params={"reference_id": item}).status_code == 404
        assert set(ids(c.get("/api/search", params={"text": "red", "k": 3}))) == {"red", "s3", "web"}
    service.close()


def test_an_index_turned_to_another_model_while_serving_is_refused_not_mixed(tmp_path):
    """A new version whose manifest names another model: searches are a 503 saying to restart."""
    import lancedb

    root = tmp_path / "g"
    idx = build_gallery(root, names=["red", "blue"], odd=False)
    c, service = make_client(idx)
    with c:
        assert ids(c.get("/api/search", params={"text": "red", "k": 1})) == ["red"]
        db = lancedb.connect(str(idx))
        rows = db.open_table("images").to_arrow()
        manifest = json.loads(rows.schema.metadata[b"cirkit"])
        turned = {**rows.schema.metadata, b"cirkit": json.dumps({**manifest, "checkpoint": "another"}).encode()}
        db.create_table("images", rows.replace_schema_metadata(turned), mode="overwrite")
        r = c.get("/api/search", params={"text": "red", "k": 1})
        assert r.status_code == 503 and "built with fake another" in r.json()["error"]
        assert "restart 'cirkit serve'" in r.json()["error"]
        assert c.get("/api/health").status_code == 503
    service.close()
