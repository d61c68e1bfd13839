"""Settings resolve defaults -> recipe -> flags, and recipe mistakes name the file and key."""

from dataclasses import dataclass
from pathlib import Path

import pytest

from cirkit.config import resolve, to_jsonable
from cirkit.errors import CirkitError


@dataclass
class Cfg:
    lr: float = 0.1
    steps: int = 10
    out: Path = Path("x")
    name: str = "a"


def test_precedence(tmp_path):
    r = tmp_path / "r.yaml"
    r.write_text("# header\ntrain:\n  lr: 1\n  steps: 5\n  out: runs/y\n")
    c = resolve(Cfg, r, {"steps": 7, "name": None}, section="train")
    assert (c.lr, c.steps, c.out, c.name) == (1.0, 7, Path("runs/y"), "a")
    assert to_jsonable(c)["out"] == "runs/y"


def test_unknown_key_is_named(tmp_path):
    r = tmp_path / "r.yaml"
    r.write_text("learning-rate: 3\n")
    with pytest.raises(CirkitError, match=r"r.yaml: unknown setting 'learning-rate'"):
        resolve(Cfg, r)


def test_wrong_type_is_named(tmp_path):
    r = tmp_path / "r.yaml"
    r.write_text("steps: many\n")
    with pytest.raises(CirkitError, match=r"setting 'steps' expects int"):
        resolve(Cfg, r)


def test_missing_recipe(tmp_path):
    with pytest.raises(CirkitError, match="recipe not found"):
        resolve(Cfg, tmp_path / "none.yaml")


@dataclass
class ListCfg:
    modes: list[str] | None = None
    layers: list[int] = None  # type: ignore[assignment]


def test_list_settings_pass_through(tmp_path):
    r = tmp_path / "r.yaml"
    r.write_text("modes: [image, text]\nlayers: [0, 2]\n")
    c = resolve(ListCfg, r)
    assert c.modes == ["image", "text"] and c.layers == [0, 2]
