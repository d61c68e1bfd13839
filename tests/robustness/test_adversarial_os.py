"""What the operating system can do to a run: read-only and full disks, file names that are not
UTF-8, files the user may not read, folders the user may not write.

Real failures where this machine allows them: a tmpfs mounted small (ENOSPC) or remounted
read-only (EROFS) when the tests run as root, and a child process run as ``nobody`` (or a
chmod when not root) for EACCES. Every failure is exit 1 with one line naming the output or
input (never a temp name), no traceback, nothing half-made left behind, and the same command
works once the cause is gone. Cases that need root or mount say so when they skip; the
in-process cases below them (a library's ENOSPC, names) run everywhere.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from .conftest import cli_env, invoke, ok, refused, tree

pytest.importorskip("torch")


def _image(world: Path) -> Path:
    return sorted((world / "synth" / "images").iterdir())[0]


def _bench(world: Path) -> Path:
    return world / "synth" / "benchmark" / "test"


ARGS = {  # kind -> args writing under folder O
    "synth": lambda w, o: ["synth", str(o / "synth"), "--train-triplets", "6", "--test-queries", "3", "--distractors",
                           "3", "--image-size", "16"],
    "captions": lambda w, o: ["caption", "--from", str(w / "synth" / "all_captions.jsonl"), "-o", str(o / "c.jsonl")],
    "triplets": lambda w, o: ["reformulate", str(w / "synth" / "captions.jsonl"), "-g", "template", "-n", "8",
                              "--max-words", "40", "-o", str(o / "t.jsonl")],
    "store": lambda w, o: ["embed", str(w / "synth" / "images"), "--backbone", "fake", "-o", str(o / "g.lance"),
                           "--num-workers", "0", "--batch-size", "8"],
    "index": lambda w, o: ["index", str(w / "g.lance"), "-o", str(o / "idx")],
    "results": lambda w, o: ["query", "--batch", str(_bench(w) / "queries.jsonl"), "--index", str(w / "idx"), "-o",
                             str(o / "r.jsonl")],
    "reports": lambda w, o: ["query", str(_image(w)), "red", "--index", str(w / "idx"), "--html", str(o / "r.html"),
                             "--grid", str(o / "r.png")],
    "evaluate": lambda w, o: ["evaluate", "generic", "-d", str(_bench(w)), "--backbone", "fake", "--num-workers", "0",
                              "-o", str(o / "m.json"), "--submission", str(o / "subs")],
    "checkpoint": lambda w, o: ["train", str(w / "synth" / "captions.jsonl"), "--stage", "1", "-m", "cirkit-tiny", "-o",
                                str(o / "run"), "--max-steps", "1", "--batch-size", "4", "--num-workers", "0"],
}


class Disk:
    """A tmpfs of ``size`` mounted at ``path`` (root only)."""

    def __init__(self, path: Path):
        self.path = path

    def mount(self, size: str) -> None:
        r = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(self.path)], capture_output=True)
        if r.returncode != 0:
            pytest.skip(f"cannot mount a tmpfs here ({r.stderr.decode().strip()[:80]})")

    def read_only(self) -> None:
        subprocess.run(["mount", "-o", "remount,ro", str(self.path)], check=True, capture_output=True)

    def fill(self, leave: int) -> Path:
        """Fill the disk, then free ``leave`` bytes (a filler file holds the rest)."""
        filler = self.path / "filler"
        with open(filler, "wb") as fh:
            try:
                while True:
                    fh.write(b"\0" * 65536)
                    fh.flush()
            except OSError as e:
                assert e.errno == errno.ENOSPC
        size = filler.stat().st_size
        os.truncate(filler, max(0, size - leave))
        return filler

    def unmount(self) -> None:
        subprocess.run(["umount", "-l", str(self.path)], capture_output=True)


@pytest.fixture
def disk(tmp_path):
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs (real ENOSPC/EROFS) needs root; the monkeypatched cases below run instead")
    d = Disk(tmp_path / "disk")
    d.path.mkdir()
    yield d
    d.unmount()


def _leftovers(folder: Path) -> list[str]:
    return [p for p in tree(folder) if ".cirkit-tmp-" in p or ".cirkit-old-" in p] + \
        [str(p) for p in folder.rglob(".*.lock")]


@pytest.mark.slow
@pytest.mark.parametrize("leave", [0, 12_000, 80_000], ids=["full", "12k-free", "80k-free"])
@pytest.mark.parametrize("kind", sorted(ARGS))
def test_a_full_disk_is_one_line_naming_the_output_and_the_rerun_recovers(world, disk, kind, leave):
    disk.mount("64m" if kind == "checkpoint" else "400k")  # a tiny vit checkpoint with its trainer state: ~40 MB
    filler = disk.fill(leave)
    args = ARGS[kind](world, disk.path)
    r = invoke(["-q", *args])
    assert "Traceback" not in r.stderr and (r.exception is None or isinstance(r.exception, SystemExit)), r.stderr
    if r.exit_code != 0:  # a small output may fit in what was left
        lines = [x for x in r.stderr.splitlines() if x.strip()]
        assert r.exit_code == 1 and len(lines) == 1 and lines[0].startswith("error: "), r.stderr
        assert str(disk.path) in lines[0] and ".cirkit-tmp-" not in lines[0], lines[0]
        assert "space" in lines[0] or "lock file" in lines[0], lines[0]
    filler.unlink()
    ok(args)  # the cause is gone: the same command finishes (resuming what was kept)
    assert not _leftovers(disk.path), _leftovers(disk.path)


@pytest.mark.slow
@pytest.mark.parametrize("kind", sorted(ARGS))
def test_a_read_only_output_is_one_line_and_changes_nothing(world, disk, kind):
    disk.mount("4m")
    (disk.path / "keep.txt").write_text("mine\n")
    disk.read_only()
    line = refused(ARGS[kind](world, disk.path), [disk.path, world])
    assert str(disk.path) in line and "read-only" in line.lower() or "Read-only" in line, line
    assert ".cirkit-tmp-" not in line


@pytest.mark.slow
def test_a_read_only_index_can_still_be_searched(world, disk):
    disk.mount("4m")
    ok(["index", str(world / "g.lance"), "-o", str(disk.path / "idx")])
    shutil.rmtree(disk.path / "idx" / "images.cache")  # nowhere to build it now: search from memory
    disk.read_only()
    before = tree(disk.path)
    summary = ok(["query", str(_image(world)), "red", "--index", str(disk.path / "idx")])
    assert summary["counts"]["hits"] == 10 and tree(disk.path) == before


# -- library writes that fail with no file name ------------------------------------------------------------
def test_a_lance_write_on_a_full_disk_names_the_store(world, tmp_path, monkeypatch):
    import lancedb.table

    def full(*a, **k):
        raise RuntimeError("lance error: LanceError(IO): No space left on device (os error 28), /rust/src/x.rs:1:2")

    monkeypatch.setattr(lancedb.table.LanceTable, "add", full)
    out = tmp_path / "g.lance"
    line = refused(["embed", str(world / "synth" / "images"), "--backbone", "fake", "-o", str(out), "--num-workers",
                    "0"], [tmp_path, world], cwd=tmp_path)
    assert line == f"error: {out}: no space left on the device; free some space or write to another disk"


def test_a_safetensors_write_on_a_full_disk_is_not_called_a_damaged_file(world, tmp_path, monkeypatch):
    import safetensors.torch
    from safetensors import SafetensorError

    def full(*a, **k):
        raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")

    monkeypatch.setattr(safetensors.torch, "save_file", full)
    out = tmp_path / "run"
    line = refused(ARGS["checkpoint"](world, tmp_path), [world], cwd=tmp_path)
    assert line == f"error: {out}: no space left on the device; free some space or write to another disk"
    assert not _leftovers(tmp_path)


@pytest.mark.parametrize("err", [errno.ENOSPC, errno.EDQUOT, errno.EIO, errno.EROFS])
def test_an_os_error_in_a_plain_write_names_the_output_not_the_temp(world, tmp_path, monkeypatch, err):
    import cirkit.io.atomic as atomic

    def failing(fd):
        raise OSError(err, os.strerror(err))

    monkeypatch.setattr(atomic.os, "fsync", failing)
    out = tmp_path / "m.json"
    line = refused(["evaluate", "generic", "-d", str(_bench(world)), "--backbone", "fake", "--num-workers", "0", "-o",
                    str(out)], [world], cwd=tmp_path)
    assert line.startswith(f"error: {out}: ") and ".cirkit-tmp-" not in line
    assert sorted(p.name for p in tmp_path.iterdir()) == []


# -- file names that are not UTF-8 ------------------------------------------------------------------------------
BAD = os.fsdecode(b"caf\xe9")


@pytest.mark.skipif(sys.platform != "linux", reason="file names are bytes on Linux")
@pytest.mark.parametrize("kind", ["checkpoint", "store", "index"])
def test_an_output_path_that_is_not_utf8_is_refused_before_any_work(world, tmp_path, kind):
    folder = tmp_path / BAD
    folder.mkdir()
    line = refused(ARGS[kind](world, folder), [tmp_path, world], cwd=tmp_path)
    assert "caf\\xe9" in line and "not valid UTF-8" in line
    assert list(folder.iterdir()) == []


@pytest.mark.skipif(sys.platform != "linux", reason="file names are bytes on Linux")
@pytest.mark.parametrize("kind", ["captions", "triplets", "results", "reports", "evaluate", "synth"])
def test_other_outputs_under_a_folder_that_is_not_utf8_work_and_resume(world, tmp_path, kind):
    folder = tmp_path / BAD
    folder.mkdir()
    ok(ARGS[kind](world, folder))
    if kind != "synth":
        ok(ARGS[kind](world, folder))  # the re-run reads back what it wrote
    assert not _leftovers(tmp_path)


@pytest.mark.skipif(sys.platform != "linux", reason="file names are bytes on Linux")
def test_one_image_name_that_is_not_utf8_is_a_counted_skip_not_a_blocked_folder(world, tmp_path):
    folder = tmp_path / "imgs"
    shutil.copytree(world / "synth" / "images", folder)
    shutil.copy(_image(world), os.fsencode(folder) + b"/caf\xe9.png")
    n = len(list((world / "synth" / "images").iterdir()))
    args = ["embed", str(folder), "--backbone", "fake", "-o", str(tmp_path / "g.lance"), "--num-workers", "0"]
    summary = ok(args)
    assert summary["counts"]["embedded"] == n and summary["counts"]["failed"] == 1
    assert "caf\\xe9.png" in summary["skipped_items"][0]["item"]
    again = ok(args)  # and it never blocks a re-run
    assert again["counts"]["already_stored"] == n and again["counts"]["embedded"] == 0
    line = refused([*args[:-4], "-o", str(tmp_path / "g2.lance"), "--num-workers", "0", "--strict"], [tmp_path])
    assert "caf\\xe9.png" in line and "not valid UTF-8" in line


@pytest.mark.skipif(sys.platform != "linux", reason="file names are bytes on Linux")
def test_an_input_folder_whose_name_is_not_utf8(world, tmp_path):
    folder = tmp_path / BAD
    shutil.copytree(world / "synth" / "images", folder)
    line = refused(["embed", str(folder), "--backbone", "fake", "-o", str(tmp_path / "g.lance")], [tmp_path])
    assert "caf\\xe9" in line and "not valid UTF-8" in line


# -- permission denied: real EACCES (root's child drops its permission-bypassing capabilities; others use chmod) ----
_CAP_DAC_OVERRIDE, _CAP_DAC_READ_SEARCH, _PR_CAPBSET_DROP = 1, 2, 24


def _drop_dac() -> None:
    """In the child, before exec: without these two capabilities root obeys file permission bits."""
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    for cap in (_CAP_DAC_OVERRIDE, _CAP_DAC_READ_SEARCH):
        if libc.prctl(_PR_CAPBSET_DROP, cap, 0, 0, 0) != 0:
            raise OSError(ctypes.get_errno(), "prctl(PR_CAPBSET_DROP)")


def _as_user(args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "cirkit", "-q", *args], cwd=cwd, capture_output=True, text=True,
                          env=cli_env(), preexec_fn=_drop_dac if os.geteuid() == 0 else None, timeout=300)


@pytest.fixture
def shared(world, tmp_path):
    """A copy of the world, with a folder (ro/) the run may not write."""
    if os.geteuid() == 0:
        try:
            subprocess.run([sys.executable, "-c", "pass"], preexec_fn=_drop_dac, check=True)
        except (OSError, subprocess.SubprocessError):
            pytest.skip("cannot drop the permission-bypassing capabilities of root here")
    root = tmp_path / "shared"
    shutil.copytree(world, root, symlinks=True)
    (root / "out").mkdir()
    (root / "ro").mkdir()
    os.chmod(root / "ro", 0o555)
    yield root
    os.chmod(root / "ro", 0o755)


def _one_line(r: subprocess.CompletedProcess, code: int = 1) -> str:
    lines = [x for x in r.stderr.splitlines() if x.strip()]
    assert r.returncode == code and len(lines) == 1 and lines[0].startswith("error: "), (r.returncode, r.stderr)
    assert "Traceback" not in r.stderr
    return lines[0]


@pytest.mark.slow
@pytest.mark.parametrize("what", ["captions", "checkpoint_weights", "recipe", "queries", "store", "image"])
def test_an_unreadable_input_is_one_line_naming_it(shared, what):
    src = {"captions": shared / "synth" / "captions.jsonl", "checkpoint_weights": shared / "ck" / "model.safetensors",
           "recipe": shared / "r.yaml", "queries": _bench(shared) / "queries.jsonl", "store": shared / "g.lance",
           "image": _image(shared)}[what]
    if what == "recipe":
        src.write_text("query:\n  k: 3\n")
    os.chmod(src, 0)
    args = {
        "captions": ["reformulate", str(src), "-g", "template", "-o", "out/t.jsonl"],
        "checkpoint_weights": ["embed", str(shared / "synth" / "images"), "--model", str(shared / "ck"), "-o",
                               "out/g.lance", "--num-workers", "0"],
        "recipe": ["query", "--text", "red", "--index", str(shared / "idx"), "-c", str(src)],
        "queries": ["evaluate", "generic", "-d", str(_bench(shared)), "--backbone", "fake", "--num-workers", "0"],
        "store": ["index", str(src), "-o", "out/idx"],
        "image": ["query", str(src), "red", "--index", str(shared / "idx")],
    }[what]
    before = tree(shared)
    r = _as_user(args, shared)
    line = _one_line(r, code=2 if "Invalid value" in r.stderr else 1)
    assert src.name in line or str(src) in line, line
    after = tree(shared)
    assert {k: v for k, v in after.items() if k in before} == before


@pytest.mark.slow
def test_an_unreadable_gallery_image_is_a_counted_skip(shared):
    os.chmod(_image(shared), 0)
    r = _as_user(["embed", str(shared / "synth" / "images"), "--backbone", "fake", "-o", "out/g.lance",
                  "--num-workers", "0", "--json"], shared)
    assert r.returncode == 0, r.stderr
    summary = json.loads(r.stdout)
    assert summary["counts"]["failed"] == 1 and "permission denied" in summary["skipped_items"][0]["reason"]


@pytest.mark.slow
@pytest.mark.parametrize("kind", sorted(ARGS))
def test_a_folder_the_user_cannot_write_is_one_line(shared, kind):
    w = shared
    r = _as_user(ARGS[kind](w, w / "ro"), shared)
    line = _one_line(r)
    assert "ro" in line and ".cirkit-tmp-" not in line and ("permission" in line.lower()), line
    assert list((shared / "ro").iterdir()) == []
