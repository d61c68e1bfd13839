"""One writer per output: a second writer fails at once naming the holder, or waits; dead holders free the lock."""

import subprocess
import sys
import time

import pytest

from cirkit.io.lock import OutputBusy, is_locked, lock_file_for, output_lock

HOLD = """
import sys, time
from cirkit.io.lock import output_lock
with output_lock(sys.argv[1]):
    print("held", flush=True)
    time.sleep(float(sys.argv[2]))
"""


def _holder(path, seconds):
    proc = subprocess.Popen([sys.executable, "-c", HOLD, str(path), str(seconds)], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "held"
    return proc


def test_second_writer_in_another_process_fails_naming_the_holder(tmp_path):
    out = tmp_path / "captions.jsonl"
    proc = _holder(out, 60)
    try:
        assert is_locked(out)
        with pytest.raises(OutputBusy) as e:
            with output_lock(out):
                pass
        msg = str(e.value)
        assert msg.startswith(f"{out}: another cirkit run is writing this output (pid {proc.pid} on ")
        assert "--wait" in msg and "\n" not in msg
    finally:
        proc.kill()
        proc.wait()


def test_a_killed_holder_leaves_a_lock_the_next_run_takes(tmp_path):  # the kernel frees a dead holder's flock
    out = tmp_path / "gallery.lance"
    proc = _holder(out, 60)
    proc.kill()
    proc.wait()
    assert lock_file_for(out).exists() and not is_locked(out)
    with output_lock(out):
        assert is_locked(out)


def test_wait_queues_behind_the_holder(tmp_path):
    out = tmp_path / "ckpt"
    proc = _holder(out, 1.5)
    t0 = time.monotonic()
    with output_lock(out, wait=True):
        waited = time.monotonic() - t0
    proc.wait()
    assert waited > 0.5


def test_same_process_cannot_open_two_writers(tmp_path):
    out = tmp_path / "x.jsonl"
    with output_lock(out):
        with pytest.raises(OutputBusy):
            with output_lock(out):
                pass
    with output_lock(out):  # released on exit
        pass


def test_lock_beside_a_file_parent_is_a_one_line_error(tmp_path):
    from cirkit.errors import CirkitError

    f = tmp_path / "file"
    f.write_text("x")
    with pytest.raises(CirkitError, match="is a file, not a folder"):
        with output_lock(f / "out.jsonl"):
            pass


def test_an_unwritable_folder_is_a_one_line_error(tmp_path, monkeypatch):
    """Root ignores folder permissions, so the OS refusal is simulated where filelock opens the file."""
    import errno

    from filelock import FileLock

    from cirkit.errors import CirkitError

    def refuse(self, *a, **k):
        raise PermissionError(errno.EACCES, "Permission denied", str(self.lock_file))

    monkeypatch.setattr(FileLock, "acquire", refuse)
    with pytest.raises(CirkitError) as e:
        with output_lock(tmp_path / "out.jsonl"):
            pass
    assert str(e.value) == (f"{tmp_path / 'out.jsonl'}: cannot write its lock file {tmp_path / '.out.jsonl.lock'} "
                            "(Permission denied); choose an output in a folder you can write")


CONTEND = """
import os, sys, time
from cirkit.io.lock import output_lock
out, log = sys.argv[1], sys.argv[2]
for _ in range(int(sys.argv[3])):
    with output_lock(out, wait=True):
        with open(log, "a") as fh:
            fh.write(f"in {os.getpid()}\\n"); fh.flush()
            time.sleep(0.002)
            fh.write(f"out {os.getpid()}\\n")
"""


def test_removing_the_lock_file_keeps_one_holder_at_a_time(tmp_path):
    """Holders unlink the lock file on exit; waiters that opened the old inode must not also hold a lock."""
    out, log = tmp_path / "o.jsonl", tmp_path / "log"
    procs = [subprocess.Popen([sys.executable, "-c", CONTEND, str(out), str(log), "25"]) for _ in range(4)]
    assert all(p.wait(timeout=120) == 0 for p in procs)
    lines = log.read_text().splitlines()
    assert len(lines) == 4 * 25 * 2
    for a, b in zip(lines[::2], lines[1::2], strict=True):  # every "in" is followed by its own "out"
        assert a.startswith("in ") and b == "out " + a[3:]
    assert not lock_file_for(out).exists()
