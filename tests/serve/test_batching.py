"""Micro-batching: concurrent requests share embedding calls and searches, and get their own answers."""

from __future__ import annotations

import threading
import time

import pytest

from cirkit.serve.batching import Closed, MicroBatcher

from .conftest import Running, build_gallery, make_client


def run_threads(n, fn):
    out, errors = [None] * n, []

    def go(i):
        try:
            out[i] = fn(i)
        except Exception as e:  # reported below, with the thread's index
            errors.append((i, e))

    threads = [threading.Thread(target=go, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert not errors, errors
    return out


# -- the batcher alone -----------------------------------------------------------------------------
def test_concurrent_jobs_are_batched_and_answered_in_order():
    sizes = []

    def fn(jobs):
        sizes.append(len(jobs))
        time.sleep(0.05)  # the model call: jobs arriving meanwhile form the next batch
        return [j * 10 for j in jobs]

    b = MicroBatcher(fn, max_batch=8, max_wait=0.01)
    out = run_threads(20, lambda i: b.submit(i))
    b.close()
    assert out == [i * 10 for i in range(20)]
    assert sum(sizes) == 20 and max(sizes) <= 8 and len(sizes) < 20
    assert b.stats == {"batches": len(sizes), "jobs": 20, "largest": max(sizes)}


def test_a_lone_job_does_not_wait_and_a_batch_waits_only_for_announced_jobs():
    b = MicroBatcher(lambda jobs: [len(jobs)] * len(jobs), max_batch=8, max_wait=2.0)
    t0 = time.perf_counter()
    assert b.submit("a") == 1
    assert time.perf_counter() - t0 < 1.0  # nobody else announced: no 2 s wait
    # one request still preparing (decoding its upload): the batch waits for it, boundedly
    with b.expecting() as ticket:
        fut = b.put("first")
        time.sleep(0.1)
        second = b.put("second", ticket)
    assert fut.result(5) == 2 and second.result(5) == 2
    # a job queued with its ticket is no longer expected: its batch does not wait for it
    t0 = time.perf_counter()
    with b.expecting() as ticket:
        fut = b.put("alone", ticket)
        assert fut.result(5) == 1
    assert time.perf_counter() - t0 < 1.0
    t0 = time.perf_counter()
    with b.expecting():  # announced but never submitted: the wait ends at max_wait
        b2 = MicroBatcher(lambda jobs: [0] * len(jobs), max_batch=8, max_wait=0.2)
        with b2.expecting():
            assert b2.submit("x") == 0
        b2.close()
    assert time.perf_counter() - t0 < 1.5
    b.close()


def test_one_bad_job_fails_alone_and_a_failed_batch_fails_all_of_it():
    def fn(jobs):
        if "boom" in jobs:
            raise RuntimeError("the model broke")
        return [ValueError(j) if j == "bad" else j.upper() for j in jobs]

    b = MicroBatcher(fn, max_batch=4, max_wait=0.05)
    with b.expecting(), b.expecting():
        good, bad = b.put("ok"), b.put("bad")
    assert good.result(5) == "OK"
    with pytest.raises(ValueError, match="bad"):
        bad.result(5)
    with pytest.raises(RuntimeError, match="the model broke"):
        b.submit("boom")
    assert b.submit("still") == "STILL"  # the worker survives
    b.close()
    with pytest.raises(Closed):
        b.submit("late")


# -- through the server ----------------------------------------------------------------------------
@pytest.fixture()
def slow_server(gallery):
    """The app with an embedding call that takes 40 ms and counts what it embeds."""
    client, service = make_client(gallery / "idx")
    real = service.backbone.embed_queries
    calls = []

    def slow(batch, texts):
        calls.append(len(texts) if texts is not None else len(batch))
        time.sleep(0.04)
        return real(batch, texts)

    service.backbone.embed_queries = slow
    yield client, service, calls
    service.close()


def test_concurrent_requests_share_embedding_calls(slow_server, gallery):
    client, service, calls = slow_server
    colours = ["red", "green", "blue", "yellow", "purple", "cyan", "orange", "pink"] * 2
    with client:
        expected = [client.get("/api/search", params={"text": f"a {c} one", "k": 1}).json()["hits"][0]["id"]
                    for c in colours]
        assert expected == colours
        calls.clear()
        before = service.embed_calls
        out = run_threads(len(colours), lambda i: client.get("/api/search", params={"text": f"a {colours[i]} one",
                                                                                    "k": 1}).json())
    assert [o["hits"][0]["id"] for o in out] == expected  # each request got its own answer
    assert sum(calls) == len(colours)
    assert len(calls) < len(colours) / 2, calls  # ... from a few shared model calls
    assert service.embed_calls - before == len(calls)
    assert max(o["batch"] for o in out) > 1


def test_mixed_kinds_and_filters_in_one_batch_answer_as_if_alone(slow_server, gallery):
    client, service, calls = slow_server
    blue = (gallery / "images" / "blue.png").read_bytes()
    requests = [
        ("post", {"files": {"image": ("b.png", blue, "image/png")}, "data": {"text": "make it red", "k": "3"}}),
        ("post", {"files": {"image": ("b.png", blue, "image/png")}, "data": {"k": "3"}}),
        ("get", {"params": {"text": "something green", "k": 3}}),
        ("get", {"params": {"text": "something green", "k": 3, "where": "warm = true"}}),
        ("get", {"params": {"reference_id": "yellow", "k": 2, "exclude_reference": "true"}}),
        ("get", {"params": {"text": "red", "where": "warm = = broken"}}),
    ]
    with client:
        alone = [getattr(client, m)("/api/search", **kw) for m, kw in requests]
        together = run_threads(len(requests), lambda i: getattr(client, requests[i][0])("/api/search", **requests[i][1]))
    for a, t in zip(alone, together, strict=True):
        assert t.status_code == a.status_code
        if a.status_code == 200:
            assert [h["id"] for h in t.json()["hits"]] == [h["id"] for h in a.json()["hits"]]
            assert [h["score"] for h in t.json()["hits"]] == pytest.approx([h["score"] for h in a.json()["hits"]],
                                                                           abs=1e-5)
        else:  # the broken filter fails alone; its batch neighbours were answered above
            assert t.json() == a.json()
    assert max(t.json().get("batch", 0) for t in together if t.status_code == 200) > 1


def test_a_real_server_batches_concurrent_clients(tmp_path):
    """Over real sockets (uvicorn in a thread): 12 clients, fewer model calls than requests."""
    import json
    import urllib.parse
    import urllib.request

    idx = build_gallery(tmp_path / "g", names=["red", "green", "blue"], odd=False)
    client, service = make_client(idx)
    real = service.backbone.embed_queries
    calls = []

    def slow(batch, texts):
        calls.append(1)
        time.sleep(0.05)
        return real(batch, texts)

    service.backbone.embed_queries = slow
    with Running(client.app) as srv:
        def ask(i):
            q = urllib.parse.urlencode({"text": ["red", "green", "blue"][i % 3], "k": 1})
            with urllib.request.urlopen(f"{srv.url}/api/search?{q}", timeout=30) as r:
                return json.load(r)["hits"][0]["id"]

        out = run_threads(12, ask)
    service.close()
    assert out == [["red", "green", "blue"][i % 3] for i in range(12)]
    assert len(calls) < 12
