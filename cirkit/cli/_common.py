"""The thin CLI layer's shared parts: commands built from config dataclasses, the error boundary, output.

Each command's options come from its stage's config dataclass (:func:`command`): a field's
default, help, range and spelling are written once, in :mod:`cirkit.config`'s ``setting``.
Every user error a command can meet becomes one ``error:`` line here (:func:`user_errors`),
usage errors too (:class:`CirkitGroup`); bugs keep their traceback.

Nothing here imports torch: ``cirkit --help`` must stay fast.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import inspect
import json
import logging
import math
import re
import sys
import typing
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Annotated, Any

import typer
from typer.core import TyperCommand, TyperGroup

from cirkit.config import UsageError, default_of, flag_name, help_text, resolve, shown, spec, streams
from cirkit.errors import CirkitError

try:  # typer >= 0.28 carries its own copy of click
    from typer._click import exceptions as click_exceptions
except ImportError:  # pragma: no cover - older typer uses click itself
    from click import exceptions as click_exceptions  # type: ignore[no-redef]

log = logging.getLogger("cirkit")

# Parameters every command has besides its settings (a config field must not take these names).
COMMON = ("config", "json_out", "verbose", "quiet", "cirkit_ctx")
VERBOSE_HELP = "Log details; print tracebacks of errors."
QUIET_HELP = "Only errors and the final summary; no progress bars."


# -- logging and messages ----------------------------------------------------------------------
def setup_logging(verbose: bool, quiet: bool) -> None:
    """cirkit's and the libraries' messages: one line each on stderr (see :mod:`cirkit.logs`)."""
    from cirkit.logs import setup

    setup(verbose, quiet)


def printable(text: str) -> str:
    """``text`` safe to print: file names that are not UTF-8 (surrogate escapes) shown as ``\\xNN``."""
    return text.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")


def err(message: str) -> None:
    """Print a one-line error on stderr."""
    from rich.console import Console
    from rich.text import Text

    line = Text("error:", style="bold red") + Text(" " + " ".join(printable(message).splitlines()))
    Console(stderr=True, highlight=False).print(line, soft_wrap=True)


# -- the error boundary ------------------------------------------------------------------------
@contextlib.contextmanager
def user_errors(verbose: bool = False) -> Iterator[None]:
    """Turn what a user can cause into one ``error:`` line and exit 1 (traceback under ``--verbose``).

    CirkitError (and the range/recipe checks), OS errors (permissions, read-only or full disks,
    a folder where a file belongs, names that are not UTF-8), Lance/Arrow, safetensors, JSON and
    YAML errors, and text the terminal cannot encode. Anything else is a bug: it keeps its
    traceback. Ctrl-C exits 130.
    """
    try:
        yield
    except KeyboardInterrupt:
        err("interrupted; finished work is kept, re-run the same command to resume")
        raise typer.Exit(130) from None
    except BrokenPipeError:
        raise  # stdout closed (`| head`): typer exits quietly
    except Exception as e:
        found = describe(e)
        if found is None:
            raise
        message, code = found
        if verbose:
            import traceback

            traceback.print_exception(type(e), e, e.__traceback__, file=sys.stderr)
        err(message)
        raise typer.Exit(code) from None


_OS_ERRORS = {
    errno.EACCES: ("permission denied", "check its permissions or choose another location"),
    errno.EPERM: ("operation not permitted", "check its permissions or choose another location"),
    errno.EROFS: ("read-only file system", "write to another location"),
    errno.ENOSPC: ("no space left on the device", "free some space or write to another disk"),
    errno.EDQUOT: ("disk quota exceeded", "free some space or write to another disk"),
    errno.EISDIR: ("is a folder, not a file", "give a file path"),
    errno.ENOTDIR: ("a part of this path is a file, not a folder", "check the path"),
    errno.ENOENT: ("no such file or folder", "check the path"),
    errno.EEXIST: ("already exists", "choose another path or remove it"),
    errno.ENAMETOOLONG: ("file name too long", "choose a shorter name"),
    errno.ENOTEMPTY: ("folder is not empty", "choose another path or empty it"),
    errno.EMFILE: ("too many open files", "raise the limit (ulimit -n) or use fewer workers"),
    errno.ENFILE: ("too many open files", "raise the limit (ulimit -n) or use fewer workers"),
    errno.EILSEQ: ("file name not valid in this file system's encoding", "rename it"),
    errno.EIO: ("input/output error", "check the disk or network share"),
}


def describe(e: BaseException) -> tuple[str, int] | None:
    """The one-line message and exit code of a user-caused error, or None for a bug.

    Library errors that name no file (a full disk inside a library's write, a Lance I/O
    error) are prefixed with the output being written when the error escaped its
    :func:`cirkit.io.lock.output_lock`; temp names (``.x.cirkit-tmp-host-pid``) read as their output.
    """
    found = _describe(e)
    if found is None:
        return None
    message, code = found
    output = getattr(e, "cirkit_output", None)
    if output and not isinstance(e, CirkitError) and not message.startswith(output):
        known = getattr(e, "filename", None)
        if not known:
            message = f"{output}: {message}"
    return _TEMP_NAME.sub(r"\g<dir>\g<name>", message), code


# ``/dir/.name.cirkit-tmp-host-123-abcd`` -> ``/dir/name``: a user knows the output, not our temp.
_TEMP_NAME = re.compile(r"(?P<dir>(?:^|[/\s(\"'])(?:[^\s/]*/)*)\.(?P<name>[^/\s]+?)\.cirkit-(?:tmp|old)-[A-Za-z0-9_.]+-\d+(?:-[0-9a-f]+)?")
# Rust-backed libraries (Lance, safetensors) report an OS error as "... (os error 28)".
_EMBEDDED_ERRNO = re.compile(r"\(os error (\d+)\)")


def _describe(e: BaseException) -> tuple[str, int] | None:
    if isinstance(e, CirkitError):
        return str(e), e.exit_code
    if isinstance(e, UnicodeEncodeError):
        return _encode_error(e), 1
    if isinstance(e, UnicodeDecodeError):
        return (f"text is not valid UTF-8 (byte 0x{e.object[e.start]:02x} at position {e.start}); "
                "save the file as UTF-8"), 1
    if isinstance(e, MemoryError) or type(e).__name__ == "OutOfMemoryError" or (
            isinstance(e, RuntimeError) and "can't allocate memory" in str(e)):
        return (f"out of memory ({_first_line(e) or 'MemoryError'}); lower --batch-size (or --k, --num-workers), "
                "or use a smaller model"), 1
    name, module = type(e).__name__, type(e).__module__ or ""
    first = _first_line(e)
    embedded = _EMBEDDED_ERRNO.search(str(e))
    library = name == "SafetensorError" or module.startswith(("safetensors", "pyarrow", "lance", "lancedb")) or \
        first.lower().startswith("lance error")
    if library and embedded and int(embedded.group(1)) in _OS_ERRORS:
        what, fix = _OS_ERRORS[int(embedded.group(1))]
        return f"{what}; {fix}", 1
    if name == "SafetensorError" or module.startswith("safetensors"):
        if "while serializing" in first.lower():
            return f"cannot write safetensors weights ({first}); check the disk and re-run", 1
        return f"cannot read safetensors weights ({first}); the file is corrupt or truncated: save or download it again", 1
    if module.startswith(("pyarrow", "lance", "lancedb")) or first.lower().startswith("lance error"):
        return f"the Lance store cannot be read or written ({first}); check the path, or create the store again", 1
    if isinstance(e, OSError):
        return _os_error(e), 1
    if isinstance(e, ValueError) and "embedded null byte" in str(e):  # os.* on a path holding NUL
        return "a path contains a NUL character, which no file name can hold; remove it from the input", 1
    if isinstance(e, json.JSONDecodeError):
        return f"not valid JSON ({e.msg} at line {e.lineno} column {e.colno}); fix or re-create the file", 1
    if module.startswith("yaml"):
        return f"not valid YAML ({first}); fix the file", 1
    return None


def _os_error(e: OSError) -> str:
    what, fix = _OS_ERRORS.get(e.errno, (e.strerror or _first_line(e) or type(e).__name__, "check the path"))
    if e.errno in (errno.EEXIST, errno.ENOTDIR) and e.filename is not None and Path(str(e.filename)).is_file():
        what, fix = "is a file where a folder is needed", "choose another path"
    if e.filename is None:
        return f"{what}; {fix}"
    where = str(e.filename) if e.filename2 is None else f"{e.filename} -> {e.filename2}"
    return f"{where}: {what}; {fix}"


def _encode_error(e: UnicodeEncodeError) -> str:
    text = e.object if isinstance(e.object, str) else ""
    bad = text[e.start:e.end]
    if e.encoding.replace("-", "").lower() in ("utf8", "utf_8") and all(0xDC80 <= ord(c) <= 0xDCFF for c in bad):
        # A file name whose bytes are not UTF-8: Python keeps them as surrogate escapes.
        around = text[max(0, e.start - 60):e.end + 60]
        return f"{printable(around)}: a file name is not valid UTF-8; rename it (e.g. with convmv)"
    return (f"cannot write {shown(bad)} in the {e.encoding} encoding; "
            "set PYTHONIOENCODING=utf-8 or use a UTF-8 locale such as LANG=C.UTF-8")


def _first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    line = text[0] if text else type(e).__name__
    # Lance appends the Rust source location: it tells a user nothing.
    return line.split(", /", 1)[0][:300]


class CirkitGroup(TyperGroup):
    """The ``cirkit`` group: builds a command only when it runs; usage errors as one line, exit 2.

    Each stage command is registered as a stub that carries its docstring (enough for
    ``cirkit --help``); its options, which need the stage's config dataclass, are built when
    the command is resolved, so ``cirkit --help`` and ``cirkit X --help`` import one config module
    at most.
    """

    def resolve_command(self, ctx: Any, args: list[str]) -> tuple[str | None, Any, list[str]]:
        name, cmd, rest = super().resolve_command(ctx, args)
        if name is not None and cmd is not None and getattr(cmd, "cirkit_stub", False):
            cmd = self.commands[name] = click_command(name)
        return name, cmd, rest

    def main(self, args: Any = None, prog_name: str | None = None, complete_var: str | None = None,
             standalone_mode: bool = True, **extra: Any) -> Any:
        if not standalone_mode:
            return super().main(args, prog_name, complete_var, standalone_mode=False, **extra)
        try:
            rv = super().main(args, prog_name, complete_var, standalone_mode=False, **extra)
        except click_exceptions.ClickException as e:
            if type(e).__name__ != "NoArgsIsHelpError":  # that one has printed the help already
                ctx = getattr(e, "ctx", None)
                hint = f" (see '{ctx.command_path} --help')" if ctx is not None else ""
                err(f"{e.format_message()}{hint}")
            sys.exit(e.exit_code)
        except typer.Abort:
            err("aborted")
            sys.exit(1)
        sys.exit(rv if isinstance(rv, int) else 0)


class StubCommand(TyperCommand):
    """A registered command whose options are not built yet (see :class:`CirkitGroup`)."""

    cirkit_stub = True


# -- commands built from config dataclasses -----------------------------------------------------
@dataclasses.dataclass(frozen=True)
class StageCommand:
    """A stage command as declared: its body, its config dataclass (by import path) and recipe section."""

    name: str
    body: Callable[..., None]
    config: str
    section: str


COMMANDS: dict[str, StageCommand] = {}


def command(config: str, section: str) -> Callable[[Callable[..., None]], Callable[..., None]]:
    """Declare a stage command ``body(config, json_out)`` whose options are the fields of ``config``.

    ``config`` is the dataclass's import path (``"cirkit.query.QueryConfig"``), imported only
    when the command is built. The command resolves the config (defaults, then the ``-c``
    recipe's ``section``, then the flags given) inside the error boundary and calls ``body``.
    Returns the stub that ``cirkit/cli/__init__.py`` registers.
    """

    def decorate(body: Callable[..., None]) -> Callable[..., None]:
        COMMANDS[body.__name__] = StageCommand(body.__name__, body, config, section)

        def stub() -> None:
            raise RuntimeError(f"cirkit {body.__name__} is built when it is resolved; run it through cirkit.cli.app")

        stub.__name__ = stub.__qualname__ = body.__name__
        stub.__doc__ = body.__doc__
        stub.__module__ = body.__module__
        return stub

    return decorate


def config_class(path: str) -> type:
    """Import a config dataclass from ``"package.module.ClassName"``."""
    import importlib

    module, _, name = path.rpartition(".")
    return getattr(importlib.import_module(module), name)


def click_command(name: str) -> Any:
    """The full click command of stage ``name``: one option per field of its config dataclass."""
    stage = COMMANDS[name]
    fn = build(stage.body, config_class(stage.config), stage.section)
    sub = typer.Typer(rich_markup_mode="rich", pretty_exceptions_enable=False, add_completion=False,
                      context_settings={"help_option_names": ["-h", "--help"]})
    sub.command(name=name, epilog=fn.epilog)(fn)  # type: ignore[attr-defined]
    return typer.main.get_command(sub)


def build(body: Callable[..., None], config_cls: type, section: str) -> Callable[..., None]:
    """A Typer callback whose signature holds one parameter per CLI field of ``config_cls``.

    Hidden old spellings are accepted with a warning; recipe-only fields are listed in the
    help epilog (``fn.epilog``).
    """
    hints = typing.get_type_hints(config_cls)
    params: list[inspect.Parameter] = []
    sources: dict[str, list[tuple[str, str, bool]]] = {}
    for f in dataclasses.fields(config_cls):
        if f.name in COMMON:
            raise TypeError(f"{config_cls.__name__}.{f.name}: the name is taken by a common option")
        if spec(f).cli:
            sources[f.name] = _field_params(f, hints[f.name], params)
    params += _common_params()

    def run_command(**kwargs: Any) -> None:
        ctx = kwargs.pop("cirkit_ctx")
        root = ctx.find_root().params
        verbose = bool(kwargs.pop("verbose") or root.get("verbose"))
        quiet = bool(kwargs.pop("quiet") or root.get("quiet"))
        if verbose != bool(root.get("verbose")) or quiet != bool(root.get("quiet")):
            setup_logging(verbose, quiet)  # -v/-q given after the command
        recipe, json_out = kwargs.pop("config"), kwargs.pop("json_out")
        with user_errors(verbose):
            flags = _given(config_cls, sources, kwargs, ctx.command_path)
            config = resolve(config_cls, recipe, flags, section=section)
            streamed = streams(config)
            if json_out and streamed:
                raise UsageError(f"--json and {streamed[0]} - both write to standard output; drop --json (the summary "
                                 "line goes to stderr) or write the records to a file")
            body(config, json_out)

    run_command.__signature__ = inspect.Signature(params)  # type: ignore[attr-defined]
    run_command.__name__ = run_command.__qualname__ = body.__name__
    run_command.__doc__ = body.__doc__
    run_command.__module__ = body.__module__
    run_command.epilog = _recipe_only(config_cls)  # type: ignore[attr-defined]
    return run_command


def _cli_type(tp: Any) -> tuple[Any, bool]:
    """(scalar type, is_list) of a field's annotation for its option."""
    args = [a for a in typing.get_args(tp) if a is not type(None)] if _is_union(tp) else [tp]
    for a in args:
        if typing.get_origin(a) in (list, tuple):
            inner = [t for t in typing.get_args(a) if t is not Ellipsis]
            return (inner[0] if inner else str), True
    if len(args) != 1 or args[0] not in (bool, int, float, str, Path):
        raise TypeError(f"{tp}: give this setting cli=False (a recipe-only value) or a simple type")
    return args[0], False


def _is_union(tp: Any) -> bool:
    import types

    return typing.get_origin(tp) in (typing.Union, types.UnionType)


def _field_params(f: dataclasses.Field, tp: Any, params: list[inspect.Parameter]) -> list[tuple[str, str, bool]]:
    """Append ``f``'s Typer parameters; return (parameter name, spelling, is an old spelling) per source."""
    s = spec(f)
    kind, is_list = _cli_type(tp)
    kebab = "--" + f.name.replace("_", "-")
    typ = (list[str] if is_list else kind) | None
    panel = {"rich_help_panel": s.panel} if s.panel else {}
    help_ = help_text(f, "Repeat or comma-separate." if is_list and "comma" not in s.help else "")
    out: list[tuple[str, str, bool]] = []

    def add(name: str, info: Any) -> None:
        params.append(inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=None,
                                        annotation=Annotated[typ, info]))

    if s.positional:
        metavar = s.metavar or f.name.upper()
        add(f.name, typer.Argument(help=help_, metavar=metavar, show_default=False))
        out.append((f.name, metavar, False))
        if s.flag:
            add(f"{f.name}__opt", typer.Option(s.flag, *([s.short] if s.short else []), help=f"Same as {metavar}.",
                                               **panel))
            out.append((f"{f.name}__opt", s.flag, False))
    else:
        if kind is bool:
            decl = s.flag or (f"{kebab}/--no-{f.name.replace('_', '-')}" if default_of(f) is True else kebab)
        else:
            decl = s.flag or kebab
        add(f.name, typer.Option(decl, *([s.short] if s.short else []), help=help_, **panel))
        out.append((f.name, decl.split("/")[0], False))
    for i, old in enumerate(s.aliases):
        add(f"{f.name}__old{i}", typer.Option(old, hidden=True))
        out.append((f"{f.name}__old{i}", old, True))
    return out


