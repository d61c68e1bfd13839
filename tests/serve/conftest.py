"""A gallery of solid-colour images indexed with the fake backbone, and the serve app over it."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from cirkit.backbones.fake import COLOURS

GALLERY = ["red", "green", "blue", "yellow", "purple", "cyan", "white", "black", "orange", "pink"]
WARM = {"red", "yellow", "orange", "pink"}
# ids a lookup must take literally and a page must show as text: an SQL quote, a path
# separator, '..', non-ASCII, markup
ODD_IDS = {"it's": "grey", "a/../b": "grey", "ünï cödé": "grey", "<img src=x onerror=alert(1)>": "grey"}


def png(path: Path, rgb, size=(24, 24)) -> Path:
    from PIL import Image

    Image.new("RGB", size, rgb).save(path)
    return path


def build_gallery(root: Path, names=GALLERY, odd=True) -> Path:
    """Images, their fake embeddings and an index (metadata column ``warm``) under ``root``; returns the index."""
    from cirkit.backbones import load_backbone
    from cirkit.backbones.base import BackboneSpec
    from cirkit.encode import encode_images
    from cirkit.index import IndexConfig, run
    from cirkit.io.embeddings import EmbeddingStore

    (root / "images").mkdir(parents=True, exist_ok=True)
    items = []
    for name in names:
        items.append((name, png(root / "images" / f"{name}.png", tuple(int(255 * c) for c in COLOURS[name]))))
    if odd:
        for i, (key, colour) in enumerate(ODD_IDS.items()):
            items.append((key, png(root / "images" / f"odd{i}.png", tuple(int(255 * c) for c in COLOURS[colour]))))
    bb = load_backbone(BackboneSpec(backbone="fake", model="fake"))
    enc = encode_images(bb, items, num_workers=0)
    paths = dict(items)
    store = EmbeddingStore.open_for_append(root / "gallery.lance", bb.manifest())
    store.append(enc.ids, [str(paths[k].relative_to(root)) for k in enc.ids], enc.vectors.numpy())
    meta = root / "meta.jsonl"
    meta.write_text("".join(json.dumps({"id": k, "warm": k in WARM}) + "\n" for k, _ in items))
    run(IndexConfig(embeddings=root / "gallery.lance", output=str(root / "idx"), metadata=meta))
    return root / "idx"


@pytest.fixture(scope="session")
def gallery(tmp_path_factory) -> Path:
    """The gallery folder (``images/``, ``idx``) shared by read-only tests."""
    root = tmp_path_factory.mktemp("serve-gallery")
    build_gallery(root)
    return root


def make_client(index: Path, **settings):
    """(TestClient, service) over ``index`` as ``cirkit serve`` builds them (refresh on every request)."""
    from fastapi.testclient import TestClient

    from cirkit.serve import ServeConfig, token_of
    from cirkit.serve.app import create_app
    from cirkit.serve.service import Service

    token = settings.pop("token", None)
    max_upload = settings.pop("max_upload_bytes", 2_000_000)
    config = ServeConfig(index=str(index), **{"refresh_s": 0.0, **settings})
    service = Service.open(config)
    app = create_app(service, token=token if token is not None else token_of(config), max_upload_bytes=max_upload,
                     cors_origins=config.cors_origin)
    return TestClient(app), service


@pytest.fixture()
def client(gallery):
    c, service = make_client(gallery / "idx")
    with c:
        yield c
    service.close()


class Running:
    """A uvicorn server on a free 127.0.0.1 port in a thread (``url``), stopped on exit."""

    def __init__(self, app):
        import threading

        import uvicorn

        from cirkit.serve import _listen

        self.sock = _listen("127.0.0.1", 0)
        self.url = f"http://127.0.0.1:{self.sock.getsockname()[1]}"
        self.server = uvicorn.Server(uvicorn.Config(app, log_config=None, log_level="warning", lifespan="off"))
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True)

    def __enter__(self):
        import time

        self.thread.start()
        deadline = time.monotonic() + 10
        while not self.server.started:
            assert time.monotonic() < deadline, "the test server did not start in 10 s"
            time.sleep(0.01)
        return self

    def __exit__(self, *exc):
        self.server.should_exit = True
        self.thread.join(10)
        self.sock.close()
