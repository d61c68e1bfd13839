"""``cirkit train [DATA] -o CKPT``: train a backbone stage (thin CLI over cirkit.train)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated

import typer

from cirkit.cli._common import JsonFlag, RecipeOpt, emit, flags, stage

_V = "ViT backbone"
_M = "MLLM backbone"
_O = "Optimisation"


def _layers(value: str | None) -> list[int] | None:
    if value is None:
        return None
    try:
        return [int(v) for v in value.replace(" ", "").split(",") if v]
    except ValueError:
        raise typer.BadParameter(f"expected comma-separated block indices like 0,2,4; got {value!r}") from None


@stage
def train(
    data: Annotated[Path | None, typer.Argument(help="captions.jsonl (stage 1) or triplets.jsonl (stage 2, combiner).")] = None,
    output: Annotated[Path | None, typer.Option("--output", "-o", help="Checkpoint folder to write. (default runs/model)")] = None,
    backbone: Annotated[str | None, typer.Option("--backbone", help="vit or mllm. (default vit)")] = None,
    stage_: Annotated[str | None, typer.Option("--stage", help="1 (image-caption), 2 (triplets) or combiner. (default 2)")] = None,
    init: Annotated[str | None, typer.Option("--init", help="Checkpoint folder to start from, e.g. the stage-1 output.")] = None,
    model: Annotated[str | None, typer.Option("--model", help="open_clip name (vit) or hub id/path (mllm). (default cirkit-small)")] = None,
    pretrained: Annotated[str | None, typer.Option("--pretrained", help="open_clip tag or .safetensors weights (vit).")] = None,
    resume: Annotated[bool | None, typer.Option("--resume", help="Continue OUTPUT's interrupted run exactly.")] = None,
    max_steps: Annotated[int | None, typer.Option("--max-steps", help="Optimiser steps. (default 1000)", rich_help_panel=_O)] = None,
    epochs: Annotated[int | None, typer.Option("--epochs", help="Epochs; overrides --max-steps.", rich_help_panel=_O)] = None,
    batch_size: Annotated[int | None, typer.Option("--batch-size", help="Examples per process per micro-batch. (default 32)", rich_help_panel=_O)] = None,
    grad_accum: Annotated[int | None, typer.Option("--grad-accum", help="Micro-batches per optimiser step. (default 1)", rich_help_panel=_O)] = None,
    lr: Annotated[float | None, typer.Option("--lr", help="Peak learning rate (AdamW). (default 1e-4)", rich_help_panel=_O)] = None,
    weight_decay: Annotated[float | None, typer.Option("--weight-decay", help="(default 0.1)", rich_help_panel=_O)] = None,
    warmup_steps: Annotated[int | None, typer.Option("--warmup-steps", help="Linear warmup steps. (default 50)", rich_help_panel=_O)] = None,
    scheduler: Annotated[str | None, typer.Option("--scheduler", help="cosine, linear or constant. (default cosine)", rich_help_panel=_O)] = None,
    max_grad_norm: Annotated[float | None, typer.Option("--max-grad-norm", help="Clip gradients to this norm; 0 = off. (default 1.0)", rich_help_panel=_O)] = None,
    precision: Annotated[str | None, typer.Option("--precision", help="auto (bf16 on GPUs that have it), fp32, bf16, fp16.", rich_help_panel=_O)] = None,
    seed: Annotated[int | None, typer.Option("--seed", help="(default 0)", rich_help_panel=_O)] = None,
    num_workers: Annotated[int | None, typer.Option("--num-workers", help="DataLoader worker processes. (default 2)", rich_help_panel=_O)] = None,
    log_every: Annotated[int | None, typer.Option("--log-every", help="Steps between metrics.jsonl lines. (default 10)", rich_help_panel=_O)] = None,
    save_every: Annotated[int | None, typer.Option("--save-every", help="Steps between checkpoint saves; 0 = only at the end. (default 200)", rich_help_panel=_O)] = None,
    temperature: Annotated[float | None, typer.Option("--temperature", help="InfoNCE temperature at the start. (default 0.07)", rich_help_panel=_O)] = None,
    learn_temperature: Annotated[bool | None, typer.Option("--learn-temperature/--fixed-temperature", help="(default learn)", rich_help_panel=_O)] = None,
    cross_attn: Annotated[bool | None, typer.Option("--cross-attn/--no-cross-attn", help="Cross-attention in the vision blocks; off = late fusion ablation.", rich_help_panel=_V)] = None,
    cross_attn_layers: Annotated[str | None, typer.Option("--cross-attn-layers", help="Blocks that get cross-attention, e.g. 0,2,4 or -1. (default all)", rich_help_panel=_V)] = None,
    ema: Annotated[bool | None, typer.Option("--ema/--no-ema", help="EMA target encoder; off = shared online weights.", rich_help_panel=_V)] = None,
    ema_momentum: Annotated[float | None, typer.Option("--ema-momentum", help="(default 0.995)", rich_help_panel=_V)] = None,
    predictor_hidden: Annotated[int | None, typer.Option("--predictor-hidden", help="Predictor MLP width. (default 2 x embed dim)", rich_help_panel=_V)] = None,
    train_text_encoder: Annotated[bool | None, typer.Option("--train-text-encoder/--freeze-text-encoder", help="(default train)", rich_help_panel=_V)] = None,
    lora_r: Annotated[int | None, typer.Option("--lora-r", help="(default 16)", rich_help_panel=_M)] = None,
    lora_alpha: Annotated[int | None, typer.Option("--lora-alpha", help="(default 32)", rich_help_panel=_M)] = None,
    lora_dropout: Annotated[float | None, typer.Option("--lora-dropout", help="(default 0.05)", rich_help_panel=_M)] = None,
    lora_target_modules: Annotated[str | None, typer.Option("--lora-target-modules", help="Comma-separated module names. (default the LLM's attention/MLP projections)", rich_help_panel=_M)] = None,
    full_finetune: Annotated[bool | None, typer.Option("--full-finetune", help="Train all LLM weights instead of LoRA.", rich_help_panel=_M)] = None,
    freeze_vision: Annotated[bool | None, typer.Option("--freeze-vision/--train-vision", help="(default freeze)", rich_help_panel=_M)] = None,
    gradient_checkpointing: Annotated[bool | None, typer.Option("--gradient-checkpointing", help="Trade compute for memory.", rich_help_panel=_M)] = None,
    target_image_loss: Annotated[bool | None, typer.Option("--target-image-loss", help="Stage 2: also contrast against target images.", rich_help_panel=_M)] = None,
    max_length: Annotated[int | None, typer.Option("--max-length", help="Token limit. (default 128)", rich_help_panel=_M)] = None,
    merge: Annotated[bool | None, typer.Option("--merge", help="Also export merged LoRA weights as model.safetensors.", rich_help_panel=_M)] = None,
    trust_remote_code: Annotated[bool | None, typer.Option("--trust-remote-code", help="Allow model code from the hub.", rich_help_panel=_M)] = None,
    allow_pickle: Annotated[bool | None, typer.Option("--allow-pickle", help="Allow loading pickle weights you trust.")] = None,
    config: RecipeOpt = None,
    json_: JsonFlag = False,
) -> None:
    """Train a backbone stage and write a checkpoint folder (also under accelerate launch).

    Stage 1 trains image-caption contrastive (captions.jsonl); stage 2 trains composed
    queries against target images (triplets.jsonl); stage combiner fits the text/query
    fusion weight with the backbone frozen. The checkpoint folder (model.safetensors,
    config.json, train_args.json, metrics.jsonl, trainer_state/) is saved atomically
    every --save-every steps; --resume continues an interrupted run exactly.

    Examples

      cirkit train data/synth/captions.jsonl --stage 1 -o runs/s1 -c recipes/vit-synth.yaml

      cirkit train data/synth/triplets.jsonl --stage 2 --init runs/s1 -o runs/s2 -c recipes/vit-synth.yaml

      cirkit train data/synth/triplets.jsonl --stage combiner --init runs/s2 -o runs/s2c --max-steps 100

      cirkit train triplets.jsonl -c recipes/vit-l14-paper.yaml -o runs/paper --resume

      accelerate launch --num_processes 2 -m cirkit train triplets.jsonl -c recipes/vit-l14-paper.yaml -o runs/paper
    """
    from cirkit.config import resolve
    from cirkit.train import run
    from cirkit.train.plugin import TrainConfig

    cfg = resolve(
        TrainConfig,
        config,
        flags(
            data=data, output=output, backbone=backbone, stage=stage_, init=init, model=model, pretrained=pretrained,
            resume=resume, max_steps=max_steps, epochs=epochs, batch_size=batch_size, grad_accum=grad_accum, lr=lr,
            weight_decay=weight_decay, warmup_steps=warmup_steps, scheduler=scheduler, max_grad_norm=max_grad_norm,
            precision=precision, seed=seed, num_workers=num_workers, log_every=log_every, save_every=save_every,
            temperature=temperature, learn_temperature=learn_temperature, cross_attn=cross_attn,
            cross_attn_layers=_layers(cross_attn_layers), ema=ema, ema_momentum=ema_momentum,
            predictor_hidden=predictor_hidden, train_text_encoder=train_text_encoder, lora_r=lora_r,
            lora_alpha=lora_alpha, lora_dropout=lora_dropout,
            lora_target_modules=[m for m in lora_target_modules.split(",") if m] if lora_target_modules else None,
            full_finetune=full_finetune, freeze_vision=freeze_vision, gradient_checkpointing=gradient_checkpointing,
            target_image_loss=target_image_loss, max_length=max_length, merge=merge,
            trust_remote_code=trust_remote_code, allow_pickle=allow_pickle,
        ),
        section="train",
    )
    result = run(cfg)
    if int(os.environ.get("RANK", "0")) == 0:  # one summary under accelerate launch / torchrun
        emit(result, json_)
