"""Settings resolve as: dataclass defaults, then a recipe YAML, then explicit CLI flags."""

from __future__ import annotations

import dataclasses
import types
import typing
from pathlib import Path
from typing import Any, TypeVar

from cirkit.errors import CirkitError

C = TypeVar("C")


def load_recipe(path: str | Path, section: str | None = None) -> dict[str, Any]:
    """Read a recipe YAML; if it has a top-level ``section`` mapping (e.g. ``train:``), use that."""
    import yaml

    path = Path(path)
    if not path.exists():
        raise CirkitError(f"{path}: recipe not found")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as e:
        raise CirkitError(f"{path}: invalid YAML ({e})") from None
    if not isinstance(data, dict):
        raise CirkitError(f"{path}: a recipe must be a mapping of setting: value")
    if section and isinstance(data.get(section), dict):
        data = data[section]
    return data


def resolve(cls: type[C], recipe: str | Path | None = None, flags: dict[str, Any] | None = None,
            section: str | None = None) -> C:
    """Build a ``cls`` config from defaults, a recipe file and flags (flags set to None are unset)."""
    names = {f.name: f for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    values: dict[str, Any] = {}
    if recipe is not None:
        data = load_recipe(recipe, section)
        for key, value in data.items():
            name = key.replace("-", "_")
            if name not in names:
                known = ", ".join(sorted(n.replace("_", "-") for n in names))
                raise CirkitError(f"{recipe}: unknown setting {key!r} (known: {known})")
            values[name] = value
    for key, value in (flags or {}).items():
        if value is not None:
            values[key] = value
    hints = typing.get_type_hints(cls)
    for name, value in list(values.items()):
        values[name] = _coerce(value, hints.get(name), name, recipe)
    try:
        return cls(**values)
    except TypeError as e:
        raise CirkitError(f"{recipe or 'flags'}: {e}") from None


def _coerce(value: Any, tp: Any, name: str, source: Any) -> Any:
    """Turn YAML/CLI values into the field's type where it is unambiguous (paths, tuples)."""
    base = tp
    if typing.get_origin(tp) in (typing.Union, types.UnionType):  # Optional[X] -> X
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        base = args[0] if len(args) == 1 else tp
    if value is None:
        return None
    if base is Path:
        return Path(value)
    if base is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if base is int and isinstance(value, float) and value.is_integer():
        return int(value)
    if base in (int, float, str, bool) and not isinstance(value, base):
        raise CirkitError(f"{source or 'flags'}: setting {name!r} expects {base.__name__}, got {value!r}")
    return value


def to_jsonable(config: Any) -> dict[str, Any]:
    """A config as plain JSON types (paths as strings) for train_args.json / metrics.json."""
    out = {}
    for f in dataclasses.fields(config):
        v = getattr(config, f.name)
        if isinstance(v, Path):
            v = str(v)
        elif isinstance(v, tuple):
            v = list(v)
        out[f.name] = v
    return out
