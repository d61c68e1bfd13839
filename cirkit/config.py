"""Settings: each one is declared once, as a field of its stage's config dataclass.

A field made with :func:`setting` carries everything else there is to know about it: its
default, its help text, whether it changes the result (``resume=True``: ``train --resume``
compares exactly those), its valid range or choices, and how the CLI spells it (flag, short
flag, positional, help panel, hidden old spellings). The CLI (:mod:`cirkit.cli._common`) builds
each command's options from these fields, so a new field appears in ``--help`` with its default
and in recipes with no other edit; ``tests/test_cli_help.py`` and ``tests/test_config.py`` check
that this holds.

Settings resolve as: dataclass defaults, then a recipe YAML, then explicit CLI flags.
This module stays free of heavy imports: the CLI reads it to build ``--help``.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import reprlib
import types
import typing
from dataclasses import MISSING, dataclass
from pathlib import Path
from typing import Any, TypeVar

from cirkit.errors import CirkitError

C = TypeVar("C")
log = logging.getLogger("cirkit")

META = "cirkit"
# A recipe is a short, hand-written file: anything bigger, or a YAML document whose aliases
# expand to more values than this, is refused before it is built (an alias "bomb" of 600 bytes
# expands to hundreds of millions of values).
MAX_RECIPE_BYTES = 1_000_000
MAX_RECIPE_VALUES = 100_000
# No count, size or seed cirkit takes is larger: a bigger integer is a typo, and past 2**63 it
# would overflow inside torch, NumPy or Lance with a traceback instead of this one line.
MAX_INT = 2**31 - 1


class UsageError(CirkitError):
    """The command line itself is wrong (a required value missing, a value given twice): exit 2."""

    exit_code = 2


@dataclass(frozen=True)
class Setting:
    """What a config field means: see :func:`setting`."""

    help: str
    resume: bool = False
    ge: float | None = None
    gt: float | None = None
    le: float | None = None
    lt: float | None = None
    choices: tuple[str, ...] | None = None
    flag: str | None = None
    short: str | None = None
    aliases: tuple[str, ...] = ()
    positional: bool = False
    metavar: str | None = None
    panel: str | None = None
    cli: bool = True
    show_default: str | None = None
    cap: int | None = None
    stdio: str | None = None
    location: bool = False  # a text setting naming a path or a URI (so '-' is checked like a path's)


STDIO = "-"  # the path that means standard input (an input setting) or standard output (an output setting)
STDIO_NOTE = {"in": "'-' reads standard input.", "out": "'-' streams records to standard output."}


def setting(default: Any = MISSING, *, help: str, resume: bool = False, ge: float | None = None,
            gt: float | None = None, le: float | None = None, lt: float | None = None,
            choices: tuple[str, ...] | None = None, flag: str | None = None, short: str | None = None,
            aliases: tuple[str, ...] = (), positional: bool = False, metavar: str | None = None,
            panel: str | None = None, cli: bool = True, show_default: str | None = None,
            cap: int | None = None, stdio: str | None = None, location: bool = False) -> Any:
    """A config field with its help, range and CLI spelling (a ``dataclasses.field``).

    ``resume``: the setting changes the trained result, so ``--resume`` needs the same value.
    ``ge``/``gt``/``le``/``lt``/``choices``: checked before any work starts (numbers; lists per item).
    ``flag``: the option's spelling when it is not ``--<field-name>``; ``"--on/--off"`` for a
    boolean pair (a boolean without one is a plain switch, or ``--x/--no-x`` when it defaults on).
    ``short``: ``-x``. ``aliases``: old spellings, hidden and accepted with a warning for one
    release (also as recipe keys). ``positional``: an argument (with ``flag`` also an option).
    ``panel``: the ``--help`` section. ``cli=False``: recipe and Python only (listed under
    ``--help``). ``show_default``: what the "(default X)" says when the value alone does not.
    ``cap``: a sanity bound on an integer, beyond any real use (default :data:`MAX_INT`), so a
    typo such as ``--num-workers 100000`` stops in one line instead of hanging the machine.
    """
    meta = {META: Setting(help=help, resume=resume, ge=ge, gt=gt, le=le, lt=lt,
                          choices=tuple(choices) if choices is not None else None, flag=flag, short=short,
                          aliases=tuple(aliases), positional=positional, metavar=metavar, panel=panel, cli=cli,
                          show_default=show_default, cap=cap, stdio=stdio,
                          location=location)}
    if isinstance(default, (list, dict, set)):
        value = default
        return dataclasses.field(default_factory=lambda: type(value)(value), metadata=meta)
    return dataclasses.field(default=default, metadata=meta)


def spec(f: dataclasses.Field) -> Setting:
    """The :class:`Setting` of a field (a bare field counts as recipe-only with no help)."""
    return f.metadata.get(META) or Setting(help="", cli=False)


def default_of(f: dataclasses.Field) -> Any:
    """The field's default value (``MISSING`` for a required field)."""
    if f.default is not MISSING:
        return f.default
    if f.default_factory is not MISSING:
        return f.default_factory()
    return MISSING


