"""``cirkit embed`` with 2 processes x 1 thread vs 1 process x 2 threads, on the same images, in one run.

Both are the real command line: ``python -m cirkit embed`` with ``OMP_NUM_THREADS=2``, and the same
command under ``python -m torch.distributed.run --nproc_per_node 2`` (what ``accelerate launch``
runs) with ``OMP_NUM_THREADS=1``; images are decoded in the embedding process (``--num-workers
0``) so each side uses exactly the threads it is given. Wall time is end to end (interpreter
start, model load, embedding, the Lance writes and, for two processes, the one commit);
CPU-seconds are the children's user+system time. The two runs alternate ``--repeats`` times
and the best wall time of each is kept. The stores must hold the same vectors.

``--baseline-tree PATH`` also times the one-process command with another cirkit checkout on
``PYTHONPATH`` (e.g. ``/work/main``: the code before multi-process embed), to show that one
process is as fast as it was.

    python benchmarks/embed_parallel.py                         # cirkit-small (random weights), 1536 JPEGs
    python benchmarks/embed_parallel.py --images 4096 --model ViT-B-32 --baseline-tree ../main
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent


def _port() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return str(s.getsockname()[1])


def _cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime


def timed(cmd: list[str], threads: int, tree: Path) -> tuple[float, float, dict]:
    """(wall s, CPU s, JSON summary) of one command."""
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads),
           "PYTHONPATH": str(tree), "HF_HUB_OFFLINE": "1"}
    c0, t0 = _cpu(), time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    wall, cpu = time.perf_counter() - t0, _cpu() - c0
    if proc.returncode != 0:
        raise SystemExit(f"failed: {' '.join(cmd)}\n{proc.stderr[-3000:]}")
    summary = json.loads([x for x in proc.stdout.splitlines() if x.startswith("{")][-1])
    return wall, cpu, summary


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="cirkit-small", help="open_clip name (random weights: nothing downloads)")
    ap.add_argument("--images", type=int, default=1536)
    ap.add_argument("--size", type=int, default=256, help="side of the generated JPEGs")
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--baseline-tree", type=Path, default=None, help="another cirkit checkout to time one process with")
    args = ap.parse_args()

    sys.path.insert(0, str(HERE))
    from embed_throughput import make_images

    tmp = Path(tempfile.mkdtemp(prefix="cirkit-embed-parallel-"))
    try:
        images = tmp / "images"
        make_images(images, args.images, args.size)
        weights = random_weights(args.model, tmp / "weights.safetensors")  # every process: the same model
        base = ["embed", str(images), "--backbone", "clip", "-m", args.model, "--pretrained", str(weights),
                "--num-workers", "0", "--batch-size", str(args.batch_size), "--device", "cpu", "--json"]
        runs = {
            "1 process x 2 threads": lambda out, tree=ROOT: timed(
                [sys.executable, "-m", "cirkit", "-q", *base, "-o", str(out)], 2, tree),
            "2 processes x 1 thread": lambda out, tree=ROOT: timed(
                [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", _port(),
                 "-m", "cirkit", "-q", *base, "-o", str(out)], 1, tree),
        }
        if args.baseline_tree is not None:
            runs["1 process x 2 threads, baseline tree"] = lambda out: timed(
                [sys.executable, "-m", "cirkit", "-q", *base, "-o", str(out)], 2, args.baseline_tree.resolve())
        best: dict[str, tuple[float, float, dict]] = {}
        for rep in range(args.repeats):
            for name, fn in runs.items():
                out = tmp / f"{name.split()[0]}-{len(name)}-{rep}.lance"
                got = fn(out)
                assert got[2]["counts"]["embedded"] == args.images, got[2]["counts"]
                if name not in best or got[0] < best[name][0]:
                    best[name] = (*got[:2], {"out": out, "stage_s": got[2]["seconds"]})
        _check_same(best)
        print(f"model {args.model} (random weights), {args.images} JPEGs of {args.size}px, batch {args.batch_size}, "
              f"decode in the embedding process, {os.cpu_count()} CPU cores, best of {args.repeats}")
        ref = best["1 process x 2 threads"][0]
        for name, (wall, cpu, info) in best.items():
            print(f"{name:38s} {wall:7.1f} s wall  {args.images / wall:7.1f} images/s  {cpu:7.1f} CPU-s  "
                  f"ratio {ref / wall:5.2f}x  (stage {info['stage_s']:.1f} s: model load + embed + write)")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def random_weights(model: str, path: Path) -> Path:
    """One random initialisation of ``model`` saved as safetensors (nothing is downloaded)."""
    import torch
    from safetensors.torch import save_file

    from cirkit.backbones._openclip import create_clip  # knows cirkit's own configs (cirkit-small)

    torch.manual_seed(0)
    m, _, _ = create_clip(model, None)
    save_file({k: v.contiguous() for k, v in m.state_dict().items()}, str(path))
    return path


def _check_same(best: dict) -> None:
    """Every store holds the same ids and (within float noise) the same vectors."""
    import numpy as np

    from cirkit.io.embeddings import read_embeddings

    stores = [v[2]["out"] for v in best.values()]
    _, ids0, _, v0 = read_embeddings(stores[0])
    row0 = {k: i for i, k in enumerate(ids0)}
    for s in stores[1:]:
        _, ids, _, v = read_embeddings(s)
        assert sorted(ids) == sorted(ids0), s
        diff = max(float(np.abs(v[i] - v0[row0[k]]).max()) for i, k in enumerate(ids))
        assert diff < 1e-4, (s, diff)


if __name__ == "__main__":
    main()
