"""open_clip loading shared by the ``clip`` baselines and the ``vit`` backbone.

cirkit registers its own small architectures (``cirkit-tiny`` for tests, ``cirkit-small``
for training from scratch on CPU) beside open_clip's, the way open_clip keeps tiny test
configs next to the real ones. ``pretrained`` is an open_clip tag (``openai``,
``laion2b_s34b_b79k``), a local ``.safetensors``/``.bin`` file, or None for random init.

Activation: OpenAI's CLIP weights (and a few others: MetaCLIP, DFN, ...) were trained with
QuickGELU, ``x * sigmoid(1.702 x)``, and open_clip's plain configs (``ViT-L-14``) build GELU,
only warning about the mismatch. :func:`quick_gelu_for` reads the ``quick_gelu`` flag of the
tag in open_clip's pretrained registry, so ``ViT-L-14`` + ``openai`` gets the activation its
weights were trained with whatever the user types (``hf-hub:``/``local-dir:`` models carry
their own flag in ``open_clip_config.json``, which open_clip honours).
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


def quick_gelu_for(model: str, pretrained: str | None) -> bool:
    """Whether ``pretrained`` (an open_clip tag of ``model``) was trained with QuickGELU.

    Read from open_clip's pretrained registry (``quick_gelu`` of the tag), never hard-coded:
    True for ``openai`` on every architecture, and for the MetaCLIP/DFN/... tags that say so.
    A file path, a schema'd model (``hf-hub:``, ``local-dir:``: their own config decides) or no
    weights at all give False, i.e. the model config's own activation.
    """
    import open_clip

    if not pretrained or model.startswith(("hf-hub:", "local-dir:")) or Path(pretrained).is_file():
        return False
    register_configs()
    cfg = open_clip.get_pretrained_cfg(model.replace("/", "-"), pretrained) or {}
    return bool(cfg.get("quick_gelu", False))


def uses_quick_gelu(clip) -> bool:
    """Whether an open_clip model's transformer MLPs use QuickGELU (what the weights must match)."""
    from open_clip.transformer import QuickGELU

    return any(isinstance(m, QuickGELU) for m in clip.modules())


def create_clip(model: str, pretrained: str | None = None, device: str = "cpu", precision: str = "fp32",
                allow_pickle: bool = False, quick_gelu: bool | None = None):
    """``open_clip.create_model_and_transforms`` with clear errors; returns (model, preprocess, tokenizer).

    ``quick_gelu``: force QuickGELU (True) or leave the config's activation (False); None
    decides from the tag (:func:`quick_gelu_for`). A checkpoint rebuilds with the value it saved.
    """
    import open_clip

    register_configs()
    if model not in open_clip.list_models() and not model.startswith(("hf-hub:", "local-dir:")):
        raise CirkitError(f"unknown open_clip model {model!r} (see open_clip.list_models())")
    _check_hub(model, pretrained)
    if quick_gelu is None:
        quick_gelu = quick_gelu_for(model, pretrained)
    _check_weights_file(model, pretrained, allow_pickle)
    # Without a tag the weights are random on purpose (training from scratch, or a cirkit
    # checkpoint loaded next): open_clip's "No pretrained weights loaded" warning is noise then.
    quiet = _DropMessage("No pretrained weights loaded") if not pretrained else None
    if quiet:
        logging.getLogger().addFilter(quiet)
    try:
        clip, _, preprocess = open_clip.create_model_and_transforms(
            model, pretrained=pretrained or None, device=device, precision=precision,
            weights_only=not allow_pickle, force_quick_gelu=bool(quick_gelu),
        )
    except RuntimeError as e:
        if "pretrained" in str(e).lower() or "download" in str(e).lower():
            raise CirkitError(f"cannot load open_clip weights {model}/{pretrained}: {e}") from None
        raise
    except ValueError as e:  # open_clip's own checks of the name ('local-dir:' with no path, ...)
        raise CirkitError(f"cannot load open_clip model {model!r}: {str(e).splitlines()[0]}") from None
    finally:
        if quiet:
            logging.getLogger().removeFilter(quiet)
    tokenizer = open_clip.get_tokenizer(model)
    return clip, preprocess, tokenizer


def _check_hub(model: str, pretrained: str | None) -> None:
    """Weights that come from the Hugging Face Hub: one line at once when they cannot (cirkit.hub)."""
    import open_clip

    from cirkit.hub import check_model

    if model.startswith("hf-hub:"):
        check_model(model[len("hf-hub:"):], "open_clip model")
    elif pretrained and not Path(pretrained).is_file():
        repo = (open_clip.get_pretrained_cfg(model, pretrained) or {}).get("hf_hub", "").strip("/")
        if repo:
            check_model(repo, f"open_clip model ({model}, weights {pretrained})",
                        local="a local weights file (--pretrained path/to/open_clip_model.safetensors)")


def _weights_file(model: str, pretrained: str | None) -> str | None:
    """The local file open_clip will load weights from for ``model``/``pretrained``, if any."""
    import open_clip
    from open_clip.factory import _find_checkpoint_in_dir

    if model.startswith("local-dir:"):  # open_clip ignores `pretrained` and picks a file in the folder
        folder = Path(model[len("local-dir:"):])
        return _find_checkpoint_in_dir(folder) if folder.is_dir() else None
    if model.startswith("hf-hub:"):  # open_clip ignores `pretrained` and fetches the repo's weights
        try:
            return open_clip.pretrained.download_pretrained_from_hf(model[len("hf-hub:"):])
        except Exception:  # noqa: BLE001 - open_clip's own attempt reports the failure
            return None
    if not pretrained:
        return None
    if Path(pretrained).is_file():
        return pretrained
    tag = open_clip.get_pretrained_cfg(model, pretrained)
    if not tag:
        return None
    try:  # the same call open_clip makes next: downloads once, or returns the cached file
        return open_clip.pretrained.download_pretrained(tag) or None
    except Exception:  # noqa: BLE001 - open_clip's own attempt reports the failure
        return None


def _check_weights_file(model: str, pretrained: str | None, allow_pickle: bool) -> None:
    """No pickle without --allow-pickle, decided by the file's content (``.ckpt``, ``.PT``, no suffix...).

    open_clip picks its loader by suffix: ``.safetensors`` files go to safetensors, ``.npz``/``.npy``
    to NumPy (which refuses pickled arrays), anything else to ``torch.load``.
    """
    from cirkit.checkpoint import check_safetensors, refuse_pickle

    path = _weights_file(model, pretrained)
    if path is None:
        return
    suffix = Path(path).suffix.lower()
    if str(path).endswith(".safetensors"):
        check_safetensors(path)
    elif suffix not in (".npz", ".npy"):
        fmt = refuse_pickle(path, allow_pickle)
        if fmt == "safetensors":
            raise CheckpointError(f"{path}: a safetensors file that open_clip would read with torch.load "
                                  "(it goes by the name); rename it to end in .safetensors")


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
