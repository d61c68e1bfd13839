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

Embeddings are compared in float32 after L2 normalisation. Everything works on what
:func:`_candidates` returns; today that is this process's batch. Gathering across processes
(open_clip's ``gather_with_grad``) is a change to that one function (all-gather the
embeddings and keys, return this process's row offset); callers do not change.
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


def _candidates(q: torch.Tensor, t: torch.Tensor, keys: torch.Tensor | None):
    """What each row is contrasted with: (all queries, all targets, all keys, this process's row offset)."""
    return q, t, keys, 0


def _masked(logits: torch.Tensor, keys: torch.Tensor | None, all_keys: torch.Tensor | None,
            labels: torch.Tensor) -> torch.Tensor:
    if keys is None:
        return logits
    shared = same_pairs(keys.to(logits.device), all_keys.to(logits.device))
    shared[torch.arange(len(labels), device=logits.device), labels] = False  # never mask the positive
    return logits.masked_fill(shared, float("-inf"))


def info_nce(query: torch.Tensor, target: torch.Tensor, logit_scale: torch.Tensor,
             same: torch.Tensor | None = None, symmetric: bool = True) -> tuple[torch.Tensor, dict[str, float]]:
    """In-batch InfoNCE of ``query[i]`` against ``target[i]``; returns ``(loss, {"acc", "temperature"})``.

    ``logit_scale`` is the log of the inverse temperature (learned or fixed). ``same`` is
    None or ``(n,)``/``(n, k)`` key ids (:func:`key_ids`): rows sharing a key are not each
    other's negatives. ``symmetric`` adds the target->query direction and averages the two.
    ``acc`` is the query->target top-1 accuracy.
    """
    scale = logit_scale_to_scale(logit_scale)
    q = F.normalize(query.float(), dim=-1)
    t = F.normalize(target.float(), dim=-1)
    keys = None if same is None else same.reshape(len(same), -1)
    all_q, all_t, all_keys, offset = _candidates(q, t, keys)
    labels = offset + torch.arange(len(q), device=q.device)
    logits = _masked(scale * q @ all_t.T, keys, all_keys, labels)
    loss = F.cross_entropy(logits, labels)
    if symmetric:
        loss = (loss + F.cross_entropy(_masked(scale * t @ all_q.T, keys, all_keys, labels), labels)) / 2
    acc = (logits.detach().argmax(dim=1) == labels).float().mean()
    return loss, {"acc": float(acc), "temperature": float(1.0 / scale.detach())}
