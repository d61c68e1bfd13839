"""CIRCO-scale exact ranking: cirkit.retrieval.topk vs a naive full sort, in the same run.

A gallery of 123,403 random unit vectors (768-d, float32, the size of COCO unlabeled2017
under ViT-L/14) against 800 queries (the CIRCO test set), top 50. The naive baseline
builds the whole 800 x 123,403 similarity matrix and argsorts every row completely. The
script checks both give the same top-50 and prints the times and their ratio, and the
time of the bare matrix product (the floor for any exact method on this machine).

It also times the numpy path the index's exact search used before it ranked with
``retrieval.topk`` (matmul + per-row argpartition, ties to the lower index), on the same
batch and on single queries (what ``cirkit query`` runs), and prints the ratios.

    python benchmarks/rank_circo.py                  # full size
    python benchmarks/rank_circo.py --gallery 20000  # quicker
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch

from cirkit.retrieval import topk


def unit(n: int, d: int, gen: torch.Generator) -> torch.Tensor:
    return torch.nn.functional.normalize(torch.randn(n, d, generator=gen), dim=1)


def naive(q: torch.Tensor, g: torch.Tensor, k: int) -> tuple[torch.Tensor, float]:
    """Full similarity matrix + full stable argsort; also returns the time of the product alone."""
    t0 = time.perf_counter()
    sims = q @ g.T
    product = time.perf_counter() - t0
    return torch.argsort(sims, dim=1, descending=True, stable=True)[:, :k], product


def numpy_topk(q: np.ndarray, g: np.ndarray, k: int) -> np.ndarray:
    """The former ``cirkit.index.topk_indices`` path: numpy scores, argpartition, lexsort per row."""
    out = np.empty((len(q), k), np.int64)
    for s in range(0, len(q), 256):
        scores = q[s : s + 256] @ g.T if len(q) > 1 else (g @ q[0])[None, :]
        for j, row in enumerate(scores):
            n = row.shape[0]
            cand = np.argpartition(row, n - k)[n - k :]
            kth = row[cand].min()
            if (row[cand] == kth).sum() > 1 or np.count_nonzero(row == kth) > (row[cand] == kth).sum():
                cand = np.union1d(cand, np.flatnonzero(row == kth))
            out[s + j] = cand[np.lexsort((cand, -row[cand]))][:k]
    return out


def _single(fn, qs) -> float:
    """Median seconds of one-query calls."""
    times = []
    for q in qs:
        t0 = time.perf_counter()
        fn(q[None, :])
        times.append(time.perf_counter() - t0)
    return float(np.median(times))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--gallery", type=int, default=123_403)
    ap.add_argument("--queries", type=int, default=800)
    ap.add_argument("--dim", type=int, default=768)
    ap.add_argument("--k", type=int, default=50)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--single", type=int, default=50, help="single queries timed for the one-query latency")
    args = ap.parse_args()

    gen = torch.Generator().manual_seed(0)
    g = unit(args.gallery, args.dim, gen)
    q = unit(args.queries, args.dim, gen)
    topk(q[:8], g, args.k)  # warm-up (allocator, BLAS threads)

    fast = []
    for _ in range(args.repeats):
        t0 = time.perf_counter()
        idx, _ = topk(q, g, args.k)
        fast.append(time.perf_counter() - t0)
    t0 = time.perf_counter()
    ref, product = naive(q, g, args.k)
    slow = time.perf_counter() - t0
    same = bool(torch.equal(idx, ref))

    gn, qn = g.numpy(), q.numpy()
    old_t = []
    for _ in range(args.repeats):
        t0 = time.perf_counter()
        old_idx = numpy_topk(qn, gn, args.k)
        old_t.append(time.perf_counter() - t0)
    # numpy's and torch's BLAS may round a dot product differently in the last bit, which can
    # swap two near-tied neighbours: count rows with the same order, and with the same set
    same_rows = int((old_idx == idx.numpy()).all(axis=1).sum())
    same_sets = sum(set(a) == set(b) for a, b in zip(old_idx.tolist(), idx.tolist(), strict=True))
    single_new = _single(lambda x: topk(x, gn, args.k), qn[: args.single])
    single_old = _single(lambda x: numpy_topk(x, gn, args.k), qn[: args.single])

    best = min(fast)
    print(f"gallery {args.gallery} x {args.dim} float32, {args.queries} queries, top-{args.k}, "
          f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    print(f"cirkit.retrieval.topk : {best:.2f} s (best of {args.repeats}; all: {', '.join(f'{t:.2f}' for t in fast)})")
    print(f"naive full sort       : {slow:.2f} s (of which the {args.queries} x {args.gallery} product: {product:.2f} s)")
    print(f"speed-up              : {slow / best:.1f}x   identical top-{args.k}: {same}")
    print(f"old index numpy path  : {min(old_t):.2f} s (best of {args.repeats}); topk / numpy = "
          f"{best / min(old_t):.2f}   same order in {same_rows}/{len(q)} rows, same set in {same_sets}/{len(q)}")
    print(f"one query (median of {args.single}): topk {single_new * 1000:.1f} ms, old numpy path "
          f"{single_old * 1000:.1f} ms; topk / numpy = {single_new / single_old:.2f}")


if __name__ == "__main__":
    main()
