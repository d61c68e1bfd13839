"""Outputs that could destroy: every output kind against every kind of place a user can point it.

For each output kind (captions/triplets/results JSONL, Lance store, index, checkpoint folder,
synth folder, metrics.json, submission folder, HTML report, PNG grid) and each target (one of
the run's inputs, a user's file or folder, a file of another kind, a link, a dangling link, a
FIFO, a device node, a path under a file, the current folder and above, a name too long) the
run either refuses with one ``error:`` line, or writes only what it creates. Either way no file
that existed before changes, no link is replaced, no FIFO or device is touched (and nothing
hangs on one). Cases that must be refused say so.
"""

from __future__ import annotations

import os
import signal
import stat
from pathlib import Path

import pytest

from .conftest import invoke, ok, refused, tree

pytest.importorskip("torch")


@pytest.fixture(autouse=True)
def deadline():
    """A run that blocks (opening a FIFO) fails the test instead of hanging the suite."""
    def expired(*_):
        raise TimeoutError("the run blocked for 120 s")

    old = signal.signal(signal.SIGALRM, expired)
    signal.alarm(120)
    yield
    signal.alarm(0)
    signal.signal(signal.SIGALRM, old)


def _image(world: Path) -> Path:
    return sorted((world / "synth" / "images").iterdir())[0]


def _bench(world: Path) -> Path:
    return world / "synth" / "benchmark" / "test"


# kind -> (args writing to T, is the output a folder, the input it reads (an output = input target))
KINDS = {
    "captions": (lambda w, t: ["caption", "--from", str(w / "synth" / "captions.jsonl"), "-o", str(t)], False,
                 lambda w: w / "synth" / "captions.jsonl"),
    "triplets": (lambda w, t: ["reformulate", str(w / "synth" / "captions.jsonl"), "-g", "template", "-n", "4", "-o",
                               str(t)], False, lambda w: w / "synth" / "captions.jsonl"),
    "results": (lambda w, t: ["query", "--batch", str(_bench(w) / "queries.jsonl"), "--index", str(w / "idx"), "-o",
                              str(t)], False, lambda w: _bench(w) / "queries.jsonl"),
    "store": (lambda w, t: ["embed", str(w / "synth" / "images"), "--backbone", "fake", "-o", str(t),
                            "--num-workers", "0"], True, lambda w: w / "synth" / "images"),
    "index": (lambda w, t: ["index", str(w / "g.lance"), "-o", str(t)], True, lambda w: w / "g.lance"),
    "checkpoint": (lambda w, t: ["train", str(w / "synth" / "captions.jsonl"), "--stage", "1", "-m", "cirkit-tiny",
                                 "-o", str(t), "--max-steps", "1", "--batch-size", "2", "--num-workers", "0"], True,
                   lambda w: w / "synth" / "captions.jsonl"),
    "synth": (lambda w, t: ["synth", str(t), "--train-triplets", "4", "--test-queries", "2", "--distractors", "2",
                            "--image-size", "16"], True, None),
    "metrics": (lambda w, t: ["evaluate", "generic", "-d", str(_bench(w)), "--backbone", "fake", "--num-workers", "0",
                              "-o", str(t)], False, lambda w: _bench(w) / "queries.jsonl"),
    # rankings may be written beside the benchmark's files (new names only: the table checks that)
    "submission": (lambda w, t: ["evaluate", "generic", "-d", str(_bench(w)), "--backbone", "fake", "--num-workers",
                                 "0", "--submission", str(t)], True, None),
    "html": (lambda w, t: ["query", str(_image(w)), "red", "--index", str(w / "idx"), "--html", str(t)], False,
             lambda w: _image(w)),
    "grid": (lambda w, t: ["query", str(_image(w)), "red", "--index", str(w / "idx"), "--grid", str(t)], False,
             lambda w: _image(w)),
}
# the file each whole-file kind's first run in ``world`` wrote (another kind's file for the others)
OWN = {"captions": "captions.jsonl", "triplets": "triplets.jsonl", "results": "results.jsonl", "metrics": "metrics.json",
       "html": "r.html", "grid": "r.png"}


def _user_file(tmp: Path) -> Path:
    p = tmp / "notes.txt"
    p.write_text("years of work\n")
    return p


def _user_folder(tmp: Path, name: str = "work") -> Path:
    p = tmp / name
    p.mkdir()
    (p / "thesis.tex").write_text("years of work\n")
    return p


def _suffixed(kind: str, name: str) -> str:
    return f"{name}.lance" if kind == "store" else name