def _common_params() -> list[inspect.Parameter]:
    kw = inspect.Parameter.KEYWORD_ONLY
    return [
        inspect.Parameter("config", kw, default=None, annotation=Annotated[Path | None, typer.Option(
            "--config", "-c", help="Recipe YAML; its settings apply before explicit flags.")]),
        inspect.Parameter("json_out", kw, default=False, annotation=Annotated[bool, typer.Option(
            "--json", help="Print the summary as one JSON object on stdout.")]),
        inspect.Parameter("verbose", kw, default=False, annotation=Annotated[bool, typer.Option(
            "--verbose", "-v", help=VERBOSE_HELP)]),
        inspect.Parameter("quiet", kw, default=False, annotation=Annotated[bool, typer.Option(
            "--quiet", "-q", help=QUIET_HELP)]),
        inspect.Parameter("cirkit_ctx", kw, annotation=typer.Context),
    ]


def _given(config_cls: type, sources: dict[str, list[tuple[str, str, bool]]], kwargs: dict[str, Any],
           where: str) -> dict[str, Any]:
    """The settings given on the command line, by field name (lists split on commas and typed)."""
    fields = {f.name: f for f in dataclasses.fields(config_cls)}
    hints = typing.get_type_hints(config_cls)
    flags: dict[str, Any] = {}
    for name, srcs in sources.items():
        given = [(label, kwargs[p], old) for p, label, old in srcs if kwargs.get(p) not in (None, [], ())]
        if not given:
            continue
        f = fields[name]
        for label, _, old in given:
            if old:
                log.warning("%s: %s is an old spelling of %s; it goes in the next release", where, label, flag_name(f))
        if len(given) > 1:
            if any(v != given[0][1] for _, v, _ in given):
                raise UsageError(f"{flag_name(f)} given twice ({' and '.join(label for label, _, _ in given)}); give it once")
        kind, is_list = _cli_type(hints[name])
        value = given[0][1]
        flags[name] = _split(value, kind, given[0][0]) if is_list else value
    return flags