def resume_keys(cls: type) -> tuple[str, ...]:
    """Names of the settings marked ``resume=True``: those an exact resume must not change."""
    return tuple(f.name for f in dataclasses.fields(cls) if spec(f).resume)


def flag_name(f: dataclasses.Field) -> str:
    """How a person refers to a field on the command line: ``--batch-size``, or ``OUT`` for an argument."""
    s = spec(f)
    if s.positional and not s.flag:
        return s.metavar or f.name.upper()
    if s.flag:
        return s.flag.split("/")[0]
    return "--" + f.name.replace("_", "-")


def default_text(f: dataclasses.Field) -> str:
    """What ``--help`` prints after "(default ...)"; empty when there is nothing to say."""
    s = spec(f)
    if s.show_default is not None:
        return s.show_default
    value = default_of(f)
    if value is MISSING or value is None:
        return ""
    if isinstance(value, bool):
        if s.flag and "/" in s.flag:
            on, off = s.flag.split("/")
            return on if value else off
        return "on" if value else ""
    if isinstance(value, (list, tuple)):
        return ", ".join(str(v) for v in value)
    return str(value)


def help_text(f: dataclasses.Field, note: str = "") -> str:
    """The field's help with its choices, ``note`` and default, as ``--help`` shows it."""
    s = spec(f)
    text, d = s.help, default_text(f)
    if s.choices and not all(c in text for c in s.choices):
        text = f"{text} One of: {', '.join(s.choices)}."
    if s.stdio:
        text = f"{text} {STDIO_NOTE[s.stdio]}"
    if note:
        text = f"{text} {note}"
    return f"{text} (default {d})" if d else text


# -- settings several stages share (one wording each) -------------------------------------------
def device_setting() -> Any:
    return setting(None, help="cpu, cuda, cuda:1, mps.", show_default="best available")


def precision_setting(default: str | None = None, show_default: str | None = "auto: bf16 on GPUs that have it",
                      **kw: Any) -> Any:
    return setting(default, help="auto, fp32, bf16 or fp16.", show_default=show_default, **kw)


def strict_setting() -> Any:
    return setting(False, flag="--strict/--no-strict", help="Fail on the first unreadable image instead of skipping it.")


def wait_setting() -> Any:
    return setting(False, help="If another cirkit run is writing the same output, wait for it to finish "
                               "instead of stopping at once.")


def trust_remote_code_setting() -> Any:
    return setting(False, help="Allow the model repository's own Python code.")


def allow_pickle_setting() -> Any:
    return setting(False, help="Allow loading pickle (.bin/.pt) weights you trust.")


