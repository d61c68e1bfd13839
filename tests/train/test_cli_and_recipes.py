"""`cirkit train` through the CLI (recipe, then flags); the shipped recipes are checked in tests/test_recipes.py."""

import json

from typer.testing import CliRunner

from cirkit.cli import app


def test_cli_recipe_then_flags(synth_dir, tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("# test\ntrain:\n  model: cirkit-tiny\n  max_steps: 5\n  batch_size: 4\n  num_workers: 0\n"
                      "  save_every: 0\n  log_every: 1\n  cross_attn_layers: [1]\n")
    out = tmp_path / "s1"
    res = CliRunner().invoke(app, ["train", str(synth_dir / "captions.jsonl"), "--stage", "1", "-c", str(recipe),
                                   "-o", str(out), "--max-steps", "2", "--json"])
    assert res.exit_code == 0, res.output
    summary = json.loads(res.stdout.strip().splitlines()[-1])
    assert summary["counts"]["steps"] == 2  # the flag beats the recipe
    args = json.loads((out / "train_args.json").read_text())
    assert args["batch_size"] == 4 and args["cross_attn_layers"] == [1] and args["stage"] == "1"
    res = CliRunner().invoke(app, ["train", str(synth_dir / "captions.jsonl"), "--stage", "1", "-o", str(out)])
    assert res.exit_code == 1 and "already holds a finished run of 2 steps with other settings" in res.output
    res = CliRunner().invoke(app, ["train", "--stage", "9", "-o", str(tmp_path / "x")])
    assert res.exit_code == 1 and "unknown --stage" in res.output
