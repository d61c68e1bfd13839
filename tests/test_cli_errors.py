"""The CLI's one error boundary: user-caused failures are one `error:` line (exit 1, 2 for usage).

Each stage's ``run`` is replaced by one that raises what a real run meets (a read-only or full
disk, a folder where a file belongs, a file name that is not UTF-8, a corrupt safetensors or
Lance file, bad JSON/YAML); the real paths are exercised too where they are cheap. Bugs keep
their traceback; ``--verbose`` shows it for user errors as well; Ctrl-C exits 130. ``--json``
output is strict JSON on stdout, and logs never go there.
"""

from __future__ import annotations

import errno
import json
import os
import sys

import pytest
from typer.testing import CliRunner

from cirkit.cli import app


def invoke(args, **kw):
    return CliRunner().invoke(app, args, **kw)


def one_error(res, code=1):
    assert res.exit_code == code, (res.exit_code, res.stdout, res.stderr, res.exception)
    assert "Traceback" not in res.stderr
    lines = [x for x in res.stderr.splitlines() if x.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), res.stderr
    return lines[0]


def raising(monkeypatch, exc, stage="synth"):
    def run(config):
        raise exc() if callable(exc) and not isinstance(exc, BaseException) else exc

    monkeypatch.setattr(f"cirkit.{stage}.run", run)


def _safetensors_error():
    from safetensors import SafetensorError

    return SafetensorError("Error while deserializing header: incomplete metadata, file not fully covered")


def _arrow_error():
    import pyarrow as pa

    return pa.lib.ArrowInvalid("Column 'vector' has null values")


def _yaml_error():
    import yaml

    try:
        yaml.safe_load("a: [1")
    except yaml.YAMLError as e:
        return e
    raise AssertionError("no YAML error")


