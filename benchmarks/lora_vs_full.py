"""LoRA vs full fine-tuning of the mllm backbone: peak memory and samples/s, one run.

Builds one tiny LLaVA (CLIP-style vision tower + Llama LLM, random weights, saved and
reloaded through ``from_pretrained`` like any hub model), then trains it with
:class:`cirkit.train.mllm.MllmTrainPlugin` twice, stage 2 (composed query vs target
caption), same data, same batches, same optimiser (AdamW):

* ``lora``  rank ``--lora-r`` adapters on the LLM's q/k/v/o + MLP projections
* ``full``  every LLM weight trainable (``full_finetune``)

The vision tower is frozen in both (the default). Each mode runs in its own spawned
process so peaks do not mix: the peak RSS while training (sampled every millisecond by a
thread; ``ru_maxrss`` would report the model-loading peak instead) minus the RSS right before
the first step, the peak of Python-level allocations (tracemalloc), the bytes of trainable
parameters + gradients + AdamW state, and on CUDA ``torch.cuda.max_memory_allocated``.
Throughput is measured over ``--steps`` steps after ``--warmup`` untimed ones.

    python benchmarks/lora_vs_full.py                          # defaults: hidden 512, 8 layers
    python benchmarks/lora_vs_full.py --hidden 256 --layers 4 --steps 5
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import queue
import shutil
import sys
import tempfile
import threading
import time
import tracemalloc
from pathlib import Path


def _data(folder: Path, n: int) -> Path:
    import random

    from PIL import Image, ImageDraw

    rng = random.Random(0)
    colours = {"red": (230, 30, 30), "blue": (30, 30, 230), "green": (30, 200, 30), "yellow": (240, 230, 40)}
    shapes = ("circle", "square")
    (folder / "img").mkdir(parents=True, exist_ok=True)
    names = []
    for c, rgb in colours.items():
        for s in shapes:
            im = Image.new("RGB", (64, 64), (128, 128, 128))
            draw = ImageDraw.Draw(im)
            (draw.ellipse if s == "circle" else draw.rectangle)((16, 16, 48, 48), fill=rgb)
            im.save(folder / "img" / f"{c}-{s}.png")
            names.append((c, s))
    lines = []
    for i in range(n):
        (c1, s1), (c2, s2) = rng.sample(names, 2)
        lines.append(json.dumps({"id": f"t{i}", "reference": f"img/{c1}-{s1}.png", "instruction": f"make it a {c2} {s2}",
                                 "target": f"img/{c2}-{s2}.png", "target_caption": f"a {c2} {s2} on a grey background"}))
    path = folder / "triplets.jsonl"
    path.write_text("\n".join(lines) + "\n")
    return path


def _rss_mb() -> float:
    import psutil

    return psutil.Process().memory_info().rss / 2**20


def _measure(mode: str, model_dir: str, data: str, args: dict, queue) -> None:
    import torch

    from cirkit.train.mllm import MllmTrainPlugin
    from cirkit.train.plugin import TrainConfig

    torch.set_num_threads(args["threads"])
    torch.manual_seed(0)
    cuda = torch.cuda.is_available()
    cfg = TrainConfig(backbone="mllm", stage="2", data=Path(data), model=model_dir, output=Path(data).parent / mode,
                      full_finetune=mode == "full", lora_r=args["lora_r"], lora_alpha=2 * args["lora_r"],
                      lora_dropout=0.0, gradient_checkpointing=args["checkpointing"])
    plugin = MllmTrainPlugin(cfg)
    model = plugin.build()
    ds, collate = plugin.dataset()
    device = torch.device("cuda" if cuda else "cpu")
    model.to(device)
    trainable = [p for p in model.parameters() if p.requires_grad]
    n_train = sum(p.numel() for p in trainable)
    n_all = sum(p.numel() for p in model.parameters())
    opt = torch.optim.AdamW(plugin.parameters(model), lr=1e-4)
    bs = args["batch_size"]
    batches = [collate([ds[(s * bs + i) % len(ds)] for i in range(bs)]) for s in range(args["warmup"] + args["steps"])]
    from cirkit.train.loop import to_device

    batches = [to_device(b, device) for b in batches]
    model.train()
    rss0 = _rss_mb()
    peak = {"rss": rss0}
    done = threading.Event()

    def sample() -> None:
        while not done.is_set():
            peak["rss"] = max(peak["rss"], _rss_mb())
            time.sleep(0.001)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    tracemalloc.start()
    if cuda:
        torch.cuda.reset_peak_memory_stats()
        base_cuda = torch.cuda.memory_allocated()

    def step(batch):
        loss, _ = plugin.loss(model, batch)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    for b in batches[: args["warmup"]]:
        step(b)
    if cuda:
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    for b in batches[args["warmup"]:]:
        step(b)
    if cuda:
        torch.cuda.synchronize()
    seconds = time.perf_counter() - t0
    _, py_peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    done.set()
    sampler.join()
    peak_rss = peak["rss"]
    queue.put({
        "mode": mode,
        "trainable_params": n_train,
        "total_params": n_all,
        "samples_per_s": args["steps"] * bs / seconds,
        "step_s": seconds / args["steps"],
        "peak_rss_mb": peak_rss,
        "peak_rss_over_model_mb": peak_rss - rss0,  # what training adds on top of the loaded model
        "tracemalloc_peak_mb": py_peak / 2**20,
        # fp32 weights' gradients + AdamW exp_avg + exp_avg_sq for what is trained.
        "grad_and_adam_state_mb": n_train * 4 * 3 / 2**20,
        "cuda_peak_mb": (torch.cuda.max_memory_allocated() / 2**20) if cuda else None,
        "cuda_peak_over_model_mb": ((torch.cuda.max_memory_allocated() - base_cuda) / 2**20) if cuda else None,
        "device": str(device),
    })


def _in_child(mode: str, model_dir: str, data: str, args: dict) -> dict:
    """Run one measurement in a fresh process (clean peak memory); a crashed child ends the benchmark."""
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    p = ctx.Process(target=_measure, args=(mode, model_dir, data, args, q))
    p.start()
    while True:
        try:
            row = q.get(timeout=5)
            break
        except queue.Empty:
            if not p.is_alive():
                sys.exit(f"{mode} run failed (exit {p.exitcode})")
    p.join()
    if p.exitcode:
        sys.exit(f"{mode} run failed (exit {p.exitcode})")
    return row


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--hidden", type=int, default=512, help="LLM and vision width")
    ap.add_argument("--layers", type=int, default=8, help="LLM and vision depth")
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--lora-r", type=int, default=16)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--checkpointing", action="store_true", help="gradient checkpointing in both modes")
    ap.add_argument("--json", type=Path, default=None, help="also write the results here")
    a = ap.parse_args(argv)

    from cirkit.testing import build_tiny_llava

    tmp = Path(tempfile.mkdtemp(prefix="lora-vs-full-"))
    try:
        model_dir = build_tiny_llava(tmp / "model", hidden=a.hidden, layers=a.layers, image_size=64, patch_size=16,
                                     initializer_range=0.02)
        data = _data(tmp / "data", 64)
        args = {"batch_size": a.batch_size, "steps": a.steps, "warmup": a.warmup, "lora_r": a.lora_r,
                "threads": a.threads, "checkpointing": a.checkpointing}
        rows = {mode: _in_child(mode, str(model_dir), str(data), args) for mode in ("full", "lora")}
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    lora, full = rows["lora"], rows["full"]
    print(f"tiny LLaVA: hidden {a.hidden}, {a.layers} layers, {full['total_params']:,} params; stage 2, batch {a.batch_size}, "
          f"{a.steps} timed steps on {full['device']}")
    keys = [("trainable_params", "{:,.0f}"), ("samples_per_s", "{:.2f}"), ("step_s", "{:.3f}"),
            ("peak_rss_mb", "{:.0f}"), ("peak_rss_over_model_mb", "{:.0f}"), ("tracemalloc_peak_mb", "{:.1f}"),
            ("grad_and_adam_state_mb", "{:.1f}"), ("cuda_peak_mb", "{:.0f}"), ("cuda_peak_over_model_mb", "{:.0f}")]
    print(f"{'':26s}{'full':>14s}{'lora':>14s}{'lora/full':>11s}")
    for k, fmt in keys:
        if full[k] is None:
            continue
        ratio = lora[k] / full[k] if full[k] else float("nan")
        print(f"{k:26s}{fmt.format(full[k]):>14s}{fmt.format(lora[k]):>14s}{ratio:>11.3f}")
    out = {"config": vars(a) | {"json": str(a.json) if a.json else None}, "full": full, "lora": lora}
    if a.json:
        a.json.write_text(json.dumps(out, indent=2) + "\n")
    return out


if __name__ == "__main__":
    main()
