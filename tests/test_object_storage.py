"""Stores and indexes on object storage: a real S3-compatible server (moto) on 127.0.0.1, not a mocked client.

``embed -o s3://...`` and ``index -o s3://...`` write through LanceDB with ``--storage-options``;
``query`` reads with credentials from the environment (the default) and keeps its exact-search
cache on local disk; results equal a local index's.
"""

from __future__ import annotations

import json
import os

import numpy as np
import pytest

pytest.importorskip("torch")
moto_server = pytest.importorskip("moto.server", reason="moto[server] (pip install 'moto[server]') runs the S3 server")

from typer.testing import CliRunner  # noqa: E402

from cirkit.cli import app  # noqa: E402
from cirkit.errors import CirkitError  # noqa: E402
from cirkit.io.embeddings import read_embeddings  # noqa: E402
from cirkit.io.storage import parse_storage_options  # noqa: E402

SECRET = "s3cr3t-value-never-printed"
BUCKET = "cirkit-test"


@pytest.fixture(scope="module")
def s3():
    """A moto S3 server on 127.0.0.1 (its own thread) with one bucket; yields the endpoint URL."""
    import boto3

    server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    endpoint = f"http://{host}:{port}"
    boto3.client("s3", endpoint_url=endpoint, aws_access_key_id="test", aws_secret_access_key=SECRET,
                 region_name="us-east-1").create_bucket(Bucket=BUCKET)
    yield endpoint
    server.stop()


def _options(endpoint: str) -> str:
    return f"aws_endpoint={endpoint},allow_http=true,aws_access_key_id=test,aws_secret_access_key={SECRET},region=us-east-1"


@pytest.fixture
def photos(tmp_path):
    from PIL import Image

    folder = tmp_path / "photos"
    folder.mkdir()
    for i, c in enumerate(["red", "green", "blue", "yellow", "purple", "cyan", "white", "black"]):
        Image.new("RGB", (16 + i, 16), c).save(folder / f"{c}.png")
    return folder


def _cli(args: list[str], env: dict[str, str] | None = None):
    return CliRunner().invoke(app, ["-q", *args], env=env)


def test_storage_options_parse_json_or_pairs_and_never_echo_values():
    assert parse_storage_options("a=1, b = x=y") == {"a": "1", "b": "x=y"}
    assert parse_storage_options('{"allow_http": true, "n": 3}') == {"allow_http": "true", "n": "3"}
    assert parse_storage_options(None) is None and parse_storage_options("") is None
    for bad in (f"aws_secret_access_key{SECRET}", '{"k": ' + SECRET, '["x"]', '{"k": {"n": 1}}'):
        with pytest.raises(CirkitError) as e:
            parse_storage_options(bad)
        assert SECRET not in str(e.value) and "--storage-options" in str(e.value)


def test_embed_and_index_on_s3_then_query_with_env_credentials(s3, photos, tmp_path, monkeypatch):
    monkeypatch.setenv("CIRKIT_CACHE_DIR", str(tmp_path / "cache"))
    store, index = f"s3://{BUCKET}/t1/gallery.lance", f"s3://{BUCKET}/t1/idx"
    r = _cli(["embed", str(photos), "--backbone", "fake", "-o", store, "--num-workers", "0",
              "--storage-options", _options(s3), "--json"])
    assert r.exit_code == 0, r.output
    assert SECRET not in r.stdout + r.stderr
    assert json.loads(r.stdout)["counts"]["embedded"] == 8
    again = _cli(["embed", str(photos), "--backbone", "fake", "-o", store, "--num-workers", "0",
                  "--storage-options", _options(s3), "--json"])
    assert json.loads(again.stdout)["counts"] == {"images": 8, "embedded": 0, "already_stored": 8, "failed": 0}
    r = _cli(["index", store, "-o", index, "--storage-options", _options(s3), "--json"])
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout)["counts"]["added"] == 8 and SECRET not in r.stdout

    # the same gallery indexed locally: the answers must match
    local_store, local_index = tmp_path / "g.lance", tmp_path / "idx"
    assert _cli(["embed", str(photos), "--backbone", "fake", "-o", str(local_store), "--num-workers", "0"]).exit_code == 0
    assert _cli(["index", str(local_store), "-o", str(local_index)]).exit_code == 0
    _, rids, _, rvecs = read_embeddings(store, parse_storage_options(_options(s3)))
    _, lids, _, lvecs = read_embeddings(local_store)
    assert dict(zip(rids, map(tuple, rvecs), strict=True)) == dict(zip(lids, map(tuple, lvecs), strict=True))

    env = {"AWS_ENDPOINT": s3, "AWS_ALLOW_HTTP": "true", "AWS_ACCESS_KEY_ID": "test",
           "AWS_SECRET_ACCESS_KEY": SECRET, "AWS_REGION": "us-east-1"}  # credentials from the environment
    query = ["query", str(photos / "red.png"), "--text", "make it blue", "--backbone", "fake", "-k", "3", "--json"]
    remote = _cli([*query, "--index", index], env=env)
    assert remote.exit_code == 0, remote.output
    local = _cli([*query, "--index", str(local_index)])
    hits = lambda r: [(h["id"], round(h["score"], 5)) for h in json.loads(r.stdout)["details"]["hits"]]  # noqa: E731
    assert hits(remote) == hits(local) and hits(remote)[0][0] == "blue"
    cached = list((tmp_path / "cache").rglob("*.vectors.npy"))
    assert cached, "exact search keeps its vector cache on local disk"
    assert SECRET not in remote.stdout + remote.stderr


def test_a_missing_remote_store_and_a_bad_uri_are_one_line_errors(s3, tmp_path, monkeypatch):
    monkeypatch.setenv("CIRKIT_CACHE_DIR", str(tmp_path / "cache"))
    r = _cli(["index", f"s3://{BUCKET}/nothing/here.lance", "-o", f"s3://{BUCKET}/nothing/idx",
              "--storage-options", _options(s3)])
    assert r.exit_code == 1 and "no such embeddings store" in r.stderr and "Traceback" not in r.stderr
    r = _cli(["embed", str(tmp_path), "--backbone", "fake", "-o", f"s3://{BUCKET}/x/notastore"])
    assert r.exit_code == 1 and "must end in /NAME.lance" in r.stderr


@pytest.mark.slow
def test_two_processes_embed_into_s3_with_one_commit(s3, photos, tmp_path):
    """Each rank writes fragments straight to the bucket; the main one commits them once."""
    import subprocess
    import sys

    import lance

    from .test_distributed_stages import _env, _torchrun

    store = f"s3://{BUCKET}/t2/gallery.lance"
    env = {**_env(), "CIRKIT_CACHE_DIR": str(tmp_path / "cache")}
    proc = subprocess.run([*_torchrun(["embed", str(photos), "--backbone", "fake", "-o", store, "--num-workers", "0",
                                       "--batch-size", "2", "--fragment-rows", "2", "--storage-options", _options(s3),
                                       "--json"])], capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert SECRET not in proc.stdout + proc.stderr
    opts = parse_storage_options(_options(s3))
    _, ids, _, vecs = read_embeddings(store, opts)
    assert sorted(ids) == sorted(p.stem for p in photos.iterdir())
    assert lance.dataset(store, storage_options=opts).version == 2
    assert np.isfinite(vecs).all() and sys.executable and os.sep
