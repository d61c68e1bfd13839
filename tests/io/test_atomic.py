"""Whole-file outputs never appear half-written; output paths cannot escape their folder."""

import os

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
    assert sorted(x.name for x in out.iterdir()) == ["b.txt"]
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
