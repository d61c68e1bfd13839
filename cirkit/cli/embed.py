"""``cirkit embed IMAGES -o gallery.lance``: embed a gallery with any backbone (thin CLI over cirkit.embed)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from cirkit.cli._common import command, emit

if TYPE_CHECKING:
    from cirkit.embed import EmbedConfig


@command("cirkit.embed.EmbedConfig", section="embed")
def embed(config: EmbedConfig, json_out: bool) -> None:
    """Embed gallery images into a Lance store; re-running skips the ids already there.

    Images are decoded in worker processes and embedded in batches; each batch is
    committed as it finishes, so an interrupted run resumes where it stopped.
    Unreadable images are skipped and counted (--strict stops at the first one).

    Examples

      cirkit embed data/synth/benchmark/test/gallery.jsonl -m runs/s2 -o gallery.lance

      cirkit embed photos/ --backbone clip -m ViT-B-32 --pretrained laion2b_s34b_b79k -o photos.lance

      cirkit embed photos/ --backbone fake -o fake.lance --json
    """
    from cirkit.embed import run

    emit(run(config), json_out)
