"""Load on ``cirkit serve`` over 127.0.0.1, against the in-process query path in the same run.

Builds a 100k-row index of clustered random unit vectors (as ``benchmarks/search_latency.py``
does: embeddings store -> ``cirkit.index.run``) whose manifest is the query model's, starts
``cirkit serve`` on it as a subprocess on a free 127.0.0.1 port, and measures:

* ``in-process query``: single composed queries through ``cirkit query``'s own code path
  (``cirkit.query._run_one``: ``encode_queries`` of the reference file + text, then
  ``Index.search``), model and index loaded once, one query at a time: the baseline;
* ``in-process bare``: the same model call and search without the query module's file
  reading and DataLoader (a lower bound for any server);
* ``served C clients``: C threads (1, 8, 32) on keep-alive HTTP connections sending a fixed
  number of composed queries (a 64 px PNG upload + a text) as fast as answers come back.

For each: p50/p95 latency, queries/s, and CPU-seconds of the server process and of this
process. For the served runs also the mean batch size and where the server's time went
(decode, queue, embedding, search; the rest of the client's latency is HTTP and JSON), which
is what tells why a goal is missed. The model is ``clip`` ``cirkit-small`` with random weights
(a real ViT + text tower, dim 128, nothing downloaded); ``--backbone fake`` uses the test
backbone (dim 32). Everything stops by itself.

    python benchmarks/serve_load.py                      # 100k rows, 1/8/32 clients, 240 requests each
    python benchmarks/serve_load.py --rows 20000 --requests 60 --clients 1,8
    python benchmarks/serve_load.py --backbone fake --py-spy /path/to/py-spy --profile-dir prof/
"""

from __future__ import annotations

import os

# Both sides (this process's in-process path and the server) run torch with passive OpenMP waits:
# on a shared, oversubscribed machine, spinning OpenMP workers of a main thread's team burn their
# time slices (we measured the same model call at 18 ms in a worker thread and 200-700 ms on the
# main thread of the same process while other jobs ran). Set before torch is first imported.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import argparse  # noqa: E402
import http.client  # noqa: E402
import json  # noqa: E402
import random
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
TEXTS = ["make it red", "in blue", "same but green", "with a yellow tint", "darker", "make it purple",
         "brighter and orange", "in black and white"]


# -- data ----------------------------------------------------------------------------------------
def clustered(n: int, dim: int, clusters: int, spread: float, seed: int) -> np.ndarray:
    """``n`` unit vectors around ``clusters`` random directions (search_latency.py's mixture)."""
    rng = np.random.default_rng(seed)
    c = np.random.default_rng(0).standard_normal((clusters, dim)).astype(np.float32)
    c /= np.linalg.norm(c, axis=1, keepdims=True)
    x = c[rng.integers(0, clusters, n)] + spread * rng.standard_normal((n, dim)).astype(np.float32) / np.sqrt(dim)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def build_index(work: Path, rows: int, manifest, ann: bool) -> Path:
    from cirkit.index import IndexConfig, run
    from cirkit.io.embeddings import EmbeddingStore

    store_path, idx = work / "gallery.lance", work / "idx"
    store = EmbeddingStore.open_for_append(store_path, manifest)
    vectors = clustered(rows, manifest.dim, 1000, 1.0, seed=1)
    step = 50_000
    for s in range(0, rows, step):
        ids = [f"r{i:07d}" for i in range(s, min(rows, s + step))]
        store.append(ids, [f"/img/{i}.jpg" for i in ids], vectors[s : s + step])
    run(IndexConfig(embeddings=store_path, output=str(idx), ann=ann))
    return idx


