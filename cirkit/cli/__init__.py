"""The ``cirkit`` command: one thin module per stage on top of plain Python ``run(config)``."""

from __future__ import annotations

import logging
from typing import Annotated

import typer

from cirkit import __version__

app = typer.Typer(
    name="cirkit",
    help="Zero-shot Composed Image Retrieval: caption, reformulate, train, embed, index, query, evaluate.",
    no_args_is_help=True,
    rich_markup_mode="rich",
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)


def _version(value: bool) -> None:
    if value:
        typer.echo(f"cirkit {__version__}")
        raise typer.Exit()


@app.callback()
def main(
    verbose: Annotated[bool, typer.Option("--verbose", "-v", help="Log details (debug level).")] = False,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="Only errors and the final summary; no progress bars.")] = False,
    version: Annotated[bool, typer.Option("--version", callback=_version, is_eager=True, help="Show the version.")] = False,
) -> None:
    """cirkit chains stages that exchange JSONL and Lance files; see each command's --help."""
    from rich.logging import RichHandler

    level = logging.DEBUG if verbose else logging.WARNING if quiet else logging.INFO
    logger = logging.getLogger("cirkit")
    logger.handlers.clear()
    handler = RichHandler(show_time=False, show_path=verbose, markup=False)
    handler.setFormatter(logging.Formatter("%(message)s"))
    logger.addHandler(handler)
    logger.setLevel(level)
    logger.propagate = False


# One module per stage, each defining one function named like the command.
from cirkit.cli import caption as _caption  # noqa: E402
from cirkit.cli import embed as _embed  # noqa: E402
from cirkit.cli import evaluate as _evaluate  # noqa: E402
from cirkit.cli import index as _index  # noqa: E402
from cirkit.cli import query as _query  # noqa: E402
from cirkit.cli import reformulate as _reformulate  # noqa: E402
from cirkit.cli import synth as _synth  # noqa: E402
from cirkit.cli import train as _train  # noqa: E402

app.command(name="synth")(_synth.synth)
app.command(name="caption")(_caption.caption)
app.command(name="reformulate")(_reformulate.reformulate)
app.command(name="evaluate")(_evaluate.evaluate)
app.command(name="index")(_index.index)
app.command(name="query")(_query.query)
app.command(name="train")(_train.train)
app.command(name="embed")(_embed.embed)
