"""CIRCO-scale exact ranking: cirkit.retrieval.topk vs a naive full sort, in the same run.

A gallery of 123,403 random unit vectors (768-d, float32, the size of COCO unlabeled2017
under ViT-L/14) against 800 queries (the CIRCO test set), top 50. The naive baseline
builds the whole 800 x 123,403 similarity matrix and argsorts every row completely. The
script checks both give the same top-50 and prints the times and their ratio, and the
time of the bare matrix product (the floor for any exact method on this machine).

    python benchmarks/rank_circo.py                  # full size
    python benchmarks/rank_circo.py --gallery 20000  # quicker
"""

from __future__ import annotations

import argparse
import time

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


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--gallery", type=int, default=123_403)
    ap.add_argument("--queries", type=int, default=800)
    ap.add_argument("--dim", type=int, default=768)
    ap.add_argument("--k", type=int, default=50)
    ap.add_argument("--repeats", type=int, default=3)
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

    best = min(fast)
    print(f"gallery {args.gallery} x {args.dim} float32, {args.queries} queries, top-{args.k}, "
          f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    print(f"cirkit.retrieval.topk : {best:.2f} s (best of {args.repeats}; all: {', '.join(f'{t:.2f}' for t in fast)})")
    print(f"naive full sort       : {slow:.2f} s (of which the {args.queries} x {args.gallery} product: {product:.2f} s)")
    print(f"speed-up              : {slow / best:.1f}x   identical top-{args.k}: {same}")


if __name__ == "__main__":
    main()
