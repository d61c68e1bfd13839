"""Whole-file outputs never appear half-written; output paths cannot escape their folder."""

import os
from pathlib import Path

import pytest

from cirkit.errors import CirkitError
from cirkit.io.atomic import atomic_dir, atomic_write, atomic_write_json, safe_join


def test_atomic_write_leaves_old_file_on_failure(tmp_path):
    p = tmp_path / "m.json"
    atomic_write_json(p, {"a": 1})
    with pytest.raises(RuntimeError):
        with atomic_write(p) as fh:
            fh.write("{half")
            raise RuntimeError("boom")
    assert p.read_text().strip().startswith("{") and '"a": 1' in p.read_text()
    assert [x.name for x in tmp_path.iterdir()] == ["m.json"]


def test_atomic_dir_swaps_whole_folder(tmp_path):
    out = tmp_path / "ckpt"
    with atomic_dir(out) as d:
        (d / "a.txt").write_text("1")
    with pytest.raises(ValueError):
        with atomic_dir(out) as d:
            (d / "a.txt").write_text("2")
            raise ValueError
    assert (out / "a.txt").read_text() == "1"
    with atomic_dir(out) as d:
        (d / "b.txt").write_text("3")
    assert sorted(x.name for x in out.iterdir()) == [".cirkit-output.json", "b.txt"]  # + the ownership marker
    assert sorted(x.name for x in tmp_path.iterdir()) == ["ckpt"]


@pytest.mark.parametrize("bad", ["../x.png", "/etc/passwd", "a/../../x"])
def test_safe_join_refuses_escapes(tmp_path, bad):
    with pytest.raises(CirkitError, match="escapes the output folder"):
        safe_join(tmp_path, bad)


def test_safe_join_allows_subpaths(tmp_path):
    assert safe_join(tmp_path, "a/b.png") == (tmp_path / "a" / "b.png").resolve()


def test_a_swap_cut_between_its_two_renames_is_restored(tmp_path):
    from cirkit.io import atomic_dir, restore_dir

    out = tmp_path / "ckpt"
    with atomic_dir(out) as tmp:
        (tmp / "step").write_text("1")
    # A crash after "old folder aside" and before "new folder in": only the aside copy is left.
    aside = tmp_path / ".ckpt.old-123"
    os.replace(out, aside)
    assert restore_dir(out) and (out / "step").read_text() == "1" and not aside.exists()
    assert not restore_dir(out)  # nothing to do when the folder is there
    with atomic_dir(out) as tmp:  # the next save works as usual
        (tmp / "step").write_text("2")
    assert (out / "step").read_text() == "2"


def test_outputs_get_the_usual_modes_and_stale_copies_go(tmp_path):
    from cirkit.io import atomic_dir, atomic_write, restore_dir

    old = os.umask(0o022)
    try:
        with atomic_write(tmp_path / "m.json") as fh:
            fh.write("{}")
        with atomic_dir(tmp_path / "ckpt") as tmp:
            (tmp / "step").write_text("1")
    finally:
        os.umask(old)
    assert (tmp_path / "m.json").stat().st_mode & 0o777 == 0o644
    assert (tmp_path / "ckpt").stat().st_mode & 0o777 == 0o755
    # a crash after the second rename leaves the old copy beside the new folder: it is removed
    stale = tmp_path / ".ckpt.old-99"
    stale.mkdir()
    assert not restore_dir(tmp_path / "ckpt") and not stale.exists() and (tmp_path / "ckpt" / "step").exists()


# -- ownership: cirkit only replaces what it created ----------------------------------------------


def test_atomic_dir_refuses_a_folder_of_user_files(tmp_path):
    out = tmp_path / "work"
    out.mkdir()
    (out / "captions.jsonl").write_text("precious\n")
    with pytest.raises(CirkitError, match="cirkit only replaces a checkpoint folder it created"):
        with atomic_dir(out, "checkpoint") as d:
            (d / "x").write_text("1")
    assert (out / "captions.jsonl").read_text() == "precious\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["work"]  # no temp left behind


