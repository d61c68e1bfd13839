"""Batched embedding of image lists and composed queries through any backbone.

Images are decoded (safely, see :func:`cirkit.io.open_image`) and transformed in
DataLoader worker processes; unreadable images come back as failures instead of
stopping the run (unless ``strict``). Shared by ``embed``, ``evaluate`` and ``query``.
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from cirkit.errors import ImageError
from cirkit.io.images import open_image

log = logging.getLogger("cirkit")

class _ImageDataset(torch.utils.data.Dataset):
    def __init__(self, items: Sequence[tuple[str, Path]], transform: Callable[[Any], Any], min_side: int | None = None):
        self.items, self.transform, self.min_side = list(items), transform, min_side

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int):
        key, path = self.items[i]
        try:
            return key, self.transform(open_image(path, min_side=self.min_side)), None
        except ImageError as e:
            return key, None, e.reason


class _Collate:
    """Split good items from failures, then let the backbone collate the good ones."""

    def __init__(self, collate: Callable[[list[Any]], Any]):
        self.collate = collate

    def __call__(self, items):
        good = [(k, x) for k, x, e in items if e is None]
        bad = [(k, e) for k, x, e in items if e is not None]
        batch = self.collate([x for _, x in good]) if good else None
        return [k for k, _ in good], batch, bad


def iter_image_batches(
    items: Sequence[tuple[str, Path]],
    transform: Callable[[Any], Any],
    collate: Callable[[list[Any]], Any],
    batch_size: int = 64,
    num_workers: int = 0,
    min_side: int | None = None,
) -> Iterator[tuple[list[str], Any, list[tuple[str, str]]]]:
    """Yield ``(ids, batch, failures)`` with images decoded in ``num_workers`` processes.

    ``min_side``: the shorter side the transform needs (see :func:`cirkit.io.open_image`).
    """
    # More workers than batches only costs process start-ups (each worker decodes whole batches).
    num_workers = min(num_workers, -(-len(items) // max(1, batch_size)))
    loader = torch.utils.data.DataLoader(
        _ImageDataset(items, transform, min_side),
        batch_size=batch_size,
        num_workers=num_workers,
        collate_fn=_Collate(collate),
        persistent_workers=False,
        prefetch_factor=4 if num_workers > 0 else None,
        pin_memory=torch.cuda.is_available(),
    )
    # DataLoader workers fork while `embed` holds a Lance store open. They only decode images and
    # never touch LanceDB, and they are forked between appends (nothing mid-operation), so
    # lancedb's generic "fork support is experimental" warning (raised in each forked child)
    # does not apply. The filter is set only around the fork (workers start in ``iter``) and
    # the children inherit it; the process's own warning filters are left as they were.
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="lancedb fork support is experimental", category=RuntimeWarning)
        batches = iter(loader)
    yield from batches


@dataclass
class Encoded:
    """Vectors for the items that decoded, in input order, and the ones that failed."""

    ids: list[str] = field(default_factory=list)
    vectors: torch.Tensor | None = None
    failed: list[tuple[str, str]] = field(default_factory=list)

    def row_of(self) -> dict[str, int]:
        """Row of each id in ``vectors``."""
        return {k: i for i, k in enumerate(self.ids)}


def default_workers() -> int:
    import os

    return min(4, max(0, (os.cpu_count() or 1) - 1))


def decoded_batches(backbone, items, batch_size, num_workers, strict, failed: list, progress, task, rate):
    """``(ids, batch)`` of decodable images, advancing ``progress``; failures go to ``failed`` (or raise if strict)."""
    workers = default_workers() if num_workers is None else num_workers
    for ids, batch, bad in iter_image_batches(items, backbone.image_transform(), backbone.collate, batch_size, workers,
                                              backbone.decode_size):
        if bad and strict:
            key, reason = bad[0]
            raise ImageError(dict(items)[key], reason)
        failed.extend(bad)
        if ids:
            yield ids, batch
        progress.update(task, advance=len(ids) + len(bad), rate=rate.add(len(ids) + len(bad)))


def encode_images(
    backbone,
    items: Sequence[tuple[str, Path]],
    batch_size: int = 64,
    num_workers: int | None = None,
    strict: bool = False,
    description: str = "embedding images",
    queries: bool = False,
) -> Encoded:
    """Embed ``(id, path)`` items; ``queries=True`` uses the image-query side of the backbone."""
    from cirkit.summary import Rate, make_progress

    out = Encoded()
    chunks: list[torch.Tensor] = []
    rate = Rate("img")
    embed = backbone.embed_image_queries if queries else backbone.embed_images
    with make_progress() as progress, torch.inference_mode():
        task = progress.add_task(description, total=len(items), rate="")
        for ids, batch in decoded_batches(backbone, items, batch_size, num_workers, strict, out.failed, progress, task, rate):
            chunks.append(embed(batch).float().cpu())
            out.ids.extend(ids)
    out.vectors = torch.cat(chunks) if chunks else torch.empty(0, backbone.dim)
    return out


def encode_queries(
    backbone,
    queries: Sequence[tuple[str, Path | None, str | None]],
    batch_size: int = 64,
    num_workers: int | None = None,
    strict: bool = False,
    description: str = "embedding queries",
) -> Encoded:
    """Embed ``(id, reference_path | None, text | None)`` queries with the backbone's query mode."""
    from cirkit.summary import Rate, make_progress

    out = Encoded()
    text_of = {k: t for k, _, t in queries}
    with_image = [(k, p) for k, p, _ in queries if p is not None]
    text_only = [k for k, p, _ in queries if p is None]
    vecs: dict[str, torch.Tensor] = {}
    rate = Rate("q")
    with make_progress() as progress, torch.inference_mode():
        task = progress.add_task(description, total=len(queries), rate="")
        for ids, batch in decoded_batches(backbone, with_image, batch_size, num_workers, strict, out.failed, progress,
                                          task, rate):
            v = backbone.embed_queries(batch, [text_of[k] or "" for k in ids]).float().cpu()
            vecs.update(zip(ids, v, strict=True))
        for i in range(0, len(text_only), batch_size):
            ids = text_only[i : i + batch_size]
            v = backbone.embed_queries(None, [text_of[k] or "" for k in ids]).float().cpu()
            vecs.update(zip(ids, v, strict=True))
            progress.update(task, advance=len(ids), rate=rate.add(len(ids)))
    out.ids = [k for k, _, _ in queries if k in vecs]
    out.vectors = torch.stack([vecs[k] for k in out.ids]) if out.ids else torch.empty(0, backbone.dim)
    return out
