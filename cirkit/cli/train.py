"""``cirkit train [DATA] -o CKPT``: train a backbone stage (thin CLI over cirkit.train)."""

from __future__ import annotations

import os
from typing import TYPE_CHECKING

from cirkit.cli._common import command, emit

if TYPE_CHECKING:
    from cirkit.train.config import TrainConfig


@command("cirkit.train.config.TrainConfig", section="train")
def train(config: TrainConfig, json_out: bool) -> None:
    """Train a backbone stage and write a checkpoint folder (also under accelerate launch).

    Stage 1 trains image-caption contrastive (captions.jsonl); stage 2 trains composed
    queries against target images (triplets.jsonl); stage combiner fits the text/query
    fusion weight with the backbone frozen. The checkpoint folder (model.safetensors,
    config.json, train_args.json, metrics.jsonl, trainer_state/) is saved atomically
    every --save-every steps; --resume continues an interrupted run exactly.

    Examples

      cirkit train data/synth/captions.jsonl --stage 1 -o runs/s1 -c recipes/vit-synth.yaml

      cirkit train data/synth/triplets.jsonl --stage 2 --init runs/s1 -o runs/s2 -c recipes/vit-synth.yaml

      cirkit train data/synth/triplets.jsonl --stage combiner --init runs/s2 -o runs/s2c --max-steps 100

      cirkit train triplets.jsonl -c recipes/vit-l14-paper.yaml -o runs/paper --resume

      accelerate launch --num_processes 2 -m cirkit train triplets.jsonl -c recipes/vit-l14-paper.yaml -o runs/paper
    """
    from cirkit.train import run

    result = run(config)
    if int(os.environ.get("RANK", "0")) == 0:  # one summary under accelerate launch / torchrun
        emit(result, json_out)