# Every worker is a process with its own copy of the decoding state: more than this is a typo
# (a 2-core machine took minutes just to start 1000 of them).
MAX_WORKERS = 256
# A batch this large does not fit any model's memory; the bound keeps a typo from overflowing.
MAX_BATCH = 1 << 20


def num_workers_setting(default: int | None = None, show_default: str | None = None) -> Any:
    return setting(default, ge=0, cap=MAX_WORKERS, help="Image decoding processes.", show_default=show_default)


def gpu_decode_setting() -> Any:
    return setting("auto", choices=("auto", "on", "off"),
                   help="Decode JPEGs in batches on the GPU (torchvision.io.decode_jpeg); auto: when the model runs on "
                        "CUDA and its preprocessing can run there.")


def batch_size_setting(default: int, what: str, **kw: Any) -> Any:
    return setting(default, ge=1, cap=MAX_BATCH, help=f"{what} per batch.", **kw)


# Decoding settings of the generation stages (caption, reformulate). "Sampling" in the name:
# train's temperature is InfoNCE's.
def sampling_temperature_setting() -> Any:
    return setting(0.0, ge=0, help="0 = greedy; > 0 samples.")


def top_p_setting() -> Any:
    return setting(1.0, gt=0, le=1, help="Nucleus sampling mass when sampling.")


def num_beams_setting() -> Any:
    return setting(1, ge=1, help="Beam search width.")


# -- checking values ---------------------------------------------------------------------------
_short = reprlib.Repr()
_short.maxstring, _short.maxother, _short.maxlist, _short.maxtuple, _short.maxdict, _short.maxlevel = 40, 40, 3, 3, 3, 2


def shown(value: Any) -> str:
    """A bounded repr for messages: a huge (or self-similar) value never floods an error line."""
    return _short.repr(value)


def problem(f: dataclasses.Field, value: Any, label: str) -> str | None:
    """What is wrong with ``value`` for field ``f`` (range or choices), or None; ``label`` names it."""
    s = spec(f)
    items = value if isinstance(value, (list, tuple)) else [value]
    for v in items:
        if v is None:
            continue
        if s.choices is not None and str(v) not in s.choices:
            return f"unknown {label} {shown(v)}; choose one of {', '.join(s.choices)}"
        if isinstance(v, bool) or not isinstance(v, (int, float)):
            continue
        if isinstance(v, float) and math.isnan(v):
            return f"{label} must be a number, got nan"
        if isinstance(v, float) and math.isinf(v):
            return f"{label} must be a finite number, got {v}"
        cap = s.cap if s.cap is not None else MAX_INT
        if isinstance(v, int) and s.le is None and s.lt is None and abs(v) > cap:
            return f"{label} must be at most {cap}, got {shown(v)}"
        bounds = [(s.ge, v >= s.ge if s.ge is not None else True, "at least"),
                  (s.gt, v > s.gt if s.gt is not None else True, "greater than"),
                  (s.le, v <= s.le if s.le is not None else True, "at most"),
                  (s.lt, v < s.lt if s.lt is not None else True, "less than")]
        if all(ok for _, ok, _ in bounds):
            continue
        if s.ge is not None and s.le is not None:
            return f"{label} must be between {_num(s.ge)} and {_num(s.le)}, got {shown(v)}"
        lo = [f"{word} {_num(b)}" for b, _, word in bounds[:2] if b is not None]
        hi = [f"{word} {_num(b)}" for b, _, word in bounds[2:] if b is not None]
        return f"{label} must be {' and '.join(lo + hi)}, got {shown(v)}"
    return None


def _num(x: float) -> str:
    return str(int(x)) if float(x).is_integer() else str(x)


def check_settings(config: Any) -> None:
    """Range and choice checks of every field (configs call this from ``__post_init__``), and ``-``
    only where a setting reads standard input or streams to standard output."""
    for f in dataclasses.fields(config):
        value = getattr(config, f.name)
        bad = problem(f, value, flag_name(f))
        if bad:
            raise CirkitError(bad)
        if (isinstance(value, Path) or spec(f).location) and str(value) == STDIO and not spec(f).stdio:
            raise CirkitError(f"{flag_name(f)} -: this setting names a file or folder, not a stream; give a path "
                              "('-' works for per-record JSONL outputs and inputs, see --help)")


