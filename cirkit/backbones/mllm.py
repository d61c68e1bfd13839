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

Training (:class:`MllmTrainPlugin`): stage 1 contrasts images with their captions,
stage 2 contrasts composed queries (reference image + instruction) with target
captions (optionally also target images); symmetric in-batch InfoNCE, duplicates of
the positive masked out. LoRA (peft) on the LLM's projections only, vision tower frozen
unless ``freeze_vision: false`` (then the vision tower and projector train fully and
are saved with the adapter as peft ``modules_to_save``).

Checkpoint folder: ``config.json`` (``{"cirkit", "backbone": "mllm", "base_model",
"templates", ...}``), the peft adapter (``adapter_config.json``,
``adapter_model.safetensors``) and, with ``--merge`` or full fine-tuning,
``model.safetensors`` holding complete weights that load without peft.
"""

from __future__ import annotations

import contextlib
import copy
import logging
import math
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

from cirkit.backbones.base import Backbone, BackboneSpec, pick_device
from cirkit.errors import CheckpointError, CirkitError
from cirkit.train.plugin import TrainConfig, TrainPlugin

log = logging.getLogger("cirkit")

DEFAULT_TEMPLATES: dict[str, str] = {
    "image": "<image>\nSummarize above image in one word:",
    "text": "<sent>\nSummarize above sentence in one word:",
    "composed": '<image>\nModify this image with "<instruction>", summarize the modified image in one word:',
    # Appended to every prompt; "<eos>" means the tokenizer's own end token, "" means none.
    "end": "<eos>",
}
# LLM linear layers LoRA adapts by default (Llama/Qwen/Mistral names); only those that exist are used.
DEFAULT_LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
WEIGHTS_FILE = "model.safetensors"
ADAPTER_CONFIG = "adapter_config.json"


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


def lora_target_regex(model: torch.nn.Module, names: Sequence[str] | None) -> str:
    """A peft ``target_modules`` regex matching ``names`` inside the LLM only (never the vision tower)."""
    wanted = list(names) if names else list(DEFAULT_LORA_TARGETS)
    present = {
        n.rsplit(".", 1)[-1]
        for n, m in unwrap(model).named_modules()
        if ".language_model." in f".{n}." and isinstance(m, torch.nn.Linear)
    }
    use = [w for w in wanted if w in present]
    if not use:
        raise CirkitError(
            f"none of the LoRA target modules {', '.join(wanted)} exist in the language model; "
            f"choose from {', '.join(sorted(present)) or '(no linear layers found)'} with --lora-target-modules"
        )
    return r"^(?:.*\.)?language_model\..*\.(?:" + "|".join(sorted(use)) + r")$"


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


def _to(enc: dict[str, torch.Tensor], device: torch.device, dtype: torch.dtype | None = None) -> dict:
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


def _base_id(model: str) -> str:
    """Local folders are recorded as absolute paths, hub ids as given."""
    p = Path(model).expanduser()
    return str(p.resolve()) if p.exists() else model


def _check_weights(folder: Path, allow_pickle: bool) -> None:
    if any(folder.glob("*.bin")) and not (folder / WEIGHTS_FILE).exists() and not allow_pickle:
        raise CheckpointError(f"{folder}: only pickle (.bin) weights found; convert to safetensors or pass --allow-pickle")


def load_checkpoint_model(
    folder: str | Path,
    prefer: str = "auto",
    trust_remote_code: bool = False,
    trainable: bool = False,
    dtype: torch.dtype | None = None,
):
    """``(model, processor, cirkit config)`` from a cirkit mllm checkpoint folder.

    ``prefer``: ``auto`` uses complete weights (``model.safetensors``, no peft needed)
    when present and the adapter otherwise; ``adapter`` / ``merged`` force one.
    """
    from cirkit.backbones import checkpoint_config

    folder = Path(folder)
    cfg = checkpoint_config(folder)
    if cfg is None or cfg.get("backbone") != "mllm":
        raise CheckpointError(f"{folder}: not a cirkit mllm checkpoint (config.json with backbone 'mllm')")
    if "base_model" not in cfg:
        raise CheckpointError(f"{folder}/config.json: missing 'base_model' (the hub id or folder of the base MLLM)")
    has_full = (folder / WEIGHTS_FILE).exists()
    has_adapter = (folder / ADAPTER_CONFIG).exists()
    if prefer == "adapter" and not has_adapter:
        raise CheckpointError(f"{folder}: no {ADAPTER_CONFIG} (was it trained with --full-finetune?)")
    if prefer == "merged" and not has_full:
        raise CheckpointError(f"{folder}: no {WEIGHTS_FILE}; train with --merge to export merged weights")
    _check_weights(folder, False)
    model, processor = load_base(cfg["base_model"], trust_remote_code, dtype)
    if has_full and (prefer in ("auto", "merged")) and not (prefer == "auto" and trainable and has_adapter):
        from safetensors.torch import load_model

        missing, unexpected = load_model(model, str(folder / WEIGHTS_FILE), strict=False)
        missing = [k for k in missing if not k.startswith("lm_head")]
        if missing or unexpected:
            raise CheckpointError(
                f"{folder}/{WEIGHTS_FILE}: does not fit {cfg['base_model']} "
                f"(missing {missing[:3]}, unexpected {list(unexpected)[:3]})"
            )
    elif has_adapter:
        from peft import PeftModel

        with _peft_quiet():
            model = PeftModel.from_pretrained(model, str(folder), is_trainable=trainable)
    return model, processor, cfg


class MllmBackbone(Backbone):
    """Last-token embeddings of a multimodal LLM under prompt templates (see module docstring)."""

    name = "mllm"

    def __init__(self, spec: BackboneSpec, model: torch.nn.Module, processor: Any,
                 templates: dict[str, str] | None = None, max_length: int = 128):
        super().__init__(spec)
        self.device = pick_device(spec.device)
        self.dtype = _inference_dtype(spec.precision, self.device)
        self.model = model.to(self.device, self.dtype).eval()
        self.prompter = Prompter(processor, templates, max_length)
        self.dim = int(language_model(model).config.hidden_size)

    def image_transform(self) -> Callable[[Any], Any]:
        return keep_image

    def collate(self, items: list[Any]) -> list[Any]:
        return list(items)

    @torch.inference_mode()
    def _embed(self, kind: str, enc: dict[str, torch.Tensor]) -> torch.Tensor:
        h = forward_embed(self.model, kind, _to(enc, self.device, self.dtype))
        return torch.nn.functional.normalize(h.float(), dim=-1).cpu()

    def embed_images(self, batch: list[Any]) -> torch.Tensor:
        return self._embed("image", self.prompter.images(batch))

    def embed_texts(self, texts: list[str]) -> torch.Tensor:
        return self._embed("text", self.prompter.texts(texts))

    def embed_composed(self, batch: list[Any], texts: list[str]) -> torch.Tensor:
        return self._embed("composed", self.prompter.composed(batch, texts))

    def manifest(self) -> dict[str, Any]:
        return {**super().manifest(), "templates": dict(self.prompter.templates)}


def keep_image(image: Any) -> Any:
    """Images go to the processor as PIL (it resizes per family: fixed, any-res, dynamic)."""
    return image


def _inference_dtype(precision: str | None, device: torch.device) -> torch.dtype:
    p = (precision or "auto").lower()
    if p in ("bf16", "bfloat16"):
        return torch.bfloat16
    if p in ("fp16", "float16", "half"):
        return torch.float16
    if p in ("fp32", "float32"):
        return torch.float32
    if device.type == "cuda" and torch.cuda.is_bf16_supported():
        return torch.bfloat16
    return torch.float32


def load_mllm_backbone(spec: BackboneSpec, prefer: str = "auto") -> MllmBackbone:
    """An :class:`MllmBackbone` from a hub id, a local model folder, or a cirkit mllm checkpoint."""
    from cirkit.backbones import checkpoint_config

    if not spec.model:
        raise CirkitError("--backbone mllm needs --model: a hub id (e.g. llava-hf/llava-1.5-7b-hf), a folder, or a checkpoint")
    if spec.pretrained:
        raise CirkitError("--pretrained is not used by the mllm backbone; pass the weights folder as --model")
    cfg = checkpoint_config(spec.model)
    if cfg is not None:
        model, processor, cfg = load_checkpoint_model(spec.model, prefer, spec.trust_remote_code)
        return MllmBackbone(spec, model, processor, cfg.get("templates"), cfg.get("max_length", 128))
    if Path(spec.model).is_dir():
        _check_weights(Path(spec.model), spec.allow_pickle)
    model, processor = load_base(spec.model, spec.trust_remote_code)
    return MllmBackbone(spec, model, processor)


# ---------------------------------------------------------------------------------------
# Training plugin.
# ---------------------------------------------------------------------------------------
class MllmTrainModel(torch.nn.Module):
    """The MLLM plus a (learnable) InfoNCE temperature; ``forward(batch)`` returns ``(loss, logs)``."""

    def __init__(self, model: torch.nn.Module, temperature: float, learn_temperature: bool,
                 target_image_loss: bool = False):
        super().__init__()
        self.model = model
        scale = torch.tensor(math.log(1.0 / temperature), dtype=torch.float32)
        if learn_temperature:
            self.logit_scale = torch.nn.Parameter(scale)
        else:
            self.register_buffer("logit_scale", scale)
        self.target_image_loss = target_image_loss

    def forward(self, batch: dict[str, Any]) -> tuple[torch.Tensor, dict[str, float]]:
        device = self.logit_scale.device
        q_kind, q_enc = batch["query"]
        q = _norm(forward_embed(self.model, q_kind, _to(q_enc, device)))
        c = _norm(forward_embed(self.model, "text", _to(batch["caption"], device)))
        scale = self.logit_scale.clamp(max=math.log(100.0)).exp()
        same = batch["same"].to(device)
        loss, acc = _info_nce(q, c, scale, same)
        logs = {"acc": acc, "temperature": float(1.0 / scale.detach())}
        if self.target_image_loss and batch.get("target") is not None:
            t = _norm(forward_embed(self.model, "image", _to(batch["target"], device)))
            loss_t, acc_t = _info_nce(q, t, scale, batch["same_target"].to(device))
            logs.update(loss_caption=float(loss.detach()), loss_image=float(loss_t.detach()), acc_image=acc_t)
            loss = (loss + loss_t) / 2
        return loss, logs


def _norm(x: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.normalize(x.float(), dim=-1)


def _info_nce(a: torch.Tensor, b: torch.Tensor, scale: torch.Tensor, same: torch.Tensor) -> tuple[torch.Tensor, float]:
    """Symmetric in-batch InfoNCE; ``same[i, j]`` marks j != i sharing i's positive (masked out)."""
    logits = scale * a @ b.T
    eye = torch.eye(len(a), dtype=torch.bool, device=a.device)
    logits = logits.masked_fill(same & ~eye, float("-inf"))
    labels = torch.arange(len(a), device=a.device)
    f = torch.nn.functional
    loss = (f.cross_entropy(logits, labels) + f.cross_entropy(logits.T, labels)) / 2
    acc = float((logits.detach().argmax(1) == labels).float().mean())
    return loss, acc


