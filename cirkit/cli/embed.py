"""``cirkit embed IMAGES -o gallery.lance``: embed a gallery with any backbone (thin CLI over cirkit.embed)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from cirkit.cli._common import DeviceOpt, JsonFlag, RecipeOpt, StrictFlag, emit, flags, stage


@stage
def embed(
    input: Annotated[Path | None, typer.Argument(help="A folder of images or a gallery.jsonl.")] = None,
    output: Annotated[Path | None, typer.Option("--output", "-o", help="Embeddings store to write or extend (NAME.lance).")] = None,
    model: Annotated[str | None, typer.Option("--model", "-m", help="Checkpoint folder, open_clip name or hub id.")] = None,
    backbone: Annotated[str | None, typer.Option("--backbone", help="clip, vit, mllm or fake (a checkpoint folder names its own).")] = None,
    pretrained: Annotated[str | None, typer.Option("--pretrained", help="open_clip weights tag or file (clip).")] = None,
    batch_size: Annotated[int | None, typer.Option("--batch-size", help="Images per batch. (default 64)")] = None,
    num_workers: Annotated[int | None, typer.Option("--num-workers", help="Image decoding processes. (default min(4, cores-1))")] = None,
    device: DeviceOpt = None,
    precision: Annotated[str | None, typer.Option("--precision", help="fp32, bf16 or fp16 (default: bf16 on GPUs that have it).")] = None,
    strict: StrictFlag = None,
    allow_pickle: Annotated[bool | None, typer.Option("--allow-pickle", help="Allow loading pickle weights you trust.")] = None,
    trust_remote_code: Annotated[bool | None, typer.Option("--trust-remote-code", help="Allow model code from the hub (mllm).")] = None,
    config: RecipeOpt = None,
    json_: JsonFlag = False,
) -> None:
    """Embed gallery images into a Lance store; re-running skips the ids already there.

    Images are decoded in worker processes and embedded in batches; each batch is
    committed as it finishes, so an interrupted run resumes where it stopped.
    Unreadable images are skipped and counted (--strict stops at the first one).

    Examples

      cirkit embed data/synth/benchmark/test/gallery.jsonl --model runs/s2 -o gallery.lance

      cirkit embed photos/ --backbone clip --model ViT-B-32 --pretrained laion2b_s34b_b79k -o photos.lance

      cirkit embed photos/ --backbone fake -o fake.lance --json
    """
    from cirkit.config import resolve
    from cirkit.embed import EmbedConfig, run

    cfg = resolve(
        EmbedConfig,
        config,
        flags(input=input, output=output, model=model, backbone=backbone, pretrained=pretrained,
              batch_size=batch_size, num_workers=num_workers, device=device, precision=precision,
              strict=strict, allow_pickle=allow_pickle, trust_remote_code=trust_remote_code),
        section="embed",
    )
    emit(run(cfg), json_)
