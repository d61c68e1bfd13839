"""``cirkit query``: find images like a reference image, changed as the text says."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from cirkit.cli._common import DeviceOpt, JsonFlag, RecipeOpt, StrictFlag, emit, flags, stage


@stage
def query(
    image: Annotated[Path | None, typer.Argument(help="Reference image (omit for a text-only query).")] = None,
    text: Annotated[str | None, typer.Argument(help="Modification text, e.g. \"make it red\".")] = None,
    text_opt: Annotated[str | None, typer.Option("--text", "-t", help="Text (for text-only queries).")] = None,
    index: Annotated[str | None, typer.Option("--index", "-i", help="Index made by 'cirkit index'.")] = None,
    table: Annotated[str | None, typer.Option("--table", help="Table name inside the index (default images)")] = None,
    model: Annotated[
        str | None, typer.Option("--model", "-m", help="Checkpoint folder or model name (default the index's model)")
    ] = None,
    backbone: Annotated[str | None, typer.Option("--backbone", help="clip, vit, mllm or fake.")] = None,
    pretrained: Annotated[str | None, typer.Option("--pretrained", help="open_clip pretrained tag (clip).")] = None,
    mode: Annotated[str | None, typer.Option("--mode", help="composed, image, text or sum (default composed)")] = None,
    k: Annotated[int | None, typer.Option("--k", "-k", help="Results per query (default 10)")] = None,
    where: Annotated[str | None, typer.Option("--where", help="SQL filter on metadata columns, e.g. \"year > 2020\".")] = None,
    exclude_reference: Annotated[
        bool | None, typer.Option("--exclude-reference/--keep-reference", help="Drop the reference image from the results.")
    ] = None,
    search: Annotated[str | None, typer.Option("--search", help="auto, exact or ann (default auto)")] = None,
    nprobes: Annotated[int | None, typer.Option("--nprobes", help="ANN partitions probed per query (default max(16, 2% of partitions)).")] = None,
    refine_factor: Annotated[
        int | None, typer.Option("--refine-factor", help="ANN: re-rank k*factor candidates exactly (default 30)")
    ] = None,
    html: Annotated[Path | None, typer.Option("--html", help="Write a self-contained HTML contact sheet.")] = None,
    grid: Annotated[Path | None, typer.Option("--grid", help="Write a PNG grid of query and results.")] = None,
    batch: Annotated[Path | None, typer.Option("--batch", help="queries.jsonl (cirkit Query records) to answer.")] = None,
    output: Annotated[
        Path | None, typer.Option("--output", "-o", help="Batch results file (default results.jsonl)")
    ] = None,
    batch_size: Annotated[int | None, typer.Option("--batch-size", help="Queries embedded per batch (default 64)")] = None,
    num_workers: Annotated[int | None, typer.Option("--num-workers", help="Image-decoding workers (default 0)")] = None,
    device: DeviceOpt = None,
    strict: StrictFlag = None,
    config: RecipeOpt = None,
    json_out: JsonFlag = False,
) -> None:
    """Search an index with a reference image, a text, or both (composed query).

    Prints a table of rank, score, id and path, and where the time went. The model must
    be the one that built the index (by default the index's own).

    Examples:

        cirkit query shoe.jpg "in red leather" --index my-index --model runs/vit
        cirkit query shoe.jpg --index my-index --exclude-reference
        cirkit query --text "a red circle" --index my-index --html results.html
        cirkit query shoe.jpg "with laces" -i my-index --where "brand = 'acme'" --grid top.png
        cirkit query --batch queries.jsonl -i my-index -o results.jsonl
    """
    from cirkit.config import resolve
    from cirkit.errors import CirkitError
    from cirkit.query import QueryConfig, run

    if text is not None and text_opt is not None:
        raise CirkitError("give the text once: either as the second argument or with --text")
    cfg = resolve(
        QueryConfig,
        config,
        flags(
            image=image,
            text=text if text is not None else text_opt,
            index=index,
            table=table,
            model=model,
            backbone=backbone,
            pretrained=pretrained,
            mode=mode,
            k=k,
            where=where,
            exclude_reference=exclude_reference,
            search=search,
            nprobes=nprobes,
            refine_factor=refine_factor,
            html=html,
            grid=grid,
            batch=batch,
            output=output,
            batch_size=batch_size,
            num_workers=num_workers,
            device=device,
            strict=strict,
        ),
        section="query",
    )
    result = run(cfg)
    emit(result, json_out, extra=lambda: _print_hits(result))


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