def reference_images(work: Path, count: int = 8) -> list[Path]:
    """Small PNGs with some structure (a decode is real work, not a solid fill)."""
    from PIL import Image, ImageDraw

    rng = random.Random(0)
    out = []
    for i in range(count):
        im = Image.new("RGB", (64, 64), tuple(rng.randrange(256) for _ in range(3)))
        d = ImageDraw.Draw(im)
        for _ in range(6):
            x, y = rng.randrange(48), rng.randrange(48)
            d.ellipse((x, y, x + rng.randrange(8, 24), y + rng.randrange(8, 24)),
                      fill=tuple(rng.randrange(256) for _ in range(3)))
        p = work / f"ref{i}.png"
        im.save(p)
        out.append(p)
    return out


def multipart(image: bytes, text: str, k: int) -> tuple[bytes, str]:
    boundary = "cirkitbench7f3a"
    parts = [
        f'--{boundary}\r\nContent-Disposition: form-data; name="image"; filename="ref.png"\r\n'
        f"Content-Type: image/png\r\n\r\n".encode() + image + b"\r\n",
        f'--{boundary}\r\nContent-Disposition: form-data; name="text"\r\n\r\n{text}\r\n'.encode(),
        f'--{boundary}\r\nContent-Disposition: form-data; name="k"\r\n\r\n{k}\r\n'.encode(),
        f"--{boundary}--\r\n".encode(),
    ]
    return b"".join(parts), f"multipart/form-data; boundary={boundary}"


# -- measuring -----------------------------------------------------------------------------------
def proc_cpu(pid: int) -> float:
    """CPU-seconds (user + system) of process ``pid`` so far (Linux /proc)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def stats(lat: list[float], wall: float) -> dict:
    a = np.asarray(lat) * 1000
    return {"n": len(lat), "p50_ms": float(np.percentile(a, 50)), "p95_ms": float(np.percentile(a, 95)),
            "qps": len(lat) / wall if wall > 0 else 0.0}


def in_process(index_path: Path, refs: list[Path], n: int, k: int) -> tuple[dict, dict]:
    """Single queries through cirkit query's path, and through the bare model call + search."""
    import torch

    from cirkit.backbones import load_backbone
    from cirkit.io.images import open_image
    from cirkit.query import QueryConfig, QueryResult, _run_one, spec_for
    from cirkit.search import open_index
    from cirkit.summary import Timer

    index = open_index(index_path)
    backbone = load_backbone(spec_for(QueryConfig(index=str(index_path)), index))
    transform = backbone.image_transform()

    def query_path(i):
        config = QueryConfig(image=refs[i % len(refs)], text=TEXTS[i % len(TEXTS)], index=str(index_path), k=k,
                             search="exact")
        return _run_one(config, index, backbone, Timer(), QueryResult("query", single=True))

    def bare_path(i):
        x = transform(open_image(refs[i % len(refs)], min_side=backbone.decode_size))
        with torch.inference_mode():
            v = backbone.embed_queries(backbone.collate([x]), [TEXTS[i % len(TEXTS)]]).float().numpy()
        return index.search(v, k=k, strategy="exact", metadata=True)

    out = []
    for fn in (query_path, bare_path):
        fn(0)  # warm (cache, page cache)
        lat, cpu0, t0 = [], time.process_time(), time.perf_counter()
        for i in range(n):
            s = time.perf_counter()
            fn(i)
            lat.append(time.perf_counter() - s)
        r = stats(lat, time.perf_counter() - t0)
        r["client_cpu_s"] = time.process_time() - cpu0
        out.append(r)
    return out[0], out[1]


