"""``cirkit synth OUT``: write the procedural, offline CIR benchmark (thin CLI over cirkit.synth)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from cirkit.cli._common import JsonFlag, RecipeOpt, emit, flags, stage


@stage
def synth(
    out: Annotated[Path, typer.Argument(help="Output folder; must be new or empty unless --overwrite.")],
    seed: Annotated[int | None, typer.Option("--seed", help="Random seed; same seed, same bytes. (default 0)")] = None,
    train_triplets: Annotated[
        int | None, typer.Option("--train-triplets", help="Training triplets to generate. (default 2000)")
    ] = None,
    test_queries: Annotated[
        int | None, typer.Option("--test-queries", help="Queries per benchmark split (test, compositional). (default 200)")
    ] = None,
    distractors: Annotated[
        int | None, typer.Option("--distractors", help="Extra random gallery images per split. (default 200)")
    ] = None,
    image_size: Annotated[int | None, typer.Option("--image-size", help="Image side in pixels. (default 64)")] = None,
    max_objects: Annotated[int | None, typer.Option("--max-objects", help="Most objects in a scene (2 or 3). (default 3)")] = None,
    held_out: Annotated[
        list[str] | None,
        typer.Option(
            "--held-out",
            help="A 'COLOUR SHAPE' combination kept out of training for the compositional split; repeat or "
            "comma-separate. (default purple star, green triangle, yellow square, blue hexagon)",
        ),
    ] = None,
    overwrite: Annotated[
        bool | None, typer.Option("--overwrite", help="Replace OUT if it holds a previous synth output.")
    ] = None,
    config: RecipeOpt = None,
    json_: JsonFlag = False,
) -> None:
    """Generate a procedural Composed Image Retrieval benchmark, fully offline.

    Scenes of 1-3 coloured shapes on a background, each with an exact caption.
    Seven edit types (colour, shape, size, move, add, remove, background) with
    human-like modification texts. Writes OUT/images/, captions.jsonl and
    triplets.jsonl (training data), and OUT/benchmark/ with an in-distribution
    'test' split and a 'compositional' split whose targets hold colour-shape
    combinations never seen in training. OUT appears whole or not at all.

    Examples

      cirkit synth data/synth

      cirkit synth data/synth --seed 1 --train-triplets 20000 --overwrite

      cirkit synth data/synth --held-out "purple star,red hexagon" --json

      cirkit synth data/synth -c recipes/synth.yaml --image-size 96
    """
    from cirkit.config import resolve
    from cirkit.synth import SynthConfig, run

    cfg = resolve(
        SynthConfig,
        config,
        flags(
            out=out,
            seed=seed,
            train_triplets=train_triplets,
            test_queries=test_queries,
            distractors=distractors,
            image_size=image_size,
            max_objects=max_objects,
            held_out=tuple(held_out) if held_out else None,
            overwrite=overwrite or None,
        ),
        section="synth",
    )
    emit(run(cfg), json_)
