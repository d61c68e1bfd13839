"""The InstructCIR ViT backbone: an open_clip CLIP whose vision blocks cross-attend to the instruction.

Model (``VitCir``), following "Scaling Prompt Instructed Zero Shot CIR with Image-Only Data":

* every selected vision transformer block gets a cross-attention layer right after its
  self-attention: image tokens are the queries, the instruction's final-layer token
  features from the CLIP text encoder (after ``ln_final``, padding masked) are keys and
  values; same head count as the block; Xavier init; pre-LayerNorm + residual like the
  block's own (§II-B, §IV-A). By default the branch is the paper's plain residual
  ``x + attn(x, text)``, so its q/k/v/out weights learn from the first step. The layers are
  injected into a CLIP when stage 2 starts (§IV-A: "modified from CLIP pretrained ViT-L/14
  and injects cross attention to each layer"): a stage-1 model is a plain CLIP, and so is
  its image-only path. Departure, as an option (``gate_init``): a Flamingo-style
  ``x + tanh(g) attn(x, text)`` with ``g`` starting at ``gate_init``; at 0 the model starts
  exactly as the CLIP it came from, but the attention weights then get exactly zero
  gradient at step 0 and learn only as fast as ``g`` grows, which is why it is not the default;
* a predictor MLP on ``[pooled image embedding; text embedding]`` (both L2-normalised)
  gives the reformulated query embedding (eq. 1). It is residual on the image embedding
  with a zero-initialised last layer, so training starts from the image embedding instead
  of from a random projection (a departure kept for the short synth runs);
* target (gallery) images go through the same network with the null text, the token
  sequence of the empty string (§II-B);
* a combiner (eq. 3) fuses the reformulated embedding with the pure text embedding by one
  learned weight ``λ = sigmoid(a)`` (``a`` starts at 2, i.e. "trust the reformulation"),
  fine-tuned in ``--stage combiner`` with the backbone and the temperature frozen (§II-C).
  Departure, as an option (``combiner: gate``): a per-query weight
  ``w = sigmoid(a . [q; t] + b)``, trained together with the temperature.

A checkpoint folder (files named in :mod:`cirkit.checkpoint`) holds ``model.safetensors`` with
the online (query) encoder and, when trained with EMA, the momentum target encoder under the
``ema.`` prefix; gallery images are embedded with the target encoder, which is what the
queries were trained against.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import math
from pathlib import Path
from typing import Any

import torch
from torch import nn

from cirkit.backbones.base import Backbone, BackboneSpec, normalize
from cirkit.device import pick_device, pick_dtype
from cirkit.errors import CheckpointError, CirkitError

log = logging.getLogger("cirkit")

EMA_PREFIX = "ema."  # the target encoder's tensors inside the checkpoint's weights file
NULL_TEXT = ""
# What config.json records about the architecture (everything else there is provenance).
SETTING_KEYS = ("model", "pretrained", "embed_dim", "cross_attn", "cross_attn_layers", "predictor_hidden",
                "temperature", "gate_init", "null_text", "combiner_trained", "combiner", "quick_gelu")
COMBINERS = ("weight", "gate")
# config.json keys an older cirkit did not write, and what its checkpoints were built with.
LEGACY_SETTINGS = {"gate_init": 0.0, "combiner": "gate", "quick_gelu": False}


class CrossAttention(nn.Module):
    """Image tokens attend to text tokens: pre-norm residual branch, Xavier init (§II-B, §IV-A).

    ``gate_init`` None: the paper's plain residual ``x + attn``. A number: the branch is scaled
    by ``tanh(g)``, ``g`` starting there (0 = identity at init, zero attention gradients at step 0).
    """

    def __init__(self, width: int, text_width: int, heads: int, gate_init: float | None = None):
        super().__init__()
        self.ln_q = nn.LayerNorm(width)
        self.ln_kv = nn.LayerNorm(text_width)
        self.attn = nn.MultiheadAttention(width, heads, kdim=text_width, vdim=text_width, batch_first=True)
        self.gate = nn.Parameter(torch.full((1,), float(gate_init))) if gate_init is not None else None
        for p in self.attn.parameters():
            if p.ndim >= 2:
                nn.init.xavier_uniform_(p)
            else:
                nn.init.zeros_(p)

    def forward(self, x: torch.Tensor, kv: torch.Tensor, kv_pad: torch.Tensor | None) -> torch.Tensor:
        kv = self.ln_kv(kv)
        out = self.attn(self.ln_q(x), kv, kv, key_padding_mask=kv_pad, need_weights=False)[0]
        if self.gate is None:
            return x + out
        return x + torch.tanh(self.gate).to(out.dtype) * out


class Predictor(nn.Module):
    """Reformulated query = image + MLP([image; text]) on normalised inputs (zero-init output)."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(2 * dim, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)
        nn.init.xavier_uniform_(self.fc1.weight)
        nn.init.zeros_(self.fc1.bias)
        nn.init.zeros_(self.fc2.weight)
        nn.init.zeros_(self.fc2.bias)

    def forward(self, image: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
        i, t = normalize_keep(image), normalize_keep(text)
        return i + self.fc2(self.act(self.fc1(torch.cat([i, t], dim=-1))))


class Combiner(nn.Module):
    """Eq. 3: ``λ q + (1 - λ) t`` with one learned weight ``λ = sigmoid(a)`` for every query."""

    def __init__(self, dim: int, bias_init: float = 2.0):
        super().__init__()
        self.logit = nn.Parameter(torch.tensor(float(bias_init)))

    @property
    def weight(self) -> float:
        """λ, the share of the reformulated embedding."""
        return float(torch.sigmoid(self.logit.detach()))

    def forward(self, q: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        q, t = normalize_keep(q), normalize_keep(t)
        w = torch.sigmoid(self.logit).to(q.dtype)
        return w * q + (1 - w) * t


class GatedCombiner(nn.Module):
    """Departure from eq. 3 (``combiner: gate``): a per-query weight ``w = sigmoid(a . [q; t] + b)``."""

    def __init__(self, dim: int, bias_init: float = 2.0):
        super().__init__()
        self.gate = nn.Linear(2 * dim, 1)
        nn.init.zeros_(self.gate.weight)
        nn.init.constant_(self.gate.bias, bias_init)

    def forward(self, q: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        q, t = normalize_keep(q), normalize_keep(t)
        w = torch.sigmoid(self.gate(torch.cat([q, t], dim=-1)))
        return w * q + (1 - w) * t


def block_indexes(layers: list[int], n_blocks: int) -> list[int]:
    """Block indexes sorted, deduplicated and non-negative (``-1`` is the last of ``n_blocks``)."""
    return sorted({(i + n_blocks) if i < 0 else i for i in layers})


def normalize_keep(x: torch.Tensor) -> torch.Tensor:
    """L2-normalise in the input dtype (``normalize`` in base casts to float32)."""
    return nn.functional.normalize(x, dim=-1)


class VitCir(nn.Module):
    """CLIP + per-block cross-attention + predictor + combiner; see module docstring.

    ``forward(task, ...)`` dispatches so that a DDP-wrapped model is always called through
    its ``forward`` (DDP only syncs gradients of computations that went through it).
    """

    def __init__(self, clip: nn.Module, settings: dict[str, Any], null_tokens: torch.Tensor):
        super().__init__()
        self.clip = clip
        self.settings = dict(settings)
        visual = clip.visual
        if not hasattr(visual, "transformer") or not hasattr(visual, "_embeds"):
            raise CirkitError(
                f"open_clip model {settings.get('model')!r} has no ViT image tower; the vit backbone needs a ViT"
            )
        if hasattr(clip, "text") and not hasattr(clip.text, "_embeds"):
            raise CirkitError(f"open_clip model {settings.get('model')!r}: only open_clip's own text transformer is supported")
        embed_dim = int(settings["embed_dim"])
        self.xattn = nn.ModuleDict()
        self.settings["cross_attn_layers"], self.settings["gate_init"] = [], settings.get("gate_init")
        if settings.get("cross_attn", True):
            self.add_cross_attention(settings.get("cross_attn_layers"), settings.get("gate_init"))
        else:
            self.settings["cross_attn"] = False
        hidden = settings.get("predictor_hidden") or 2 * embed_dim
        self.settings["predictor_hidden"] = hidden
        self.predictor = Predictor(embed_dim, hidden)
        self.set_combiner(self.settings.get("combiner") or "weight")
        tau = float(settings.get("temperature", 0.07))
        self.logit_scale = nn.Parameter(torch.tensor(math.log(1.0 / tau)))
        self.register_buffer("null_tokens", null_tokens.reshape(1, -1).long(), persistent=False)
        # open_clip's own logit_scale/bias are unused: cirkit keeps one temperature here.
        for name in ("logit_scale", "logit_bias"):
            p = getattr(clip, name, None)
            if isinstance(p, nn.Parameter):
                p.requires_grad_(False)

    # -- the layers the paper adds ---------------------------------------------------------
    def add_cross_attention(self, layers: list[int] | None, gate_init: float | None) -> list[int]:
        """Fresh Xavier-initialised cross-attention in ``layers`` (None = every block), replacing any.

        Stage 2 calls this on a plain CLIP (§IV-A: the paper injects cross-attention into
        CLIP ViT-L/14); returns the block indexes, as stored in ``settings``.
        """
        blocks = self.clip.visual.transformer.resblocks
        wanted = list(range(len(blocks))) if layers is None else layers
        idx = block_indexes(wanted, len(blocks))
        if any(i < 0 or i >= len(blocks) for i in idx):
            raise CirkitError(f"cross_attn_layers {layers} out of range for {len(blocks)} blocks")
        width, heads, text_width = self.clip.visual.transformer.width, _heads(blocks[0]), self._text_width()
        ref = next(self.clip.visual.parameters())
        self.xattn = nn.ModuleDict(
            {str(i): CrossAttention(width, text_width, heads, gate_init) for i in idx}
        ).to(ref.device, ref.dtype)
        self.settings.update(cross_attn=True, cross_attn_layers=idx, gate_init=gate_init)
        return idx

    def set_combiner(self, kind: str) -> None:
        """A fresh eq. 3 combiner (``weight``) or the per-query gate (``gate``)."""
        if kind not in COMBINERS:
            raise CirkitError(f"unknown combiner {kind!r}; choose one of {', '.join(COMBINERS)}")
        dim = int(self.settings["embed_dim"])
        ref = next(self.clip.visual.parameters())
        self.combiner = (Combiner if kind == "weight" else GatedCombiner)(dim).to(ref.device, ref.dtype)
        self.settings["combiner"] = kind

    # -- text ---------------------------------------------------------------------------
    def _text_width(self) -> int:
        c = self.clip
        t = c.text if hasattr(c, "text") else c
        return int(t.transformer.width)

    def encode_text(self, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Tokens -> (pooled embedding, final-layer token features, key padding mask True=pad)."""
        from open_clip.transformer import text_global_pool

        c = self.clip
        if hasattr(c, "text"):  # CustomTextCLIP
            t = c.text
            x, attn_mask = t._embeds(tokens)
            x = t.transformer(x, attn_mask=attn_mask)
            if t.cls_emb is not None:
                pooled, x = t.ln_final(x[:, -1]), x[:, :-1]
            else:
                x = t.ln_final(x)
                pooled = text_global_pool(x, tokens, t.pool_type, eos_token_id=getattr(t, "eos_id", None))
            proj, pool_type = t.text_projection, t.pool_type
        else:
            cast = c.transformer.get_cast_dtype()
            x = c.token_embedding(tokens).to(cast) + c.positional_embedding.to(cast)
            x = c.transformer(x, attn_mask=c.attn_mask)
            x = c.ln_final(x)
            pooled = text_global_pool(x, tokens, c.text_pool_type, eos_token_id=getattr(c, "text_eos_id", None))
            proj, pool_type = c.text_projection, c.text_pool_type
        if proj is not None:
            pooled = proj(pooled) if isinstance(proj, nn.Linear) else pooled @ proj
        pos = torch.arange(tokens.shape[1], device=tokens.device)
        if pool_type == "argmax":  # CLIP BPE: EOT has the largest id; keys up to and including it
            pad = pos[None, :] > tokens.argmax(dim=-1, keepdim=True)
        else:
            pad = tokens == 0
            pad[:, 0] = False  # never mask every key
        return pooled, x, pad

    # -- image --------------------------------------------------------------------------
    def encode_image(self, images: torch.Tensor, kv: torch.Tensor | None = None,
                     kv_pad: torch.Tensor | None = None) -> torch.Tensor:
        """Pooled, projected image embedding; with ``kv`` the selected blocks cross-attend to it."""
        from open_clip.transformer import ResidualAttentionBlock

        v = self.clip.visual
        x = v._embeds(images)
        tr = v.transformer
        if not tr.batch_first:
            x = x.transpose(0, 1)
        use_x = kv is not None and len(self.xattn) > 0
        for i, blk in enumerate(tr.resblocks):
            xa = self.xattn[str(i)] if use_x and str(i) in self.xattn else None
            if xa is None:
                x = blk(x) if tr.batch_first else blk(x.transpose(0, 1)).transpose(0, 1)
            elif isinstance(blk, ResidualAttentionBlock) and tr.batch_first:
                x = x + blk.ls_1(blk.attention(q_x=blk.ln_1(x)))
                x = xa(x, kv.to(x.dtype), kv_pad)
                x = x + blk.ls_2(blk.mlp(blk.ln_2(x)))
            else:  # other block types: cross-attend after the whole block
                x = blk(x) if tr.batch_first else blk(x.transpose(0, 1)).transpose(0, 1)
                x = xa(x, kv.to(x.dtype), kv_pad)
        pooled, _ = v._pool(x)
        if v.proj is not None:
            pooled = pooled @ v.proj
        return pooled

    # -- the model's outputs --------------------------------------------------------------
    def query(self, images: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        """Reformulated query embedding (unnormalised) for reference images + instructions."""
        t, feats, pad = self.encode_text(tokens)
        img = self.encode_image(images, feats, pad)
        return self.predictor(img, t)

    def target(self, images: torch.Tensor) -> torch.Tensor:
        """Gallery/target side: the same network with the null text."""
        null = self.null_tokens.expand(images.shape[0], -1)
        return self.query(images, null)

    def text(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.encode_text(tokens)[0]

    def compose(self, images: torch.Tensor, tokens: torch.Tensor, frozen: bool = False) -> torch.Tensor:
        """Combiner output; ``frozen`` computes the backbone without autograd (combiner stage)."""
        with torch.no_grad() if frozen else contextlib.nullcontext():
            t, feats, pad = self.encode_text(tokens)
            q = self.predictor(self.encode_image(images, feats, pad), t)
        return self.combiner(q, t)

    def forward(self, task: str, images: torch.Tensor | None = None, tokens: torch.Tensor | None = None,
                targets: torch.Tensor | None = None):
        if task == "clip":  # stage 1: plain CLIP image and text embeddings
            return self.encode_image(images), self.text(tokens)
        if task == "query":
            return self.query(images, tokens)
        if task == "pair":  # query and target through the same (shared) weights
            return self.query(images, tokens), self.target(targets)
        if task == "target":
            return self.target(images)
        if task == "compose":
            return self.compose(images, tokens, frozen=True)
        raise ValueError(f"unknown task {task!r}")


def _heads(block: nn.Module) -> int:
    attn = getattr(block, "attn", None)
    n = getattr(attn, "num_heads", None)
    if n is None:
        raise CirkitError("cannot find the head count of the ViT blocks")
    return int(n)


# -- building and loading ------------------------------------------------------------------
def settings_from_config(config) -> dict[str, Any]:
    """The model settings a TrainConfig implies (everything VitCir needs besides weights)."""
    return {
        "model": config.model,
        "cross_attn": bool(config.cross_attn),
        "cross_attn_layers": list(config.cross_attn_layers) if config.cross_attn_layers is not None else None,
        "predictor_hidden": config.predictor_hidden,
        "temperature": float(config.temperature),
        "gate_init": None if config.gate_init is None else float(config.gate_init),
        "combiner": config.combiner,
        "null_text": NULL_TEXT,
    }


def build_model(settings: dict[str, Any], pretrained: str | None = None, allow_pickle: bool = False):
    """Create (VitCir, preprocess, tokenizer) from settings; CLIP weights from ``pretrained`` if given."""
    from cirkit.backbones._openclip import create_clip, embed_dim, uses_quick_gelu

    clip, preprocess, tokenizer = create_clip(settings["model"], pretrained, allow_pickle=allow_pickle,
                                              quick_gelu=settings.get("quick_gelu"))
    settings = {k: v for k, v in settings.items() if k in SETTING_KEYS}
    settings["embed_dim"] = embed_dim(clip)
    # Recorded, so a checkpoint rebuilds (without its tag) with the activation it was trained with.
    settings["quick_gelu"] = uses_quick_gelu(clip)
    null = tokenizer([settings.get("null_text", NULL_TEXT)])
    model = VitCir(clip, settings, null)
    return model, preprocess, tokenizer


def config_json(model: VitCir, **extra: Any) -> dict[str, Any]:
    """The vit fields of ``config.json`` (``weights_id`` comes with ``extra``; family and version are added on write)."""
    import open_clip

    from cirkit.checkpoint import WEIGHTS

    return {
        **{k: v for k, v in model.settings.items()},
        "open_clip": open_clip.__version__,
        "open_clip_config": open_clip.get_model_config(model.settings["model"]),
        "weights": WEIGHTS,
        **extra,
    }


def save_checkpoint(model: VitCir, folder: Path, ema: VitCir | None = None, **extra: Any) -> None:
    """Write ``model.safetensors`` (+ ``ema.*`` target encoder) and ``config.json`` into ``folder``."""
    from safetensors.torch import save_file

    from cirkit.checkpoint import WEIGHTS, write_config

    Path(folder).mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu().contiguous().clone() for k, v in model.state_dict().items()}
    if ema is not None:
        state.update({EMA_PREFIX + k: v.detach().cpu().contiguous().clone() for k, v in ema.state_dict().items()})
    # The id follows the content: the same weights saved twice keep it (an index built from
    # them stays valid), any change of weights gives a new one. Hashed over the tensors, not
    # the file, whose header order is not fixed.
    digest = hashlib.sha256()
    for k, v in sorted(model.state_dict().items()):
        v = v.detach().cpu().contiguous()
        digest.update(f"{k}:{v.dtype}:{tuple(v.shape)}".encode())
        digest.update(v.reshape(-1).view(torch.uint8).numpy().tobytes())
    extra.setdefault("weights_id", digest.hexdigest()[:12])
    save_file(state, str(Path(folder) / WEIGHTS), metadata={"format": "pt", "backbone": "vit"})
    write_config(folder, "vit", **config_json(model, has_ema=ema is not None, **extra))


def read_checkpoint(folder: str | Path) -> tuple[dict[str, Any], dict[str, torch.Tensor], dict[str, torch.Tensor] | None]:
    """(config, query-encoder state, ema state or None) from a vit checkpoint folder (safetensors only)."""
    from cirkit.checkpoint import WEIGHTS, check_folder, load_safetensors

    folder = Path(folder)
    cfg = check_folder(folder, "vit")
    state = load_safetensors(folder / cfg.get("weights", WEIGHTS))
    ema = {k[len(EMA_PREFIX):]: v for k, v in state.items() if k.startswith(EMA_PREFIX)} or None
    online = {k: v for k, v in state.items() if not k.startswith(EMA_PREFIX)}
    return cfg, online, ema


def load_weights(model: nn.Module, state: dict[str, torch.Tensor], where: str) -> None:
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise CheckpointError(
            f"{where}: weights do not match the model ({len(missing)} missing e.g. {missing[:2]}, "
            f"{len(unexpected)} unexpected e.g. {unexpected[:2]})"
        )


def load_model(folder: str | Path, allow_pickle: bool = False) -> tuple[VitCir, VitCir | None, Any, Any, dict[str, Any]]:
    """(query encoder, target encoder or None, preprocess, tokenizer, config) from a folder.

    ``allow_pickle`` applies to an open_clip ``local-dir:`` model the config names, whose own
    weights open_clip loads first (the checkpoint's weights are safetensors only).
    """
    cfg, online, ema_state = read_checkpoint(folder)
    # A setting an older cirkit did not record means what that cirkit built (tanh gates at 0,
    # the per-query combiner, the config's own GELU), so its weights fit the rebuilt model.
    cfg = {**LEGACY_SETTINGS, **cfg}
    model, preprocess, tokenizer = build_model(cfg, allow_pickle=allow_pickle)
    load_weights(model, online, str(folder))
    ema = None
    if ema_state is not None:
        import copy

        ema = copy.deepcopy(model)
        load_weights(ema, ema_state, f"{folder} (ema)")
        ema.requires_grad_(False)
    return model, ema, preprocess, tokenizer, cfg


# -- the Backbone ---------------------------------------------------------------------------
class VitBackbone(Backbone):
    """Embeds with a trained (or fresh) VitCir; gallery side = the EMA target encoder if present."""

    name = "vit"

    def __init__(self, spec: BackboneSpec, model: VitCir, target: VitCir | None, preprocess, tokenizer,
                 config: dict[str, Any]):
        super().__init__(spec)
        self.device = pick_device(spec.device)
        self.dtype = pick_dtype(spec.precision, self.device)
        self.model = model.to(self.device, self.dtype).eval()
        self.target_model = target.to(self.device, self.dtype).eval() if target is not None else self.model
        self.preprocess, self.tokenizer, self.config = preprocess, tokenizer, config
        self.dim = int(model.settings["embed_dim"])
        from cirkit.backbones._openclip import decode_size

        self.decode_size = decode_size(model.clip)
        self.use_combiner = bool(config.get("combiner_trained", False))

    def image_transform(self):
        return self.preprocess

    def _tokens(self, texts: list[str]) -> torch.Tensor:
        return self.tokenizer([t or "" for t in texts]).to(self.device)

    def _images(self, batch: torch.Tensor) -> torch.Tensor:
        return batch.to(self.device, self.dtype, non_blocking=True)

    @torch.inference_mode()
    def embed_images(self, batch):
        return normalize(self.target_model.target(self._images(batch))).cpu()

    @torch.inference_mode()
    def embed_texts(self, texts):
        return normalize(self.model.text(self._tokens(list(texts)))).cpu()

    @torch.inference_mode()
    def embed_composed(self, batch, texts):
        images, tokens = self._images(batch), self._tokens(list(texts))
        if self.use_combiner:
            return normalize(self.model.compose(images, tokens)).cpu()
        return normalize(self.model.query(images, tokens)).cpu()

    def checkpoint_id(self) -> str:
        wid = self.config.get("weights_id")
        if wid:
            return f"{Path(str(self.spec.model)).name}@{wid}"
        return super().checkpoint_id()


def load_vit_backbone(spec: BackboneSpec) -> VitBackbone:
    """A VitBackbone from a checkpoint folder, or an untrained one from an open_clip name + weights."""
    from cirkit.backbones import checkpoint_config

    if spec.model and checkpoint_config(spec.model) is not None:
        model, ema, preprocess, tokenizer, cfg = load_model(spec.model, spec.allow_pickle)
        return VitBackbone(spec, model, ema, preprocess, tokenizer, cfg)
    if spec.model and Path(spec.model).is_dir():
        raise CheckpointError(f"{spec.model}: a folder without config.json is not a cirkit checkpoint")
    # No cross-attention yet (stage 2 injects it): the untrained predictor is the identity, so
    # composed queries equal image queries, and the gallery side is the plain CLIP embedding.
    settings = {"model": spec.model or "cirkit-small", "cross_attn": False, "cross_attn_layers": None,
                "predictor_hidden": None, "temperature": 0.07, "null_text": NULL_TEXT}
    log.warning("vit backbone from %s without a cirkit checkpoint: no cross-attention and an untrained predictor "
                "(composed queries equal image queries)", settings["model"])
    model, preprocess, tokenizer = build_model(settings, spec.pretrained, allow_pickle=spec.allow_pickle)
    return VitBackbone(spec, model, None, preprocess, tokenizer, {"model": settings["model"]})