def _link_to_file(tmp: Path, kind: str) -> Path:
    real = _user_file(tmp)
    link = tmp / _suffixed(kind, "link")
    link.symlink_to(real)
    return link


def _link_to_folder(tmp: Path, kind: str) -> Path:
    real = _user_folder(tmp, "real")
    link = tmp / _suffixed(kind, "link")
    link.symlink_to(real)
    return link


def _dangling(tmp: Path, kind: str) -> Path:
    link = tmp / _suffixed(kind, "dangling")
    link.symlink_to(tmp / "gone" / "x")
    return link


def _fifo(tmp: Path, kind: str) -> Path:
    p = tmp / _suffixed(kind, "fifo")
    os.mkfifo(p)
    return p


def _device(tmp: Path, kind: str) -> Path:
    p = tmp / _suffixed(kind, "null")
    try:
        os.mknod(p, stat.S_IFCHR | 0o666, os.makedev(1, 3))  # a second /dev/null, inside the test folder
    except PermissionError:
        pytest.skip("making a device node needs root (the FIFO cases cover other users)")
    return p


def _under_a_file(tmp: Path, kind: str) -> Path:
    return _user_file(tmp) / _suffixed(kind, "out")


def _other_kind_file(tmp: Path, kind: str, world: Path) -> Path:
    """A file another stage wrote (metrics for a JSONL kind, captions for the others), copied here."""
    src = world / ("metrics.json" if kind in ("captions", "triplets", "results", "html", "grid") else "captions.jsonl")
    p = tmp / _suffixed(kind, "other")
    p.write_bytes(src.read_bytes())
    return p


def _too_long(tmp: Path, kind: str) -> Path:
    return tmp / _suffixed(kind, "x" * 300)


TARGETS = {  # name -> (make target, must it be refused: True, or a set of kinds that must)
    "user_file": (lambda t, k, w: _user_file(t) if k != "store" else _user_file_as(t, "notes.lance"), True),
    "user_folder": (lambda t, k, w: _user_folder(t, _suffixed(k, "work")), {"captions", "triplets", "results", "store",
                                                                           "checkpoint", "synth", "metrics", "html",
                                                                           "grid"}),
    "other_kind_file": (_other_kind_file, True),
    "link_to_file": (lambda t, k, w: _link_to_file(t, k), True),
    "link_to_folder": (lambda t, k, w: _link_to_folder(t, k), {"captions", "triplets", "results", "checkpoint", "synth",
                                                              "metrics", "html", "grid"}),
    "dangling_link": (lambda t, k, w: _dangling(t, k), {"captions", "triplets", "results", "checkpoint", "synth",
                                                        "metrics", "html", "grid", "store"}),
    "fifo": (lambda t, k, w: _fifo(t, k), True),
    "device": (lambda t, k, w: _device(t, k), True),
    "under_a_file": (lambda t, k, w: _under_a_file(t, k), True),
    "name_too_long": (lambda t, k, w: _too_long(t, k), True),
}


def _user_file_as(tmp: Path, name: str) -> Path:
    p = tmp / name
    p.write_text("years of work\n")
    return p


def _special(path: Path) -> str | None:
    try:
        mode = os.lstat(path).st_mode
    except OSError:  # absent, under a file, or a name too long
        return None
    return "link" if stat.S_ISLNK(mode) else "fifo" if stat.S_ISFIFO(mode) else "chr" if stat.S_ISCHR(mode) else None


CASES = [(k, t) for k in KINDS for t in TARGETS]


@pytest.mark.parametrize("kind, target", CASES, ids=[f"{k}-{t}" for k, t in CASES])
def test_an_output_never_destroys_what_is_there(world, tmp_path, kind, target):
    make_args, _, _ = KINDS[kind]
    make, must = TARGETS[target]
    dest = make(tmp_path, kind, world)
    special = _special(dest)
    before_world, before_here = tree(world), tree(tmp_path)
    r = invoke(["-q", *make_args(world, dest)], cwd=tmp_path)
    assert "Traceback" not in r.stderr and (r.exception is None or isinstance(r.exception, SystemExit)), r.stderr
    must_refuse = must is True or kind in must
    if must_refuse or r.exit_code != 0:
        lines = [x for x in r.stderr.splitlines() if x.strip()]
        assert r.exit_code == 1 and len(lines) == 1 and lines[0].startswith("error: "), (r.exit_code, r.stderr)
    assert tree(world) == before_world, "the world changed"
    after = tree(tmp_path)
    changed = [p for p in before_here if after.get(p) != before_here[p]]
    assert not changed, (changed, r.stderr)
    assert _special(dest) == special, "a link, FIFO or device was replaced"


