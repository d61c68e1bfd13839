"""``evaluate`` on the generic and synth formats, from Python and through the CLI."""

import json

import pytest
from typer.testing import CliRunner

from cirkit.cli import app
from cirkit.errors import CirkitError
from cirkit.evaluate import EvaluateConfig, run

COLOURS = {"red": (255, 0, 0), "green": (0, 255, 0), "blue": (0, 0, 255), "yellow": (255, 255, 0),
           "purple": (128, 0, 128), "black": (0, 0, 0)}


def _png(path, rgb):
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (8, 8), rgb).save(path)


def _write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


@pytest.fixture
def generic(tmp_path):
    """Five solid squares; three queries whose text names the target's colour."""
    d = tmp_path / "bench"
    for name, rgb in COLOURS.items():
        if name != "black":
            _png(d / "images" / f"{name}.png", rgb)
    _write_jsonl(d / "gallery.jsonl", [{"id": n, "image": f"images/{n}.png"} for n in COLOURS if n != "black"])
    _write_jsonl(d / "queries.jsonl", [
        {"id": "q1", "reference": "images/blue.png", "text": "make it red", "targets": ["red"]},
        {"id": "q2", "reference": "images/red.png", "text": "now green please", "targets": ["green"]},
        {"id": "q3", "reference": "images/yellow.png", "text": "turn it blue", "targets": ["blue"]},
    ])
    return d


def _run(data, **kw):
    kw.setdefault("backbone", "fake")
    kw.setdefault("num_workers", 0)
    return run(EvaluateConfig(data=data, **kw))


def test_generic_exact_values_per_mode(generic):
    res = _run(generic, mode=["composed", "image", "text", "sum"])
    m = res.metrics
    assert m["benchmark"] == "generic" and m["splits"] == ["test"]
    assert m["composed/test/R@1"] == 100.0  # the text names the target's colour
    assert m["text/test/R@1"] == 100.0
    assert m["image/test/R@1"] == 0.0  # the reference itself (kept in the gallery) ranks first
    assert m["image/test/R@5"] == 100.0 and "sum/test/R@1" in m
    assert m["primary_metric"] == "composed/test/R@1"
    assert m["protocol/exclude_reference"] is False
    assert res.counts == {"queries": 3, "gallery_images": 5, "modes": 4}
    assert [r["mode"] for r in res.details["rows"]] == ["composed", "image", "text", "sum"]


def test_submission_rankings_one_folder_per_mode(generic, tmp_path):
    _run(generic, mode=["composed", "text"], submission=tmp_path / "sub")
    for mode in ("composed", "text"):
        rows = [json.loads(x) for x in (tmp_path / "sub" / mode / "generic-test-rankings.jsonl").read_text().splitlines()]
        assert [r["id"] for r in rows] == ["q1", "q2", "q3"]
        assert [h["rank"] for h in rows[0]["hits"]] == [1, 2, 3, 4, 5]
    assert [h["id"] for h in rows[0]["hits"]][0] == "red"  # text mode, "make it red"


def test_generic_exclude_reference_by_path(generic):
    (generic / "meta.json").write_text(json.dumps({"exclude_reference": True, "split": "dev"}))
    m = _run(generic, mode=["image"]).metrics
    assert m["protocol/exclude_reference"] is True and "image/dev/R@1" in m
    assert m["image/dev/R@1"] < 100.0 and m["image/dev/R@5"] == 100.0
    # the flag wins over meta.json
    assert _run(generic, mode=["image"], exclude_reference=False).metrics["image/dev/R@1"] == 0.0


def test_generic_candidates_are_pessimistic_and_subsets_scored(tmp_path):
    d = tmp_path / "b"
    for n in ("a", "b", "c"):
        _png(d / f"{n}.png", (0, 0, 0))  # all-black: the fake backbone embeds zeros, every score ties
    _write_jsonl(d / "gallery.jsonl", [{"id": n, "image": f"{n}.png"} for n in "abc"])
    _write_jsonl(d / "queries.jsonl", [
        {"id": "q", "reference": "a.png", "text": "x", "targets": ["a"], "candidates": ["a", "b", "c"]},
    ])
    m = _run(d).metrics
    assert (m["composed/test/R@1"], m["composed/test/R@2"], m["composed/test/R@3"]) == (0.0, 0.0, 100.0)
    _write_jsonl(d / "queries.jsonl", [
        {"id": "q", "reference": "a.png", "text": "x", "targets": ["c", "b"], "subset": ["b", "c"]},
    ])
    m = _run(d).metrics
    # ties follow gallery order: a, b, c; subset b, c; several targets add mAP
    assert m["composed/test/R@1"] == 0.0 and m["composed/test/R@5"] == 100.0
    assert m["composed/test/Rs@1"] == 100.0
    assert m["composed/test/mAP@5"] == pytest.approx(100 * (1 / 2 + 2 / 3) / 2)


def test_generic_errors_name_file_and_line(generic):
    _write_jsonl(generic / "queries.jsonl", [{"id": "q1", "reference": "images/blue.png", "targets": ["nope"]}])
    with pytest.raises(CirkitError, match=r"queries.jsonl:1: field 'targets'"):
        _run(generic)
    with pytest.raises(CirkitError, match="--data"):
        run(EvaluateConfig(backbone="fake"))
    with pytest.raises(CirkitError, match="query mode"):
        EvaluateConfig(data=generic, mode=["fusion"])


