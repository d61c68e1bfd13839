"""``cirkit recipes``: the recipes shipped with cirkit (the paper setups, the CPU demos)."""

from __future__ import annotations

from typing import Annotated

import typer


def recipes(
    name: Annotated[str | None, typer.Argument(help="Print this recipe (to copy and edit it).",
                                               show_default=False)] = None,
    json_out: Annotated[bool, typer.Option("--json", help="Print the list as JSON on stdout.")] = False,
) -> None:
    """List the shipped recipes: name, the command that reads it, what it is for.

    Any command's -c takes a recipe's name (-c vit-synth-cpu) or a path to a YAML file
    (-c recipes/vit-synth-cpu.yaml works from any folder). Give a NAME to print that
    recipe, e.g. to save a copy and edit it.

    Examples

      cirkit recipes

      cirkit recipes vit-synth-cpu > my-recipe.yaml

      cirkit train data/synth/captions.jsonl --stage 1 -c vit-synth-cpu -o runs/s1
    """
    from cirkit.cli._common import user_errors
    from cirkit.config import find_recipe, shipped_recipes

    with user_errors():
        if name is not None:
            typer.echo(find_recipe(name).read_text(encoding="utf-8"), nl=False)
            return
        found = shipped_recipes()
    if json_out:
        import json

        typer.echo(json.dumps([{"name": r.name, "command": r.command, "description": r.description,
                                "path": str(r.path)} for r in found], ensure_ascii=False))
        return
    from rich.console import Console
    from rich.table import Table

    table = Table(show_edge=False, header_style="bold")
    for col in ("name", "command", "description"):
        table.add_column(col, overflow="fold")
    for r in found:
        table.add_row(r.name, r.command, r.description)
    Console(highlight=False).print(table)
