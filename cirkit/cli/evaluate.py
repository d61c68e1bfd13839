"""``cirkit evaluate``: thin layer over :func:`cirkit.evaluate.run` (no torch at import time)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from cirkit.cli._common import command, emit

if TYPE_CHECKING:
    from cirkit.evaluate import EvaluateConfig


@command("cirkit.evaluate.EvaluateConfig", section="evaluate")
def evaluate(config: EvaluateConfig, json_out: bool) -> None:
    """Score a backbone on a CIR benchmark; print a table, write metrics.json and test-server files.

    The gallery is embedded once and every --mode is ranked against it (exact top-k),
    one table row per mode. Test splits without ground truth (CIRR test1, CIRCO test,
    FashionIQ test) need --submission and produce files only.

    Examples

      cirkit evaluate synth -d out/benchmark --backbone clip -m cirkit-tiny --pretrained tiny.safetensors \\
          --mode image --mode text --mode sum -o metrics.json

      cirkit evaluate cirr -d data/cirr --images data/nlvr2 -m ViT-B-32 --pretrained openai

      cirkit evaluate cirr -d data/cirr --images data/nlvr2 --split test1 --submission subs/

      cirkit evaluate circo -d CIRCO --images coco/unlabeled2017 --split test --submission subs/

      cirkit evaluate -c recipes/eval-fashioniq.yaml --caption-join first
    """
    from cirkit.evaluate import print_table, run

    result = run(config)
    emit(result, json_out, render=lambda: print_table(result))
