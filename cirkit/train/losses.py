"""The contrastive loss of both trainable backbones: InfoNCE with in-batch negatives.

* Symmetric (image->text and text->image, averaged) as in CLIP (Radford et al. 2021, §2.3):
  vit stage 1 and both mllm stages.
* One-directional (query->target) for vit stage 2 and the combiner: InstructCIR eq. 2 and
  eq. 3 contrast each composed query against the batch's target images.
* The temperature is a learned log-scale (CLIP §2.5), clamped so logits are never scaled by
  more than 100, the limit CLIP uses. One clamp and one log key (``temperature``) for every
  caller, so ``metrics.jsonl`` reads the same whatever the backbone.
* ``same`` keys rows that share a positive (identical captions, the same target image):
  such a row is no negative of the other, so it is masked out of the softmax instead of
  being pushed away (a false negative).

* ``gather`` (on by default in training): under several processes the negatives are the
  *global* batch. Each process contrasts its own rows against the rows of every process,
  all-gathered with gradient, and its loss is its share of the global mean; DDP's gradient
  average then equals the gradient of the one-process loss on the global batch (open_clip's
  ``ClipLoss(local_loss=True, gather_with_grad=True)``). The paper's batch of 32 on eight
  GPUs is four per GPU: without gathering each query would see 3 negatives, not 31. The
  ``same`` keys are gathered too, so a duplicate on another process is masked as well.
  Processes may hold different numbers of rows (unreadable images are dropped per batch).
  (The MLLM paper's released code gathers without gradient and keeps only its own slice
  differentiable, SimCSE-style; that drops the gradient of the other processes' losses with
  respect to this process's rows, so it is not the one-process loss on the global batch.)

Embeddings are compared in float32 after L2 normalisation.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F

MAX_LOGIT_SCALE = 100.0


def logit_scale_to_scale(logit_scale: torch.Tensor) -> torch.Tensor:
    """``exp(logit_scale)`` with the one clamp (at ``MAX_LOGIT_SCALE``), as a float32 scalar."""
    return logit_scale.float().clamp(max=math.log(MAX_LOGIT_SCALE)).exp()


def key_ids(*columns: Sequence[Any]) -> torch.Tensor:
    """``(n, k)`` int64 ids of ``k`` key columns (e.g. caption, target path) for ``same``.

    Stable hashes of the keys' text, so ids from different processes agree (gatherable).
    """
    def h(key: Any) -> int:
        return int.from_bytes(hashlib.blake2b(str(key).encode("utf-8"), digest_size=8).digest(), "little") >> 1

    return torch.tensor([[h(k) for k in row] for row in zip(*columns, strict=True)], dtype=torch.int64)


def same_pairs(same: torch.Tensor, other: torch.Tensor | None = None) -> torch.Tensor:
    """``(n, m)`` bool: rows of ``same`` and ``other`` (default ``same``) sharing any key."""
    a = same.reshape(len(same), -1)
    b = a if other is None else other.reshape(len(other), -1)
    return (a[:, None, :] == b[None, :, :]).any(-1)


def _world() -> tuple[int, int]:
    """(processes, this process's rank) of the default process group; (1, 0) when there is none."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size(), dist.get_rank()
    return 1, 0


class _GatherRows(torch.autograd.Function):
    """All-gather rows of every process (sizes may differ), differentiable.

    Backward sums each process's gradient for all rows (every process's loss sees every row)
    and hands each process the slice of its own rows, as open_clip's ``gather_with_grad``.
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, sizes: tuple[int, ...], rank: int) -> torch.Tensor:
        import torch.distributed as dist

        ctx.sizes, ctx.rank = sizes, rank
        pad = x.new_zeros((max(sizes) - x.shape[0], *x.shape[1:]))
        xp = torch.cat([x, pad]).contiguous()
        parts = [torch.empty_like(xp) for _ in sizes]
        dist.all_gather(parts, xp)
        return torch.cat([part[:n] for part, n in zip(parts, sizes, strict=True)])

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        import torch.distributed as dist

        grad = grad.contiguous().clone()
        dist.all_reduce(grad)  # sum over processes
        start = sum(ctx.sizes[: ctx.rank])
        return grad[start : start + ctx.sizes[ctx.rank]], None, None


def gather_rows(x: torch.Tensor, sizes: tuple[int, ...], rank: int) -> torch.Tensor:
    """Rows of every process in rank order; gradients flow back to each process's own rows."""
    return _GatherRows.apply(x, sizes, rank)


def row_counts(n: int, device: torch.device) -> tuple[int, ...]:
    """Rows each process holds this step (all-gathered)."""
    import torch.distributed as dist

    world, _ = _world()
    mine = torch.tensor([n], device=device, dtype=torch.long)
    counts = [torch.zeros_like(mine) for _ in range(world)]
    dist.all_gather(counts, mine)
    return tuple(int(c) for c in counts)


def _candidates(q: torch.Tensor, t: torch.Tensor, keys: torch.Tensor | None, gather: bool):
    """What each row is contrasted with: (all queries, all targets, all keys, this process's row
    offset, the weight of one row's loss): this process's batch, or with ``gather`` the global one.

    The weight is ``processes / global rows``: summed over this process's rows it is the mean
    when every process holds as many rows, and still its share of the global mean when an
    unreadable image made one batch shorter (DDP divides the summed gradients by ``processes``).
    """
    world, rank = _world()
    if not gather or world == 1:
        return q, t, keys, 0, 1.0 / len(q)
    sizes = row_counts(len(q), q.device)
    all_keys = None if keys is None else gather_rows(keys.to(q.device), sizes, rank)
    return gather_rows(q, sizes, rank), gather_rows(t, sizes, rank), all_keys, sum(sizes[:rank]), world / sum(sizes)


def _masked(logits: torch.Tensor, keys: torch.Tensor | None, all_keys: torch.Tensor | None,
            labels: torch.Tensor) -> torch.Tensor:
    if keys is None:
        return logits
    shared = same_pairs(keys.to(logits.device), all_keys.to(logits.device))
    shared[torch.arange(len(labels), device=logits.device), labels] = False  # never mask the positive
    return logits.masked_fill(shared, float("-inf"))


def info_nce(query: torch.Tensor, target: torch.Tensor, logit_scale: torch.Tensor,
             same: torch.Tensor | None = None, symmetric: bool = True,
             gather: bool = False) -> tuple[torch.Tensor, dict[str, float]]:
    """In-batch InfoNCE of ``query[i]`` against ``target[i]``; returns ``(loss, {"acc", "temperature"})``.

    ``logit_scale`` is the log of the inverse temperature (learned or fixed). ``same`` is
    None or ``(n,)``/``(n, k)`` key ids (:func:`key_ids`): rows sharing a key are not each
    other's negatives. ``symmetric`` adds the target->query direction and averages the two.
    ``gather``: under several processes, contrast with the global batch (module docstring);
    the loss is then this process's share of the global mean, scaled by the process count
    so that DDP's average of gradients is the global gradient. ``acc`` is this process's
    query->target top-1 accuracy.
    """
    scale = logit_scale_to_scale(logit_scale)
    q = F.normalize(query.float(), dim=-1)
    t = F.normalize(target.float(), dim=-1)
    keys = None if same is None else same.reshape(len(same), -1)
    all_q, all_t, all_keys, offset, share = _candidates(q, t, keys, gather)
    labels = offset + torch.arange(len(q), device=q.device)
    logits = _masked(scale * q @ all_t.T, keys, all_keys, labels)
    loss = F.cross_entropy(logits, labels, reduction="sum") * share
    if symmetric:
        back = _masked(scale * t @ all_q.T, keys, all_keys, labels)
        loss = (loss + F.cross_entropy(back, labels, reduction="sum") * share) / 2
    acc = (logits.detach().argmax(dim=1) == labels).float().mean()
    return loss, {"acc": float(acc), "temperature": float(1.0 / scale.detach())}
