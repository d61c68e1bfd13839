"""`cirkit train` through the CLI (recipe, then flags) and every shipped vit recipe against TrainConfig."""

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from cirkit.cli import app
from cirkit.config import resolve
from cirkit.train.plugin import TrainConfig

RECIPES = sorted((Path(__file__).parents[2] / "recipes").glob("vit-*.yaml"))


@pytest.mark.parametrize("recipe", RECIPES, ids=lambda p: p.name)
def test_shipped_recipes_load_and_have_a_header(recipe):
    text = recipe.read_text()
    assert text.startswith("#") and "cirkit train" in text.split("train:")[0]
    cfg = resolve(TrainConfig, recipe, section="train")
    assert cfg.backbone == "vit" and cfg.max_steps > 0
    assert cfg.model in ("cirkit-tiny", "cirkit-small") or cfg.pretrained


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
    assert res.exit_code == 1 and "already holds a checkpoint" in res.output
    res = CliRunner().invoke(app, ["train", "--stage", "9", "-o", str(tmp_path / "x")])
    assert res.exit_code == 1 and "unknown --stage" in res.output
