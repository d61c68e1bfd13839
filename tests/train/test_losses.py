"""The one contrastive loss (cirkit.train.losses.info_nce) against naive references (no model needed)."""

import math

import pytest
import torch

from cirkit.train.losses import MAX_LOGIT_SCALE, info_nce, key_ids, same_pairs


def _naive_info_nce(a, b, scale, same, symmetric=True):
    """Row- and column-wise InfoNCE written as loops; ``same[i, j]`` (j != i) drops j from i's negatives."""
    n = len(a)
    sim = [[scale * float(a[i] @ b[j]) for j in range(n)] for i in range(n)]

    def allowed(i, j):
        return i == j or not bool(same[i, j])

    rows = [-sim[i][i] + math.log(sum(math.exp(sim[i][j]) for j in range(n) if allowed(i, j))) for i in range(n)]
    cols = [-sim[j][j] + math.log(sum(math.exp(sim[i][j]) for i in range(n) if allowed(i, j))) for j in range(n)]
    hits = [max((j for j in range(n) if allowed(i, j)), key=lambda j: sim[i][j]) == i for i in range(n)]
    loss = (sum(rows) / n + sum(cols) / n) / 2 if symmetric else sum(rows) / n
    return loss, sum(hits) / n


def _same(keys):
    return same_pairs(key_ids(keys))


def test_same_marks_rows_sharing_a_key():
    assert _same(["a", "b", "a", "c"]).tolist() == [
        [True, False, True, False],
        [False, True, False, False],
        [True, False, True, False],
        [False, False, False, True],
    ]


def test_same_with_two_key_columns_marks_rows_sharing_either():
    # captions, then target images: rows 0-1 share a caption, rows 1-2 an image; 0 and 2 share nothing
    pairs = same_pairs(key_ids(["x", "x", "y"], ["p.png", "q.png", "q.png"]))
    assert pairs.tolist() == [[True, True, False], [True, True, True], [False, True, True]]


def test_key_ids_are_stable_across_calls_and_processes():
    # hashed from the text, not numbered per batch: ids from two processes can be compared (gathered)
    assert key_ids(["a", "b"]).tolist() == key_ids(["b", "a"]).flip(0).tolist()
    assert key_ids(["a"]).dtype == torch.int64 and int(key_ids(["a"])[0, 0]) >= 0


@pytest.mark.parametrize("keys", [["a", "b", "c", "d", "e"], ["a", "b", "a", "c", "a"], ["x", "x", "y", "y", "z"]])
def test_info_nce_with_duplicates_masked_matches_a_naive_loop(keys):
    g = torch.Generator().manual_seed(len(set(keys)))
    a = torch.nn.functional.normalize(torch.randn(5, 8, generator=g), dim=-1)
    b = torch.nn.functional.normalize(torch.randn(5, 8, generator=g), dim=-1)
    b[2] = a[0]  # a strong false negative for row 0 (masked when keys 0 and 2 match)
    scale = torch.tensor(10.0)
    same = _same(keys)
    loss, logs = info_nce(a, b, scale.log(), key_ids(keys))
    want_loss, want_acc = _naive_info_nce(a, b, 10.0, same)
    assert float(loss) == pytest.approx(want_loss, rel=1e-5)
    assert logs["acc"] == pytest.approx(want_acc)
    assert logs["temperature"] == pytest.approx(0.1)


def test_masking_a_duplicate_lowers_the_loss():
    a = torch.nn.functional.normalize(torch.tensor([[1.0, 0.0], [1.0, 0.1], [0.0, 1.0]]), dim=-1)
    scale = torch.tensor(20.0).log()
    unmasked, _ = info_nce(a, a, scale, key_ids(["p", "q", "r"]))
    masked, logs = info_nce(a, a, scale, key_ids(["p", "p", "r"]))
    assert float(masked) < float(unmasked) and logs["acc"] == 1.0


def test_one_directional_is_the_query_to_target_rows_only():
    """InstructCIR eq. 2: each composed query against the batch's targets, nothing the other way."""
    g = torch.Generator().manual_seed(3)
    q, t = torch.randn(6, 4, generator=g), torch.randn(6, 4, generator=g)
    nq, nt = (torch.nn.functional.normalize(x, dim=-1) for x in (q, t))
    loss, logs = info_nce(q, t, torch.tensor(5.0).log(), symmetric=False)  # unnormalised inputs are normalised
    want, acc = _naive_info_nce(nq, nt, 5.0, torch.zeros(6, 6, dtype=torch.bool), symmetric=False)
    assert float(loss) == pytest.approx(want, rel=1e-5) and logs["acc"] == pytest.approx(acc)
    both, _ = info_nce(q, t, torch.tensor(5.0).log(), symmetric=True)
    assert float(both) == pytest.approx(_naive_info_nce(nq, nt, 5.0, torch.zeros(6, 6, dtype=torch.bool))[0], rel=1e-5)


def test_the_one_clamp_caps_the_scale_at_100_and_passes_no_gradient_beyond_it():
    g = torch.Generator().manual_seed(0)
    a, b = (torch.nn.functional.normalize(torch.randn(4, 3, generator=g), dim=-1) for _ in range(2))
    big = torch.tensor(math.log(1e4), requires_grad=True)
    loss, logs = info_nce(a, b, big)
    assert logs["temperature"] == pytest.approx(1.0 / MAX_LOGIT_SCALE)
    want, _ = _naive_info_nce(a, b, MAX_LOGIT_SCALE, torch.zeros(4, 4, dtype=torch.bool))
    assert float(loss.detach()) == pytest.approx(want, rel=1e-4)
    loss.backward()
    assert big.grad == 0
    small = torch.tensor(math.log(2.0), requires_grad=True)
    info_nce(a, a.flip(0), small)[0].backward()
    assert small.grad != 0


def test_low_precision_inputs_are_compared_in_float32():
    a = torch.randn(4, 8, generator=torch.Generator().manual_seed(1))
    loss32, _ = info_nce(a, a * 2, torch.tensor(3.0))
    loss16, _ = info_nce(a.bfloat16(), (a * 2).bfloat16(), torch.tensor(3.0))
    assert loss16.dtype == torch.float32 and float(loss16) == pytest.approx(float(loss32), rel=2e-2)