CASES = {
    "permission": (PermissionError(errno.EACCES, "Permission denied", "/data/out"),
                   "error: /data/out: permission denied; check its permissions or choose another location"),
    "read-only": (OSError(errno.EROFS, "Read-only file system", "/mnt/ro/out"),
                  "error: /mnt/ro/out: read-only file system; write to another location"),
    "disk full": (OSError(errno.ENOSPC, "No space left on device", "/data/out/x.png"),
                  "error: /data/out/x.png: no space left on the device; free some space or write to another disk"),
    "disk full, no name": (OSError(errno.ENOSPC, "No space left on device"),
                           "error: no space left on the device; free some space or write to another disk"),
    "quota": (OSError(errno.EDQUOT, "Disk quota exceeded", "/home/me/x"),
              "error: /home/me/x: disk quota exceeded; free some space or write to another disk"),
    "folder for a file": (IsADirectoryError(errno.EISDIR, "Is a directory", "/data/captions.jsonl"),
                          "error: /data/captions.jsonl: is a folder, not a file; give a file path"),
    "file in the path": (NotADirectoryError(errno.ENOTDIR, "Not a directory", "/nowhere/f.txt/out"),
                         "error: /nowhere/f.txt/out: a part of this path is a file, not a folder; check the path"),
    "name too long": (OSError(errno.ENAMETOOLONG, "File name too long", "/x/" + "a" * 300),
                      "error: /x/" + "a" * 300 + ": file name too long; choose a shorter name"),
    "rename": (OSError(errno.EXDEV, "Invalid cross-device link", "/a/tmp", None, "/b/out"),
               "error: /a/tmp -> /b/out: Invalid cross-device link; check the path"),
    "too many files": (OSError(errno.EMFILE, "Too many open files"),
                       "error: too many open files; raise the limit (ulimit -n) or use fewer workers"),
    "name not utf-8": (UnicodeEncodeError("utf-8", "photos/caf\udce9.png", 10, 11, "surrogates not allowed"),
                       "error: photos/caf\\xe9.png: a file name is not valid UTF-8; rename it (e.g. with convmv)"),
    "terminal not utf-8": (UnicodeEncodeError("ascii", "a red café", 9, 10, "ordinal not in range(128)"),
                           "error: cannot write 'é' in the ascii encoding; set PYTHONIOENCODING=utf-8 or use a "
                           "UTF-8 locale such as LANG=C.UTF-8"),
    "bytes not utf-8": (UnicodeDecodeError("utf-8", b"ab\xff", 2, 3, "invalid start byte"),
                        "error: text is not valid UTF-8 (byte 0xff at position 2); save the file as UTF-8"),
    "json": (json.JSONDecodeError("Expecting value", '{"a": }', 6),
             "error: not valid JSON (Expecting value at line 1 column 7); fix or re-create the file"),
    "lance": (RuntimeError("lance error: LanceError(IO): does not have sufficient data, len: 7, "
                           "/root/.cargo/registry/src/lance-io-13.0.0/src/utils.rs:224:20"),
              "error: the Lance store cannot be read or written (lance error: LanceError(IO): does not have "
              "sufficient data, len: 7); check the path, or create the store again"),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_user_caused_errors_are_one_line(monkeypatch, case):
    exc, line = CASES[case]
    raising(monkeypatch, exc)
    assert one_error(invoke(["synth", "out"])) == line


@pytest.mark.parametrize("make, start", [
    (_safetensors_error, "error: cannot read safetensors weights (Error while deserializing header"),
    (_arrow_error, "error: the Lance store cannot be read or written (Column 'vector' has null values)"),
    (_yaml_error, "error: not valid YAML (while parsing a flow sequence"),
])
def test_library_errors_are_one_line(monkeypatch, make, start):
    raising(monkeypatch, make())
    assert one_error(invoke(["synth", "out"])).startswith(start)


def test_a_bug_keeps_its_traceback(monkeypatch):
    raising(monkeypatch, ValueError("a bug"))
    res = invoke(["synth", "out"])
    assert res.exit_code == 1 and isinstance(res.exception, ValueError)  # propagates: Python prints it


@pytest.mark.parametrize("where", [["-v", "synth", "out"], ["synth", "out", "--verbose"]])
def test_verbose_shows_the_traceback_before_the_one_line(monkeypatch, where):
    raising(monkeypatch, PermissionError(errno.EACCES, "Permission denied", "/data/out"))
    res = invoke(where)
    assert res.exit_code == 1
    assert "Traceback (most recent call last)" in res.stderr and "PermissionError" in res.stderr
    assert res.stderr.strip().splitlines()[-1].startswith("error: /data/out: permission denied")


def test_ctrl_c_exits_130(monkeypatch):
    raising(monkeypatch, KeyboardInterrupt)
    line = one_error(invoke(["synth", "out"]), code=130)
    assert line == "error: interrupted; finished work is kept, re-run the same command to resume"


# -- real failures, end to end ------------------------------------------------------------------
@pytest.fixture
def captions(tmp_path):
    from PIL import Image

    Image.new("RGB", (8, 8), "red").save(tmp_path / "a.png")
    path = tmp_path / "in.jsonl"
    path.write_text(json.dumps({"id": "a", "image": "a.png", "caption": "a red square"}) + "\n")
    return path


def test_output_that_is_a_folder(tmp_path, captions):
    (tmp_path / "out").mkdir()
    line = one_error(invoke(["caption", "--from", str(captions), "-o", str(tmp_path / "out")]))
    assert line == f"error: {tmp_path / 'out'}: is a folder, but a file is written here; choose a file path"


def test_output_under_a_file(tmp_path, captions):
    line = one_error(invoke(["caption", "--from", str(captions), "-o", str(captions / "out.jsonl")]))
    assert line.startswith(f"error: {captions}") and "file" in line


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only folders")
def test_read_only_output_folder(tmp_path, captions):
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o500)
    try:
        line = one_error(invoke(["caption", "--from", str(captions), "-o", str(ro / "c.jsonl")]))
    finally:
        ro.chmod(0o700)
    assert "permission denied" in line and str(ro) in line


