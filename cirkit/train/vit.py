"""Training the vit backbone: stage 1 (image-caption CLIP), stage 2 (triplets, EMA target), combiner.

* stage 1: symmetric CLIP InfoNCE between images and captions; only the CLIP towers and
  the temperature train. It stands in for the pretrained CLIP the paper starts from, so it
  builds no cross-attention (the predictor stays at its identity init): a stage-1
  checkpoint is a plain CLIP, its gallery side exactly its CLIP image embedding.
* stage 2 (eq. 2): InfoNCE from the reformulated query (reference + instruction) to the
  target image embedded with the null text. Cross-attention is injected here, Xavier
  initialised, into a model that has none (§IV-A). The target encoder is an EMA copy of
  the query encoder (``ema_momentum``), updated after every optimiser step and without
  gradients. ``--no-ema`` ablation: the target goes through the *same* online weights in
  the same forward pass, with gradients flowing through both sides (a shared-weight
  siamese encoder); the gallery is then embedded with those same weights.
* combiner (eq. 3): everything frozen except the combiner; InfoNCE from the fused query to
  the (frozen) target embeddings at the backbone's temperature (§II-C: "this combiner
  weight is fine-tuned using the same [loss] by fixing backbone weights"); ``combiner:
  gate`` also learns the temperature. Needs ``--init`` from a stage-2 checkpoint.

With several processes the contrastive batch is the global one (``gather_negatives``,
:mod:`cirkit.train.losses`): the paper's batch of 32 on 8 GPUs is 4 per GPU, 32 negatives.

Images get the model's deterministic eval transform (no crops/flips/colour jitter): in
CIR the instruction talks about positions and colours, which augmentations would falsify.
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from cirkit.errors import CirkitError, ImageError
from cirkit.train.losses import info_nce
from cirkit.train.plugin import TrainConfig, TrainPlugin, Unreadable, readable

log = logging.getLogger("cirkit")

STAGES = ("1", "2", "combiner")


class _Examples(torch.utils.data.Dataset):
    """(image paths..., text) rows; images decoded + transformed in workers, bad ones reported."""

    def __init__(self, rows: list[tuple[list[Path], str]], transform: Callable[[Any], Any]):
        self.rows, self.transform = rows, transform

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int):
        from cirkit.io import open_image

        paths, text = self.rows[i]
        try:
            return [self.transform(open_image(p)) for p in paths], text
        except ImageError as e:
            return Unreadable(e.path, e.reason)


class _Collate:
    def __init__(self, tokenizer):
        self.tokenizer = tokenizer

    def __call__(self, items):
        items, skipped = readable(items)
        if not items:
            return {"skipped": skipped, "examples": 0}
        n_img = len(items[0][0])
        images = [torch.stack([x[0][k] for x in items]) for k in range(n_img)]
        tokens = self.tokenizer([x[1] for x in items])
        return {"images": images[0], "targets": images[1] if n_img > 1 else None, "tokens": tokens,
                "skipped": skipped, "examples": len(items)}


class VitTrainPlugin(TrainPlugin):
    """The vit backbone as seen by :mod:`cirkit.train.loop`."""

    name = "vit"

    def __init__(self, config: TrainConfig):
        super().__init__(config)
        if str(config.stage) not in STAGES:
            raise CirkitError(f"unknown --stage {config.stage!r}; choose one of {', '.join(STAGES)}")
        self.stage = str(config.stage)
        self.use_ema = bool(config.ema) and self.stage == "2"
        self.target: torch.nn.Module | None = None  # EMA / frozen target encoder, made in prepare()
        self.init_ema: torch.nn.Module | None = None  # the --init checkpoint's EMA encoder (combiner)
        self.preprocess = self.tokenizer = None
        self.init_config: dict[str, Any] = {}
        self.init_has_ema = False

    # -- model ----------------------------------------------------------------------------
    def build(self) -> torch.nn.Module:
        from cirkit.backbones import vit

        c = self.config
        if c.init:
            model, ema, self.preprocess, self.tokenizer, self.init_config = vit.load_model(c.init, c.allow_pickle)
            _check_init_compatible(c, model.settings, c.init, len(model.clip.visual.transformer.resblocks))
            if self.stage == "2":
                self._stage2_layers(model, c.init)
            if ema is not None and self.stage == "combiner":
                self.init_ema, self.init_has_ema = ema, True
        else:
            if self.stage == "combiner":
                raise CirkitError("--stage combiner fine-tunes a stage-2 model: pass --init <stage-2 checkpoint folder>")
            settings = vit.settings_from_config(c)
            settings["pretrained"] = c.pretrained
            if self.stage == "1":  # a plain CLIP: stage 2 injects the cross-attention
                settings["cross_attn"] = False
            model, self.preprocess, self.tokenizer = vit.build_model(settings, c.pretrained, allow_pickle=c.allow_pickle)
        if model.settings.get("combiner") != c.combiner:
            if self.stage == "combiner" and model.settings.get("combiner_trained"):
                log.warning("%s holds a trained '%s' combiner; --combiner %s starts a fresh one",
                            c.init, model.settings.get("combiner"), c.combiner)
            model.set_combiner(c.combiner)
            if self.init_ema is not None:  # the target encoder never uses it, but must load the same keys
                self.init_ema.set_combiner(c.combiner)
        if self.stage == "combiner" and not self.init_config.get("stage") == "2":
            log.warning("--stage combiner on a checkpoint not trained with --stage 2 (%s)", self.init_config.get("stage"))
        self._set_trainable(model)
        return model

    def _stage2_layers(self, model, where: str) -> None:
        """Stage 2 from a checkpoint: add cross-attention to a model without (a stage-1 CLIP), or drop it."""
        c = self.config
        if not c.cross_attn and model.xattn:
            model.xattn = torch.nn.ModuleDict()  # --no-cross-attn on top of a model that has it
            model.settings["cross_attn"], model.settings["cross_attn_layers"] = False, []
        elif c.cross_attn and not model.xattn:
            layers = model.add_cross_attention(c.cross_attn_layers, c.gate_init)
            log.info("%s: injecting cross-attention into blocks %s (Xavier init%s)", where, layers,
                     "" if c.gate_init is None else f", tanh gate from {c.gate_init}")
        elif c.cross_attn and model.settings.get("gate_init") != c.gate_init:
            log.warning("%s: keeping its cross-attention (gate_init %s); --gate-init %s applies to new layers only",
                        where, model.settings.get("gate_init"), c.gate_init)

    def _set_trainable(self, model) -> None:
        model.requires_grad_(False)
        if self.stage == "1":
            model.clip.requires_grad_(True)
            model.logit_scale.requires_grad_(True)
        elif self.stage == "2":
            model.requires_grad_(True)
            model.combiner.requires_grad_(False)
            if not self.config.train_text_encoder:
                _freeze_text_tower(model.clip)
        else:
            model.combiner.requires_grad_(True)
            # eq. 3 fine-tunes λ alone; the per-query gate (a departure) also learns the temperature
            model.logit_scale.requires_grad_(self.config.combiner == "gate")
        model.logit_scale.requires_grad_(bool(self.config.learn_temperature) and model.logit_scale.requires_grad)
        for name in ("logit_scale", "logit_bias"):  # open_clip's own: unused
            p = getattr(model.clip, name, None)
            if isinstance(p, torch.nn.Parameter):
                p.requires_grad_(False)

    def parameters(self, model) -> list[dict[str, Any]]:
        """AdamW groups; with ``new_layer_lr`` the layers added to CLIP get their own rate."""
        groups = super().parameters(model)
        lr = self.config.new_layer_lr
        if lr is None:
            return groups
        new = {id(p) for m in (model.xattn, model.predictor, model.combiner) for p in m.parameters()}
        out = []
        for g in groups:
            old = [p for p in g["params"] if id(p) not in new]
            added = [p for p in g["params"] if id(p) in new]
            out += [{**g, "params": old}, {**g, "params": added, "lr": float(lr)}]
        return out

    # -- data -----------------------------------------------------------------------------
    def dataset(self):
        from cirkit.io.datasets import as_image

        if self.stage == "1":
            path, records = self.training_records("image")
            rows = [([as_image(r.image)], r.caption) for r in records]
        else:
            path, records = self.training_records("reference", "target")
            rows = [([as_image(r.reference), as_image(r.target)], r.instruction) for r in records]
        if len(rows) < 2:
            raise CirkitError(f"{path}: in-batch contrastive training needs at least 2 examples, found {len(rows)}")
        return _Examples(rows, self.preprocess), _Collate(self.tokenizer)

    # -- the target encoder ---------------------------------------------------------------
    def prepare(self, model) -> None:
        """Make the frozen target encoder: an EMA copy of the query encoder (stage 2), or for the
        combiner the --init checkpoint's target encoder (its EMA one when it has one)."""
        if self.stage == "1" or (self.stage == "2" and not self.use_ema):
            return
        raw = getattr(model, "module", model)
        self.target = copy.deepcopy(raw).requires_grad_(False).eval()
        if self.init_ema is not None:
            self.target.load_state_dict(self.init_ema.state_dict())
            self.init_ema = None

    # -- loss -----------------------------------------------------------------------------
    def loss(self, model, batch):
        raw = getattr(model, "module", model)
        if self.stage == "1":
            img, txt = model("clip", batch["images"], batch["tokens"])
            return info_nce(img, txt, raw.logit_scale, symmetric=True, gather=self.config.gather_negatives)
        if self.stage == "2" and not self.use_ema:
            q, t = model("pair", batch["images"], batch["tokens"], batch["targets"])
        else:
            q = model("query" if self.stage == "2" else "compose", batch["images"], batch["tokens"])
            with torch.no_grad():
                t = self.target("target", batch["targets"])
        # eq. 2 / eq. 3: query -> target
        return info_nce(q, t, raw.logit_scale, symmetric=False, gather=self.config.gather_negatives)

    def after_step(self, model, step: int) -> None:
        if not self.use_ema or self.target is None:
            return
        m = float(self.config.ema_momentum)
        raw = getattr(model, "module", model)
        with torch.no_grad():
            tp = list(self.target.parameters())
            op = list(raw.parameters())
            torch._foreach_mul_(tp, m)
            torch._foreach_add_(tp, [o.detach().to(t.dtype) for o, t in zip(op, tp, strict=True)], alpha=1.0 - m)
            for tb, ob in zip(self.target.buffers(), raw.buffers(), strict=True):
                tb.copy_(ob)

    # -- state ----------------------------------------------------------------------------
    def state_dict(self) -> dict[str, torch.Tensor]:
        if self.target is None:
            return {}
        return {k: v.detach() for k, v in self.target.state_dict().items()}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        if not state:
            return
        if self.target is None:
            raise CirkitError("the trainer state holds a target encoder, but this stage trains without one")
        self.target.load_state_dict(state)

    def save(self, model, folder: Path) -> None:
        from cirkit.backbones.vit import save_checkpoint

        raw = getattr(model, "module", model)
        if self.stage == "combiner":
            raw.settings["combiner_trained"] = True
        # The gallery side of the checkpoint: the EMA target when one was trained or inherited.
        ema = None
        if (self.stage == "2" and self.use_ema) or (self.stage == "combiner" and self.init_has_ema):
            ema = self.target
        save_checkpoint(raw, folder, ema=ema, stage=self.stage, ema_used=self.use_ema,
                        ema_momentum=self.config.ema_momentum if self.use_ema else None,
                        init=str(self.config.init) if self.config.init else None)


