"""``cirkit index``: build or update a LanceDB index from an embeddings store."""

from __future__ import annotations

from typing import TYPE_CHECKING

from cirkit.cli._common import command, emit

if TYPE_CHECKING:
    from cirkit.index import IndexConfig


@command("cirkit.index.IndexConfig", section="index")
def index(config: IndexConfig, json_out: bool) -> None:
    """Create or update an index: upsert by id, delete ids, build ANN search once it is large.

    Re-running the same command changes nothing. The index remembers the model that made
    its vectors and refuses vectors (or queries) from another one.

    Examples

      cirkit index gallery.lance -o my-index

      cirkit index more.lance -o my-index --metadata tags.jsonl

      cirkit index -o my-index --delete old-ids.txt

      cirkit index gallery.lance -o my-index --ann

      cirkit index gallery.lance -o my-index -c recipes/index-ann.yaml
    """
    from cirkit.index import run

    emit(run(config), json_out)