def _split(values: list[str], kind: Any, label: str) -> list[Any]:
    out = []
    for v in values:
        for item in str(v).split(","):
            item = item.strip()
            if not item:
                continue
            try:
                out.append(kind(item))
            except ValueError:
                word = {int: "an integer", float: "a number"}.get(kind, getattr(kind, "__name__", str(kind)))
                raise UsageError(f"{label}: {shown(item)} is not {word}") from None
    return out


def _recipe_only(config_cls: type) -> str | None:
    lines = [f"{f.name}: {help_text(f)}" for f in dataclasses.fields(config_cls) if not spec(f).cli and spec(f).help]
    if not lines:
        return None
    return "Recipe-only settings (set them with -c recipe.yaml):\n\n" + "\n\n".join(lines)


# -- output ------------------------------------------------------------------------------------
def finite(value: Any) -> Any:
    """``value`` with every NaN/Infinity float replaced by None: JSON has no spelling for them."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [finite(v) for v in value]
    return value


_LINE_BREAKS = {0x2028: "\\u2028", 0x2029: "\\u2029", 0x85: "\\u0085"}


def emit(result: Any, as_json: bool, render: Callable[[], None] | None = None) -> None:
    """Print a stage's summary: a JSON object on stdout, or a rich one-liner (after ``render()``, e.g. a table).

    Under ``accelerate launch``/``torchrun`` only the main process prints: every process returns
    a result, the main one's holds the counts of all.
    """
    import os

    if int(os.environ.get("RANK", "0")) != 0:
        return
    if as_json:
        data = finite(result.to_dict())
        try:
            text = json.dumps(data, ensure_ascii=False, allow_nan=False, default=str)
            # Line separators JSON allows raw (U+2028/9, NEL) would split the one line for line-based readers.
            sys.stdout.write(text.translate(_LINE_BREAKS) + "\n")
        except UnicodeEncodeError:  # a terminal that is not UTF-8, or names that are not: escape them
            sys.stdout.write(json.dumps(data, ensure_ascii=True, allow_nan=False, default=str) + "\n")
        return
    from rich.console import Console
    from rich.text import Text

    if render is not None:
        render()
    console = Console(stderr=True, highlight=False)
    console.print(Text("✓ ", style="green") + Text(printable(result.line())), soft_wrap=True)
    if result.skipped:
        for item, reason in result.skipped[:10]:
            console.print(Text("  ") + Text("skipped", style="yellow") + Text(printable(f" {item}: {reason}")),
                          soft_wrap=True)
        if len(result.skipped) > 10:
            console.print(Text(f"  ... and {len(result.skipped) - 10} more (see --json for all)"))
