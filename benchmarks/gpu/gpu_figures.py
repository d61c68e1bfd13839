"""The GPU figures in one short run: embed images/s (ViT-B-32, ViT-L-14, random weights), the model-only
ceiling, GPU vs CPU JPEG decoding, and bf16 training samples/s.

Made for a lent GPU machine with no network: nothing is downloaded (random weights, generated
JPEGs), and the whole run takes a few minutes. It prints a table and writes every figure to
``--out`` (JSON) so the numbers come back as a file.

* ``model_only``: ``encode_image`` on random batches already on the GPU, in the backbone's
  precision (bf16 on GPUs that have it): the ceiling of any input pipeline.
* ``embed_gpu_decode`` / ``embed_cpu_decode``: ``cirkit embed``'s own path (:func:`cirkit.embed.run`:
  DataLoader workers, Lance writes included) on ``--images`` generated photo-like JPEGs, with
  ``--gpu-decode on`` (nvJPEG batches + preprocessing on the GPU) and ``off`` (PIL in workers).
* ``train_samples_per_s``: ``cirkit train --stage 2`` of the vit backbone on ViT-B-32 (random
  weights) in bf16 for ``--train-steps`` steps, after one warm-up step.

``--smoke`` runs every part on the CPU with a tiny model in seconds (a test runs it), so the
script is known to work before a GPU is lent.

    python benchmarks/gpu/gpu_figures.py --out gpu.json          # on the GPU machine
    python benchmarks/gpu/gpu_figures.py --smoke --out smoke.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))  # benchmarks/: make_images
sys.path.insert(0, str(HERE.parents[1]))  # the checkout: cirkit


def _sync() -> None:
    import torch

    if torch.cuda.is_available():
        torch.cuda.synchronize()


def model_only(backbone, batch: int, steps: int) -> float:
    """Images/s of the image tower alone on random inputs already on the device."""
    import torch

    size = backbone.model.visual.image_size
    size = size[0] if isinstance(size, (tuple, list)) else size
    x = torch.randn(batch, 3, size, size, device=backbone.device, dtype=backbone.dtype)
    with torch.inference_mode():
        for _ in range(2):  # warm-up (kernels, cudnn autotune)
            backbone.model.encode_image(x)
        _sync()
        t0 = time.perf_counter()
        for _ in range(steps):
            backbone.model.encode_image(x)
        _sync()
    return batch * steps / (time.perf_counter() - t0)


def embed_rate(backbone, images: Path, out: Path, batch: int, workers: int, gpu_decode: str) -> float:
    from cirkit.embed import EmbedConfig, run

    shutil.rmtree(out, ignore_errors=True)
    run(EmbedConfig(input=images, output=out, batch_size=batch, num_workers=workers, gpu_decode=gpu_decode),
        backbone=backbone)  # warm-up pass writes the store; the timed pass below embeds into a fresh one
    shutil.rmtree(out, ignore_errors=True)
    _sync()
    t0 = time.perf_counter()
    r = run(EmbedConfig(input=images, output=out, batch_size=batch, num_workers=workers, gpu_decode=gpu_decode),
            backbone=backbone)
    _sync()
    return r.counts["embedded"] / (time.perf_counter() - t0)


def train_rate(images: Path, root: Path, model: str, batch: int, steps: int, workers: int, precision: str) -> float:
    """bf16 samples/s of stage-2 training (vit backbone), timed over ``steps`` after a 1-step warm-up run."""
    from cirkit.train import run
    from cirkit.train.plugin import TrainConfig

    files = sorted(images.glob("*.jpg"))
    data = root / "triplets.jsonl"
    with open(data, "w") as fh:
        for i, ref in enumerate(files):
            tgt = files[(i + 1) % len(files)]
            fh.write(json.dumps({"id": f"t{i}", "reference": str(ref), "instruction": "make it brighter",
                                 "target": str(tgt)}) + "\n")

    def once(n: int, out: Path) -> float:
        cfg = TrainConfig(backbone="vit", stage="2", data=data, output=out, model=model, max_steps=n,
                          batch_size=batch, warmup_steps=1, num_workers=workers, log_every=max(n, 1), save_every=0,
                          precision=precision)
        t0 = time.perf_counter()
        run(cfg)
        return time.perf_counter() - t0

    once(1, root / "warm")
    short, full = once(1, root / "t1"), once(1 + steps, root / "t2")
    return steps * batch / max(full - short, 1e-9)  # the difference leaves out start-up and the final save


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--smoke", action="store_true", help="tiny CPU run of every part (seconds)")
    ap.add_argument("--models", default="ViT-B-32,ViT-L-14")
    ap.add_argument("--images", type=int, default=2048)
    ap.add_argument("--size", type=int, default=512, help="side of the generated JPEGs")
    ap.add_argument("--batch-size", type=int, default=256)
    ap.add_argument("--num-workers", type=int, default=min(8, os.cpu_count() or 1))
    ap.add_argument("--model-steps", type=int, default=20)
    ap.add_argument("--train-model", default="ViT-B-32")
    ap.add_argument("--train-batch", type=int, default=128)
    ap.add_argument("--train-steps", type=int, default=20)
    ap.add_argument("--out", type=Path, default=None, help="write the figures here as JSON")
    args = ap.parse_args()
    if args.smoke:
        args.models, args.images, args.size, args.batch_size, args.num_workers = "cirkit-tiny", 16, 96, 8, 0
        args.model_steps, args.train_model, args.train_batch, args.train_steps = 2, "cirkit-tiny", 4, 2

    import logging

    import torch
    from embed_throughput import make_images

    from cirkit.backbones import load_backbone
    from cirkit.backbones.base import BackboneSpec

    logging.getLogger("cirkit").setLevel(logging.ERROR)
    cuda = torch.cuda.is_available()
    device = "cuda" if cuda and not args.smoke else "cpu"
    figures: dict = {"device": torch.cuda.get_device_name(0) if device == "cuda" else platform.processor() or "cpu",
                     "torch": torch.__version__, "smoke": args.smoke, "images": args.images, "size": args.size,
                     "batch_size": args.batch_size, "num_workers": args.num_workers, "models": {}}
    tmp = Path(tempfile.mkdtemp(prefix="cirkit-gpu-figures-"))
    try:
        t0 = time.perf_counter()
        images = tmp / "images"
        make_images(images, args.images, args.size)
        figures["generate_s"] = round(time.perf_counter() - t0, 1)
        for name in args.models.split(","):
            torch.manual_seed(0)
            bb = load_backbone(BackboneSpec(backbone="clip", model=name, device=device, precision="auto"))
            row = {"precision": str(bb.dtype).replace("torch.", ""),
                   "model_only": round(model_only(bb, args.batch_size, args.model_steps), 1),
                   # "on" decodes JPEGs with torchvision.io.decode_jpeg on the model's device (the CPU in --smoke)
                   "embed_gpu_decode": round(embed_rate(bb, images, tmp / "g.lance", args.batch_size,
                                                        args.num_workers, "on"), 1),
                   "embed_cpu_decode": round(embed_rate(bb, images, tmp / "c.lance", args.batch_size,
                                                        args.num_workers, "off"), 1)}
            row["embed_vs_model"] = round(row["embed_gpu_decode"] / row["model_only"], 3)
            figures["models"][name] = row
            del bb
            if cuda:
                torch.cuda.empty_cache()
        precision = "bf16" if device == "cuda" else "fp32"
        figures["train"] = {"model": args.train_model, "batch_size": args.train_batch, "steps": args.train_steps,
                            "precision": precision,
                            "samples_per_s": round(train_rate(images, tmp, args.train_model, args.train_batch,
                                                              args.train_steps, args.num_workers, precision), 1)}
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    print(f"device {figures['device']}, torch {figures['torch']}, {args.images} JPEGs of {args.size}px, "
          f"batch {args.batch_size}, {args.num_workers} workers{' (SMOKE: CPU, tiny model)' if args.smoke else ''}")
    print(f"{'model':12s} {'precision':9s} {'model only':>11s} {'embed, GPU decode':>18s} {'embed, CPU decode':>18s}")
    for name, row in figures["models"].items():
        print(f"{name:12s} {row['precision']:9s} {row['model_only']:9.1f}/s {row['embed_gpu_decode']:16.1f}/s "
              f"{row['embed_cpu_decode']:16.1f}/s")
    t = figures["train"]
    print(f"train stage 2 ({t['model']}, {t['precision']}, batch {t['batch_size']}): {t['samples_per_s']:.1f} samples/s")
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(figures, indent=2) + "\n")


if __name__ == "__main__":
    main()