class _PairDataset(torch.utils.data.Dataset):
    """Stage 1: (image, caption); stage 2: (reference, instruction, target caption, target image)."""

    def __init__(self, rows: list[tuple]):
        self.rows = rows

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int):
        from cirkit.errors import ImageError
        from cirkit.io import open_image

        row = self.rows[i]
        try:
            if len(row) == 2:  # (image path, caption)
                return (open_image(row[0]), row[1])
            ref, instruction, caption, target = row
            target_image = open_image(target) if target is not None else None
            return (open_image(ref), instruction, caption, target_image, str(target))
        except ImageError as e:
            log.warning("skipping training example: %s", e)
            return None


class MllmCollate:
    """Builds model inputs in the DataLoader workers (picklable)."""

    def __init__(self, prompter: Prompter, stage: str, target_images: bool):
        self.prompter, self.stage, self.target_images = prompter, stage, target_images

    def __call__(self, items: list) -> dict[str, Any]:
        items = [x for x in items if x is not None]
        if len(items) < 2:
            raise CirkitError("a training batch has fewer than 2 readable examples; check the images or raise --batch-size")
        if self.stage == "1":
            images, captions = zip(*items, strict=True)
            out = {"query": ("image", self.prompter.images(list(images))), "caption": self.prompter.texts(list(captions))}
            out["same"] = _same(captions)
            return out
        refs, instructions, captions, targets, target_paths = zip(*items, strict=True)
        out = {
            "query": ("composed", self.prompter.composed(list(refs), list(instructions))),
            "caption": self.prompter.texts(list(captions)),
            "same": _same(captions),
        }
        if self.target_images:
            out["target"] = self.prompter.images(list(targets))
            out["same_target"] = _same(target_paths) | out["same"]  # same image, or same description
        return out