def test_atomic_dir_marks_its_folder_and_replaces_only_the_same_kind(tmp_path):
    from cirkit.io.atomic import MARKER, read_marker

    out = tmp_path / "ckpt"
    with atomic_dir(out, "checkpoint") as d:
        (d / "a").write_text("1")
    assert read_marker(out)["kind"] == "checkpoint" and (out / MARKER).exists()
    with atomic_dir(out, "checkpoint") as d:
        (d / "a").write_text("2")
    assert (out / "a").read_text() == "2"
    with pytest.raises(CirkitError, match="holds a cirkit checkpoint; cirkit only replaces a synth folder"):
        with atomic_dir(out, "synth"):
            pass
    assert (out / "a").read_text() == "2"


def test_atomic_dir_refuses_symlinks_files_and_the_current_folder(tmp_path, monkeypatch):
    real = tmp_path / "real"
    real.mkdir()
    (real / "keep").write_text("x")
    link = tmp_path / "link"
    link.symlink_to(real)
    with pytest.raises(CirkitError, match="is a symbolic link"):
        with atomic_dir(link, "checkpoint"):
            pass
    assert link.is_symlink() and (real / "keep").exists()
    f = tmp_path / "file"
    f.write_text("x")
    with pytest.raises(CirkitError, match="exists and is not a folder"):
        with atomic_dir(f, "checkpoint"):
            pass
    monkeypatch.chdir(real)
    with pytest.raises(CirkitError, match="is the current folder or one above it"):
        with atomic_dir(Path("."), "checkpoint"):
            pass
    with pytest.raises(CirkitError, match="is the current folder or one above it"):
        with atomic_dir(tmp_path, "checkpoint"):
            pass
    assert (real / "keep").read_text() == "x"


def test_empty_folder_is_replaced_and_legacy_folders_are_recognised(tmp_path):
    out = tmp_path / "empty"
    out.mkdir()
    with atomic_dir(out, "checkpoint") as d:
        (d / "a").write_text("1")
    assert (out / "a").exists()
    legacy = tmp_path / "legacy"
    legacy.mkdir()
    (legacy / "config.json").write_text("{}")
    with atomic_dir(legacy, "checkpoint", owned=lambda p: (p / "config.json").exists()) as d:
        (d / "b").write_text("1")
    assert sorted(p.name for p in legacy.iterdir()) == [".cirkit-output.json", "b"]


def test_temps_name_their_owner_and_dead_owners_temps_are_removed(tmp_path):
    import subprocess
    import sys

    from cirkit.io.atomic import remove_dead_temps, temp_name

    out = tmp_path / "m.json"
    mine = temp_name(out)
    assert mine.name.startswith(".m.json.cirkit-tmp-") and f"-{os.getpid()}-" in mine.name
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    stale = Path(str(mine).replace(f"-{os.getpid()}-", f"-{dead.pid}-"))
    stale.write_text("half")
    stale_dir = Path(str(temp_name(tmp_path / "ckpt")).replace(f"-{os.getpid()}-", f"-{dead.pid}-"))
    stale_dir.mkdir()
    (stale_dir / "w").write_bytes(b"0" * 100)
    live = temp_name(out)
    live.write_text("being written")
    other = tmp_path / ".m.json.backup"  # not ours: never touched
    other.write_text("x")
    assert remove_dead_temps(out) == 1 and remove_dead_temps(tmp_path / "ckpt") == 1
    assert not stale.exists() and not stale_dir.exists() and live.exists() and other.exists()
    atomic_write_json(out, {"a": 1})  # an atomic write cleans up after dead owners too
    assert live.exists()


def test_file_outputs_refuse_folders_and_file_parents(tmp_path):
    d = tmp_path / "dir.json"
    d.mkdir()
    with pytest.raises(CirkitError, match="is a folder, but a file is written here"):
        atomic_write_json(d, {})
    f = tmp_path / "plain"
    f.write_text("x")
    with pytest.raises(CirkitError, match="is a file, not a folder"):
        atomic_write_json(f / "sub" / "m.json", {})


@pytest.mark.parametrize("bad", ["../victim", "/abs", "a/b", "..", ".", "", ".hidden", "a\x00b", "a b", "x\\y"])
def test_check_name_refuses_anything_but_a_plain_name(bad):
    from cirkit.io.atomic import check_name

    with pytest.raises(CirkitError, match="is not a plain name"):
        check_name(bad, "table")


def test_check_name_accepts_plain_names():
    from cirkit.io.atomic import check_name

    assert check_name("images_v2.1-x", "table") == "images_v2.1-x"
