"""open_clip loading shared by the ``clip`` baselines and the ``vit`` backbone.

cirkit registers its own small architectures (``cirkit-tiny`` for tests, ``cirkit-small``
for training from scratch on CPU) beside open_clip's, the way open_clip keeps tiny test
configs next to the real ones. ``pretrained`` is an open_clip tag (``openai``,
``laion2b_s34b_b79k``), a local ``.safetensors``/``.bin`` file, or None for random init.
"""

from __future__ import annotations

import logging
from pathlib import Path

from cirkit.errors import CheckpointError, CirkitError

CONFIG_DIR = Path(__file__).with_name("configs")
_registered = False


def register_configs() -> None:
    """Make cirkit's architecture JSONs known to open_clip (idempotent)."""
    global _registered
    if _registered:
        return
    import open_clip

    open_clip.add_model_config(CONFIG_DIR)
    _registered = True


class _DropMessage(logging.Filter):
    def __init__(self, start: str):
        super().__init__()
        self.start = start

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(self.start)


def create_clip(model: str, pretrained: str | None = None, device: str = "cpu", precision: str = "fp32",
                allow_pickle: bool = False):
    """``open_clip.create_model_and_transforms`` with clear errors; returns (model, preprocess, tokenizer)."""
    import open_clip

    register_configs()
    if model not in open_clip.list_models() and not model.startswith(("hf-hub:", "local-dir:")):
        raise CirkitError(f"unknown open_clip model {model!r} (see open_clip.list_models())")
    if pretrained and Path(pretrained).suffix in (".bin", ".pt", ".pth") and not allow_pickle:
        raise CheckpointError(
            f"{pretrained}: pickle checkpoints can run code when loaded; convert to .safetensors "
            "or pass --allow-pickle if you trust the file"
        )
    # Without a tag the weights are random on purpose (training from scratch, or a cirkit
    # checkpoint loaded next): open_clip's "No pretrained weights loaded" warning is noise then.
    quiet = _DropMessage("No pretrained weights loaded") if not pretrained else None
    if quiet:
        logging.getLogger().addFilter(quiet)
    try:
        clip, _, preprocess = open_clip.create_model_and_transforms(
            model, pretrained=pretrained or None, device=device, precision=precision,
            weights_only=not allow_pickle,
        )
    except RuntimeError as e:
        if "pretrained" in str(e).lower() or "download" in str(e).lower():
            raise CirkitError(f"cannot load open_clip weights {model}/{pretrained}: {e}") from None
        raise
    finally:
        if quiet:
            logging.getLogger().removeFilter(quiet)
    tokenizer = open_clip.get_tokenizer(model)
    return clip, preprocess, tokenizer


def decode_size(clip) -> int:
    """Twice the shorter input side of an open_clip model's vision tower (see Backbone.decode_size)."""
    size = getattr(clip.visual, "image_size", 224)
    return 2 * int(min(size) if isinstance(size, (tuple, list)) else size)


def embed_dim(clip) -> int:
    """The width of an open_clip model's joint image-text embedding space."""
    import torch

    visual = getattr(clip, "visual", None)
    if getattr(visual, "proj", None) is not None:
        return int(visual.proj.shape[1])
    if getattr(visual, "output_dim", None):
        return int(visual.output_dim)
    proj = getattr(clip, "text_projection", None)
    if isinstance(proj, torch.nn.Linear):
        return int(proj.out_features)
    if proj is not None:
        return int(proj.shape[1])
    with torch.inference_mode():  # last resort: ask the model
        return int(clip.encode_text(torch.zeros(1, 77, dtype=torch.long)).shape[-1])
