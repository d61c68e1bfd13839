"""Test-server files: the official examples validate, and ours round-trip to the same shape."""

import json

import pytest

from cirkit.evaluate.submission import (
    circo_submission,
    cirr_submission,
    validate_circo_submission,
    validate_cirr_submission,
    write_circo_submission,
    write_cirr_submission,
)


@pytest.fixture(scope="module")
def fx(benchmark_fixtures):
    """Read a fixture file of each source present: the project's own (always) and the real upstream
    samples with the official demo/example submissions (when present; see tests/conftest.py)."""
    root = benchmark_fixtures[1]

    def load(rel):
        return json.loads((root / rel).read_text(encoding="utf-8"))

    return load


@pytest.mark.parametrize("metric", ["recall", "recall_subset"])
def test_cirr_official_demo_round_trips(fx, tmp_path, metric):
    demo = fx(f"cirr/demo_files/test1_pred_ranks_{metric}.json")
    pairids = [str(r["pairid"]) for r in fx("cirr/captions/cap.rc2.test1.json")]
    assert validate_cirr_submission(demo, metric, pairids=pairids) == []
    ranked = {k: v for k, v in demo.items() if k not in ("version", "metric")}
    ours = cirr_submission(ranked, metric)
    assert ours == demo
    full = {k: v for k, v in fx("cirr/demo_files/test1_pred_ranks_recall.json").items() if k.isdigit()}
    subset = {k: v for k, v in fx("cirr/demo_files/test1_pred_ranks_recall_subset.json").items() if k.isdigit()}
    paths = write_cirr_submission(tmp_path, "test1", full, subset)
    assert [p.name for p in paths] == ["test1_pred_ranks_recall.json", "test1_pred_ranks_recall_subset.json"]
    back = json.loads(paths[0 if metric == "recall" else 1].read_text())
    assert back.keys() == demo.keys()
    assert back["version"] == demo["version"] == "rc2" and back["metric"] == demo["metric"] == metric
    for k in pairids:
        assert len(back[k]) == len(demo[k]) == (50 if metric == "recall" else 3)
        assert all(isinstance(x, str) for x in back[k])


def test_cirr_validator_catches_mistakes(fx):
    demo = fx("cirr/demo_files/test1_pred_ranks_recall.json")
    assert validate_cirr_submission({**demo, "version": "rc1"})
    assert validate_cirr_submission({**demo, "metric": "recall_subset"}, "recall")
    first = next(k for k in demo if k.isdigit())
    assert validate_cirr_submission({**demo, first: demo[first][:10]})
    assert validate_cirr_submission({**demo, first: [1] * 50})
    assert validate_cirr_submission(demo, pairids=[*list(demo)[2:], "99999999"])
    assert cirr_submission({"1": [f"n{i}" for i in range(80)]}, "recall")["1"] == [f"n{i}" for i in range(50)]


@pytest.mark.parametrize("split", ["val", "test"])
def test_circo_official_example_round_trips(fx, tmp_path, split):
    example = fx(f"circo/submission_examples/submission_{split}.json")
    n = len(fx(f"circo/annotations/{split}.json"))
    assert validate_circo_submission(example, num_queries=n) == []
    ranked = {k: [str(x) for x in v] for k, v in example.items()}  # cirkit ids are strings
    assert circo_submission(ranked) == example
    path = write_circo_submission(tmp_path / "sub.json", dict(reversed(list(ranked.items()))))
    back = json.loads(path.read_text())
    assert list(back) == list(example)
    assert all(len(v) == 50 and all(type(x) is int for x in v) for v in back.values())


def test_circo_validator_catches_mistakes(fx):
    ex = fx("circo/submission_examples/submission_val.json")
    assert validate_circo_submission({k: v for k, v in ex.items() if k != "3"})  # ids not 0..N-1
    assert validate_circo_submission({**ex, "0": ex["0"][:49]})
    assert validate_circo_submission({**ex, "0": [str(x) for x in ex["0"]]})
    assert validate_circo_submission(ex, num_queries=220)


# -- written atomically, under a lock; a killed write leaves a temp the next write removes -----------
SLOW_WRITER = """
import json, sys, time
from cirkit.evaluate.submission import write_circo_submission

def stuck(obj, fh, **kw):  # write part of the file, then hang until killed
    fh.write('{"0": [' + ", ".join(["1"] * 100_000))
    fh.flush()
    print("writing", flush=True)
    time.sleep(120)

json.dump = stuck
write_circo_submission(sys.argv[1], {"0": [str(i) for i in range(50)]})
"""


def test_a_killed_submission_write_keeps_the_old_file_and_its_temp_is_removed_next_time(tmp_path):
    import os
    import signal
    import subprocess
    import sys

    from cirkit.io.lock import OutputBusy

    path = tmp_path / "sub" / "circo-test-submission.json"
    write_circo_submission(path, {"0": [str(i) for i in range(50)]})
    before = path.read_bytes()
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    proc = subprocess.Popen([sys.executable, "-c", SLOW_WRITER, str(path)], stdout=subprocess.PIPE, text=True, env=env)
    try:
        assert proc.stdout.readline().strip() == "writing"
        temps = list(path.parent.glob(".circo-test-submission.json.cirkit-tmp-*"))
        assert len(temps) == 1 and f"-{proc.pid}-" in temps[0].name and temps[0].stat().st_size > 100_000
        with pytest.raises(OutputBusy, match=rf"another cirkit run is writing this submission file \(pid {proc.pid} "):
            write_circo_submission(path, {"0": [str(i) for i in range(50)]})
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    assert path.read_bytes() == before  # the complete old file, never a half one
    assert temps[0].exists()  # what SIGKILL leaves ...
    write_circo_submission(path, {"0": [str(i) for i in range(1, 51)]})
    assert not temps[0].exists()  # ... the next write removes, its owner being dead
    assert json.loads(path.read_text()) == {"0": list(range(1, 51))}
    # the dead writer's lock file goes with the next writer's (holders remove it when done)
    assert sorted(p.name for p in path.parent.iterdir()) == ["circo-test-submission.json"]


def test_cirr_files_are_written_under_their_locks(tmp_path):
    from cirkit.io.lock import OutputBusy, output_lock

    ranked = {"1": [f"n{i}" for i in range(50)]}
    subset = {"1": ["n1", "n2", "n3"]}
    with output_lock(tmp_path / "test1_pred_ranks_recall_subset.json"):
        pass  # a lock that was released is free again
    paths = write_cirr_submission(tmp_path, "test1", ranked, subset)
    assert [json.loads(p.read_text())["metric"] for p in paths] == ["recall", "recall_subset"]
    with output_lock(paths[0]), pytest.raises(OutputBusy, match="test1_pred_ranks_recall.json: another"):
        write_cirr_submission(tmp_path, "test1", ranked, subset)


def test_circo_ids_that_are_not_numbers_are_one_line():
    from cirkit.errors import CirkitError

    with pytest.raises(CirkitError, match=r"image id \(query 0\) '000000123.jpg' is not a number"):
        circo_submission({"0": ["000000123.jpg"]})
    with pytest.raises(CirkitError, match="query id 'q1' is not a number"):
        circo_submission({"q1": ["1"]})
