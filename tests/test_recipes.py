"""Every shipped recipe resolves against its command's config and says how to run and override it.

One parametrised test over ``recipes/*.yaml`` (torchtune's ``tests/recipes/test_configs.py``
habit): the recipe's one top-level section names the command, ``SECTIONS`` maps the command to
its ``Config`` class, and ``cirkit.config.resolve`` builds it the way the CLI does. A recipe
whose section is not in ``SECTIONS`` fails here rather than going unchecked.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib
import re
from pathlib import Path

import pytest
import yaml

RECIPES = Path(__file__).resolve().parents[1] / "recipes"
ALL = sorted(RECIPES.glob("*.yaml"))

# recipe section (= the cirkit command that reads it with -c) -> its config class, imported lazily
# so that collecting this file stays torch-free
SECTIONS = {
    "synth": "cirkit.synth:SynthConfig",
    "caption": "cirkit.caption:CaptionConfig",
    "reformulate": "cirkit.reformulate:ReformulateConfig",
    "train": "cirkit.train.config:TrainConfig",
    "embed": "cirkit.embed:EmbedConfig",
    "index": "cirkit.index:IndexConfig",
    "query": "cirkit.query:QueryConfig",
    "evaluate": "cirkit.evaluate:EvaluateConfig",
}
# what the command line adds to a recipe: the positional input a run always names, and for
# evaluate a flag that must beat the recipe's own batch_size
FLAGS = {"caption": {"images": "photos"}, "reformulate": {"captions": "c.jsonl"}, "evaluate": {"batch_size": 8}}


def config_class(section: str):
    module, name = SECTIONS[section].split(":")
    return getattr(importlib.import_module(module), name)


def section_of(recipe: Path) -> str:
    """The recipe's command; fails naming the recipe when it cannot be mapped to a config."""
    data = yaml.safe_load(recipe.read_text(encoding="utf-8"))
    keys = list(data) if isinstance(data, dict) else []
    if len(keys) != 1 or keys[0] not in SECTIONS or not isinstance(data[keys[0]], dict):
        pytest.fail(f"{recipe.name}: a recipe is one top-level section naming its command "
                    f"({', '.join(SECTIONS)}), got {keys or type(data).__name__}; add it to SECTIONS "
                    "in tests/test_recipes.py if it is a new command")
    return keys[0]


def header_of(recipe: Path) -> list[str]:
    """The comment block the recipe opens with."""
    lines = recipe.read_text(encoding="utf-8").splitlines()
    return lines[: next((i for i, line in enumerate(lines) if not line.startswith("#")), len(lines))]


@functools.cache
def command_options(command: str) -> frozenset[str]:
    """Every flag spelling of ``cirkit <command>`` (long, short and --no- forms), from the Typer app."""
    from cirkit.cli._common import click_command

    cmd = click_command(command)  # the full command (the app registers light stubs for --help speed)
    return frozenset(o for p in cmd.params for o in (*p.opts, *getattr(p, "secondary_opts", ())))


FLAG = re.compile(r"(?<![\w-])(--?[a-zA-Z][\w-]*)")


def check_header(recipe: Path, section: str) -> None:
    header = header_of(recipe)
    text = "\n".join(header)
    assert header, f"{recipe.name}: starts with a comment header"
    # how to run it: a `cirkit <command> ... -c recipes/<this file>` line
    run = [line for line in header if f"cirkit {section}" in line and f"-c recipes/{recipe.name}" in line]
    assert "Run" in text and run, f"{recipe.name}: the header shows `cirkit {section} ... -c recipes/{recipe.name}`"
    # how to override it: an "Override" line (or its continuation) naming flags
    at = next((i for i, line in enumerate(header) if "override" in line.lower()), None)
    assert at is not None, f"{recipe.name}: the header says how to override it with flags"
    override = [header[at]] + [line for line in header[at + 1: at + 3] if re.match(r"#\s{4,}", line)]
    assert FLAG.search(" ".join(override)), f"{recipe.name}: the Override line names a flag"
    # and every flag it shows for a cirkit command is one that command has
    for line in header:
        for cmd, args in re.findall(r"\bcirkit (\w+)((?:(?!\bcirkit |&&|\|).)*)", line):
            known = command_options(cmd)
            assert not [f for f in FLAG.findall(args) if f not in known], f"{recipe.name}: {line.strip()}"
    known = command_options(section)
    for line in override:
        assert not [f for f in FLAG.findall(line) if f not in known], f"{recipe.name}: {line.strip()}"