def streams(config: Any) -> list[str]:
    """The flags of ``config`` set to ``-`` that stream to standard output."""
    return [flag_name(f) for f in dataclasses.fields(config)
            if spec(f).stdio == "out" and str(getattr(config, f.name)) == STDIO]


# -- recipes -----------------------------------------------------------------------------------
# The shipped recipes live in the package (installed with it); the repository's top-level
# recipes/ is a link to this folder, so `-c recipes/x.yaml` works in a clone and elsewhere.
RECIPES = Path(__file__).resolve().parent / "recipes"


@dataclass(frozen=True)
class Recipe:
    """A shipped recipe: its name (file stem), the command that reads it, its header's first line."""

    name: str
    command: str
    description: str
    path: Path


def shipped_recipes() -> list[Recipe]:
    """Every recipe shipped with cirkit, by name; read from the files' text (no YAML parser needed)."""
    out = []
    for path in sorted(RECIPES.glob("*.yaml")):
        lines = path.read_text(encoding="utf-8").splitlines()
        header = [ln[1:].strip() for ln in lines if ln.startswith("#")]
        command = next((ln.split(":")[0] for ln in lines if ln and not ln.startswith(("#", " ")) and ":" in ln), "")
        out.append(Recipe(path.stem, command, header[0] if header else "", path))
    return out


def find_recipe(ref: str | Path) -> Path:
    """The recipe file ``ref`` names: a path, or a shipped recipe's name (``vit-synth-cpu``,
    ``vit-synth-cpu.yaml`` or ``recipes/vit-synth-cpu.yaml`` from any folder)."""
    path = Path(ref)
    if path.exists():
        return path
    if str(path.parent) in (".", "recipes"):
        shipped = RECIPES / (path.name if path.suffix in (".yaml", ".yml") else f"{path.name}.yaml")
        if shipped.is_file():
            return shipped
    names = ", ".join(r.name for r in shipped_recipes())
    raise CirkitError(f"{ref}: recipe not found; give a YAML file or a shipped recipe's name ({names}; "
                      "'cirkit recipes' describes them)")


def load_recipe(path: str | Path, section: str | None = None) -> dict[str, Any]:
    """Read a recipe YAML (a path or a shipped recipe's name); if it has a top-level ``section``
    mapping (e.g. ``train:``), use that."""
    path = find_recipe(path)
    if path.is_dir():
        raise CirkitError(f"{path}: a recipe must be a YAML file, not a folder")
    if not path.is_file():
        raise CirkitError(f"{path}: a recipe must be a regular YAML file, not a device, FIFO or socket")
    with path.open("rb") as fh:
        raw = fh.read(MAX_RECIPE_BYTES + 1)
    if len(raw) > MAX_RECIPE_BYTES:
        raise CirkitError(f"{path}: larger than {MAX_RECIPE_BYTES // 1_000_000} MB; a recipe is a short settings file")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise CirkitError(f"{path}: not UTF-8 text (byte {e.start}); save the recipe as UTF-8") from None
    data = _parse_yaml(text, path) or {}
    if not isinstance(data, dict):
        raise CirkitError(f"{path}: a recipe must be a mapping of setting: value")
    if section and isinstance(data.get(section), dict):
        data = data[section]
    bad = [k for k in data if not isinstance(k, str)]
    if bad:
        raise CirkitError(f"{path}: setting names must be text, got {shown(bad[0])}")
    return data