def _freeze_text_tower(clip) -> None:
    """Stop gradients to the CLIP text encoder (open_clip's ``CustomTextCLIP`` or plain ``CLIP``)."""
    if hasattr(clip, "text"):
        clip.text.requires_grad_(False)
        return
    for mod in (clip.transformer, clip.token_embedding, clip.ln_final, clip.text_projection):
        if isinstance(mod, torch.nn.Module):
            mod.requires_grad_(False)
    for p in (clip.positional_embedding, clip.text_projection):
        if isinstance(p, torch.nn.Parameter):
            p.requires_grad_(False)


def _check_init_compatible(config: TrainConfig, settings: dict[str, Any], where: str, n_blocks: int) -> None:
    from cirkit.backbones.vit import block_indexes

    saved = settings.get("cross_attn_layers")
    # Compare as the model stores them: -1 and the last block's index name the same block. A model
    # without cross-attention (a stage-1 CLIP) gets the layers asked for.
    if config.cross_attn_layers is not None and saved and (
        block_indexes(saved, n_blocks) != block_indexes(config.cross_attn_layers, n_blocks)
    ):
        raise CirkitError(
            f"--cross-attn-layers {config.cross_attn_layers} differs from the --init checkpoint's "
            f"{settings.get('cross_attn_layers')}; leave it unset when starting from {where}"
        )
