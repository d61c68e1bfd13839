"""The examples in examples/ run as documented."""

import importlib.util
import json
from pathlib import Path

from typer.testing import CliRunner

from cirkit.cli import app

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def test_python_api_example(tmp_path):
    spec = importlib.util.spec_from_file_location("python_api", EXAMPLES / "python_api.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    out = mod.main(tmp_path)
    assert "blue_circle" in out["hits"][:2] and "red_circle" not in out["hits"]
    assert out["metrics"]["composed/test/R@5"] == 100.0


def test_generic_benchmark_batch_query(tmp_path):
    bench = EXAMPLES / "generic_benchmark"
    runner = CliRunner()
    assert runner.invoke(app, ["embed", str(bench / "gallery.jsonl"), "--backbone", "fake", "-o",
                               str(tmp_path / "g.lance"), "--num-workers", "0"]).exit_code == 0
    assert runner.invoke(app, ["index", str(tmp_path / "g.lance"), "-o", str(tmp_path / "idx")]).exit_code == 0
    res = runner.invoke(app, ["query", "--batch", str(bench / "queries.jsonl"), "--index", str(tmp_path / "idx"),
                              "-o", str(tmp_path / "results.jsonl"), "-k", "3"])
    assert res.exit_code == 0, res.output
    results = [json.loads(line) for line in (tmp_path / "results.jsonl").read_text().splitlines()]
    queries = [json.loads(line) for line in (bench / "queries.jsonl").read_text().splitlines()]
    assert [r["id"] for r in results] == [q["id"] for q in queries]
    # the fake backbone swaps in the named colour: each target is among the top 3
    assert all(q["targets"][0] in [h["id"] for h in r["hits"]] for q, r in zip(queries, results, strict=True))
