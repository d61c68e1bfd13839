"""``cirkit caption IMAGES -o captions.jsonl``: thin CLI over :mod:`cirkit.caption`."""

from __future__ import annotations

from typing import TYPE_CHECKING

from cirkit.cli._common import command, emit

if TYPE_CHECKING:
    from cirkit.caption import CaptionConfig


@command("cirkit.caption.CaptionConfig", section="caption")
def caption(config: CaptionConfig, json_out: bool) -> None:
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

      cirkit caption photos/ -c recipes/caption-qwen2-vl.yaml -o data/captions.jsonl --limit 100

      cirkit caption photos/ -o data/captions.jsonl --prompt paper --max-new-tokens 160

      accelerate launch -m cirkit caption photos/ -o data/captions.jsonl

      cirkit caption --from data/synth/captions.jsonl -o work/captions.jsonl
    """
    from cirkit.caption import run

    emit(run(config), json_out)