def load(port: int, pid: int, clients: int, total: int, bodies: list[tuple[bytes, str]],
         profile: tuple[str, Path] | None = None) -> dict:
    """``total`` requests from ``clients`` threads on keep-alive connections; stops when all are answered."""
    lock = threading.Lock()
    next_i = [0]
    lat: list[float] = []
    batches: list[int] = []
    parts: dict[str, list[float]] = {}
    errors: list[str] = []

    def client():
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
        while True:
            with lock:
                i = next_i[0]
                next_i[0] += 1
            if i >= total:
                break
            body, ctype = bodies[i % len(bodies)]
            s = time.perf_counter()
            try:
                conn.request("POST", "/api/search", body=body, headers={"Content-Type": ctype})
                resp = conn.getresponse()
                data = resp.read()
            except (OSError, http.client.HTTPException) as e:
                errors.append(repr(e))
                conn.close()
                conn = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
                continue
            took = time.perf_counter() - s
            if resp.status != 200:
                errors.append(f"{resp.status}: {data[:200]!r}")
                continue
            answer = json.loads(data)
            if not answer["hits"]:
                errors.append("no hits")
            with lock:
                lat.append(took)
                batches.append(answer["batch"])
                for key, v in answer["timing_ms"].items():
                    parts.setdefault(key, []).append(v)
        conn.close()

    threads = [threading.Thread(target=client) for _ in range(clients)]
    spy = None
    if profile is not None:  # sample the server's stacks while it holds the GIL (py-spy --gil)
        spy = subprocess.Popen([profile[0], "record", "--gil", "--nonblocking", "--rate", "200", "--format", "raw",
                                "-o", str(profile[1] / f"server-{clients}-clients.txt"), "--pid", str(pid)],
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        time.sleep(1.0)
    server0, self0, t0 = proc_cpu(pid), time.process_time(), time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    if spy is not None:
        spy.send_signal(signal.SIGINT)
        spy.wait(60)
    if errors:
        raise SystemExit(f"{len(errors)} failed requests at {clients} clients, e.g. {errors[0]}")
    r = stats(lat, wall)
    r.update(clients=clients, server_cpu_s=proc_cpu(pid) - server0, client_cpu_s=time.process_time() - self0,
             mean_batch=statistics.fmean(batches), wall_s=wall,
             server_ms={k: statistics.median(v) for k, v in parts.items()})
    return r


def start_server(index: Path, args) -> tuple[subprocess.Popen, int]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    cmd = [sys.executable, "-m", "cirkit", "serve", "--index", str(index), "--port", str(port), "--search", "exact",
           "--batch-size", str(args.batch_size), "--batch-wait-ms", str(args.batch_wait_ms), "--json"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    deadline = time.monotonic() + 300
    while True:
        line = proc.stderr.readline()
        if "listening on" in line:
            break
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            raise SystemExit(f"cirkit serve did not start: {line}{proc.stderr.read()}")
    threading.Thread(target=proc.stderr.read, daemon=True).start()  # keep the pipe drained
    return proc, port


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rows", type=int, default=100_000)
    ap.add_argument("--clients", default="1,8,32")
    ap.add_argument("--requests", type=int, default=240, help="requests per concurrency level")
    ap.add_argument("--single", type=int, default=120, help="in-process single queries per path")
    ap.add_argument("--k", type=int, default=10)
    ap.add_argument("--backbone", choices=("clip", "fake"), default="clip")
    ap.add_argument("--ann", action="store_true", help="build an ANN index (the server still searches exactly)")
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--batch-wait-ms", type=float, default=5.0)
    ap.add_argument("--json", type=Path, default=None, help="also write the results here")
    ap.add_argument("--py-spy", default=None, help="path of a py-spy binary: profile the server at each level")
    ap.add_argument("--profile-dir", type=Path, default=Path("."), help="where --py-spy writes its stacks")
    args = ap.parse_args()

    from cirkit.backbones import load_backbone
    from cirkit.backbones.base import BackboneSpec

    work = Path(tempfile.mkdtemp(prefix="cirkit-serve-bench-"))
    proc = None
    try:
        t0 = time.perf_counter()
        spec = BackboneSpec(backbone="clip", model="cirkit-small") if args.backbone == "clip" else \
            BackboneSpec(backbone="fake", model="fake")
        manifest = load_backbone(spec).manifest()
        index = build_index(work, args.rows, manifest, args.ann)
        refs = reference_images(work)
        bodies = [multipart(refs[i % len(refs)].read_bytes(), TEXTS[i], args.k) for i in range(len(TEXTS))]
        print(f"index: {args.rows} x {manifest.dim} ({manifest.backbone} {manifest.checkpoint}), built in "
              f"{time.perf_counter() - t0:.1f}s; cores: {os.cpu_count()}", flush=True)

        proc, port = start_server(index, args)
        warm = load(port, proc.pid, 4, 16, bodies)  # caches, JIT paths, connections
        del warm
        rows = []
        q1, bare1 = in_process(index, refs, args.single, args.k)
        rows.append({"path": "in-process query", "clients": 1, **q1})
        rows.append({"path": "in-process bare", "clients": 1, **bare1})
        print(f"  in-process query  p50 {q1['p50_ms']:.1f} ms", flush=True)
        for c in [int(x) for x in args.clients.split(",") if x.strip()]:
            spy = (args.py_spy, args.profile_dir) if args.py_spy else None
            r = load(port, proc.pid, c, args.requests, bodies, spy)
            rows.append({"path": "served", **r})
            print(f"  served {c:3d} clients  p50 {r['p50_ms']:.1f} ms  {r['qps']:.1f} q/s", flush=True)
        q2, bare2 = in_process(index, refs, args.single, args.k)  # again: the machine's load drifts
        rows.append({"path": "in-process query (again)", "clients": 1, **q2})
        rows.append({"path": "in-process bare (again)", "clients": 1, **bare2})
        proc.send_signal(signal.SIGINT)
        out, _ = proc.communicate(timeout=60)
        summary = json.loads(out.strip().splitlines()[-1])
    finally:
        if proc is not None and proc.poll() is None:
            proc.kill()
        shutil.rmtree(work, ignore_errors=True)

    print()
    print(f"{'path':26s} {'clients':>7s} {'n':>5s} {'p50 ms':>8s} {'p95 ms':>8s} {'q/s':>7s} {'batch':>6s} "
          f"{'server CPU-s':>12s} {'client CPU-s':>12s}")
    for r in rows:
        print(f"{r['path']:26s} {r['clients']:7d} {r['n']:5d} {r['p50_ms']:8.1f} {r['p95_ms']:8.1f} {r['qps']:7.1f} "
              f"{r.get('mean_batch', 1.0):6.1f} {r.get('server_cpu_s', 0.0):12.1f} {r['client_cpu_s']:12.1f}")
    print("\nserver time per request, medians in ms (the rest of the latency: HTTP, multipart, JSON):")
    for r in rows:
        if r["path"] == "served":
            parts = ", ".join(f"{k} {v:.1f}" for k, v in r["server_ms"].items())
            print(f"  {r['clients']:3d} clients: {parts}; client p50 {r['p50_ms']:.1f}")
    served = {r["clients"]: r for r in rows if r["path"] == "served"}
    base = statistics.median([q1["p50_ms"], q2["p50_ms"]])
    print(f"\nserver summary: {summary['counts']}, largest batch {summary['details'].get('largest_batch')}")
    if 1 in served and 8 in served:
        speedup = served[8]["qps"] / served[1]["qps"]
        ratio = served[8]["p50_ms"] / base
        print(f"goal 1: 8 clients give {speedup:.2f}x the q/s of 1 client (goal >= 3x): "
              f"{'met' if speedup >= 3 else 'MISSED'}")
        print(f"goal 2: p50 at 8 clients is {ratio:.2f}x the in-process query p50 {base:.1f} ms (goal <= 1.5x): "
              f"{'met' if ratio <= 1.5 else 'MISSED'}; at 1 client {served[1]['p50_ms'] / base:.2f}x")
    if args.json:
        args.json.write_text(json.dumps({"args": vars(args) | {"json": str(args.json)}, "rows": rows,
                                         "server": summary}, indent=2, default=str) + "\n")


if __name__ == "__main__":
    main()
