"""Search latency of a cirkit index: ANN and exact paths vs numpy exact top-k and LanceDB flat.

Generates random unit vectors (N x dim), indexes them with ``cirkit.index.run`` exactly as
``cirkit index`` does (embeddings store -> index, ANN forced on), then times single-query
searches, all in one run on the same machine:

* ``numpy``        in-RAM float32 matrix: ``G @ q``, argpartition, sort (the baseline)
* ``cirkit-exact`` ``Index.search(strategy="exact")``: memory-mapped cache, same maths, + ids
* ``cirkit-ann``   ``Index.search(strategy="ann")``: LanceDB IVF_PQ, cosine, default nprobes/refine
* ``lancedb-flat`` ``table.search(q).bypass_vector_index()``: LanceDB's own exhaustive scan

and recall@k of the ANN path against the numpy top-k.

Data: ``--clusters C`` (default 1000) draws the gallery and the queries from the same
mixture of C random unit directions with Gaussian spread ``--spread`` (every vector is
still a random unit vector; like real image embeddings, neighbours are much closer than
random pairs). ``--clusters 0`` gives i.i.d. uniform unit vectors, where nearest
neighbours are barely closer than anything else and no IVF index can reach high recall
without scanning most partitions; both are reported honestly when asked for.

    python benchmarks/search_latency.py                       # 100k and 1M x 512
    python benchmarks/search_latency.py --sizes 100000 --queries 100
    python benchmarks/search_latency.py --sizes 100000 --sweep  # nprobes/refine grid for tuning
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np


def centres_for(clusters: int, dim: int) -> np.ndarray | None:
    if not clusters:
        return None
    c = np.random.default_rng(0).standard_normal((clusters, dim)).astype(np.float32)
    return c / np.linalg.norm(c, axis=1, keepdims=True)


def make_data(n: int, dim: int, centres: np.ndarray | None, spread: float, seed: int) -> np.ndarray:
    """``n`` unit vectors: uniform when ``centres`` is None, else a mixture around them."""
    rng = np.random.default_rng(seed)
    out = np.empty((n, dim), np.float32)
    step = 100_000
    for s in range(0, n, step):
        m = min(step, n - s)
        x = rng.standard_normal((m, dim)).astype(np.float32)
        if centres is not None:
            x = centres[rng.integers(0, len(centres), m)] + spread * x / np.sqrt(dim)
        out[s : s + m] = x / np.linalg.norm(x, axis=1, keepdims=True)
    return out


def numpy_topk(g: np.ndarray, q: np.ndarray, k: int) -> np.ndarray:
    s = g @ q
    idx = np.argpartition(s, len(s) - k)[-k:]
    return idx[np.argsort(-s[idx])]


def pct(xs: list[float]) -> tuple[float, float]:
    a = np.asarray(xs) * 1000
    return float(np.percentile(a, 50)), float(np.percentile(a, 95))


def timeit(fn, qs) -> tuple[list[float], list]:
    fn(qs[0])  # warm caches (page cache, index load)
    times, outs = [], []
    for q in qs:
        t0 = time.perf_counter()
        outs.append(fn(q))
        times.append(time.perf_counter() - t0)
    return times, outs


def timeit_pair(fa, fb, qs):
    """Time two functions on the same queries, alternating which goes first."""
    fa(qs[0]), fb(qs[0])
    ta, tb, oa, ob = [], [], [], []
    for i, q in enumerate(qs):
        for f, ts, outs in ((fa, ta, oa), (fb, tb, ob))[:: 1 if i % 2 == 0 else -1]:
            t0 = time.perf_counter()
            outs.append(f(q))
            ts.append(time.perf_counter() - t0)
    return (ta, oa), (tb, ob)


def bench(n: int, args, work: Path) -> dict:
    from cirkit.index import IndexConfig, run
    from cirkit.io.embeddings import EmbeddingStore
    from cirkit.records import EmbeddingManifest
    from cirkit.search import DEFAULT_REFINE, ann_params, open_index

    dim, k = args.dim, args.k
    t0 = time.perf_counter()
    centres = centres_for(args.clusters, dim)
    g = make_data(n, dim, centres, args.spread, seed=1)
    qs = make_data(args.queries, dim, centres, args.spread, seed=2)  # fresh points, same distribution
    gen_s = time.perf_counter() - t0

    t0 = time.perf_counter()
    store_path = work / f"emb{n}.lance"
    ids = [f"r{i:07d}" for i in range(n)]
    reuse = args.reuse and (work / f"idx{n}" / "images.lance").exists()
    if not reuse:
        shutil.rmtree(store_path, ignore_errors=True)
        shutil.rmtree(work / f"idx{n}", ignore_errors=True)
        m = EmbeddingManifest(backbone="random", checkpoint="bench", dim=dim)
        store = EmbeddingStore.open_for_append(store_path, m)
        step = 200_000
        for s in range(0, n, step):
            store.append(ids[s : s + step], [f"/img/{i}.jpg" for i in ids[s : s + step]], g[s : s + step])
    store_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    res = run(IndexConfig(embeddings=store_path, output=str(work / f"idx{n}"), ann=True, index_type=args.index_type))
    index_s = time.perf_counter() - t0
    ann_build = (res.details.get("ann") or {}).get("build_seconds")
    if reuse:
        ann_build = "reused "
    ix = open_index(work / f"idx{n}")
    cache = ix.cache()
    params = ann_params(n, dim)
    out: dict = {
        "n": n, "dim": dim, "k": k, "clusters": args.clusters, "spread": args.spread, "queries": args.queries,
        "generate_s": round(gen_s, 1), "store_s": round(store_s, 1), "index_s": round(index_s, 1),
        "ann_build_s": ann_build, "ann": params, "index_type": args.index_type,
        "nprobes": args.nprobes or ix.nprobes(),
        "refine_factor": args.refine_factor if args.refine_factor is not None else DEFAULT_REFINE,
    }

    # numpy and cirkit-exact alternate query by query, so machine load hits both alike
    (truth_t, truth), (ex_t, ex) = timeit_pair(lambda q: numpy_topk(g, q, k), lambda q: ix.search(q, k=k, strategy="exact")[0], qs)
    out["numpy_p50_ms"], out["numpy_p95_ms"] = pct(truth_t)
    truth_ids = [{ids[j] for j in t} for t in truth]

    out["exact_p50_ms"], out["exact_p95_ms"] = pct(ex_t)
    out["exact_recall"] = float(np.mean([len({h.id for h in e} & t) / k for e, t in zip(ex, truth_ids, strict=True)]))
    out["exact_vs_numpy_p50"] = round(out["exact_p50_ms"] / out["numpy_p50_ms"], 3)

    def ann(q, nprobes=args.nprobes, refine=args.refine_factor):
        return ix.search(q, k=k, strategy="ann", nprobes=nprobes, refine_factor=refine)[0]

    an_t, an = timeit(ann, qs)
    out["ann_p50_ms"], out["ann_p95_ms"] = pct(an_t)
    out["ann_recall"] = float(np.mean([len({h.id for h in a} & t) / k for a, t in zip(an, truth_ids, strict=True)]))

    flat_q = qs[: args.flat_queries]
    tbl = ix.table
    fl_t, _ = timeit(
        lambda q: tbl.search(q).distance_type("cosine").bypass_vector_index().limit(k).select(["id", "_distance"]).to_arrow(),
        flat_q,
    )
    out["flat_p50_ms"], out["flat_p95_ms"] = pct(fl_t)
    out["flat_vs_numpy_p50"] = round(out["flat_p50_ms"] / out["numpy_p50_ms"], 1)

    if args.sweep:
        sweep = []
        for nprobes in (8, 16, 32, 64, 128):
            for refine in (1, 5, 10, 20):
                t, a = timeit(lambda q, p=nprobes, r=refine: ann(q, p, r), qs[: min(len(qs), 100)])
                rec = float(np.mean([len({h.id for h in x} & tt) / k for x, tt in zip(a, truth_ids[: len(a)], strict=True)]))
                p50, p95 = pct(t)
                sweep.append({"nprobes": nprobes, "refine": refine, "p50_ms": round(p50, 2), "p95_ms": round(p95, 2), "recall": round(rec, 4)})
                print(f"  sweep n={n} nprobes={nprobes:4d} refine={refine:3d}  p50 {p50:7.2f} ms  p95 {p95:7.2f} ms  recall@{k} {rec:.4f}", flush=True)
        out["sweep"] = sweep
    del cache
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sizes", default="100000,1000000", help="comma-separated gallery sizes")
    ap.add_argument("--dim", type=int, default=512)
    ap.add_argument("--k", type=int, default=10)
    ap.add_argument("--queries", type=int, default=200, help="single-vector queries timed per path")
    ap.add_argument("--flat-queries", type=int, default=10, help="queries for the (slow) LanceDB flat scan")
    ap.add_argument("--clusters", type=int, default=1000, help="mixture components (0 = uniform random)")
    ap.add_argument("--spread", type=float, default=1.0, help="within-cluster Gaussian spread")
    ap.add_argument("--index-type", default="IVF_PQ", help="IVF_PQ or IVF_HNSW_SQ")
    ap.add_argument("--nprobes", type=int, default=None)
    ap.add_argument("--refine-factor", type=int, default=None)
    ap.add_argument("--sweep", action="store_true", help="also time a grid of nprobes x refine_factor")
    ap.add_argument("--workdir", type=Path, default=None, help="where to build the indexes (default: a temp dir)")
    ap.add_argument("--reuse", action="store_true", help="with --workdir: keep an index built by an earlier run")
    ap.add_argument("--json", type=Path, default=None, help="also write the rows as JSON here")
    args = ap.parse_args()

    work = args.workdir or Path(tempfile.mkdtemp(prefix="cirkit-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    rows = []
    try:
        for n in [int(s) for s in args.sizes.split(",") if s.strip()]:
            print(f"== {n} x {args.dim} (clusters={args.clusters}) ==", flush=True)
            r = bench(n, args, work)
            rows.append(r)
            print(
                f"  build: store {r['store_s']}s, index {r['index_s']}s ({r['index_type']} {r['ann_build_s']}s, "
                f"{r['ann']['num_partitions']} partitions, {r['ann']['num_sub_vectors']} sub-vectors); "
                f"query nprobes={r['nprobes']} refine={r['refine_factor']}",
                flush=True,
            )
            print(f"  {'path':14s} {'p50 ms':>9s} {'p95 ms':>9s}  notes")
            print(f"  {'numpy':14s} {r['numpy_p50_ms']:9.2f} {r['numpy_p95_ms']:9.2f}  baseline")
            print(f"  {'cirkit-exact':14s} {r['exact_p50_ms']:9.2f} {r['exact_p95_ms']:9.2f}  {r['exact_vs_numpy_p50']}x numpy, recall {r['exact_recall']:.3f}")
            print(f"  {'cirkit-ann':14s} {r['ann_p50_ms']:9.2f} {r['ann_p95_ms']:9.2f}  recall@{args.k} {r['ann_recall']:.4f}")
            print(f"  {'lancedb-flat':14s} {r['flat_p50_ms']:9.2f} {r['flat_p95_ms']:9.2f}  {r['flat_vs_numpy_p50']}x numpy ({args.flat_queries} queries)", flush=True)
    finally:
        if args.workdir is None:
            shutil.rmtree(work, ignore_errors=True)
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2) + "\n")


if __name__ == "__main__":
    main()