def _parse_yaml(text: str, path: Path) -> Any:
    import yaml

    try:
        loader = yaml.SafeLoader(text)  # its reader refuses control characters (NUL) here already
    except yaml.YAMLError as e:
        raise CirkitError(f"{path}: invalid YAML ({_one_line(e)})") from None
    try:
        node = loader.get_single_node()
        if node is None:
            return None
        if _expanded_size(node, path) > MAX_RECIPE_VALUES:
            raise CirkitError(f"{path}: its aliases expand to more than {MAX_RECIPE_VALUES} values; "
                              "write the settings out instead of nesting anchors")
        return loader.construct_document(node)
    except yaml.YAMLError as e:
        raise CirkitError(f"{path}: invalid YAML ({_one_line(e)})") from None
    except RecursionError:
        raise CirkitError(f"{path}: nested too deeply to be a recipe") from None
    finally:
        loader.dispose()


def _expanded_size(root: Any, path: Path) -> int:
    """Values a YAML node graph stands for once every alias is expanded (shared nodes counted once each use)."""
    import yaml

    memo: dict[int, int] = {}
    active: set[int] = set()

    def size(node: Any) -> int:
        if id(node) in active:
            raise CirkitError(f"{path}: an alias refers to the value that contains it; write the settings out")
        if id(node) in memo:
            return memo[id(node)]
        active.add(id(node))
        if isinstance(node, yaml.MappingNode):
            n = 1 + sum(size(k) + size(v) for k, v in node.value)
        elif isinstance(node, yaml.SequenceNode):
            n = 1 + sum(size(v) for v in node.value)
        else:
            n = 1
        active.discard(id(node))
        memo[id(node)] = min(n, MAX_RECIPE_VALUES + 1)
        return memo[id(node)]

    return size(root)


def _one_line(e: Exception) -> str:
    return " ".join(str(e).split())[:300]


