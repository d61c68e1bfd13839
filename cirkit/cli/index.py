"""``cirkit index``: build or update a LanceDB index from an embeddings store."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from cirkit.cli._common import JsonFlag, RecipeOpt, emit, flags, stage


@stage
def index(
    embeddings: Annotated[
        Path | None, typer.Argument(help="Embeddings store (X.lance from 'cirkit embed'); optional with --delete.")
    ] = None,
    output: Annotated[str | None, typer.Option("--output", "-o", help="Index location: a folder or any LanceDB URI.")] = None,
    table: Annotated[str | None, typer.Option("--table", help="Table name inside the index (default images)")] = None,
    metadata: Annotated[
        Path | None, typer.Option("--metadata", help="JSONL of {id, any columns} to store beside the vectors.")
    ] = None,
    delete: Annotated[str | None, typer.Option("--delete", help="Ids to remove: a file (one per line) or id,id,...")] = None,
    ann: Annotated[
        bool | None, typer.Option("--ann/--no-ann", help="Force (or drop) the ANN index (default by --ann-threshold)")
    ] = None,
    ann_threshold: Annotated[
        int | None, typer.Option("--ann-threshold", help="Build an ANN index from this many rows (default 100000)")
    ] = None,
    index_type: Annotated[str | None, typer.Option("--index-type", help="IVF_PQ or IVF_HNSW_SQ (default IVF_PQ)")] = None,
    num_partitions: Annotated[
        int | None, typer.Option("--num-partitions", help="IVF partitions (default min(sqrt(N), N/256))")
    ] = None,
    num_sub_vectors: Annotated[
        int | None, typer.Option("--num-sub-vectors", help="PQ sub-vectors (default largest divisor of dim <= dim/8)")
    ] = None,
    config: RecipeOpt = None,
    json_out: JsonFlag = False,
) -> None:
    """Create or update an index: upsert by id, delete ids, build ANN search once it is large.

    Re-running the same command changes nothing. The index remembers the model that made
    its vectors and refuses vectors (or queries) from another one.

    Examples:

        cirkit index gallery.lance -o my-index
        cirkit index more.lance -o my-index --metadata tags.jsonl
        cirkit index -o my-index --delete old-ids.txt
        cirkit index gallery.lance -o my-index --ann
    """
    from cirkit.config import resolve
    from cirkit.index import IndexConfig, run

    cfg = resolve(
        IndexConfig,
        config,
        flags(
            embeddings=embeddings,
            output=output,
            table=table,
            metadata=metadata,
            delete=delete,
            ann=ann,
            ann_threshold=ann_threshold,
            index_type=index_type,
            num_partitions=num_partitions,
            num_sub_vectors=num_sub_vectors,
        ),
        section="index",
    )
    result = run(cfg)
    emit(result, json_out)
