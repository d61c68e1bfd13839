"""Training: one generic loop (accelerate) and a plugin per trainable backbone.

``run(config)`` is what ``cirkit train`` calls; ``plugin_for(config)`` picks the backbone's
:class:`~cirkit.train.plugin.TrainPlugin` (imported only when needed).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from cirkit.errors import CirkitError

if TYPE_CHECKING:
    from cirkit.summary import StageResult
    from cirkit.train.config import TrainConfig
    from cirkit.train.plugin import TrainPlugin

TRAINABLE = ("vit", "mllm", "reformulator")


def plugin_for(config: TrainConfig) -> TrainPlugin:
    """The plugin that trains ``config.backbone``."""
    if config.lora_layers and config.backbone != "reformulator":
        raise CirkitError(f"--lora-layers applies to --backbone reformulator only, not {config.backbone}; drop it")
    if config.backbone == "vit":
        from cirkit.train.vit import VitTrainPlugin

        return VitTrainPlugin(config)
    if config.backbone == "mllm":
        from cirkit.train.mllm import MllmTrainPlugin

        return MllmTrainPlugin(config)
    if config.backbone == "reformulator":
        from cirkit.train.reformulator import ReformulatorTrainPlugin

        return ReformulatorTrainPlugin(config)
    raise CirkitError(f"cannot train backbone {config.backbone!r}; trainable backbones: {', '.join(TRAINABLE)}")


def run(config: TrainConfig) -> StageResult:
    """Train one stage and write the checkpoint folder ``config.output``."""
    from cirkit.train.loop import train

    return train(config, plugin_for(config))
