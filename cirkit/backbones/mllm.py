"""The MLLM backbone: a multimodal LLM read out at its last ([EOS]) token, trained with LoRA.

Any transformers image-text-to-text model (vision encoder + projector + causal LLM:
LLaVA-1.5, LLaVA-NeXT, Qwen2-VL, ...) loads by hub id or local path through
``AutoProcessor`` and ``AutoModelForImageTextToText``. Every input is written into a
prompt template that asks the model to summarise it in one word (E5-V / PromptEOL
style), followed by the end token; the embedding is the final-layer hidden state at
that last token, L2-normalised:

- image (gallery, targets):   ``<image>\\nSummarize above image in one word:``
- text (captions):            ``<sent>\\nSummarize above sentence in one word:``
- composed (queries):         ``<image>\\nModify this image with "<instruction>", ...``

Text-only inputs go straight to the language model (no vision encoder, no projector).
Sequences are right-padded and read at each row's last attended position, so an
embedding never depends on what else is in the batch.

Training (stage 1 image-caption, stage 2 triplets, LoRA or full fine-tuning) lives in
:mod:`cirkit.train.mllm`.

Checkpoint folder (files named in :mod:`cirkit.checkpoint`): ``config.json`` (``{"cirkit",
"backbone": "mllm", "base_model", "templates", ...}``, written and read here), the peft
adapter (``adapter_config.json``, ``adapter_model.safetensors``) and, with ``--merge`` or
full fine-tuning, ``model.safetensors`` holding complete weights that load without peft.
"""

from __future__ import annotations

import contextlib
import logging
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from cirkit.backbones.base import Backbone, BackboneSpec
from cirkit.device import pick_device, pick_dtype
from cirkit.errors import CheckpointError, CirkitError
from cirkit.records import EmbeddingManifest

log = logging.getLogger("cirkit")

DEFAULT_TEMPLATES: dict[str, str] = {
    "image": "<image>\nSummarize above image in one word:",
    "text": "<sent>\nSummarize above sentence in one word:",
    "composed": '<image>\nModify this image with "<instruction>", summarize the modified image in one word:',
    # Appended to every prompt; "<eos>" means the tokenizer's own end token, "" means none.
    "end": "<eos>",
}


# ---------------------------------------------------------------------------------------
# Model anatomy: where the LLM and the vision side live, whatever the family.
# ---------------------------------------------------------------------------------------
def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The transformers model under accelerate/DDP and peft wrappers."""
    model = getattr(model, "module", model)
    get_base = getattr(model, "get_base_model", None)
    return get_base() if callable(get_base) else model


def inner_model(model: torch.nn.Module) -> torch.nn.Module:
    """The headless multimodal model (e.g. ``LlavaModel``): ``forward`` returns ``last_hidden_state``."""
    hf = unwrap(model)
    inner = getattr(hf, "model", None)
    if inner is None or not hasattr(inner, "language_model"):
        raise CirkitError(
            f"{type(hf).__name__} has no '.model.language_model'; the mllm backbone needs a transformers "
            "image-text-to-text model (LLaVA, LLaVA-NeXT, Qwen2-VL, ...)"
        )
    return inner


def language_model(model: torch.nn.Module) -> torch.nn.Module:
    return inner_model(model).language_model


def vision_module_names(model: torch.nn.Module) -> list[str]:
    """Names of the vision tower and projector (every child of the inner model but the LLM)."""
    return [n for n, _ in inner_model(model).named_children() if n != "language_model"]


# ---------------------------------------------------------------------------------------
# Prompts -> model inputs (picklable: runs inside DataLoader workers during training).
# ---------------------------------------------------------------------------------------
class Prompter:
    """Turns images/texts into model inputs with the image, text and composed templates."""

    def __init__(self, processor: Any, templates: dict[str, str] | None = None, max_length: int = 128):
        self.processor = processor
        self.tokenizer = getattr(processor, "tokenizer", processor)
        self.templates = {**DEFAULT_TEMPLATES, **(templates or {})}
        self.max_length = int(max_length)
        if self.tokenizer.pad_token is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        self.tokenizer.padding_side = "right"
        for key, slot in (("image", "<image>"), ("composed", "<image>"), ("composed", "<instruction>"), ("text", "<sent>")):
            if slot not in self.templates[key]:
                raise CirkitError(f"the {key} template must contain {slot}: {self.templates[key]!r}")

    @property
    def image_placeholder(self) -> str:
        token = getattr(self.processor, "image_token", None) or "<image>"
        vocab = self.tokenizer.get_vocab()
        if token == "<|image_pad|>" and "<|vision_start|>" in vocab:  # Qwen2-VL family
            return "<|vision_start|><|image_pad|><|vision_end|>"
        return token

    def _end(self) -> str:
        end = self.templates.get("end", "")
        return end.replace("<eos>", self.tokenizer.eos_token or "")

    def _clip(self, text: str) -> str:
        """Cut a caption/instruction to ``max_length`` tokens so the end token always survives."""
        text = " ".join((text or "").split())
        if len(text.encode("utf-8")) <= self.max_length:  # a token covers at least one byte
            return text
        ids = self.tokenizer(text, add_special_tokens=False)["input_ids"]
        if len(ids) <= self.max_length:
            return text
        return self.tokenizer.decode(ids[: self.max_length], skip_special_tokens=True)

    def fill(self, kind: str, text: str | None = None) -> str:
        t = self.templates[kind]
        t = t.replace("<image>", self.image_placeholder)
        if kind == "text":
            t = t.replace("<sent>", self._clip(text or ""))
        elif kind == "composed":
            t = t.replace("<instruction>", self._clip(text or ""))
        return t + self._end()

    def images(self, images: list[Any]) -> dict[str, torch.Tensor]:
        return self._mm(images, [self.fill("image") for _ in images])

    def composed(self, images: list[Any], texts: list[str]) -> dict[str, torch.Tensor]:
        return self._mm(images, [self.fill("composed", t) for t in texts])

    def texts(self, texts: list[str]) -> dict[str, torch.Tensor]:
        enc = self.tokenizer([self.fill("text", t) for t in texts], return_tensors="pt", padding=True)
        return {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]}

    def _mm(self, images: list[Any], prompts: list[str]) -> dict[str, torch.Tensor]:
        enc = self.processor(images=list(images), text=prompts, return_tensors="pt", padding=True)
        return {k: v for k, v in enc.items() if k != "token_type_ids" and isinstance(v, torch.Tensor)}


def last_token_hidden(hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """The hidden state at each row's last attended position (works for left or right padding)."""
    pos = torch.arange(attention_mask.shape[1], device=attention_mask.device)
    last = (attention_mask.to(pos.dtype) * (pos + 1)).argmax(dim=1)
    return hidden[torch.arange(hidden.shape[0], device=hidden.device), last]


