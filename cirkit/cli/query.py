"""``cirkit query``: find images like a reference image, changed as the text says."""

from __future__ import annotations

from typing import TYPE_CHECKING

from cirkit.cli._common import command, emit

if TYPE_CHECKING:
    from cirkit.query import QueryConfig


@command("cirkit.query.QueryConfig", section="query")
def query(config: QueryConfig, json_out: bool) -> None:
    """Search an index with a reference image, a text, or both (composed query).

    Prints a table of rank, score, id and path, and where the time went. The model must
    be the one that built the index (by default the index's own).

    Examples

      cirkit query shoe.jpg "in red leather" --index my-index -m runs/vit

      cirkit query shoe.jpg --index my-index --exclude-reference

      cirkit query --text "a red circle" --index my-index --html results.html

      cirkit query shoe.jpg "with laces" --index my-index --where "brand = 'acme'" --grid top.png

      cirkit query --batch queries.jsonl --index my-index -o results.jsonl
    """
    from cirkit.query import run

    result = run(config)
    emit(result, json_out, render=lambda: _print_hits(result))


def _print_hits(result) -> None:
    """A single query's hits as a table on stdout (with the index's metadata columns); timings on stderr."""
    from rich.console import Console
    from rich.markup import escape
    from rich.table import Table

    if result.single:
        columns = list(result.details.get("columns") or [])
        t = Table(show_edge=False, header_style="bold")
        for col, just in (("rank", "right"), ("score", "right"), ("id", "left"), ("path", "left")):
            t.add_column(col, justify=just, overflow="fold")
        for col in columns:
            t.add_column(escape(col), overflow="fold")
        for h in result.hits:
            meta = [escape("" if h.metadata.get(c) is None else str(h.metadata.get(c))) for c in columns]
            t.add_row(str(h.rank), f"{h.score:.4f}", escape(h.id), escape(h.image or ""), *meta)
        Console(highlight=False).print(t)
    Console(stderr=True, highlight=False).print(
        f"[dim]time ({result.details.get('search', '?')} search): {result.details.get('timing', '')}[/]"
    )
