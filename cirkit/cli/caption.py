"""``cirkit caption IMAGES -o captions.jsonl``: thin CLI over :mod:`cirkit.caption`."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from cirkit.cli._common import (
    DeviceOpt,
    DtypeOpt,
    JsonFlag,
    NumBeamsOpt,
    RecipeOpt,
    SamplingTemperatureOpt,
    StrictFlag,
    TopPOpt,
    TrustRemoteCodeOpt,
    emit,
    flags,
    stage,
)


@stage
def caption(
    images: Annotated[
        Path | None, typer.Argument(help="A folder of images (recursive) or a gallery/captions JSONL with id and image.")
    ] = None,
    output: Annotated[Path | None, typer.Option("--output", "-o", help="Captions JSONL to write or resume. (default captions.jsonl)")] = None,
    from_file: Annotated[
        Path | None,
        typer.Option("--from", help="Import existing captions (JSONL with id/image/caption, CSV, or JSON) instead of running a model."),
    ] = None,
    model: Annotated[
        str | None, typer.Option("--model", "-m", help="Hub id or folder of a captioning model. (default llava-hf/llava-1.5-7b-hf)")
    ] = None,
    prompt: Annotated[
        str | None, typer.Option("--prompt", help="Instruction for chat models (a text prefix for plain captioners like BLIP).")
    ] = None,
    max_new_tokens: Annotated[int | None, typer.Option("--max-new-tokens", help="Longest caption in tokens. (default 60)")] = None,
    temperature: SamplingTemperatureOpt = None,
    top_p: TopPOpt = None,
    num_beams: NumBeamsOpt = None,
    seed: Annotated[int | None, typer.Option("--seed", help="Sampling seed. (default 0)")] = None,
    batch_size: Annotated[int | None, typer.Option("--batch-size", "-b", help="Images per generate call. (default 8)")] = None,
    num_workers: Annotated[int | None, typer.Option("--num-workers", help="Image decoding processes. (default: up to 4)")] = None,
    limit: Annotated[int | None, typer.Option("--limit", help="Caption only the first N images.")] = None,
    dtype: DtypeOpt = None,
    trust_remote_code: TrustRemoteCodeOpt = None,
    strict: StrictFlag = None,
    device: DeviceOpt = None,
    config: RecipeOpt = None,
    json_: JsonFlag = False,
) -> None:
    """Caption every image with an MLLM (LLaVA, Qwen2-VL, ...) or an image-to-text model (BLIP).

    Records (id, image, caption, model, prompt, settings) are appended as they finish:
    re-running the same command after a crash resumes where it stopped, and each id
    is written once. Unreadable images are skipped and listed (--strict: fatal).
    Under `accelerate launch` each process captions its share into
    captions.jsonl.part-<rank>, merged into captions.jsonl at the end.

    Examples

      cirkit caption photos/ -o data/captions.jsonl

      cirkit caption photos/ -o data/captions.jsonl -m Qwen/Qwen2-VL-2B-Instruct --batch-size 16

      cirkit caption gallery.jsonl -o captions.jsonl -m Salesforce/blip-image-captioning-base

      accelerate launch -m cirkit caption photos/ -o data/captions.jsonl

      cirkit caption --from data/synth/captions.jsonl -o work/captions.jsonl
    """
    from cirkit.caption import CaptionConfig, run
    from cirkit.config import resolve

    cfg = resolve(
        CaptionConfig,
        config,
        flags(
            images=images, output=output, from_file=from_file, model=model, prompt=prompt,
            max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p, num_beams=num_beams, seed=seed,
            batch_size=batch_size, num_workers=num_workers, limit=limit, dtype=dtype,
            trust_remote_code=trust_remote_code, strict=strict, device=device,
        ),
        section="caption",
    )
    emit(run(cfg), json_)
