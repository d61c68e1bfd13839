"""The ``cirkit`` command: one thin module per stage on top of plain Python ``run(config)``."""

from __future__ import annotations

from typing import Annotated

import typer

from cirkit import __version__
from cirkit.cli._common import QUIET_HELP, VERBOSE_HELP, CirkitGroup, StubCommand, setup_logging

app = typer.Typer(
    name="cirkit",
    cls=CirkitGroup,
    help="Zero-shot Composed Image Retrieval: caption, reformulate, train, embed, index, query, serve, evaluate.",
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
    verbose: Annotated[bool, typer.Option("--verbose", "-v", help=VERBOSE_HELP)] = False,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help=QUIET_HELP)] = False,
    version: Annotated[bool, typer.Option("--version", callback=_version, is_eager=True, help="Show the version.")] = False,
) -> None:
    """cirkit chains stages that exchange JSONL and Lance files; see each command's --help.

    -v/-q work before or after the command (cirkit -q embed ..., cirkit embed ... -q).
    """
    setup_logging(verbose, quiet)


# One module per stage, each defining one function named like the command.
from cirkit.cli import caption as _caption  # noqa: E402
from cirkit.cli import embed as _embed  # noqa: E402
from cirkit.cli import evaluate as _evaluate  # noqa: E402
from cirkit.cli import index as _index  # noqa: E402
from cirkit.cli import query as _query  # noqa: E402
from cirkit.cli import reformulate as _reformulate  # noqa: E402
from cirkit.cli import serve as _serve  # noqa: E402
from cirkit.cli import synth as _synth  # noqa: E402
from cirkit.cli import train as _train  # noqa: E402

# Each is registered as a stub with its docstring; CirkitGroup builds its options when it runs.
for _fn in (_synth.synth, _caption.caption, _reformulate.reformulate, _evaluate.evaluate, _index.index,
            _query.query, _train.train, _embed.embed, _serve.serve):
    app.command(name=_fn.__name__, cls=StubCommand)(_fn)

# Tools around the stages: no config dataclass, no torch.
from cirkit.cli import doctor as _doctor  # noqa: E402
from cirkit.cli import recipes as _recipes  # noqa: E402

app.command(name="recipes")(_recipes.recipes)
app.command(name="doctor")(_doctor.doctor)
