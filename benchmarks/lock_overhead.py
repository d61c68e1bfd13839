"""What the single-writer lock and the output checks cost a small ``cirkit embed`` run.

The same run (fake backbone, generated PNGs, a fresh store each time) with and without them,
in one process, alternating ``--repeats`` times; the medians are compared. "Without" replaces
:func:`cirkit.io.lock.output_lock` by a no-op context and skips the checks a run makes before
writing (setting ranges, the store name, the output path's encoding, an output that is a link,
device or another kind of file); everything else is the real stage. Wall and CPU seconds
(``time.process_time``: this process, as ``--num-workers 0`` decodes here) are both reported.

    python benchmarks/lock_overhead.py                        # 256 images, 7 repeats
    python benchmarks/lock_overhead.py --images 1024 --repeats 9
"""

from __future__ import annotations

import argparse
import contextlib
import shutil
import statistics
import tempfile
import time
from pathlib import Path


def make_images(folder: Path, n: int, size: int = 32) -> Path:
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        Image.new("RGB", (size, size), (i * 7 % 256, i * 31 % 256, i * 101 % 256)).save(folder / f"im{i:05d}.png")
    return folder


@contextlib.contextmanager
def without_safety():
    """The stage with no lock and no output checks (module attributes swapped back afterwards)."""
    import cirkit.embed
    import cirkit.io.atomic
    import cirkit.io.lock

    @contextlib.contextmanager
    def no_lock(output, *a, **k):
        yield Path(output)

    saved = [(cirkit.io.lock, "output_lock", no_lock), (cirkit.embed, "check_settings", lambda config: None),
             (cirkit.io.atomic, "check_utf8_path", lambda *a, **k: None),
             (cirkit.io.atomic, "check_name", lambda name, what: name),
             (cirkit.io.atomic, "check_file_output", lambda *a, **k: None)]
    originals = [(mod, name, getattr(mod, name)) for mod, name, _ in saved]
    try:
        for mod, name, value in saved:
            setattr(mod, name, value)
        yield
    finally:
        for mod, name, value in originals:
            setattr(mod, name, value)


def one_run(images: Path, out: Path, batch_size: int) -> tuple[float, float]:
    from cirkit.embed import EmbedConfig, run

    shutil.rmtree(out, ignore_errors=True)
    wall, cpu = time.perf_counter(), time.process_time()
    result = run(EmbedConfig(input=images, output=out, backbone="fake", num_workers=0, batch_size=batch_size))
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    assert result.counts["embedded"] == len(list(images.iterdir()))
    return wall, cpu


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=int, default=256)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=7)
    args = ap.parse_args()

    import torch

    torch.set_num_threads(1)  # shared CI cores: one thread is steadier and the same for both paths
    root = Path(tempfile.mkdtemp(prefix="cirkit-lock-bench-"))
    try:
        images = make_images(root / "images", args.images)
        one_run(images, root / "warm.lance", args.batch_size)  # imports, first Lance table
        with_, without = [], []
        for _ in range(args.repeats):
            with_.append(one_run(images, root / "with.lance", args.batch_size))
            with without_safety():
                without.append(one_run(images, root / "without.lance", args.batch_size))
    finally:
        shutil.rmtree(root, ignore_errors=True)
    w1, c1 = (statistics.median(x[i] for x in with_) for i in (0, 1))
    w0, c0 = (statistics.median(x[i] for x in without) for i in (0, 1))
    print(f"embed, fake backbone, {args.images} images, batch {args.batch_size}, median of {args.repeats}:")
    print(f"  with lock + checks    {w1:.3f} s wall  {c1:.3f} CPU-s")
    print(f"  without               {w0:.3f} s wall  {c0:.3f} CPU-s")
    print(f"lock+validation overhead: {w1 / w0:.3f}x wall, {c1 / c0:.3f}x CPU ({(c1 - c0) * 1000:+.1f} ms CPU per run)")


if __name__ == "__main__":
    main()