@pytest.mark.parametrize("recipe", ALL, ids=lambda p: p.name)
def test_shipped_recipe(recipe):
    from cirkit.config import resolve

    section = section_of(recipe)
    check_header(recipe, section)
    cfg = resolve(config_class(section), recipe, FLAGS.get(section), section=section)
    CHECKS.get(section, lambda recipe, cfg: None)(recipe, cfg)


def _train(recipe, cfg):
    assert recipe.name.startswith(f"{cfg.backbone}-"), "train recipes are named after their backbone"
    if cfg.backbone == "vit":
        assert cfg.max_steps > 0
        assert cfg.model in ("cirkit-tiny", "cirkit-small") or cfg.pretrained
    elif cfg.backbone == "reformulator":  # triplets (caption A, caption B -> edit), LoRA only
        assert str(cfg.stage) == "2" and not cfg.full_finetune and not cfg.init and cfg.epochs
    else:
        from cirkit.backbones.mllm import DEFAULT_TEMPLATES

        assert cfg.backbone == "mllm" and str(cfg.stage) in ("1", "2")
        if cfg.templates:  # templates are validated when the model is built; check slots here
            for key, slot in (("image", "<image>"), ("composed", "<instruction>"), ("text", "<sent>")):
                assert slot in {**DEFAULT_TEMPLATES, **cfg.templates}[key]


def _evaluate(recipe, cfg):
    assert "Run:" in "\n".join(header_of(recipe))
    assert cfg.benchmark in ("fashioniq", "cirr", "circo", "genecis", "generic", "synth")
    assert cfg.batch_size == 8 and cfg.modes  # the flag beats the recipe
    assert recipe.name == f"eval-{cfg.benchmark}.yaml"


def _caption(recipe, cfg):
    assert recipe.name.startswith("caption-") and cfg.model


def _reformulate(recipe, cfg):
    assert recipe.name.startswith("reformulate-")
    cfg.validate()


def _index(recipe, cfg):
    from cirkit.index import INDEX_TYPES
    from cirkit.io.atomic import check_name

    assert recipe.name.startswith("index-") and cfg.index_type in INDEX_TYPES
    check_name(cfg.table, "table")  # a table name becomes a folder: no separators or ".."
    if recipe.name.endswith("-ann.yaml"):
        assert cfg.ann is True


CHECKS = {"train": _train, "evaluate": _evaluate, "caption": _caption, "reformulate": _reformulate,
          "index": _index}


def test_every_recipe_section_is_a_command_with_a_config():
    from typer.main import get_command

    from cirkit.cli import app

    commands = set(get_command(app).commands)
    for section in SECTIONS:
        assert section in commands
        assert dataclasses.is_dataclass(config_class(section))
    assert ALL and set(CHECKS) <= set(SECTIONS)


@pytest.mark.parametrize("text", [
    "serve:\n  port: 8080\n",  # a command that does not exist
    "model: cirkit-tiny\nmax_steps: 3\n",  # flat settings: which command?
    "train:\n  model: a\nevaluate:\n  model: b\n",  # two commands in one file
    "train: cirkit-tiny\n",  # a section that is not a mapping
])
def test_a_recipe_that_cannot_be_mapped_fails(tmp_path, text):
    recipe = tmp_path / "odd.yaml"
    recipe.write_text("# Run: cirkit train x -c recipes/odd.yaml\n" + text)
    with pytest.raises(pytest.fail.Exception, match="odd.yaml: a recipe is one top-level section"):
        section_of(recipe)


def test_a_header_with_a_stale_flag_fails(tmp_path):
    recipe = tmp_path / "vit-x.yaml"
    good = ("# Run:       cirkit train data.jsonl -c recipes/vit-x.yaml -o runs/x\n"
            "# Override:  --max-steps 10\ntrain:\n  model: cirkit-tiny\n")
    recipe.write_text(good)
    check_header(recipe, "train")
    for bad, why in [
        (good.replace("--max-steps", "--max-step"), "Override"),  # not a train flag
        (good.replace("-o runs/x", "--out runs/x"), "Run"),  # not a train flag either
        (good.replace("-c recipes/vit-x.yaml", "-c recipes/other.yaml"), "shows"),  # runs another recipe
        (good.replace("# Override:  --max-steps 10\n", ""), "override"),
    ]:
        recipe.write_text(bad)
        with pytest.raises(AssertionError, match=why):
            check_header(recipe, "train")