def resolve(cls: type[C], recipe: str | Path | None = None, flags: dict[str, Any] | None = None,
            section: str | None = None) -> C:
    """Build a ``cls`` config from defaults, a recipe file and flags (flags set to None are unset).

    Recipe values are type-checked (a list where a number belongs, ``"false"`` in quotes for a
    switch, a mapping where text belongs are errors naming the recipe and setting) and every value
    is range-checked before the config exists, so no stage starts on a bad setting.
    """
    fields = {f.name: f for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    hints = typing.get_type_hints(cls)
    values: dict[str, Any] = {}
    if recipe is not None:
        for key, value in _recipe_values(cls, recipe, section, fields).items():
            values[key] = _coerce(value, hints.get(key), key, recipe)
            bad = problem(fields[key], values[key], key)
            if bad:
                raise CirkitError(f"{recipe}: {bad}")
    for key, value in (flags or {}).items():
        if value is None:
            continue
        if key not in fields:
            raise CirkitError(f"{cls.__name__} has no setting {key!r}")
        values[key] = _coerce(value, hints.get(key), flag_name(fields[key]), None)
        bad = problem(fields[key], values[key], flag_name(fields[key]))
        if bad:
            raise CirkitError(bad)
    missing = [f for f in fields.values() if default_of(f) is MISSING and f.name not in values]
    if missing:
        names = " and ".join(_missing_name(f) for f in missing)
        raise UsageError(f"missing {names}" + (f" (or set it in {recipe})" if recipe else ""))
    try:
        return cls(**values)
    except TypeError as e:
        raise CirkitError(f"{recipe or 'flags'}: {e}") from None


def _missing_name(f: dataclasses.Field) -> str:
    s = spec(f)
    if s.positional and s.flag:
        return f"{s.metavar or f.name.upper()} (or {s.flag})"
    return flag_name(f)


def _recipe_values(cls: type, recipe: str | Path, section: str | None,
                   fields: dict[str, dataclasses.Field]) -> dict[str, Any]:
    """A recipe's settings by field name (kebab- or snake-case keys, old spellings accepted with a warning)."""
    aliases = {a.lstrip("-").replace("-", "_"): f.name for f in fields.values() for a in spec(f).aliases
               if a.startswith("--")}
    out: dict[str, Any] = {}
    for key, value in load_recipe(recipe, section).items():
        name = key.replace("-", "_")
        if name not in fields and name in aliases:
            log.warning("%s: setting %r is now called %r; the old name goes in the next release",
                        recipe, key, aliases[name])
            name = aliases[name]
        if name not in fields:
            known = ", ".join(sorted(n.replace("_", "-") for n in fields))
            hint = ("; its settings are top-level now (templates, gate-init), and check_sync is the environment "
                    "variable CIRKIT_CHECK_SYNC=1" if name == "extra" else "")
            raise CirkitError(f"{recipe}: unknown setting {shown(key)}{hint} (known: {known})")
        out[name] = value
    return out


def _coerce(value: Any, tp: Any, name: str, source: Any) -> Any:
    """Check a recipe/flag value against the field's type; convert only what is unambiguous.

    Paths from text, ints for floats, integral floats for ints, one item for a list, and a
    number for text whose choices spell it (``stage: 1``). Anything else of the wrong type is a
    one-line error naming the source and setting.
    """
    if value is None:
        return None
    where = f"{source}: setting '{name}'" if source else name
    args = [a for a in typing.get_args(tp) if a is not type(None)] if _is_union(tp) else [tp]
    seqs = [a for a in args if typing.get_origin(a) in (list, tuple)]
    maps = [a for a in args if typing.get_origin(a) is dict or a is dict]
    if seqs:
        item = typing.get_args(seqs[0])[0] if typing.get_args(seqs[0]) else Any
        if isinstance(value, dict):
            raise CirkitError(f"{where} expects a list, got a mapping {shown(value)}")
        items = list(value) if isinstance(value, (list, tuple)) else [value]
        out = [_scalar(v, item, where + " item") for v in items]
        return tuple(out) if typing.get_origin(seqs[0]) is tuple and len(seqs) == len(args) else out
    if maps:
        if not isinstance(value, dict):
            raise CirkitError(f"{where} expects a mapping, got {shown(value)}")
        kt, vt = typing.get_args(maps[0]) or (Any, Any)
        return {_scalar(k, kt, where + " key"): _scalar(v, vt, f"{where} key {shown(k)}") for k, v in value.items()}
    return _scalar(value, args[0] if len(args) == 1 else Any, where)


def _scalar(value: Any, tp: Any, where: str) -> Any:
    if tp is Any or tp is None:
        return value
    if isinstance(value, (list, tuple, dict, set)):
        kind = "a mapping" if isinstance(value, dict) else "a list"
        raise CirkitError(f"{where} expects {_type_word(tp)}, got {kind} {shown(value)}")
    if tp is bool:
        if isinstance(value, bool):
            return value
        hint = " (write true or false without quotes)" if isinstance(value, str) else ""
        raise CirkitError(f"{where} expects true or false, got {shown(value)}{hint}")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
    elif tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
    elif tp is str:
        if isinstance(value, str):
            return _no_nul(value, where)
        if isinstance(value, int) and not isinstance(value, bool):
            return str(value)  # `stage: 1`, `seed`-like names; a range/choice check follows
        if isinstance(value, Path):
            return str(value)  # a location setting that is a path or a URI (embed -o, index EMBEDDINGS)
    elif tp is Path:
        if isinstance(value, (str, Path)):
            return Path(_no_nul(str(value), where))
    else:
        return value
    raise CirkitError(f"{where} expects {_type_word(tp)}, got {shown(value)}")


def _no_nul(value: str, where: str) -> str:
    if "\x00" in value:
        raise CirkitError(f"{where} contains a NUL character ({shown(value)}); no path or name can hold one")
    return value


def _type_word(tp: Any) -> str:
    return {bool: "true or false", Path: "a path"}.get(tp, getattr(tp, "__name__", str(tp)))


def _is_union(tp: Any) -> bool:
    return typing.get_origin(tp) in (typing.Union, types.UnionType)


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