@pytest.mark.skipif(sys.platform != "linux", reason="file names are bytes on Linux")
def test_a_file_name_that_is_not_utf8(tmp_path):
    pytest.importorskip("torch")
    from PIL import Image

    folder = tmp_path / "imgs"
    folder.mkdir()
    Image.new("RGB", (8, 8), "red").save(os.fsencode(folder) + b"/caf\xe9.png")
    line = one_error(invoke(["-q", "embed", str(folder), "--backbone", "fake", "-o", str(tmp_path / "g.lance"),
                             "--num-workers", "0"]))
    assert "caf\\xe9" in line and "not valid UTF-8" in line


# -- usage errors: exit 2, one line --------------------------------------------------------------
@pytest.mark.parametrize("args, line", [
    (["query", "--foo"], "error: No such option: --foo (see 'cirkit query --help')"),
    (["query", "-k", "abc"], "error: Invalid value for '--k' / '-k': 'abc' is not a valid int."),
    (["synth"], "error: missing OUT (or --output)"),
    (["synth", "a", "-o", "b"], "error: --output given twice (OUT and --output); give it once"),
    (["nope"], "error: No such command 'nope'."),
    (["train", "--cross-attn-layers", "1,x"], "error: --cross-attn-layers: 'x' is not an integer"),
])
def test_usage_errors_exit_2_with_one_line(args, line):
    assert one_error(invoke(args), code=2).startswith(line)


@pytest.mark.parametrize("args, line", [
    (["query", "x.jpg", "--index", "i", "-k", "0"], "error: --k must be at least 1, got 0"),
    (["query", "--index", "i", "--nprobes", "-3"], "error: --nprobes must be at least 1, got -3"),
    (["query", "--index", "i", "--refine-factor", "0"], "error: --refine-factor must be at least 1, got 0"),
    (["query", "--index", "i", "--search", "fast"], "error: unknown --search 'fast'; choose one of auto, exact, ann"),
    (["index", "g.lance", "-o", "i", "--num-partitions", "-1"], "error: --num-partitions must be at least 1, got -1"),
    (["index", "g.lance", "-o", "i", "--num-sub-vectors", "0"], "error: --num-sub-vectors must be at least 1, got 0"),
    (["index", "g.lance", "-o", "i", "--index-type", "FLAT"], "error: unknown --index-type 'FLAT'"),
    (["embed", "x", "-o", "g.lance", "--num-workers", "-2"], "error: --num-workers must be at least 0, got -2"),
    (["embed", "x", "-o", "g.lance", "--batch-size", "0"], "error: --batch-size must be at least 1, got 0"),
    (["train", "x", "--lr", "-1"], "error: --lr must be greater than 0, got -1.0"),
    (["train", "x", "--lr", "nan"], "error: --lr must be a number, got nan"),
    (["train", "x", "--max-steps", "-5"], "error: --max-steps must be at least 1, got -5"),
    (["train", "x", "--num-workers", "-1"], "error: --num-workers must be at least 0, got -1"),
    (["train", "x", "--ema-momentum", "2"], "error: --ema-momentum must be between 0 and 1, got 2.0"),
    (["train", "x", "--lora-dropout", "1"], "error: --lora-dropout must be at least 0 and less than 1, got 1.0"),
    (["train", "x", "--scheduler", "step"], "error: unknown --scheduler 'step'; choose one of cosine, linear, constant"),
    (["caption", "x", "--top-p", "0"], "error: --top-p must be greater than 0 and at most 1, got 0.0"),
    (["caption", "x", "--temperature", "-1"], "error: --temperature must be at least 0, got -1.0"),
    (["reformulate", "x", "-n", "0"], "error: --count must be at least 1, got 0"),
    (["reformulate", "x", "--min-sim", "2"], "error: --min-sim must be between -1 and 1, got 2.0"),
    (["evaluate", "synth", "--caption-join", "both"], "error: unknown --caption-join 'both'"),
    (["synth", "o", "--max-objects", "5"], "error: --max-objects must be between 2 and 3, got 5"),
])
def test_out_of_range_settings_stop_before_any_work(tmp_path, monkeypatch, args, line):
    monkeypatch.chdir(tmp_path)  # relative outputs land here: nothing may be created
    assert one_error(invoke(args)).startswith(line)
    assert list(tmp_path.iterdir()) == []


