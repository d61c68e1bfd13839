"""Exact top-k retrieval by chunked matrix products on torch: the one exact ranking in cirkit.

``evaluate`` ranks benchmark galleries with it, and the exact search of an index
(:meth:`cirkit.search.VectorCache.search`, behind ``query``) ranks the index's
memory-mapped vectors with it, so both break ties the same way.

Scores are dot products of L2-normalised vectors (cosine). Equal scores are broken by
gallery position (lower index first), whatever the chunk sizes. Note that BLAS may round
the same dot product differently in the last bit for different batch shapes (a single
query uses a matrix-vector kernel), so two duplicate gallery images are an exact tie only
when their scores come out bit-identical.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence

import numpy as np
import torch


def _as_tensor(x) -> torch.Tensor:
    if isinstance(x, np.ndarray):
        if not x.flags.writeable:  # a read-only memory map: shared, never written through
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", UserWarning)
                x = torch.from_numpy(x)
        else:
            x = torch.from_numpy(x)
    return x.float().contiguous()


def topk(
    queries,
    gallery,
    k: int,
    exclude: Sequence[Sequence[int]] | None = None,
    chunk_size: int = 256,
    gallery_chunk: int = 65536,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-``k`` gallery indices and scores per query, exact.

    ``exclude[i]`` lists gallery indices that query ``i`` must not return (e.g. its own
    reference image). Queries are processed ``chunk_size`` at a time and the gallery in
    slices of ``gallery_chunk`` rows, merging partial top-k lists, so memory stays at
    ``chunk_size x gallery_chunk`` floats whatever the gallery size.
    """
    q = _as_tensor(queries)
    g = _as_tensor(gallery)
    n, m = q.shape[0], g.shape[0]
    k = min(k, m)
    out_idx = torch.empty(n, k, dtype=torch.long)
    out_val = torch.empty(n, k, dtype=torch.float32)
    if k <= 0:
        return out_idx, out_val
    for s in range(0, n, chunk_size):
        qs = q[s : s + chunk_size]
        best_val = best_idx = None
        for gs in range(0, m, gallery_chunk):
            sims = qs @ g[gs : gs + gallery_chunk].T
            if exclude is not None:
                for r in range(qs.shape[0]):
                    ex = [j - gs for j in exclude[s + r] if gs <= j < gs + sims.shape[1]]
                    if ex:
                        sims[r, ex] = float("-inf")
            kk = min(k, sims.shape[1])
            if kk < sims.shape[1]:
                # One extra item tells whether the k-th score is tied with an item left out.
                val, idx = torch.topk(sims, kk + 1, dim=1, sorted=True)
                _fix_boundary_ties(sims, val, idx)
                val, idx = val[:, :kk], idx[:, :kk]
            else:
                val, idx = torch.topk(sims, kk, dim=1, sorted=True)
            idx = idx + gs
            if best_val is None:
                best_val, best_idx = val, idx
            else:
                best_val = torch.cat([best_val, val], 1)
                best_idx = torch.cat([best_idx, idx], 1)
                best_val, order = _stable_topk(best_val, best_idx, k)
                best_idx = torch.gather(best_idx, 1, order)
        # Final deterministic order: score desc, then gallery index asc.
        best_val, order = _stable_topk(best_val, best_idx, k)
        out_val[s : s + chunk_size] = best_val
        out_idx[s : s + chunk_size] = torch.gather(best_idx, 1, order)
    return out_idx, out_val


def _fix_boundary_ties(sims: torch.Tensor, val: torch.Tensor, idx: torch.Tensor) -> None:
    """torch.topk picks any of the items tied at the k-th score; keep the lowest indices instead.

    ``val``/``idx`` hold the top k+1; a row needs fixing only when its k-th and (k+1)-th
    scores are equal (rare with real embeddings), and is then re-ranked by a stable sort.
    """
    k = val.shape[1] - 1
    rows = (val[:, k - 1] == val[:, k]).nonzero().flatten()
    for r in rows.tolist():
        order = torch.argsort(sims[r], descending=True, stable=True)[: k + 1]
        idx[r] = order
        val[r] = sims[r, order]


def _stable_topk(val: torch.Tensor, idx: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    # Sort by index first, then stably by score: equal scores keep ascending index order.
    by_idx = torch.argsort(idx, dim=1)
    v1 = torch.gather(val, 1, by_idx)
    order2 = torch.argsort(v1, dim=1, descending=True, stable=True)
    order = torch.gather(by_idx, 1, order2)[:, :k]
    return torch.gather(val, 1, order), order


def rank_of(scores: torch.Tensor, target: int, pessimistic: bool = True) -> int:
    """1-based rank of ``target`` among ``scores``; ties count against it when ``pessimistic``."""
    t = scores[target]
    better = int((scores > t).sum())
    ties = int((scores == t).sum()) - 1
    return 1 + better + (ties if pessimistic else 0)
