"""cirkit.encode: importing it changes no global state; DataLoader workers fork quietly beside LanceDB."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")

ROOT = Path(__file__).resolve().parents[1]
LANCE_FORK = "lancedb fork support is experimental"


_FORKS = """
import multiprocessing, sys, warnings
from pathlib import Path

import lancedb  # noqa: F401  (registers lancedb's at-fork hook, which warns in each forked child)
import torch
from PIL import Image

if sys.argv[1] == "plain":  # the control: a fork with nothing scoped around it
    p = multiprocessing.get_context("fork").Process(target=print, args=("child",))
    p.start()
    p.join()
    sys.exit(0)
import cirkit.errors, cirkit.io.images  # noqa: E401  (encode's own imports first, then encode alone)

on_import = list(warnings.filters)
from cirkit.encode import iter_image_batches
assert warnings.filters == on_import, "importing cirkit.encode changed the process's warning filters"

folder = Path(sys.argv[2])
items = []
for i in range(4):
    Image.new("RGB", (8, 8), (60 * i, 0, 0)).save(folder / f"{i}.png")
    items.append((str(i), folder / f"{i}.png"))
before = list(warnings.filters)
got = [k for ids, _, _ in iter_image_batches(items, lambda im: torch.zeros(1), torch.stack, 2, 2) for k in ids]
assert sorted(got) == ["0", "1", "2", "3"], got
assert warnings.filters == before
"""


def test_import_sets_no_filters_and_workers_fork_without_the_lancedb_warning(tmp_path):
    """In subprocesses: pytest records warnings itself, so a child's warning would never reach stderr here."""
    pytest.importorskip("lancedb")
    runs = {}
    for mode in ("plain", "encode"):
        r = subprocess.run([sys.executable, "-c", _FORKS, mode, str(tmp_path)], cwd=ROOT, capture_output=True,
                           text=True, timeout=300)
        assert r.returncode == 0, r.stderr
        runs[mode] = r.stderr
    assert LANCE_FORK in runs["plain"]  # the check can see the warning
    assert LANCE_FORK not in runs["encode"]
