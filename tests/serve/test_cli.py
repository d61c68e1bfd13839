"""``cirkit serve`` on the command line: one-line errors, and a real server process that stops cleanly."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
from typer.testing import CliRunner

ROOT = Path(__file__).resolve().parents[2]


def invoke(*args):
    from cirkit.cli import app

    return CliRunner().invoke(app, ["serve", *map(str, args)])


def test_no_index_is_a_one_line_error():
    r = invoke()
    assert r.exit_code == 1 and "error: no index given; pass --index INDEX" in r.stderr


def test_a_missing_index_names_the_fix(tmp_path):
    r = invoke("--index", tmp_path / "none")
    assert r.exit_code == 1 and "no index table 'images' here; make one with 'cirkit index" in r.stderr


def test_bad_settings_are_refused_before_loading(gallery):
    r = invoke("--index", gallery / "idx", "--port", "70000")
    assert r.exit_code == 1 and "--port must be between 0 and 65535, got 70000" in r.stderr
    r = invoke("--index", gallery / "idx", "--cors-origin", "example.org")
    assert r.exit_code == 1 and "give an origin like https://example.org" in r.stderr
    r = invoke("--index", gallery / "idx", "--search", "ann")
    assert r.exit_code == 1 and "has no ANN index" in r.stderr


def test_a_port_in_use_is_a_one_line_error(gallery):
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen(1)
        port = busy.getsockname()[1]
        r = invoke("--index", gallery / "idx", "--port", port)
    assert r.exit_code == 1 and f"127.0.0.1:{port}: cannot listen" in r.stderr and "--port" in r.stderr
    assert "Traceback" not in r.output


def test_responses_are_not_held_back_by_nagle(gallery):
    """The listening socket says TCP, so asyncio disables Nagle: a keep-alive request is not ~40 ms."""
    import http.client

    from cirkit.serve import _listen

    from .conftest import Running, make_client

    with _listen("127.0.0.1", 0) as sock:
        assert sock.proto == socket.IPPROTO_TCP
    client, service = make_client(gallery / "idx")
    with Running(client.app) as srv:
        conn = http.client.HTTPConnection("127.0.0.1", int(srv.url.rsplit(":", 1)[1]))
        took = []
        for _ in range(15):
            t0 = time.perf_counter()
            conn.request("GET", "/api/health")
            assert conn.getresponse().read() == b'{"status":"ok"}'
            took.append(time.perf_counter() - t0)
        conn.close()
    service.close()
    assert sorted(took)[len(took) // 2] < 0.03, took  # with Nagle on: >= 40 ms each (the client's delayed ACK)


@pytest.mark.slow
def test_cirkit_serve_process_answers_and_stops_on_ctrl_c(gallery):
    env = {**os.environ, "PYTHONPATH": str(ROOT), "CIRKIT_SERVE_TOKEN": "t0k"}
    proc = subprocess.Popen([sys.executable, "-m", "cirkit", "serve", "--index", str(gallery / "idx"), "--port", "0",
                             "--json"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=ROOT)
    try:
        line, deadline = "", time.monotonic() + 120
        while "listening on" not in line:
            assert time.monotonic() < deadline and proc.poll() is None, proc.stderr.read()
            line = proc.stderr.readline()
        url = line.split("listening on ")[1].split()[0]
        assert url.startswith("http://127.0.0.1:")
        with urllib.request.urlopen(url + "api/health", timeout=10) as r:
            assert json.load(r) == {"status": "ok"}
        req = urllib.request.Request(url + "api/search?text=red&k=1", headers={"Authorization": "Bearer t0k"})
        with urllib.request.urlopen(req, timeout=10) as r:
            assert json.load(r)["hits"][0]["id"] == "red"
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, err
    summary = json.loads(out.strip().splitlines()[-1])
    assert summary["stage"] == "serve" and summary["counts"]["requests"] == 1