def forward_embed(model: torch.nn.Module, kind: str, enc: dict[str, torch.Tensor]) -> torch.Tensor:
    """Unnormalised last-token embeddings for prepared inputs of ``kind`` (image | text | composed)."""
    if kind == "text":  # bypass the vision encoder and projector entirely
        out = language_model(model)(
            input_ids=enc["input_ids"], attention_mask=enc["attention_mask"], use_cache=False
        )
    else:
        out = inner_model(model)(**enc, use_cache=False)
    return last_token_hidden(out.last_hidden_state, enc["attention_mask"])


def inputs_to(enc: dict[str, torch.Tensor], device: torch.device, dtype: torch.dtype | None = None) -> dict:
    out = {}
    for k, v in enc.items():
        v = v.to(device, non_blocking=True)
        if dtype is not None and v.is_floating_point():
            v = v.to(dtype)
        out[k] = v
    return out


# ---------------------------------------------------------------------------------------
# Loading: hub id / local folder / cirkit checkpoint (adapter, merged or full weights).
# ---------------------------------------------------------------------------------------
def load_base(model_id: str, trust_remote_code: bool = False, dtype: torch.dtype | None = None):
    """``(model, processor)`` from a hub id or local folder (never runs remote code unless asked)."""
    from transformers import AutoModelForImageTextToText, AutoProcessor

    from cirkit.hub import check_model

    check_model(model_id, "multimodal model")
    try:
        processor = AutoProcessor.from_pretrained(model_id, trust_remote_code=trust_remote_code)
        kwargs = {"dtype": dtype} if dtype is not None else {}
        model = AutoModelForImageTextToText.from_pretrained(model_id, trust_remote_code=trust_remote_code, **kwargs)
    except (OSError, ValueError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CirkitError(
            f"cannot load multimodal model {model_id!r} ({first}); pass a hub id or a folder with "
            "config.json + weights + processor files (add --trust-remote-code only for models that need it)"
        ) from None
    return model, processor


def default_pixels() -> tuple[int, int]:
    """The ``min_pixels``/``max_pixels`` defaults, declared once as training settings."""
    import dataclasses

    from cirkit.train.config import TrainConfig

    f = {x.name: x for x in dataclasses.fields(TrainConfig)}
    return int(f["min_pixels"].default), int(f["max_pixels"].default)


def cap_image_pixels(processor: Any, min_pixels: int | None, max_pixels: int | None) -> bool:
    """Bound a dynamic-resolution image processor (Qwen2-VL family) to ``min..max_pixels``.

    Such a processor keeps each image near its own size, so a 4000x3000 photo becomes 1,230
    visual tokens at the processor's default and up to 16k at the hub configs' limits; the
    bound makes sequence length (memory, speed) independent of the photos. Returns whether
    the processor is of that kind; fixed-size families (LLaVA's CLIP processor) are untouched.
    """
    ip = getattr(processor, "image_processor", None)
    size = getattr(ip, "size", None)
    keys = size.keys() if isinstance(size, dict) else vars(size) if size is not None else {}
    if ip is None or not hasattr(ip, "merge_size") or "longest_edge" not in keys:
        return False
    lo = min_pixels if min_pixels is not None else _size_get(size, "shortest_edge")
    hi = max_pixels if max_pixels is not None else _size_get(size, "longest_edge")
    if lo > hi:
        raise CirkitError(f"min_pixels {lo} is larger than max_pixels {hi}")
    ip.size = {"shortest_edge": int(lo), "longest_edge": int(hi)}
    for name in ("min_pixels", "max_pixels"):  # older processors also keep these attributes
        if getattr(ip, name, None) is not None:
            setattr(ip, name, int(lo if name == "min_pixels" else hi))
    return True


def _size_get(size: Any, key: str) -> int:
    return int(size[key] if isinstance(size, dict) else getattr(size, key))


def _check_weights(folder: Path, allow_pickle: bool) -> None:
    """Refuse a model folder transformers would load from pickle (decided by content), unless allowed."""
    from cirkit.checkpoint import check_model_folder

    check_model_folder(folder, allow_pickle)


def save_checkpoint(model: torch.nn.Module, folder: str | Path, *, base_model: str | None, templates: dict[str, str],
                    max_length: int, merge: bool, stage: str, lora: dict[str, Any],
                    temperature: float | None, processor: Any = None,
                    pixels: tuple[int, int] | None = None) -> None:
    """Write an mllm checkpoint's model files and cirkit's config into ``folder``.

    A peft model writes its adapter (and, with ``merge``, merged complete weights too); a
    fully fine-tuned model writes complete weights. A folder with complete weights is also a
    plain transformers model folder (the model's config.json, generation config and
    ``processor``'s files; cirkit's config in cirkit.json): see :mod:`cirkit.checkpoint`.
    """
    from cirkit.checkpoint import ADAPTER_DIR, WEIGHTS, write_config, write_model_files

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    is_peft = hasattr(model, "peft_config")
    complete = not is_peft or merge
    if is_peft:  # beside complete weights in adapter/ (see cirkit.checkpoint.adapter_folder)
        where = folder / ADAPTER_DIR if complete and processor is not None else folder
        model.save_pretrained(str(where))
        (where / "README.md").unlink(missing_ok=True)  # peft's model card template, not ours
    if complete:
        import copy

        from safetensors.torch import save_model

        # Complete weights (tied tensors stored once), loadable without peft or cirkit.
        full = copy.deepcopy(model).merge_and_unload() if is_peft else model
        save_model(full, str(folder / WEIGHTS))
        if processor is not None:
            write_model_files(folder, full, processor)
    write_config(
        folder, "mllm", model_folder=complete and processor is not None,
        base_model=base_model,
        templates={k: templates[k] for k in DEFAULT_TEMPLATES},
        max_length=max_length,
        dim=int(language_model(model).config.hidden_size),
        weights="lora" if is_peft else "full",
        merged=bool(is_peft and merge),
        lora=lora if is_peft else None,
        stage=stage,
        temperature=temperature,
        **({"min_pixels": int(pixels[0]), "max_pixels": int(pixels[1])} if pixels else {}),
    )


def load_checkpoint_model(
    folder: str | Path,
    prefer: str = "auto",
    trust_remote_code: bool = False,
    trainable: bool = False,
    dtype: torch.dtype | None = None,
    allow_pickle: bool = False,
):
    """``(model, processor, cirkit config)`` from a cirkit mllm checkpoint folder.

    ``prefer``: ``auto`` uses complete weights (``model.safetensors``, no peft needed)
    when present and the adapter otherwise; ``adapter`` / ``merged`` force one.
    ``allow_pickle`` applies to the base model's folder (the checkpoint itself is safetensors only).
    """
    from cirkit.checkpoint import (
        ADAPTER_CONFIG,
        CONFIG,
        SETTINGS,
        WEIGHTS,
        adapter_folder,
        check_folder,
        read_config,
    )

    folder = Path(folder)
    cfg = read_config(folder)
    if cfg is None or cfg.get("backbone") != "mllm":
        raise CheckpointError(f"{folder}: not a cirkit mllm checkpoint ({CONFIG} with backbone 'mllm')")
    check_folder(folder, "mllm")
    has_full = (folder / WEIGHTS).exists()
    adapter = adapter_folder(folder)
    has_adapter = adapter is not None
    if prefer == "adapter" and not has_adapter:
        raise CheckpointError(f"{folder}: no {ADAPTER_CONFIG} (was it trained with --full-finetune?)")
    if prefer == "merged" and not has_full:
        raise CheckpointError(f"{folder}: no {WEIGHTS}; train with --merge to export merged weights")
    full = has_full and (prefer in ("auto", "merged")) and not (prefer == "auto" and trainable and has_adapter)
    if full and (folder / SETTINGS).is_file():  # a transformers model folder of its own: no base model needed
        model, processor = load_base(str(folder), trust_remote_code, dtype)
        if "max_pixels" in cfg:
            cap_image_pixels(processor, cfg.get("min_pixels"), cfg["max_pixels"])
        return model, processor, cfg
    if Path(cfg["base_model"]).is_dir():
        _check_weights(Path(cfg["base_model"]), allow_pickle)
    model, processor = load_base(cfg["base_model"], trust_remote_code, dtype)
    # The image size the checkpoint was trained at; an older checkpoint recorded none (processor default).
    if "max_pixels" in cfg:
        cap_image_pixels(processor, cfg.get("min_pixels"), cfg["max_pixels"])
    if full:
        from safetensors.torch import load_model

        missing, unexpected = load_model(model, str(folder / WEIGHTS), strict=False)
        missing = [k for k in missing if not k.startswith("lm_head")]
        if missing or unexpected:
            raise CheckpointError(
                f"{folder / WEIGHTS}: does not fit {cfg['base_model']} "
                f"(missing {missing[:3]}, unexpected {list(unexpected)[:3]})"
            )
    elif has_adapter:
        from peft import PeftModel

        with peft_quiet():
            model = PeftModel.from_pretrained(model, str(adapter), is_trainable=trainable)
    return model, processor, cfg


class MllmBackbone(Backbone):
    """Last-token embeddings of a multimodal LLM under prompt templates (see module docstring)."""

    name = "mllm"

    def __init__(self, spec: BackboneSpec, model: torch.nn.Module, processor: Any,
                 templates: dict[str, str] | None = None, max_length: int = 128):
        super().__init__(spec)
        self.device = pick_device(spec.device)
        self.dtype = pick_dtype(spec.precision, self.device)
        self.model = model.to(self.device, self.dtype).eval()
        self.prompter = Prompter(processor, templates, max_length)
        self.dim = int(language_model(model).config.hidden_size)

    def image_transform(self) -> Callable[[Any], Any]:
        return keep_image

    def collate(self, items: list[Any]) -> list[Any]:
        return list(items)

    @torch.inference_mode()
    def _embed(self, kind: str, enc: dict[str, torch.Tensor]) -> torch.Tensor:
        h = forward_embed(self.model, kind, inputs_to(enc, self.device, self.dtype))
        return torch.nn.functional.normalize(h.float(), dim=-1).cpu()

    def embed_images(self, batch: list[Any]) -> torch.Tensor:
        return self._embed("image", self.prompter.images(batch))

    def embed_texts(self, texts: list[str]) -> torch.Tensor:
        return self._embed("text", self.prompter.texts(texts))

    def embed_composed(self, batch: list[Any], texts: list[str]) -> torch.Tensor:
        return self._embed("composed", self.prompter.composed(batch, texts))

    def manifest(self) -> EmbeddingManifest:
        m = super().manifest()
        m.extra["templates"] = dict(self.prompter.templates)
        return m


def keep_image(image: Any) -> Any:
    """Images go to the processor as PIL (it resizes per family: fixed, any-res, dynamic)."""
    return image


def load_mllm_backbone(spec: BackboneSpec, prefer: str = "auto") -> MllmBackbone:
    """An :class:`MllmBackbone` from a hub id, a local model folder, or a cirkit mllm checkpoint."""
    from cirkit.backbones import checkpoint_config

    if not spec.model:
        raise CirkitError("--backbone mllm needs --model: a hub id (e.g. llava-hf/llava-1.5-7b-hf), a folder, or a checkpoint")
    if spec.pretrained:
        raise CirkitError("--pretrained is not used by the mllm backbone; pass the weights folder as --model")
    cfg = checkpoint_config(spec.model)
    if cfg is not None:
        model, processor, cfg = load_checkpoint_model(spec.model, prefer, spec.trust_remote_code,
                                                      allow_pickle=spec.allow_pickle)
        return MllmBackbone(spec, model, processor, cfg.get("templates"), cfg.get("max_length", 128))
    if Path(spec.model).is_dir():
        _check_weights(Path(spec.model), spec.allow_pickle)
    model, processor = load_base(spec.model, spec.trust_remote_code)
    cap_image_pixels(processor, *default_pixels())
    return MllmBackbone(spec, model, processor)


@contextlib.contextmanager
def peft_quiet():
    """peft 0.21 reads transformers' deprecated ``is_gradient_checkpointing``: not ours to fix."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
        yield