def _same(keys: Sequence[Any]) -> torch.Tensor:
    """(n, n) bool: rows sharing a key (identical captions would otherwise be false negatives)."""
    ids = {k: i for i, k in enumerate(dict.fromkeys(keys))}
    v = torch.tensor([ids[k] for k in keys])
    return v[:, None] == v[None, :]


class MllmTrainPlugin(TrainPlugin):
    """Stage 1 (image-caption) and stage 2 (triplet) contrastive training of an MLLM with LoRA."""

    name = "mllm"

    def __init__(self, config: TrainConfig):
        super().__init__(config)
        if str(config.stage) not in ("1", "2"):
            raise CirkitError(f"--stage {config.stage} is not available for --backbone mllm; use 1 or 2")
        self.stage = str(config.stage)
        self.templates = {**DEFAULT_TEMPLATES, **(config.extra.get("templates") or {})}
        self.base_model: str | None = None
        self.processor: Any = None

    # -- model ---------------------------------------------------------------------------
    def build(self) -> torch.nn.Module:
        c = self.config
        if c.init:
            from cirkit.backbones import checkpoint_config

            cfg = checkpoint_config(c.init)
            if cfg is None or cfg.get("backbone") != "mllm":
                raise CheckpointError(f"--init {c.init}: not a cirkit mllm checkpoint (config.json with backbone 'mllm')")
            model, self.processor, cfg = load_checkpoint_model(
                c.init, "adapter" if (Path(c.init) / ADAPTER_CONFIG).exists() and not c.full_finetune else "auto",
                c.trust_remote_code, trainable=True,
            )
            self.base_model = cfg["base_model"]
            if not c.extra.get("templates"):
                self.templates = {**DEFAULT_TEMPLATES, **(cfg.get("templates") or {})}
        else:
            self.base_model = _base_id(c.model)
            model, self.processor = load_base(self.base_model, c.trust_remote_code)
        is_peft = hasattr(model, "peft_config")
        if c.full_finetune:
            if is_peft:
                model = model.merge_and_unload()
            for p in model.parameters():
                p.requires_grad = True
        elif not is_peft:
            from peft import LoraConfig, get_peft_model

            lora = LoraConfig(
                r=c.lora_r, lora_alpha=c.lora_alpha, lora_dropout=c.lora_dropout,
                target_modules=lora_target_regex(model, c.lora_target_modules),
                modules_to_save=None if c.freeze_vision else vision_module_names(model),
                bias="none",
            )
            with _peft_quiet():
                model = get_peft_model(model, lora)
        # The vision side: frozen unless asked (in LoRA mode, trainable copies are peft modules_to_save).
        inner = inner_model(model)
        for name in vision_module_names(model):
            for pname, p in getattr(inner, name).named_parameters():
                if c.freeze_vision:
                    p.requires_grad = False
                elif c.full_finetune or "modules_to_save" in pname:
                    p.requires_grad = True
        if c.gradient_checkpointing:
            hf, kwargs = unwrap(model), {"use_reentrant": False}
            if hasattr(hf, "activation_checkpointing_enable"):  # transformers >= 5.x
                hf.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
            else:
                hf.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
        n_train = sum(p.numel() for p in model.parameters() if p.requires_grad)
        n_all = sum(p.numel() for p in model.parameters())
        log.info("mllm: %s trainable of %s parameters (%s)", f"{n_train:,}", f"{n_all:,}",
                 "full fine-tune" if c.full_finetune else "LoRA")
        return MllmTrainModel(model, c.temperature, c.learn_temperature, c.target_image_loss and self.stage == "2")

    # -- data ----------------------------------------------------------------------------
    def dataset(self):
        c = self.config
        rows: list[tuple] = []
        if self.stage == "1":
            data, records = self.training_records("image")
            rows = [(Path(r.image), r.caption) for r in records if r.caption.strip()]
        else:
            data, records = self.training_records("reference", *(["target"] if c.target_image_loss else []))
            rows = [(Path(r.reference), r.instruction, r.target_caption, Path(r.target) if c.target_image_loss else None)
                    for r in records if (r.target_caption or "").strip()]
            if not rows:
                raise CirkitError(f"{data}: no triplet has a target_caption; stage 2 contrasts queries with target captions")
        if len(rows) < 2:
            raise CirkitError(f"{data}: need at least 2 usable examples for in-batch contrastive training, found {len(rows)}")
        if self.processor is None:
            from transformers import AutoProcessor

            base_id = self.base_model or _base_id(c.model)
            self.processor = AutoProcessor.from_pretrained(base_id, trust_remote_code=c.trust_remote_code)
        prompter = Prompter(self.processor, self.templates, c.max_length)
        return _PairDataset(rows), MllmCollate(prompter, self.stage, c.target_image_loss and self.stage == "2")

    def loss(self, model: torch.nn.Module, batch: Any) -> tuple[torch.Tensor, dict[str, float]]:
        return model(batch)

    # -- checkpoint ----------------------------------------------------------------------
    def save(self, model: torch.nn.Module, folder: Path) -> None:
        import cirkit
        from cirkit.config import to_jsonable
        from cirkit.io import atomic_write_json

        c = self.config
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        wrapper = getattr(model, "module", model)
        mllm = wrapper.model if isinstance(wrapper, MllmTrainModel) else wrapper
        is_peft = hasattr(mllm, "peft_config")
        if is_peft:
            mllm.save_pretrained(str(folder))
            readme = folder / "README.md"
            readme.unlink(missing_ok=True)
        if not is_peft or c.merge:
            _save_full(copy.deepcopy(mllm).merge_and_unload() if is_peft else mllm, folder / WEIGHTS_FILE)
        atomic_write_json(folder / "config.json", {
            "cirkit": cirkit.__version__,
            "backbone": "mllm",
            "base_model": self.base_model,
            "templates": {k: self.templates[k] for k in DEFAULT_TEMPLATES},
            "max_length": c.max_length,
            "dim": int(language_model(mllm).config.hidden_size),
            "weights": "lora" if is_peft else "full",
            "merged": bool(is_peft and c.merge),
            "lora": {"r": c.lora_r, "alpha": c.lora_alpha, "target_modules": c.lora_target_modules
                     or list(DEFAULT_LORA_TARGETS), "vision_trained": not c.freeze_vision} if is_peft else None,
            "stage": self.stage,
            "temperature": float(1.0 / wrapper.logit_scale.detach().exp()) if hasattr(wrapper, "logit_scale") else None,
        })
        if not (folder / "train_args.json").exists():
            atomic_write_json(folder / "train_args.json", to_jsonable(c))


def _save_full(model: torch.nn.Module, path: Path) -> None:
    """Complete weights as safetensors (tied tensors stored once), loadable without peft."""
    from safetensors.torch import save_model

    save_model(model, str(path))



@contextlib.contextmanager
def _peft_quiet():
    """peft 0.21 reads transformers' deprecated ``is_gradient_checkpointing``: not ours to fix."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
        yield
