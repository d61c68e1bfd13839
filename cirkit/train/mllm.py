"""Training the mllm backbone: stage 1 (image-caption) and stage 2 (triplets) with LoRA.

Stage 1 contrasts images with their captions, stage 2 contrasts composed queries
(reference image + instruction) with target captions (optionally also target images);
symmetric in-batch InfoNCE, duplicates of the positive masked out. LoRA (peft) on the
LLM's projections only, vision tower frozen unless ``freeze_vision: false`` (then the
vision tower and projector train fully and are saved with the adapter as peft
``modules_to_save``). The model, its prompts and its checkpoint folder are described in
:mod:`cirkit.backbones.mllm`.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from cirkit.backbones.mllm import (
    DEFAULT_TEMPLATES,
    Prompter,
    cap_image_pixels,
    forward_embed,
    inner_model,
    inputs_to,
    load_base,
    load_checkpoint_model,
    peft_quiet,
    save_checkpoint,
    unwrap,
    vision_module_names,
)
from cirkit.checkpoint import adapter_folder, check_model_folder
from cirkit.errors import CheckpointError, CirkitError
from cirkit.train.losses import info_nce, key_ids
from cirkit.train.plugin import TrainConfig, TrainPlugin, Unreadable, readable

log = logging.getLogger("cirkit")

DEFAULT_LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


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


def unused_vision_parameters(model: torch.nn.Module) -> list[str]:
    """Names of vision-tower parameters whose output the model never reads (``inner_model`` names).

    LLaVA-family models take the tower's hidden states at ``vision_feature_layer`` (LLaVA-1.5:
    -2, the penultimate layer), so the blocks after it and the tower's pooling head
    (``post_layernorm``, SigLIP's ``head``) feed nothing. Trained, they would get no gradient:
    DDP then fails at its first gradient reduction, and AdamW's weight decay alone would move
    them. Families without the setting (Qwen2-VL reads its whole tower) give none.
    """
    inner = inner_model(model)
    config = getattr(unwrap(model), "config", None)
    layer = getattr(config, "vision_feature_layer", None)
    vision = getattr(config, "vision_config", None)
    n = getattr(vision, "num_hidden_layers", None)
    if layer is None or n is None:
        return []
    # hidden_states[k] is the output of the first k blocks (k = 0: the embeddings), k in -(n+1)..n
    first_unused = max(k % (n + 1) for k in ([layer] if isinstance(layer, int) else layer))
    names = []
    for vname in vision_module_names(model):
        tower = getattr(inner, vname)
        blocks = [name for name, m in tower.named_modules()
                  if isinstance(m, torch.nn.ModuleList) and len(m) == n and name.endswith("layers")]
        heads = [name for name, _ in tower.named_modules() if name.rsplit(".", 1)[-1] in ("post_layernorm", "head")]
        for pname, _ in tower.named_parameters():
            unused_block = any(pname.startswith(f"{b}.{i}.") for b in blocks for i in range(first_unused, n))
            if unused_block or any(pname.startswith(h + ".") for h in heads):
                names.append(f"{vname}.{pname}")
    return names


def _base_id(model: str) -> str:
    """Local folders are recorded as absolute paths, hub ids as given."""
    p = Path(model).expanduser()
    return str(p.resolve()) if p.exists() else model


class MllmTrainModel(torch.nn.Module):
    """The MLLM plus a (learnable) InfoNCE temperature; ``forward(batch)`` returns ``(loss, logs)``."""

    def __init__(self, model: torch.nn.Module, temperature: float, learn_temperature: bool,
                 target_image_loss: bool = False, gather: bool = True):
        super().__init__()
        self.model = model
        self.gather = gather
        scale = torch.tensor(math.log(1.0 / temperature), dtype=torch.float32)
        if learn_temperature:
            self.logit_scale = torch.nn.Parameter(scale)
        else:
            self.register_buffer("logit_scale", scale)
        self.target_image_loss = target_image_loss

    def forward(self, batch: dict[str, Any]) -> tuple[torch.Tensor, dict[str, float]]:
        device = self.logit_scale.device
        q_kind, q_enc = batch["query"]
        q = forward_embed(self.model, q_kind, inputs_to(q_enc, device))
        c = forward_embed(self.model, "text", inputs_to(batch["caption"], device))
        loss, logs = info_nce(q, c, self.logit_scale, batch["same"], gather=self.gather)
        if self.target_image_loss and batch.get("target") is not None:
            t = forward_embed(self.model, "image", inputs_to(batch["target"], device))
            loss_t, logs_t = info_nce(q, t, self.logit_scale, batch["same_target"], gather=self.gather)
            logs.update(loss_caption=float(loss.detach()), loss_image=float(loss_t.detach()), acc_image=logs_t["acc"])
            loss = (loss + loss_t) / 2
        return loss, logs


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
            return Unreadable(e.path, e.reason)


class MllmCollate:
    """Builds model inputs in the DataLoader workers (picklable)."""

    def __init__(self, prompter: Prompter, stage: str, target_images: bool):
        self.prompter, self.stage, self.target_images = prompter, stage, target_images

    def __call__(self, items: list) -> dict[str, Any]:
        items, skipped = readable(items)
        if len(items) < 2:  # the loop reports it (raising here would be a worker traceback)
            return {"skipped": skipped, "examples": len(items)}
        # Identical captions (or target images) would otherwise be false negatives: keyed, then masked.
        if self.stage == "1":
            images, captions = zip(*items, strict=True)
            out = {"query": ("image", self.prompter.images(list(images))), "caption": self.prompter.texts(list(captions))}
            out["same"] = key_ids(captions)
        else:
            refs, instructions, captions, targets, target_paths = zip(*items, strict=True)
            out = {
                "query": ("composed", self.prompter.composed(list(refs), list(instructions))),
                "caption": self.prompter.texts(list(captions)),
                "same": key_ids(captions),
            }
            if self.target_images:
                out["target"] = self.prompter.images(list(targets))
                out["same_target"] = key_ids(captions, target_paths)  # same description, or same image
        return {**out, "skipped": skipped, "examples": len(items)}


class MllmTrainPlugin(TrainPlugin):
    """Stage 1 (image-caption) and stage 2 (triplet) contrastive training of an MLLM with LoRA."""

    name = "mllm"

    def __init__(self, config: TrainConfig):
        super().__init__(config)
        if str(config.stage) not in ("1", "2"):
            raise CirkitError(f"--stage {config.stage} is not available for --backbone mllm; use 1 or 2")
        self.stage = str(config.stage)
        self.templates = {**DEFAULT_TEMPLATES, **(config.templates or {})}
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
                c.init, "adapter" if adapter_folder(c.init) is not None and not c.full_finetune else "auto",
                c.trust_remote_code, trainable=True, allow_pickle=c.allow_pickle,
            )
            self.base_model = cfg["base_model"]
            if not c.templates:
                self.templates = {**DEFAULT_TEMPLATES, **(cfg.get("templates") or {})}
        else:
            self.base_model = _base_id(c.model)
            if Path(self.base_model).is_dir():
                check_model_folder(Path(self.base_model), c.allow_pickle)
            model, self.processor = load_base(self.base_model, c.trust_remote_code)
        self._cap_pixels()
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
            with peft_quiet():
                model = get_peft_model(model, lora)
        # The vision side: frozen unless asked (in LoRA mode, trainable copies are peft modules_to_save).
        inner = inner_model(model)
        for name in vision_module_names(model):
            for pname, p in getattr(inner, name).named_parameters():
                if c.freeze_vision:
                    p.requires_grad = False
                elif c.full_finetune or "modules_to_save" in pname:
                    p.requires_grad = True
        # Don't train what the embedding never reads (DDP could not reduce its gradients).
        if not c.freeze_vision:
            unused = set(unused_vision_parameters(model))
            for pname, p in inner.named_parameters():
                if pname in unused:
                    p.requires_grad = False
            if unused:
                log.info("mllm: %d vision parameters feed nothing (after vision_feature_layer %s) and stay frozen",
                         len(unused), getattr(unwrap(model).config, "vision_feature_layer", None))
        if c.full_finetune:  # the embedding is a hidden state: an untied LM head is never used
            head, embed = unwrap(model).get_output_embeddings(), unwrap(model).get_input_embeddings()
            if head is not None and embed is not None and head.weight is not embed.weight:
                head.requires_grad_(False)
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
        return MllmTrainModel(model, c.temperature, c.learn_temperature, c.target_image_loss and self.stage == "2",
                              gather=c.gather_negatives)

    # -- data ----------------------------------------------------------------------------
    def dataset(self):
        from cirkit.io.datasets import as_image

        c = self.config
        rows: list[tuple] = []
        if self.stage == "1":
            data, records = self.training_records("image")
            rows = [(as_image(r.image), r.caption) for r in records if r.caption.strip()]
        else:
            data, records = self.training_records("reference", *(["target"] if c.target_image_loss else []))
            rows = [(as_image(r.reference), r.instruction, r.target_caption, as_image(r.target) if c.target_image_loss else None)
                    for r in records if (r.target_caption or "").strip()]
            if not rows:
                raise CirkitError(f"{data}: no triplet has a target_caption; stage 2 contrasts queries with target captions")
        if len(rows) < 2:
            raise CirkitError(f"{data}: need at least 2 usable examples for in-batch contrastive training, found {len(rows)}")
        if self.processor is None:
            from transformers import AutoProcessor

            base_id = self.base_model or _base_id(c.model)
            self.processor = AutoProcessor.from_pretrained(base_id, trust_remote_code=c.trust_remote_code)
            self._cap_pixels()
        prompter = Prompter(self.processor, self.templates, c.max_length)
        return _PairDataset(rows), MllmCollate(prompter, self.stage, c.target_image_loss and self.stage == "2")

    def _cap_pixels(self) -> None:
        """Bound dynamic-resolution images (Qwen2-VL) to ``min_pixels..max_pixels``."""
        if self.processor is not None and cap_image_pixels(self.processor, self.config.min_pixels,
                                                           self.config.max_pixels):
            log.info("mllm: images resized to %s..%s pixels", f"{self.config.min_pixels:,}", f"{self.config.max_pixels:,}")

    def loss(self, model: torch.nn.Module, batch: Any) -> tuple[torch.Tensor, dict[str, float]]:
        return model(batch)

    # -- checkpoint ----------------------------------------------------------------------
    def save(self, model: torch.nn.Module, folder: Path) -> None:
        c = self.config
        wrapper = getattr(model, "module", model)
        mllm = wrapper.model if isinstance(wrapper, MllmTrainModel) else wrapper
        scale = getattr(wrapper, "logit_scale", None)
        save_checkpoint(
            mllm, folder, base_model=self.base_model, templates=self.templates, max_length=c.max_length,
            merge=c.merge, stage=self.stage,
            lora={"r": c.lora_r, "alpha": c.lora_alpha, "target_modules": c.lora_target_modules
                  or list(DEFAULT_LORA_TARGETS), "vision_trained": not c.freeze_vision},
            temperature=float(1.0 / scale.detach().exp()) if scale is not None else None,
            processor=self.processor,
            pixels=(c.min_pixels, c.max_pixels),
        )
