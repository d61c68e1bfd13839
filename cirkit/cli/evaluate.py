"""``cirkit evaluate``: thin layer over :func:`cirkit.evaluate.run` (no torch at import time)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from cirkit.cli._common import DeviceOpt, JsonFlag, RecipeOpt, StrictFlag, emit, flags, stage


@stage
def evaluate(
    benchmark: Annotated[str | None, typer.Argument(
        help="fashioniq, cirr, circo, genecis, generic or synth (default: detected from --data).",
        show_default=False)] = None,
    data: Annotated[Path | None, typer.Option("--data", "-d", help="Annotation root or benchmark folder.")] = None,
    images: Annotated[Path | None, typer.Option("--images", "-i", help="Image root (default: --data).")] = None,
    split: Annotated[list[str] | None, typer.Option(
        "--split", "-s", help="Split to evaluate; repeat for several (default: the benchmark's val/test splits).")] = None,
    backbone: Annotated[str | None, typer.Option("--backbone", "-b", help="clip, vit, mllm or fake.")] = None,
    model: Annotated[str | None, typer.Option(
        "--model", "-m", help="open_clip model name, or a cirkit checkpoint folder.")] = None,
    pretrained: Annotated[str | None, typer.Option(
        "--pretrained", help="open_clip pretrained tag or a local .safetensors file.")] = None,
    mode: Annotated[list[str] | None, typer.Option(
        "--mode", help="Query mode: composed, image, text, sum; repeat to compare in one run.")] = None,
    batch_size: Annotated[int | None, typer.Option("--batch-size", help="Images per batch (default 64).")] = None,
    num_workers: Annotated[int | None, typer.Option("--num-workers", help="Image decoding processes.")] = None,
    device: DeviceOpt = None,
    precision: Annotated[str | None, typer.Option("--precision", help="fp32, fp16 or bf16.")] = None,
    strict: StrictFlag = None,
    submission: Annotated[Path | None, typer.Option(
        "--submission", help="Folder for test-server files (CIRR, CIRCO) or rankings (others).")] = None,
    output: Annotated[Path | None, typer.Option("--output", "-o", help="Write metrics.json here.")] = None,
    caption_join: Annotated[str | None, typer.Option(
        "--caption-join", help="FashionIQ captions: and ('c1 and c2', default), first, second.")] = None,
    exclude_reference: Annotated[bool | None, typer.Option(
        "--exclude-reference/--keep-reference",
        help="Remove each query's reference from its ranking (default: the benchmark's protocol).")] = None,
    allow_pickle: Annotated[bool | None, typer.Option(
        "--allow-pickle", help="Allow loading pickle (.bin/.pt) checkpoints you trust.")] = None,
    config: RecipeOpt = None,
    json_: JsonFlag = False,
) -> None:
    """Score a backbone on a CIR benchmark; print a table, write metrics.json and test-server files.

    The gallery is embedded once and every --mode is ranked against it (exact top-k),
    one table row per mode. Test splits without ground truth (CIRR test1, CIRCO test,
    FashionIQ test) need --submission and produce files only.

    Examples:

        cirkit evaluate synth -d out/benchmark -b clip -m cirkit-tiny --pretrained tiny.safetensors \\
            --mode image --mode text --mode sum -o metrics.json

        cirkit evaluate cirr -d data/cirr -i data/nlvr2 -m ViT-B-32 --pretrained openai

        cirkit evaluate cirr -d data/cirr -i data/nlvr2 --split test1 --submission subs/

        cirkit evaluate circo -d CIRCO -i coco/unlabeled2017 --split test --submission subs/

        cirkit evaluate -c recipes/eval-fashioniq.yaml --caption-join first
    """
    from cirkit.config import resolve
    from cirkit.evaluate import EvaluateConfig, print_table, run

    cfg = resolve(
        EvaluateConfig,
        config,
        flags(
            benchmark=benchmark, data=data, images=images, split=split or None, backbone=backbone, model=model,
            pretrained=pretrained, mode=mode or None, batch_size=batch_size, num_workers=num_workers,
            device=device, precision=precision, strict=strict, submission=submission, output=output,
            caption_join=caption_join, exclude_reference=exclude_reference, allow_pickle=allow_pickle,
        ),
        section="evaluate",
    )
    result = run(cfg)
    emit(result, json_, extra=lambda: print_table(result))
