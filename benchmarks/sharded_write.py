"""What writing a store as per-process Lance fragments + one commit costs, at 100k vectors, in one run.

The same 100,000 normalised 512-d vectors (ids and image paths like ``embed`` writes) go into a
new store three ways:

* ``one process``: today's single-process path, :meth:`EmbeddingStore.append` per batch of 64
  (one Lance commit per batch, so a kill keeps every finished batch);
* ``fragments, 1 writer``: :class:`FragmentWriter` (``--fragment-rows`` rows per fragment, each
  journaled) and one ``LanceOperation.Append`` commit (:func:`commit_fragments`), as one process
  of a multi-process ``embed`` does;
* ``fragments, 2 writers``: two writers (as ranks 0 and 1, interleaved batch by batch in this
  process) and one commit of both: the write work of a two-process run without its compute.

Then each store is read back whole (:func:`read_embeddings`, what ``index`` does) and checked
equal. Times are best of ``--repeats``; the overhead is the ratio to the one-process path.

    python benchmarks/sharded_write.py                 # 100k x 512
    python benchmarks/sharded_write.py --rows 1000000 --fragment-rows 65536
"""

from __future__ import annotations

import argparse
import os
import resource
import shutil
import tempfile
import time
from pathlib import Path


def _cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def write(kind: str, out: Path, ids, images, vecs, batch: int, fragment_rows: int) -> None:
    from cirkit.io.embeddings import EmbeddingStore, FragmentWriter, commit_fragments, journal_entries
    from cirkit.records import EmbeddingManifest

    manifest = EmbeddingManifest(backbone="bench", checkpoint="random", dim=vecs.shape[1])
    store = EmbeddingStore.open_for_append(out, manifest)
    if kind == "one process":
        for i in range(0, len(ids), batch):
            store.append(ids[i : i + batch], images[i : i + batch], vecs[i : i + batch])
        return
    writers = [FragmentWriter(store, r, fragment_rows) for r in range(1 if kind.endswith("1 writer") else 2)]
    for n, i in enumerate(range(0, len(ids), batch)):
        writers[n % len(writers)].append(ids[i : i + batch], images[i : i + batch], vecs[i : i + batch])
    for w in writers:
        w.close()
    entries = journal_entries(out)
    commit_fragments(store, [e for _, e in entries])
    from cirkit.io.embeddings import clear_journal

    clear_journal([f for f, _ in entries])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=100_000)
    ap.add_argument("--dim", type=int, default=512)
    ap.add_argument("--batch", type=int, default=64, help="rows per embed batch")
    ap.add_argument("--fragment-rows", type=int, default=8192)
    ap.add_argument("--repeats", type=int, default=2)
    args = ap.parse_args()

    import lance
    import numpy as np

    from cirkit.io.embeddings import read_embeddings

    rng = np.random.default_rng(0)
    vecs = rng.standard_normal((args.rows, args.dim), dtype=np.float32)
    vecs /= np.linalg.norm(vecs, axis=1, keepdims=True)
    ids = [f"img{i:08d}" for i in range(args.rows)]
    images = [f"/data/photos/{i % 1000:03d}/img{i:08d}.jpg" for i in range(args.rows)]
    kinds = ("one process", "fragments, 1 writer", "fragments, 2 writers")
    best: dict[str, tuple[float, float, float, int]] = {}
    tmp = Path(tempfile.mkdtemp(prefix="cirkit-sharded-write-"))
    try:
        for rep in range(args.repeats):
            for kind in kinds:
                out = tmp / f"s{rep}-{kinds.index(kind)}.lance"
                c0, t0 = _cpu(), time.perf_counter()
                write(kind, out, ids, images, vecs, args.batch, args.fragment_rows)
                t_write, c_write = time.perf_counter() - t0, _cpu() - c0
                t0 = time.perf_counter()
                _, got_ids, _, got = read_embeddings(out)
                t_read = time.perf_counter() - t0
                assert sorted(got_ids) == ids
                order = np.argsort(got_ids)
                assert np.array_equal(got[order], vecs), kind
                versions = lance.dataset(str(out)).version
                if kind not in best or t_write < best[kind][0]:
                    best[kind] = (t_write, c_write, t_read, versions)
                shutil.rmtree(out, ignore_errors=True)
        print(f"{args.rows} x {args.dim} float32 vectors, batches of {args.batch}, {args.fragment_rows} rows per "
              f"fragment, {os.cpu_count()} CPU cores, best of {args.repeats}")
        ref = best["one process"][0]
        for kind, (t_write, c_write, t_read, versions) in best.items():
            print(f"{kind:22s} write {t_write:6.2f} s ({args.rows / t_write:9.0f} rows/s, {c_write:5.2f} CPU-s, "
                  f"{versions:5d} table versions)  read back {t_read:5.2f} s  write ratio {t_write / ref:5.2f}x")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
