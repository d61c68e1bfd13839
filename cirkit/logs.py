"""Where messages go: the one place that decides what cirkit and the libraries under it print.

* cirkit's own log lines, the libraries' log records (transformers, huggingface_hub, datasets,
  accelerate, peft) and Python warnings (``FutureWarning`` and
  friends) all go to **stderr** through one rich handler, one line each, so they print above a
  running rich progress bar instead of through it. stdout is for results and ``--json``.
* Levels follow ``--verbose``/``--quiet``: by default cirkit logs INFO and libraries WARNING;
  ``-v`` shows library INFO too and the warning's file:line; ``-q`` shows errors only. Warnings
  are never hidden wholesale: each distinct one prints once (Python's default filter).
* Records logged on the root logger itself (open_clip's ``logging.warning(...)`` lines) carry
  no library name and print beside a one-line ``error:``; they show under ``--verbose`` only.
* The libraries' own tqdm bars (downloads, "Loading weights", "Writing model shards") would
  draw over cirkit's bars: they are off unless ``--verbose`` (or the user's own
  ``HF_HUB_DISABLE_PROGRESS_BARS=0`` / ``HF_DATASETS_DISABLE_PROGRESS_BARS=0``).

transformers, huggingface_hub and datasets attach their own stderr handler to their logger when
their ``utils.logging`` module is imported; :class:`_AdoptOnImport` takes it off right after that
import (whenever it happens), so their records reach the handler here instead. Nothing here
imports a heavy library: ``cirkit --help`` stays fast.
"""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import logging
import os
import sys
import warnings
from typing import Any

# Libraries whose logging module installs its own stderr handler at import.
ADOPTED = ("transformers", "huggingface_hub", "datasets")
# Libraries whose records are shown (at the library level below), besides anything on the root logger.
LIBRARIES = (*ADOPTED, "accelerate", "peft", "open_clip", "timm", "lancedb", "torch")
PROGRESS_ENV = ("HF_HUB_DISABLE_PROGRESS_BARS", "HF_DATASETS_DISABLE_PROGRESS_BARS")

_state: dict[str, Any] = {"handler": None, "library_level": logging.WARNING, "verbose": False}


class _LibraryFormatter(logging.Formatter):
    """``library: message`` (the top-level package of the logger); warnings and root lines as they are."""

    def format(self, record: logging.LogRecord) -> str:
        text = super().format(record)
        if record.name in ("root", "py.warnings"):
            return text
        return f"{record.name.split('.', 1)[0]}: {text}"


def _handler(verbose: bool, formatter: logging.Formatter) -> logging.Handler:
    from rich.console import Console
    from rich.logging import RichHandler

    handler = RichHandler(console=Console(stderr=True), show_time=False, show_path=verbose, markup=False,
                          rich_tracebacks=False)
    handler.setFormatter(formatter)
    return handler


def setup(verbose: bool = False, quiet: bool = False) -> None:
    """Configure cirkit's logger, the libraries' loggers, warnings and library progress bars."""
    level = logging.DEBUG if verbose else logging.ERROR if quiet else logging.INFO
    library_level = logging.INFO if verbose else logging.ERROR if quiet else logging.WARNING
    logger = logging.getLogger("cirkit")
    logger.handlers.clear()
    logger.addHandler(_handler(verbose, logging.Formatter("%(message)s")))
    logger.setLevel(level)
    logger.propagate = False

    # Libraries: everything that reaches the root logger is printed by one handler, "name: message".
    root = logging.getLogger()
    if _state["handler"] is not None:
        root.removeHandler(_state["handler"])
    handler = _handler(verbose, _LibraryFormatter("%(message)s"))
    if not verbose:
        handler.addFilter(lambda record: record.name != "root")
    root.addHandler(handler)
    root.setLevel(library_level)
    _state.update(handler=handler, library_level=library_level, verbose=verbose)
    for name in LIBRARIES:
        logging.getLogger(name).setLevel(library_level)
    for name in ADOPTED:
        if f"{name}.utils.logging" in sys.modules:  # imported before cirkit's CLI set up logging
            adopt(name)
    if not any(isinstance(f, _AdoptOnImport) for f in sys.meta_path):
        sys.meta_path.insert(0, _AdoptOnImport())

    warnings.showwarning = _show_warning
    if not verbose:  # read by the libraries when they are imported; a value the user set wins
        for var in PROGRESS_ENV:
            os.environ.setdefault(var, "1")
    _library_bars(on=verbose)


def adopt(library: str) -> None:
    """Take ``library``'s own stderr handler off its logger, so its records reach cirkit's handler."""
    logger = logging.getLogger(library)
    if library == "transformers":
        mod = sys.modules.get("transformers.utils.logging")
        if mod is not None and hasattr(mod, "disable_default_handler"):
            mod.disable_default_handler()  # configures it first (level, propagate=False), then removes it
    for h in list(logger.handlers):
        if type(h) is logging.StreamHandler and getattr(h, "stream", None) in (sys.stderr, sys.__stderr__, None):
            logger.removeHandler(h)
    logger.setLevel(_state["library_level"])
    logger.propagate = True


def _library_bars(on: bool) -> None:
    """Switch the libraries' tqdm bars off where they are imported already (under -v they keep their default)."""
    if on:
        return
    for module, name in (("huggingface_hub.utils", "disable_progress_bars"),
                         ("transformers.utils.logging", "disable_progress_bar"),
                         ("datasets.utils", "disable_progress_bars")):
        fn = getattr(sys.modules.get(module), name, None)
        if fn is not None:
            fn()


def _show_warning(message: Any, category: type[Warning], filename: str, lineno: int, file: Any = None,
                  line: str | None = None) -> None:
    """A Python warning as one log line (the module that raised it; its file:line under -v)."""
    text = " ".join(str(message).split())
    if len(text) > 400:
        text = text[:400] + " ..."
    where = f" ({filename}:{lineno})" if _state["verbose"] else ""
    logging.getLogger("py.warnings").warning("%s: %s%s", category.__name__, text, where)


class _Adopting(importlib.abc.Loader):
    """A loader that runs the real one, then hands the library's logger to cirkit (see :func:`adopt`)."""

    def __init__(self, loader: Any, library: str):
        self.loader, self.library = loader, library

    def create_module(self, spec: Any) -> Any:
        return self.loader.create_module(spec)

    def exec_module(self, module: Any) -> None:
        self.loader.exec_module(module)
        adopt(self.library)
        _library_bars(on=_state["verbose"])

    def __getattr__(self, name: str) -> Any:  # get_source, is_package, ... of the real loader
        return getattr(self.loader, name)


class _AdoptOnImport(importlib.abc.MetaPathFinder):
    """Wraps the loader of ``<library>.utils.logging`` for the libraries in :data:`ADOPTED`."""

    def find_spec(self, fullname: str, path: Any, target: Any = None) -> Any:
        library = fullname.split(".", 1)[0]
        if library not in ADOPTED or fullname != f"{library}.utils.logging":
            return None
        spec = importlib.machinery.PathFinder.find_spec(fullname, path, target)
        if spec is not None and spec.loader is not None:
            spec.loader = _Adopting(spec.loader, library)
        return spec