def test_unreadable_reference_is_skipped_or_fatal_with_strict(generic):
    (generic / "images" / "yellow.png").write_bytes(b"not a png")
    res = _run(generic)
    assert res.metrics["count/test/queries"] == 2
    assert {item for item, _ in res.skipped} >= {"q3"}
    with pytest.raises(CirkitError):
        _run(generic, strict=True)


def test_cli_on_synth_benchmark(synth_dir, tmp_path):
    out = tmp_path / "metrics.json"
    r = CliRunner().invoke(app, [
        "evaluate", "synth", "--data", str(synth_dir / "benchmark"), "-b", "fake", "--mode", "composed",
        "--mode", "image", "--num-workers", "0", "-o", str(out), "--json",
    ])
    assert r.exit_code == 0, r.output
    summary = json.loads(r.stdout.strip().splitlines()[-1])
    assert summary["stage"] == "evaluate" and summary["outputs"]["metrics"] == str(out)
    m = json.loads(out.read_text())
    assert m["splits"] == ["test", "compositional"] and m["modes"] == ["composed", "image"]
    for mode in ("composed", "image"):
        for split in ("test", "compositional"):
            for k in (1, 5, 10, 50):
                assert 0.0 <= m[f"{mode}/{split}/R@{k}"] <= 100.0
    # synth keeps the unedited reference in the gallery: image-only retrieval returns it first
    assert m["image/test/R@1"] == 0.0 and m["image/compositional/R@1"] == 0.0
    assert m["primary_metric"] == "composed/test/R@1" and m["backbone"] == "fake"
    assert all(isinstance(v, (int, float, str, bool, type(None), list)) for v in m.values())  # flat
    # the synth OUT folder itself is accepted too, and --split picks one split
    r = CliRunner().invoke(app, ["evaluate", "-d", str(synth_dir), "-b", "fake", "--split", "compositional",
                                 "--num-workers", "0", "--json"])
    assert r.exit_code == 0, r.output
    assert set(json.loads(r.stdout.strip().splitlines()[-1])["metrics"]["splits"]) == {"compositional"}


def test_cli_user_errors_are_one_line(tmp_path):
    r = CliRunner().invoke(app, ["evaluate", "cirr", "--data", str(tmp_path / "missing"), "-b", "fake"])
    assert r.exit_code == 1 and "no such folder" in r.output
    r = CliRunner().invoke(app, ["evaluate", "-d", str(tmp_path), "-b", "fake"])
    assert r.exit_code == 1 and "cannot tell which benchmark" in r.output


def test_every_metric_gets_a_seeded_95_percent_bootstrap_interval(synth_dir, tmp_path):
    """--bootstrap N (on by default): '<key>/ci95' = [lo, hi] beside every split and task metric."""
    out = tmp_path / "metrics.json"
    r = CliRunner().invoke(app, ["evaluate", "synth", "--data", str(synth_dir / "benchmark"), "-b", "fake",
                                 "--num-workers", "0", "--bootstrap", "200", "--bootstrap-seed", "3", "-o", str(out)])
    assert r.exit_code == 0, r.output
    m = json.loads(out.read_text())
    values = [k for k, v in m.items() if k.startswith("composed/") and isinstance(v, float)]
    assert values and m["bootstrap/samples"] == 200 and m["bootstrap/seed"] == 3
    for k in values:
        lo, hi = m[f"{k}/ci95"]
        assert 0.0 <= lo <= m[k] <= hi <= 100.0, k
    assert " [" in r.stderr and "95 % bootstrap interval" in r.stderr  # the table shows them
    again = _run(synth_dir / "benchmark", bootstrap=200, bootstrap_seed=3).metrics
    assert {k: again[k] for k in m if k.endswith("/ci95")} == {k: m[k] for k in m if k.endswith("/ci95")}
    off = _run(synth_dir / "benchmark", bootstrap=0).metrics
    assert not [k for k in off if k.endswith("/ci95") or k.startswith("bootstrap/")]
    assert {k: off[k] for k in values} == {k: m[k] for k in values}  # the estimates do not change


def test_task_intervals_and_a_summary_of_several_metrics(benchmark_fixtures, tmp_path):
    """FashionIQ: per-category intervals and one for the average of R@10 and R@50 over categories."""
    import colorsys

    root = benchmark_fixtures[1] / "fashioniq"
    names = set()
    for cat in ("dress", "shirt", "toptee"):
        names.update(json.loads((root / "image_splits" / f"split.{cat}.val.json").read_text()))
    for i, n in enumerate(sorted(names)):
        rgb = tuple(int(255 * c) for c in colorsys.hsv_to_rgb(i / len(names), 1.0, 1.0))
        _png(tmp_path / "images" / f"{n}.png", rgb)
    m = run(EvaluateConfig(benchmark="fashioniq", data=root, images=tmp_path, backbone="fake", num_workers=0,
                           mode=["image"], bootstrap=300)).metrics
    for key in ("image/val/avg", "image/val/R@10", "image/val/dress/R@10", "image/val/toptee/R@50"):
        lo, hi = m[f"{key}/ci95"]
        assert lo <= m[key] <= hi, key