# -- an output that is one of the run's own inputs ----------------------------------------------------
@pytest.mark.parametrize("kind", sorted(k for k, v in KINDS.items() if v[2] is not None))
def test_an_output_that_is_the_runs_input_is_refused(world, tmp_path, kind):
    import shutil

    make_args, _, input_of = KINDS[kind]
    copy = tmp_path / "world"
    shutil.copytree(world, copy, symlinks=True)
    target = input_of(copy)
    args = make_args(copy, target)
    line = refused(args, [copy], cwd=tmp_path)
    assert str(target) in line


def test_the_run_replaces_its_own_previous_file_of_each_kind(world, tmp_path):
    """The other side of the rule: re-running writes over what cirkit itself wrote before."""
    import shutil

    for kind, name in sorted(OWN.items()):
        make_args, _, _ = KINDS[kind]
        dest = tmp_path / name
        shutil.copy2(world / name, dest)
        ok(make_args(world, dest), cwd=tmp_path)
        assert dest.is_file() and dest.read_bytes() == (world / name).read_bytes() or kind in ("html", "grid")


@pytest.mark.parametrize("kind", ["checkpoint", "synth"])
@pytest.mark.parametrize("where", [".", "..", "~"])
def test_a_folder_output_that_is_the_current_folder_above_or_home(world, tmp_path, monkeypatch, kind, where):
    home = tmp_path / "home"
    work = home / "work"
    work.mkdir(parents=True)
    (work / "thesis.tex").write_text("years of work\n")
    (home / "photos.txt").write_text("mine\n")
    monkeypatch.setenv("HOME", str(home))
    make_args, _, _ = KINDS[kind]
    target = str(home) if where == "~" else where
    line = refused(make_args(world, target), [home, world], cwd=work)
    assert line.startswith("error: ")


@pytest.mark.parametrize("kind", ["metrics", "html", "grid", "captions", "results"])
@pytest.mark.parametrize("where", [".", ".."])
def test_a_file_output_that_is_a_folder(world, tmp_path, kind, where):
    (tmp_path / "work").mkdir()
    make_args, _, _ = KINDS[kind]
    line = refused(make_args(world, where), [tmp_path, world], cwd=tmp_path / "work")
    assert "is a folder" in line


def test_a_long_path_component_deep_inside_is_one_line(world, tmp_path):
    deep = tmp_path / ("d" * 255) / ("e" * 255) / ("x" * 300 + ".json")
    line = refused(KINDS["metrics"][0](world, deep), [tmp_path, world], cwd=tmp_path)
    assert "file name too long" in line or "File name too long" in line


@pytest.mark.parametrize("name", ["a b.lance", "../x.lance", "-x.lance", ".hidden.lance", "caf\u00e9.lance",
                                  "cafe\u0301.lance", "x\u202egnp.lance", "a\\b.lance", ".lance", "x" * 250 + ".lance"])
def test_a_store_name_that_is_not_a_plain_name(world, tmp_path, name):
    (tmp_path / "sub").mkdir()
    dest = tmp_path / "sub" / name
    r = invoke(["-q", "embed", str(world / "synth" / "images"), "--backbone", "fake", "-o", str(dest), "--num-workers",
                "0"], cwd=tmp_path)
    # a store's name is a table name: plain ASCII names only ("../x.lance" is a path whose name is x)
    if name == "../x.lance":
        assert r.exit_code == 0 and (tmp_path / "x.lance").is_dir()
        return
    lines = [x for x in r.stderr.splitlines() if x.strip()]
    assert r.exit_code == 1 and len(lines) == 1 and "Traceback" not in r.stderr, r.stderr
    assert not any(p for p in (tmp_path / "sub").iterdir()), "a refused store left something behind"


def test_unicode_lookalike_table_names_cannot_reach_another_table(world, tmp_path):
    ok(["index", str(world / "g.lance"), "-o", str(tmp_path / "idx")])
    before = tree(tmp_path)
    for table in ("images\u200b", "ima\u0261es", "IMAGES", "images.", "images.lance", "images/../images"):
        r = invoke(["-q", "index", str(world / "g.lance"), "-o", str(tmp_path / "idx"), "--table", table,
                    "--delete", "x"], cwd=tmp_path)
        assert r.exit_code in (0, 1) and "Traceback" not in r.stderr
    assert {k: v for k, v in tree(tmp_path).items() if k in before} == before


# -- names from data that become paths -----------------------------------------------------------------
@pytest.mark.parametrize("meta", [{"name": "../../x"}, {"name": "/tmp/x"}, {"name": "a\x00b"}, {"name": "..."},
                                  {"split": "../../../x"}, {"name": "x" * 400}, {"name": "a/b"}])
