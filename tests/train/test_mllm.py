"""The mllm training loss against a naive reference (no model needed)."""

import math

import pytest
import torch

from cirkit.train.mllm import _info_nce, _same


def _naive_info_nce(a, b, scale, same):
    """Row- and column-wise InfoNCE written as loops; ``same[i, j]`` (j != i) drops j from i's negatives."""
    n = len(a)
    sim = [[scale * float(a[i] @ b[j]) for j in range(n)] for i in range(n)]

    def allowed(i, j):
        return i == j or not bool(same[i, j])

    rows = [-sim[i][i] + math.log(sum(math.exp(sim[i][j]) for j in range(n) if allowed(i, j))) for i in range(n)]
    cols = [-sim[j][j] + math.log(sum(math.exp(sim[i][j]) for i in range(n) if allowed(i, j))) for j in range(n)]
    hits = [max((j for j in range(n) if allowed(i, j)), key=lambda j: sim[i][j]) == i for i in range(n)]
    return (sum(rows) / n + sum(cols) / n) / 2, sum(hits) / n


def test_same_marks_rows_sharing_a_key():
    assert _same(["a", "b", "a", "c"]).tolist() == [
        [True, False, True, False],
        [False, True, False, False],
        [True, False, True, False],
        [False, False, False, True],
    ]


@pytest.mark.parametrize("keys", [["a", "b", "c", "d", "e"], ["a", "b", "a", "c", "a"], ["x", "x", "y", "y", "z"]])
def test_info_nce_with_duplicates_masked_matches_a_naive_loop(keys):
    g = torch.Generator().manual_seed(len(set(keys)))
    a = torch.nn.functional.normalize(torch.randn(5, 8, generator=g), dim=-1)
    b = torch.nn.functional.normalize(torch.randn(5, 8, generator=g), dim=-1)
    b[2] = a[0]  # a strong false negative for row 0 (masked when keys 0 and 2 match)
    scale = torch.tensor(10.0)
    same = _same(keys)
    loss, acc = _info_nce(a, b, scale, same)
    want_loss, want_acc = _naive_info_nce(a, b, 10.0, same)
    assert float(loss) == pytest.approx(want_loss, rel=1e-5)
    assert acc == pytest.approx(want_acc)


def test_masking_a_duplicate_lowers_the_loss():
    a = torch.nn.functional.normalize(torch.tensor([[1.0, 0.0], [1.0, 0.1], [0.0, 1.0]]), dim=-1)
    scale = torch.tensor(20.0)
    unmasked, _ = _info_nce(a, a, scale, _same(["p", "q", "r"]))
    masked, acc = _info_nce(a, a, scale, _same(["p", "p", "r"]))
    assert float(masked) < float(unmasked) and acc == 1.0
