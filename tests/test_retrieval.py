"""Exact chunked top-k: same answer as a full sort, deterministic ties, exclusions."""

import numpy as np
import torch

from cirkit.retrieval import rank_of, topk


def _naive(q, g, k, exclude=None):
    s = q @ g.T
    if exclude:
        for i, ex in enumerate(exclude):
            s[i, ex] = float("-inf")
    return torch.argsort(s, dim=1, descending=True, stable=True)[:, :k]


def test_topk_matches_full_sort_across_chunk_sizes():
    gen = torch.Generator().manual_seed(0)
    g = torch.nn.functional.normalize(torch.randn(1000, 16, generator=gen), dim=1)
    q = torch.nn.functional.normalize(torch.randn(37, 16, generator=gen), dim=1)
    ref = _naive(q, g, 20)
    for chunk, gchunk in ((256, 65536), (5, 100), (1, 7), (64, 333)):
        idx, val = topk(q, g, 20, chunk_size=chunk, gallery_chunk=gchunk)
        assert torch.equal(idx, ref)
        assert torch.allclose(val, torch.gather(q @ g.T, 1, ref))


def test_ties_go_to_the_lower_gallery_index_whatever_the_chunking():
    # Many exact duplicates: ties at every boundary, including the k-th position.
    # Scores must be exactly equal for a tie: BLAS may round the same dot product differently
    # for different batch shapes, so the vectors here make every product exact.
    gen = torch.Generator().manual_seed(1)
    base = torch.tensor([[1.0, 0, 0, 0], [0.5, 0.5, 0.5, 0.5], [0, 1.0, 0, 0], [0.75, 0, 0.25, 0]])
    g = base[torch.randint(0, 4, (300,), generator=gen)]
    q = base[:3]
    ref = _naive(q, g, 50)
    for chunk, gchunk in ((256, 65536), (2, 17), (1, 64), (3, 1)):
        idx, _ = topk(q, g, 50, chunk_size=chunk, gallery_chunk=gchunk)
        assert torch.equal(idx, ref), (chunk, gchunk)


def test_constant_scores_rank_in_gallery_order():
    g = torch.ones(10, 4) / 2
    idx, _ = topk(torch.ones(2, 4) / 2, g, 3, gallery_chunk=4)
    assert idx.tolist() == [[0, 1, 2], [0, 1, 2]]


def test_exclusions_and_k_larger_than_gallery():
    gen = torch.Generator().manual_seed(2)
    g = torch.nn.functional.normalize(torch.randn(50, 8, generator=gen), dim=1)
    q = g[:4].clone()
    exclude = [[0], [1], [2, 7], []]
    idx, val = topk(q, g, 10, exclude=exclude, gallery_chunk=16)
    assert torch.equal(idx, _naive(q, g, 10, exclude))
    assert idx[0, 0] != 0 and idx[3, 0] == 3
    idx, val = topk(q, g, 500, exclude=exclude)
    assert idx.shape == (4, 50)
    assert torch.isinf(val[0, -1])  # the excluded item comes last, marked -inf


def test_rank_of_pessimistic_and_optimistic():
    s = torch.tensor([0.5, 0.9, 0.5, 0.1])
    assert rank_of(s, 0) == 3
    assert rank_of(s, 0, pessimistic=False) == 2
    assert rank_of(torch.zeros(15), 0) == 15


def test_ties_broken_by_position_for_one_query():
    """The rule the index's exact search relies on (it ranks with this same topk)."""
    s = np.array([0.5, 0.9, 0.5, 0.9, 0.1, 0.5], np.float32)
    g = s[:, None]  # one-dim "gallery": each score is the dot product with the query [1]
    q = np.ones((1, 1), np.float32)
    assert topk(q, g, 3)[0][0].tolist() == [1, 3, 0]
    assert topk(q, g, 10)[0][0].tolist() == [1, 3, 0, 2, 5, 4]