def test_benchmark_names_never_put_a_file_outside_the_submission_folder(world, tmp_path, meta):
    import json
    import shutil

    bench = tmp_path / "bench"
    shutil.copytree(_bench(world), bench)
    (bench / "meta.json").write_text(json.dumps(meta))
    subs = tmp_path / "out" / "subs"
    split = meta.get("split", "test")
    before = tree(tmp_path)
    r = invoke(["-q", "evaluate", "generic", "-d", str(bench), "--backbone", "fake", "--split", split, "--num-workers",
                "0", "--submission", str(subs)], cwd=tmp_path)
    assert "Traceback" not in r.stderr and r.exit_code in (0, 1), r.stderr
    if r.exit_code == 1:
        assert len([x for x in r.stderr.splitlines() if x.strip()]) == 1
    new = [p for p in tree(tmp_path) if p not in before]
    assert all(p == "out" or p.startswith("out/subs") for p in new), new


def test_caption_ids_with_separators_stay_data(world, tmp_path):
    import json

    src = tmp_path / "in.jsonl"
    img = str(_image(world))
    src.write_text("".join(json.dumps({"id": i, "image": img, "caption": "a square"}) + "\n"
                           for i in ["../../x", "/etc/passwd", "a\\b", "..", "C:\\x"]))
    out = tmp_path / "out" / "c.jsonl"
    before = tree(tmp_path)
    ok(["caption", "--from", str(src), "-o", str(out)], cwd=tmp_path)
    new = sorted(p for p in tree(tmp_path) if p not in before)
    assert new == ["out", "out/c.jsonl"]
    ids = [json.loads(x)["id"] for x in out.read_text().splitlines()]
    assert ids == ["../../x", "/etc/passwd", "a\\b", "..", "C:\\x"]


# -- the search cache: its folder may hold other things ------------------------------------------------
def test_a_cache_folder_of_user_files_keeps_them(world, tmp_path):
    cache = _user_folder(tmp_path, "cache")
    (cache / "0123456789abcdef0123456789abcdef-v1.rows.arrow").write_text("not ours either")
    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"query:\n  cache_dir: {cache}\n")
    before = tree(cache)
    ok(["query", str(_image(world)), "red", "--index", str(world / "idx"), "-c", str(recipe)], cwd=tmp_path)
    after = tree(cache)
    assert all(after.get(k) == v for k, v in before.items())


@pytest.mark.parametrize("target", ["file", "fifo", "under_a_file"])
def test_a_cache_location_that_cannot_be_a_folder_searches_from_memory(world, tmp_path, target):
    cache = {"file": lambda: _user_file(tmp_path), "fifo": lambda: _fifo(tmp_path, "cache"),
             "under_a_file": lambda: _user_file(tmp_path) / "cache"}[target]()
    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"query:\n  cache_dir: {cache}\n")
    before = tree(tmp_path)
    summary = ok(["query", str(_image(world)), "red", "--index", str(world / "idx"), "-c", str(recipe)], cwd=tmp_path)
    assert summary["counts"]["hits"] == 10
    assert {k: v for k, v in tree(tmp_path).items() if k in before} == before


# -- the checkpoint folder through its other writers -----------------------------------------------------
def test_an_init_checkpoint_is_never_written_by_the_run_that_reads_it(world, tmp_path):
    import shutil

    ck = tmp_path / "ck"
    shutil.copytree(world / "ck", ck)
    for out in (ck, ck / "stage2", tmp_path):
        line = refused(["train", str(world / "synth" / "triplets.jsonl"), "--stage", "2", "--init", str(ck), "-o",
                        str(out), "--max-steps", "1", "--num-workers", "0"], [tmp_path, world], cwd=tmp_path / "ck")
        assert line.startswith("error: ")


def test_a_second_kind_in_a_folder_is_refused_not_mixed(world, tmp_path):
    """An index into a checkpoint or synth folder would be lost at that folder's next swap."""
    import shutil

    for src in ("ck", "synth"):
        shutil.copytree(world / src, tmp_path / src)
        line = refused(["index", str(world / "g.lance"), "-o", str(tmp_path / src)], [tmp_path, world], cwd=tmp_path)
        assert "cirkit" in line and "folder" in line
    shutil.copytree(world / "idx", tmp_path / "idx")
    line = refused(["embed", str(world / "synth" / "images"), "--backbone", "fake", "-o",
                    str(tmp_path / "idx" / "images.lance"), "--num-workers", "0"], [tmp_path, world], cwd=tmp_path)
    assert "is a table of an index" in line

