"""Every training setting, declared once (torch-free: the CLI reads it to build ``cirkit train --help``).

``resume=True`` marks the settings that change the trained result: ``--resume`` refuses to
continue a run under other values of exactly these (:func:`resume_keys`).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from cirkit import config as _config
from cirkit.config import MAX_BATCH, MAX_WORKERS, check_settings, setting, strict_setting, wait_setting
from cirkit.io import datasets as datasets_input

VIT = "ViT backbone"
MLLM = "MLLM backbone"
OPTIM = "Optimisation"
STAGES = ("1", "2", "combiner")
BACKBONES = ("vit", "mllm", "reformulator")
SCHEDULERS = ("cosine", "linear", "constant")
COMBINERS = ("weight", "gate")  # cirkit.backbones.vit.COMBINERS (that module imports torch)
# Test-only switch read by the loop: compare gradient/weight checksums across processes each step.
CHECK_SYNC_ENV = "CIRKIT_CHECK_SYNC"


@dataclass
class TrainConfig:
    """Every training setting; recipes set these by name (kebab- or snake-case)."""

    # what and where
    data: Path | None = setting(
        None, positional=True, metavar="DATA", resume=True,
        help="captions.jsonl (stage 1) or triplets.jsonl (stage 2, combiner).")
    output: Path = setting(Path("runs/model"), short="-o", help="Checkpoint folder to write.")
    backbone: str = setting("vit", choices=BACKBONES, resume=True, help="The model family to train.")
    stage: str = setting("2", choices=STAGES, resume=True,
                         help="1 (image-caption), 2 (triplets) or combiner (fusion weight only).")
    init: str | None = setting(None, resume=True, help="Checkpoint folder to start from, e.g. the stage-1 output.")
    model: str = setting("cirkit-small", short="-m", resume=True,
                         help="open_clip name (vit) or hub id/path (mllm, reformulator: default "
                               "the offline SmolLM2-135M-Instruct).")
    pretrained: str | None = setting(None, resume=True, help="open_clip tag or .safetensors weights (vit).")
    resume: bool = setting(False, help="Continue OUTPUT's interrupted run exactly.")
    # optimisation
    max_steps: int = setting(1000, ge=1, resume=True, panel=OPTIM, help="Optimiser steps.")
    epochs: int | None = setting(None, ge=1, resume=True, panel=OPTIM, help="Epochs; overrides --max-steps.")
    batch_size: int = setting(32, ge=1, cap=MAX_BATCH, resume=True, panel=OPTIM,
                              help="Examples per process per micro-batch.")
    grad_accum: int = setting(1, ge=1, resume=True, panel=OPTIM, help="Micro-batches per optimiser step.")
    lr: float = setting(1e-4, gt=0, resume=True, panel=OPTIM, help="Peak learning rate (AdamW).")
    weight_decay: float = setting(0.1, ge=0, resume=True, panel=OPTIM, help="AdamW weight decay.")
    warmup_steps: int = setting(50, ge=0, resume=True, panel=OPTIM, help="Linear warmup steps.")
    scheduler: str = setting("cosine", choices=SCHEDULERS, resume=True, panel=OPTIM,
                             help="Learning-rate schedule after warmup.")
    max_grad_norm: float | None = setting(1.0, ge=0, resume=True, panel=OPTIM,
                                          help="Clip gradients to this norm; 0 = off.")
    precision: str = setting("auto", panel=OPTIM, help="auto (bf16 on GPUs that have it), fp32, bf16, fp16.")
    seed: int = setting(0, ge=0, resume=True, panel=OPTIM, help="Seed of initialisation and data order.")
    num_workers: int = setting(2, ge=0, cap=MAX_WORKERS, panel=OPTIM, help="DataLoader worker processes.")
    log_every: int = setting(10, ge=1, panel=OPTIM, help="Steps between metrics.jsonl lines.")
    save_every: int = setting(200, ge=0, panel=OPTIM, help="Steps between checkpoint saves; 0 = only at the end.")
    temperature: float = setting(0.07, gt=0, resume=True, panel=OPTIM, help="InfoNCE temperature at the start.")
    learn_temperature: bool = setting(True, resume=True, flag="--learn-temperature/--fixed-temperature",
                                      panel=OPTIM, help="Learn the InfoNCE temperature.")
    gather_negatives: bool = setting(
        True, resume=True, flag="--gather-negatives/--local-negatives", panel=OPTIM,
        help="Contrast each example with the batches of all processes (gathered with gradient), "
             "not only its own: the global batch is the contrastive batch.")
    # vit backbone
    cross_attn: bool = setting(True, resume=True, flag="--cross-attn/--no-cross-attn", panel=VIT,
                               help="Cross-attention in the vision blocks; off = late fusion ablation.")
    cross_attn_layers: list[int] | None = setting(
        None, resume=True, panel=VIT, show_default="all",
        help="Blocks that get cross-attention, e.g. 0,2,4 or -1 (repeat or comma-separate).")
    gate_init: float | None = setting(
        None, resume=True, panel=VIT, show_default="none: the paper's plain residual branch",
        help="Gate the cross-attention branch by tanh(g), g starting here (0 starts as plain CLIP, "
             "but the attention weights then get no gradient until g moves).")
    new_layer_lr: float | None = setting(
        None, gt=0, resume=True, panel=VIT, show_default="--lr",
        help="Learning rate of the layers added to CLIP (cross-attention, predictor, combiner), "
             "like LLaVA's mm_projector_lr; the paper uses one rate for all.")
    combiner: str = setting("weight", choices=COMBINERS, resume=True, panel=VIT,
                            help="Eq. 3 fusion with the text embedding: weight (one learned lambda, the paper's) "
                                 "or gate (a per-query weight, trained with the temperature).")
    ema: bool = setting(True, resume=True, flag="--ema/--no-ema", panel=VIT,
                        help="EMA target encoder; off = shared online weights.")
    ema_momentum: float = setting(0.995, ge=0, le=1, resume=True, panel=VIT, help="EMA momentum per step.")
    predictor_hidden: int | None = setting(None, ge=1, resume=True, panel=VIT, show_default="2 x embed dim",
                                           help="Predictor MLP width.")
    train_text_encoder: bool = setting(True, resume=True, flag="--train-text-encoder/--freeze-text-encoder",
                                       panel=VIT, help="Train the CLIP text encoder too.")
    # mllm backbone
    lora_r: int = setting(16, ge=1, resume=True, panel=MLLM, help="LoRA rank.")
    lora_alpha: int = setting(32, ge=1, resume=True, panel=MLLM, help="LoRA scale numerator (alpha / r).")
    lora_dropout: float = setting(0.05, ge=0, lt=1, resume=True, panel=MLLM, help="LoRA dropout.")
    lora_target_modules: list[str] | None = setting(
        None, resume=True, panel=MLLM, show_default="the LLM's attention/MLP projections",
        help="Module names LoRA adapts (repeat or comma-separate).")
    lora_layers: int | None = setting(
        None, ge=1, resume=True, panel=MLLM, show_default="all",
        help="reformulator: LoRA on the top N transformer layers only (backward stops below them: cheaper steps).")
    full_finetune: bool = setting(False, resume=True, panel=MLLM, help="Train all LLM weights instead of LoRA.")
    freeze_vision: bool = setting(True, resume=True, flag="--freeze-vision/--train-vision", panel=MLLM,
                                  help="Keep the vision tower and projector frozen.")
    gradient_checkpointing: bool = setting(False, panel=MLLM, help="Trade compute for memory.")
    target_image_loss: bool = setting(False, resume=True, panel=MLLM,
                                      help="Stage 2: also contrast against target images.")
    max_length: int = setting(128, ge=1, resume=True, panel=MLLM, help="Token limit.")
    # Qwen2-VL-style processors resize each image to min..max pixels (one visual token per 28x28 px
    # after the 2x2 merge); the hub configs allow 12.8 Mpx (16k tokens). 576 tokens is what
    # LLaVA-1.5 sees and the Qwen2.5-VL fine-tuning scripts' default (max_pixels=576*28*28).
    min_pixels: int = setting(16 * 28 * 28, ge=1, resume=True, panel=MLLM,
                              help="Dynamic-resolution models (Qwen2-VL): smallest image area in pixels.")
    max_pixels: int = setting(576 * 28 * 28, ge=1, resume=True, panel=MLLM,
                              help="Dynamic-resolution models (Qwen2-VL): largest image area in pixels "
                                   "(576 visual tokens); other families ignore it.")
    templates: dict[str, str] | None = setting(
        None, resume=True, cli=False, show_default="the --init checkpoint's, else the built-in ones",
        help="mllm prompt templates by kind (image, text, composed, end); kinds left out keep the default.")
    merge: bool = setting(False, panel=MLLM, help="Also export merged LoRA weights as model.safetensors.")
    trust_remote_code: bool = setting(False, panel=MLLM, help="Allow model code from the hub.")
    allow_pickle: bool = setting(False, help="Allow loading pickle weights you trust.")
    strict: bool = strict_setting()
    wait: bool = wait_setting()
    # DATA as a Hugging Face dataset (cirkit.io.datasets): which columns and split
    image_column: str | None = datasets_input.image_column_setting("stage-1 images")
    id_column: str | None = datasets_input.id_column_setting()
    text_column: str | None = datasets_input.text_column_setting("caption (stage 1) or instruction (stage 2)",
                                                                 "caption / instruction, else text or txt")
    dataset_split: str | None = datasets_input.dataset_split_setting()
    input_format: str = datasets_input.input_format_setting()

    def __post_init__(self) -> None:
        check_settings(self)


def resume_keys(cls: type = TrainConfig) -> tuple[str, ...]:
    """The settings ``--resume`` compares: the fields marked ``resume=True``."""
    return _config.resume_keys(cls)
