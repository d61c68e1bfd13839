"""Model families behind one interface; ``load_backbone`` picks one from a spec.

Families: ``clip`` (open_clip zero-shot baselines), ``vit`` (InstructCIR ViT with
cross-attention, trained by cirkit), ``mllm`` (InstructCIR multimodal LLM, [EOS]
embeddings), ``fake`` (deterministic, for tests). A cirkit checkpoint folder names its
own family in its ``config.json`` (the folder's files: :mod:`cirkit.checkpoint`).
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from cirkit.errors import CheckpointError, CirkitError

if TYPE_CHECKING:
    from cirkit.backbones.base import Backbone, BackboneSpec

FAMILIES = ("clip", "vit", "mllm", "fake")


def checkpoint_config(path: str | Path) -> dict | None:
    """The ``config.json`` of a cirkit checkpoint folder, or None if ``path`` is not one (see :mod:`cirkit.checkpoint`)."""
    from cirkit.checkpoint import read_config

    return read_config(path)


def load_backbone(spec: BackboneSpec) -> Backbone:
    """Instantiate the backbone a spec names (a checkpoint folder decides its own family)."""
    from cirkit.device import pick_device, resolve_precision

    resolve_precision(spec.precision, pick_device(spec.device))  # bad --device/--precision: fail before loading
    family = spec.backbone
    if spec.model:
        cfg = checkpoint_config(spec.model)
        if cfg is not None:
            if family and family != cfg["backbone"]:
                raise CheckpointError(
                    f"{spec.model} is a {cfg['backbone']} checkpoint, but --backbone {family} was given"
                )
            family = cfg["backbone"]
    family = family or "clip"
    if family == "fake":
        from cirkit.backbones.fake import FakeBackbone

        return FakeBackbone(spec)
    if family == "clip":
        from cirkit.backbones.clip import ClipBackbone

        return ClipBackbone(spec)
    if family == "vit":
        from cirkit.backbones.vit import load_vit_backbone

        return load_vit_backbone(spec)
    if family == "mllm":
        from cirkit.backbones.mllm import load_mllm_backbone

        return load_mllm_backbone(spec)
    raise CirkitError(f"unknown backbone {family!r}; choose one of {', '.join(FAMILIES)}")