def test_a_recipe_out_of_range_names_the_recipe(tmp_path):
    r = tmp_path / "r.yaml"
    r.write_text("query:\n  nprobes: -3\n")
    line = one_error(invoke(["query", "--index", "i", "-c", str(r)]))
    assert line == f"error: {r}: nprobes must be at least 1, got -3"


# -- output: stdout carries results only, and --json is strict JSON ------------------------------
class _Result:
    def __init__(self, skipped=()):
        self.skipped = list(skipped)

    def to_dict(self):
        return {"stage": "t", "metrics": {"loss": float("nan"), "r": [float("inf"), 1.5, -float("inf")]},
                "details": {"ids": ["caf\udce9"]}, "seconds": 0.1}

    def line(self):
        return "t: [yellow]done[/] in caf\udce9"


def _strict(text):
    def refuse(name):
        raise ValueError(f"not JSON: {name}")

    return json.loads(text, parse_constant=refuse)


def test_json_never_prints_nan_or_infinity(capsys):
    from cirkit.cli._common import emit

    emit(_Result(), True)
    out = capsys.readouterr().out
    data = _strict(out)
    assert data["metrics"] == {"loss": None, "r": [None, 1.5, None]}
    assert data["details"]["ids"] == ["caf\udce9"]  # escaped, so it survives a UTF-8 stdout


def test_summary_prints_no_markup_literally(capsys):
    from cirkit.cli._common import emit

    emit(_Result(skipped=[("a.png", "cannot decode [red]x[/]")]), False)
    err = capsys.readouterr().err
    assert "skipped a.png: cannot decode [red]x[/]" in err and "[yellow]" not in err.replace("[yellow]done[/]", "")
    assert "t: [yellow]done[/] in caf\\xe9" in err  # a result's own text is shown as is


def test_logs_go_to_stderr_so_json_stays_parseable(tmp_path):
    import subprocess

    env = {**os.environ, "COLUMNS": "80"}
    cmd = [sys.executable, "-m", "cirkit", "synth", str(tmp_path / "s"), "--train-triplets", "4", "--test-queries",
           "2", "--distractors", "0", "--image-size", "32", "--json", "-b", "1"]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    assert proc.returncode == 2  # -b is not a synth option: a usage error on stderr, nothing on stdout
    assert proc.stdout == "" and proc.stderr.startswith("error: No such option: -b")
    proc = subprocess.run(cmd[:-2], capture_output=True, text=True, env=env)
    assert proc.returncode == 0, proc.stderr
    _strict(proc.stdout)  # exactly one JSON object: nothing else on stdout
    assert proc.stdout.count("\n") == 1


def test_old_spelling_warning_goes_to_stderr_not_stdout(tmp_path):
    import subprocess

    cmd = [sys.executable, "-m", "cirkit", "reformulate", str(tmp_path / "none.jsonl"), "-b", "2", "--json"]
    proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "COLUMNS": "200"}, cwd=tmp_path)
    assert proc.stdout == ""
    assert "-b is an old spelling of --batch-size" in proc.stderr and proc.returncode == 1


@pytest.mark.parametrize("args", [["-q", "synth"], ["synth", "-q"], ["synth", "--quiet"]])
def test_global_flags_work_after_the_command_too(tmp_path, args):
    res = invoke([*args, str(tmp_path / "s"), "--train-triplets", "4", "--test-queries", "2", "--distractors", "0",
                  "--image-size", "32", "--json"])
    assert res.exit_code == 0, res.stderr
    assert json.loads(res.stdout)["stage"] == "synth"
