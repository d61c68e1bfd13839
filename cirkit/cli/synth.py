"""``cirkit synth OUT``: write the procedural, offline CIR benchmark (thin CLI over cirkit.synth)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from cirkit.cli._common import command, emit

if TYPE_CHECKING:
    from cirkit.synth import SynthConfig


@command("cirkit.synth.SynthConfig", section="synth")
def synth(config: SynthConfig, json_out: bool) -> None:
    """Generate a procedural Composed Image Retrieval benchmark, fully offline.

    Scenes of 1-3 coloured shapes on a background, each with an exact caption.
    Seven edit types (colour, shape, size, move, add, remove, background) with
    human-like modification texts. Writes OUT/images/, captions.jsonl and
    triplets.jsonl (training data), and OUT/benchmark/ with an in-distribution
    'test' split and a 'compositional' split whose targets hold colour-shape
    combinations never seen in training. OUT appears whole or not at all.

    Examples

      cirkit synth data/synth

      cirkit synth -o data/synth --seed 1 --train-triplets 20000 --overwrite

      cirkit synth data/synth --held-out "purple star,red hexagon" --json

      cirkit synth data/synth --image-size 96 --max-objects 2
    """
    from cirkit.synth import run

    emit(run(config), json_out)
