"""Batched embedding of image lists and composed queries through any backbone.

Images are decoded (safely, see :func:`cirkit.io.open_image`) and transformed in
DataLoader worker processes; unreadable images come back as failures instead of
stopping the run (unless ``strict``). Shared by ``embed``, ``evaluate`` and ``query``.

An image is a file path or a dataset row's image (:mod:`cirkit.io.datasets`); the items are a
list (read by index) or an :class:`~cirkit.io.datasets.ImageStream` (read as it comes, split
between DataLoader workers). With a :class:`~cirkit.device.ProcessInfo` of several processes,
:func:`encode_images` and :func:`encode_queries` embed this process's share
(:func:`cirkit.device.my_share`) and gather every share, so each process ends with the same
vectors, in input order, as one process would.
"""

from __future__ import annotations

import contextlib
import logging
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
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


class _StreamDataset(torch.utils.data.IterableDataset):
    """A streamed dataset's images; in DataLoader workers ``datasets`` gives each worker its own shards."""

    def __init__(self, stream: Any, transform: Callable[[Any], Any], min_side: int | None = None):
        self.stream, self.transform, self.min_side = stream, transform, min_side

    def __iter__(self):
        for key, image in self.stream.iterate():
            try:
                yield key, self.transform(open_image(image, min_side=self.min_side)), None
            except ImageError as e:
                yield key, None, e.reason


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
    items: Sequence[tuple[str, Any]] | Any,
    transform: Callable[[Any], Any],
    collate: Callable[[list[Any]], Any],
    batch_size: int = 64,
    num_workers: int = 0,
    min_side: int | None = None,
) -> Iterator[tuple[list[str], Any, list[tuple[str, str]]]]:
    """Yield ``(ids, batch, failures)`` with images decoded in ``num_workers`` processes.

    ``items``: a list of ``(id, image)`` or an :class:`~cirkit.io.datasets.ImageStream`.
    ``min_side``: the shorter side the transform needs (see :func:`cirkit.io.open_image`).
    """
    streamed = hasattr(items, "iterate")
    data = _StreamDataset(items, transform, min_side) if streamed else _ImageDataset(items, transform, min_side)
    if not streamed:  # more workers than batches only costs process start-ups (each worker decodes whole batches)
        num_workers = min(num_workers, -(-len(items) // max(1, batch_size)))
    loader = torch.utils.data.DataLoader(
        data,
        batch_size=batch_size,
        num_workers=num_workers,
        collate_fn=_Collate(collate),
        persistent_workers=False,
        prefetch_factor=4 if num_workers > 0 else None,
        pin_memory=torch.cuda.is_available(),
    )
    # DataLoader workers fork while `embed` holds a Lance store open. They only decode images and
    # never touch LanceDB, and they are forked between appends (nothing mid-operation), so
    # lancedb's generic "fork support is experimental" warning and pylance's "lance is not
    # fork-safe" (raised in each forked child) do not apply. The filter is set only around the fork (workers start in ``iter``) and
    # the children inherit it; the process's own warning filters are left as they were.
    with _quiet_fork():
        batches = iter(loader)
    yield from batches


@contextlib.contextmanager
def _quiet_fork():
    """Warning filters for forking DataLoader workers while a Lance store is open (see iter_image_batches)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="lancedb fork support is experimental", category=RuntimeWarning)
        warnings.filterwarnings("ignore", message="lance is not fork-safe", category=UserWarning)
        yield


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


def decoded_batches(backbone, items, batch_size, num_workers, strict, failed: list, progress, task, rate,
                    gpu_decode: str | None = "off"):
    """``(ids, batch)`` of decodable images, advancing ``progress``; failures go to ``failed`` (or raise if strict).

    ``gpu_decode`` (auto, on, off): JPEGs decoded in batches on the backbone's device
    (:mod:`cirkit.io.gpu_decode`).
    """
    from cirkit.io.gpu_decode import wanted

    workers = default_workers() if num_workers is None else num_workers
    plan = wanted(gpu_decode, backbone)
    batches = (_device_batches(backbone, items, plan, batch_size, workers) if plan is not None else
               iter_image_batches(items, backbone.image_transform(), backbone.collate, batch_size, workers,
                                  backbone.decode_size))
    for ids, batch, bad in batches:
        if bad and strict:
            key, reason = bad[0]
            raise ImageError(str(dict(items)[key]) if isinstance(items, (list, tuple)) else key, reason)
        failed.extend(bad)
        if ids:
            yield ids, batch
        progress.update(task, advance=len(ids) + len(bad), rate=rate.add(len(ids) + len(bad)))


def _device_batches(backbone, items, plan, batch_size: int, workers: int):
    """``(ids, batch, failures)`` with JPEGs decoded on the backbone's device (see :mod:`cirkit.io.gpu_decode`)."""
    from cirkit.io import gpu_decode

    raw = (gpu_decode.RawStream(items, backbone.image_transform()) if hasattr(items, "iterate") else
           gpu_decode.RawImages(items, backbone.image_transform()))
    loader = torch.utils.data.DataLoader(
        raw, batch_size=batch_size, num_workers=workers,
        collate_fn=gpu_decode.collate, prefetch_factor=4 if workers > 0 else None,
        pin_memory=torch.cuda.is_available())
    device = getattr(backbone, "device", torch.device("cpu"))
    with _quiet_fork():  # see iter_image_batches
        batches = iter(loader)
    for ids, payloads, bad in batches:
        batch, kept, failed = gpu_decode.decode_batch(payloads, plan, device, ids) if ids else (None, [], [])
        yield kept, batch, bad + failed


def gathered(local: Encoded, keys: Sequence[str], proc: Any, dim: int) -> Encoded:
    """Every process's :class:`Encoded` share joined into one, in the order of ``keys`` (on every process)."""
    if proc is None or proc.world <= 1:
        return local
    vecs = local.vectors.numpy() if local.vectors is not None else None
    shares = proc.gather((local.ids, vecs, local.failed))
    row: dict[str, tuple[int, int]] = {}
    for s, (ids, _, _) in enumerate(shares):
        for i, k in enumerate(ids):
            row[k] = (s, i)
    order = {k: i for i, k in enumerate(keys)}
    out = Encoded(failed=sorted((f for _, _, failed in shares for f in failed), key=lambda f: order.get(f[0], -1)))
    out.ids = [k for k in keys if k in row]
    out.vectors = (torch.from_numpy(np.stack([shares[row[k][0]][1][row[k][1]] for k in out.ids]))
                   if out.ids else torch.empty(0, dim))
    return out


def encode_images(
    backbone,
    items: Sequence[tuple[str, Any]],
    batch_size: int = 64,
    num_workers: int | None = None,
    strict: bool = False,
    description: str = "embedding images",
    queries: bool = False,
    proc: Any = None,
    gpu_decode: str | None = "off",
) -> Encoded:
    """Embed ``(id, image)`` items; ``queries=True`` uses the image-query side of the backbone.

    ``proc`` (several processes): each embeds its share and every process gets all vectors.
    """
    if proc is not None and proc.world > 1:
        from cirkit.device import my_share

        local = encode_images(backbone, my_share(list(items), proc), batch_size, num_workers, strict,
                              f"{description} [{proc.rank}/{proc.world}]", queries, gpu_decode=gpu_decode)
        return gathered(local, [k for k, _ in items], proc, backbone.dim)
    from cirkit.summary import Rate, make_progress

    out = Encoded()
    chunks: list[torch.Tensor] = []
    rate = Rate("img")
    embed = backbone.embed_image_queries if queries else backbone.embed_images
    with make_progress() as progress, torch.inference_mode():
        task = progress.add_task(description, total=len(items), rate="")
        for ids, batch in decoded_batches(backbone, items, batch_size, num_workers, strict, out.failed, progress, task,
                                          rate, gpu_decode):
            chunks.append(embed(batch).float().cpu())
            out.ids.extend(ids)
    out.vectors = torch.cat(chunks) if chunks else torch.empty(0, backbone.dim)
    return out


def encode_queries(
    backbone,
    queries: Sequence[tuple[str, Any | None, str | None]],
    batch_size: int = 64,
    num_workers: int | None = None,
    strict: bool = False,
    description: str = "embedding queries",
    proc: Any = None,
    gpu_decode: str | None = "off",
) -> Encoded:
    """Embed ``(id, reference image | None, text | None)`` queries with the backbone's query mode.

    ``proc`` (several processes): each embeds its share and every process gets all vectors.
    """
    if proc is not None and proc.world > 1:
        from cirkit.device import my_share

        local = encode_queries(backbone, my_share(list(queries), proc), batch_size, num_workers, strict,
                               f"{description} [{proc.rank}/{proc.world}]", gpu_decode=gpu_decode)
        return gathered(local, [k for k, _, _ in queries], proc, backbone.dim)
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
                                          task, rate, gpu_decode):
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
