"""The generic training loop: accelerate, AdamW, warmup + decay, accumulation, clipping, exact resume.

Works as one process and unchanged under ``accelerate launch -m cirkit train ...`` (DDP on
GPUs, gloo on CPUs). What it asks of a :class:`~cirkit.train.plugin.TrainPlugin`:

* ``loss(model, batch)`` receives the *prepared* model (DDP-wrapped when distributed) and
  must run every trainable computation through ``model(...)`` (its ``forward``), since
  DDP only synchronises gradients of work done inside its forward. The batch is already
  on the device (tensors inside dicts/lists/tuples are moved).
* ``after_step``, ``save`` receive the unwrapped model; ``state_dict``/``load_state_dict``
  carry extra state (EMA) through ``trainer_state/plugin.safetensors``.

Data order is a function of (seed, epoch) only: each epoch is one seeded permutation,
cut into global batches of ``batch_size x processes`` (the remainder is dropped), and
process ``r`` takes the ``r``-th slice of each. Resume therefore replays the exact order
from the saved step. ``batch_size`` is per process; in-batch negatives are per process.

Checkpoint folder (replaced atomically at every save)::

    model files + config.json (plugin.save), train_args.json, metrics.jsonl,
    trainer_state/{state.json, model.safetensors (trainable tensors), optimizer.safetensors,
                   plugin.safetensors, rng.safetensors}

Everything is safetensors or JSON: nothing is unpickled on resume.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import random
import shutil
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from cirkit.device import mixed_precision  # --precision -> accelerate's mixed_precision, one table for all
from cirkit.errors import CheckpointError, CirkitError
from cirkit.summary import StageResult, make_progress, timed
from cirkit.train.config import CHECK_SYNC_ENV, resume_keys
from cirkit.train.plugin import TrainConfig, TrainPlugin

log = logging.getLogger("cirkit")

STATE_DIR = "trainer_state"
CHECKPOINT_KIND = "checkpoint"
METRICS = "metrics.jsonl"


# -- data order -------------------------------------------------------------------------------
class EpochBatches(torch.utils.data.Sampler):
    """This process's batches of one epoch: a seeded permutation, optionally from ``start`` on."""

    def __init__(self, n: int, batch_size: int, world: int, rank: int, seed: int, epoch: int, start: int = 0):
        self.n, self.bs, self.world, self.rank = n, batch_size, world, rank
        self.seed, self.epoch, self.start = seed, epoch, start

    def batches_per_epoch(self) -> int:
        return self.n // (self.bs * self.world)

    def __len__(self) -> int:
        return max(0, self.batches_per_epoch() - self.start)

    def __iter__(self):
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
        perm = torch.randperm(self.n, generator=g).tolist()
        for b in range(self.start, self.batches_per_epoch()):
            lo = (b * self.world + self.rank) * self.bs
            yield perm[lo : lo + self.bs]


def to_device(obj: Any, device: torch.device) -> Any:
    if isinstance(obj, torch.Tensor):
        return obj.to(device, non_blocking=True)
    if isinstance(obj, dict):
        return {k: to_device(v, device) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(to_device(v, device) for v in obj)
    return obj


# -- schedule ---------------------------------------------------------------------------------
def lr_factor(step: int, warmup: int, total: int, kind: str) -> float:
    """Multiplier of the peak lr at optimiser step ``step`` (0-based)."""
    if warmup > 0 and step < warmup:
        return (step + 1) / warmup
    if kind == "constant":
        return 1.0
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    if kind == "linear":
        return max(0.0, 1.0 - progress)
    if kind == "cosine":
        return 0.5 * (1.0 + math.cos(math.pi * progress))
    raise CirkitError(f"unknown scheduler {kind!r}; choose cosine, linear or constant")


# -- state (de)serialisation without pickle ------------------------------------------------------
def _optimizer_to_files(opt_state: dict) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    tensors, scalars = {}, {}
    for idx, st in opt_state["state"].items():
        for k, v in st.items():
            if isinstance(v, torch.Tensor):
                tensors[f"{idx}.{k}"] = v.detach().cpu().contiguous()
            else:
                scalars[f"{idx}.{k}"] = v
    return tensors, {"param_groups": opt_state["param_groups"], "scalars": scalars}


def _optimizer_from_files(tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> dict:
    state: dict[int, dict[str, Any]] = {}
    for key, v in list(tensors.items()) + list(meta["scalars"].items()):
        idx, name = key.split(".", 1)
        state.setdefault(int(idx), {})[name] = v
    return {"state": state, "param_groups": meta["param_groups"]}


def _rng_state(device: torch.device) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    tensors = {"torch": torch.get_rng_state()}
    if device.type == "cuda":
        tensors["cuda"] = torch.cuda.get_rng_state(device)
    py = random.getstate()
    npy = np.random.get_state()
    meta = {"python": [py[0], list(py[1]), py[2]],
            "numpy": [npy[0], npy[1].tolist(), int(npy[2]), int(npy[3]), float(npy[4])]}
    return tensors, meta


def _set_rng_state(tensors: dict[str, torch.Tensor], meta: dict[str, Any], device: torch.device) -> None:
    torch.set_rng_state(tensors["torch"])
    if device.type == "cuda" and "cuda" in tensors:
        torch.cuda.set_rng_state(tensors["cuda"], device)
    v, st, g = meta["python"]
    random.setstate((v, tuple(st), g))
    n = meta["numpy"]
    np.random.set_state((n[0], np.array(n[1], dtype=np.uint32), n[2], n[3], n[4]))


def _jsonable(obj: Any) -> Any:
    try:
        json.dumps(obj)
        return obj
    except TypeError:
        if isinstance(obj, dict):
            return {k: _jsonable(v) for k, v in obj.items() if _is_plain(v)}
        return None


def _is_plain(v: Any) -> bool:
    try:
        json.dumps(v)
        return True
    except TypeError:
        return False


# -- the loop ---------------------------------------------------------------------------------
def train(config: TrainConfig, plugin: TrainPlugin, stop_at: int | None = None) -> StageResult:
    """Train ``plugin``'s model per ``config``; ``stop_at`` ends early after a save (simulates a kill)."""
    from accelerate import Accelerator
    from accelerate.utils import DistributedDataParallelKwargs
    from safetensors.torch import load_file, save_file

    from cirkit.config import to_jsonable
    from cirkit.io import atomic_dir, atomic_write_json

    result = StageResult("train")
    out = Path(config.output)
    with timed(result):
        world_env = int(os.environ.get("WORLD_SIZE", "1"))
        accelerator = Accelerator(
            mixed_precision=mixed_precision(config.precision),
            cpu=not torch.cuda.is_available() and world_env > 1,
            kwargs_handlers=[DistributedDataParallelKwargs(find_unused_parameters=False)],
        )
        main = accelerator.is_main_process
        world, rank, device = accelerator.num_processes, accelerator.process_index, accelerator.device
        _check_output(out, config, main)
        accelerator.wait_for_everyone()

        # Same seed on every process for the model (DDP also broadcasts rank 0's weights).
        torch.manual_seed(config.seed)
        random.seed(config.seed)
        np.random.seed(config.seed)
        model = plugin.build()
        dataset, collate = plugin.dataset()
        bs, accum = int(config.batch_size), max(1, int(config.grad_accum))
        per_epoch = EpochBatches(len(dataset), bs, world, rank, config.seed, 0).batches_per_epoch()
        steps_per_epoch = per_epoch // accum
        if steps_per_epoch < 1:
            raise CirkitError(
                f"{config.data}: {len(dataset)} examples are fewer than one optimiser step "
                f"({bs} x {world} processes x {accum} accumulation); lower --batch-size"
            )
        max_steps = int(config.epochs) * steps_per_epoch if config.epochs else int(config.max_steps)
        # Per-process randomness (dropout, augmentation) differs between processes.
        torch.manual_seed(config.seed + 7919 * (rank + 1))
        random.seed(config.seed + rank)
        np.random.seed(config.seed + rank)

        groups = [g for g in plugin.parameters(model) if g["params"]]
        if not groups:
            raise CirkitError(f"nothing to train in stage {config.stage}: every parameter is frozen")
        n_trainable = sum(p.numel() for g in groups for p in g["params"])
        optimizer = torch.optim.AdamW(groups, lr=config.lr, betas=(0.9, 0.98), eps=1e-6)
        scheduler = torch.optim.lr_scheduler.LambdaLR(
            optimizer, lambda s: lr_factor(s, int(config.warmup_steps), max_steps, config.scheduler)
        )
        step = 0
        state_dir = out / STATE_DIR
        if config.resume:
            meta = json.loads((state_dir / "state.json").read_text(encoding="utf-8"))
            _check_resume(config, out, world)
            trainable = load_file(str(state_dir / "model.safetensors"))
            _load_trainable(model, trainable, state_dir)
            step = int(meta["step"])
        model, optimizer = accelerator.prepare(model, optimizer)
        raw = accelerator.unwrap_model(model)
        if config.resume:
            optimizer.load_state_dict(_optimizer_from_files(load_file(str(state_dir / "optimizer.safetensors")),
                                                            meta["optimizer"]))
            scheduler.load_state_dict(meta["scheduler"])
            plugin_file = state_dir / "plugin.safetensors"
            plugin.load_state_dict(load_file(str(plugin_file)) if plugin_file.exists() else {})
            if rank == 0:
                _set_rng_state(load_file(str(state_dir / "rng.safetensors")), meta["rng"], device)
            else:
                torch.manual_seed(config.seed + 7919 * (rank + 1) + step)
            if main:
                _truncate_metrics(out / METRICS, step)
            log.info("resuming %s at step %d of %d", out, step, max_steps)

        def save() -> None:
            accelerator.wait_for_everyone()
            if main:
                with atomic_dir(out, CHECKPOINT_KIND, _is_checkpoint) as tmp:
                    plugin.save(raw, tmp)
                    args = to_jsonable(config)
                    args.update(resume=False, resolved_max_steps=max_steps, processes=world)
                    atomic_write_json(tmp / "train_args.json", args)
                    sd = tmp / STATE_DIR
                    sd.mkdir()
                    save_file({n: p.detach().cpu().contiguous() for n, p in raw.named_parameters() if p.requires_grad},
                              str(sd / "model.safetensors"))
                    opt_tensors, opt_meta = _optimizer_to_files(optimizer.state_dict())
                    save_file(opt_tensors, str(sd / "optimizer.safetensors"))
                    pstate = plugin.state_dict()
                    if pstate:
                        save_file({k: v.detach().cpu().contiguous() for k, v in pstate.items()},
                                  str(sd / "plugin.safetensors"))
                    rng_t, rng_meta = _rng_state(device)
                    save_file(rng_t, str(sd / "rng.safetensors"))
                    atomic_write_json(sd / "state.json", {
                        "step": step, "max_steps": max_steps, "epoch": step // steps_per_epoch,
                        "scheduler": _jsonable(scheduler.state_dict()), "optimizer": opt_meta, "rng": rng_meta,
                    })
                    if (out / METRICS).exists():
                        shutil.copy2(out / METRICS, tmp / METRICS)
            accelerator.wait_for_everyone()

        samples_per_step = bs * accum * world
        result.details.update(max_steps=max_steps, steps_per_epoch=steps_per_epoch, processes=world,
                              samples_per_step=samples_per_step, trainable_parameters=n_trainable,
                              mixed_precision=accelerator.mixed_precision, device=str(device))
        check_sync = os.environ.get(CHECK_SYNC_ENV) == "1"
        start_step = step
        last = {"loss": float("nan")}
        from rich.progress import TextColumn

        progress = make_progress(TextColumn("loss {task.fields[loss]}")) if main else contextlib.nullcontext()
        t_start = time.perf_counter()
        t_win, n_win = t_start, 0
        with progress:
            task = progress.add_task(f"train stage {config.stage}", total=max_steps, completed=step, rate="", loss="-") if main else None
            while step < max_steps:
                epoch, start_batch = divmod(step, steps_per_epoch)
                sampler = EpochBatches(len(dataset), bs, world, rank, config.seed, epoch, start_batch * accum)
                loader = torch.utils.data.DataLoader(
                    dataset, batch_sampler=sampler, collate_fn=collate, num_workers=int(config.num_workers),
                    pin_memory=device.type == "cuda", persistent_workers=False,
                )
                batches = iter(loader)
                for _ in range(start_batch, steps_per_epoch):
                    if step >= max_steps:
                        break
                    model.train()
                    loss_sum, logs = 0.0, {}
                    for micro in range(accum):
                        batch = to_device(next(batches), device)
                        sync = contextlib.nullcontext() if micro == accum - 1 else accelerator.no_sync(model)
                        with sync:
                            loss, mlogs = plugin.loss(model, batch)
                            accelerator.backward(loss / accum)
                        loss_sum += float(loss.detach()) / accum
                        for k, v in mlogs.items():
                            logs[k] = logs.get(k, 0.0) + float(v) / accum
                    if check_sync and world > 1:
                        _assert_in_sync(accelerator, [p.grad for p in raw.parameters() if p.grad is not None], "gradients")
                    grad_norm = None
                    if config.max_grad_norm:
                        grad_norm = accelerator.clip_grad_norm_(model.parameters(), config.max_grad_norm)
                    optimizer.step()
                    scheduler.step()
                    optimizer.zero_grad(set_to_none=True)
                    step += 1
                    plugin.after_step(raw, step)
                    n_win += samples_per_step
                    if not math.isfinite(loss_sum):
                        raise CirkitError(f"loss became {loss_sum} at step {step}; lower --lr or use --precision fp32")
                    if step % max(1, config.log_every) == 0 or step == max_steps:
                        mean_loss = float(accelerator.reduce(torch.tensor(loss_sum, device=device), "mean"))
                        now = time.perf_counter()
                        sps = n_win / max(now - t_win, 1e-9)
                        t_win, n_win = now, 0
                        last = {"step": step, "epoch": epoch, "loss": round(mean_loss, 6),
                                "lr": scheduler.get_last_lr()[0], "samples_per_s": round(sps, 2),
                                **{k: round(v, 6) for k, v in logs.items()}}
                        if grad_norm is not None:
                            last["grad_norm"] = round(float(grad_norm), 4)
                        if main:
                            with open(out / METRICS, "a", encoding="utf-8") as fh:
                                fh.write(json.dumps(last) + "\n")
                    if main:
                        progress.update(task, advance=1, loss=f"{last['loss']:.4f}",
                                        rate=f"{(step - start_step) * samples_per_step / (time.perf_counter() - t_start):.1f} samples/s")
                    if config.save_every and step % config.save_every == 0 and step < max_steps:
                        save()
                    if stop_at is not None and step >= stop_at and step < max_steps:
                        if not (config.save_every and step % config.save_every == 0):
                            save()
                        result.details["stopped_at"] = step
                        break
                del batches, loader
                if "stopped_at" in result.details:
                    break
            if "stopped_at" not in result.details and step > start_step:
                save()  # (resuming a finished run trains nothing and leaves its checkpoint as it is)
        if check_sync and world > 1:
            _assert_in_sync(accelerator, [p.detach() for p in raw.parameters()], "weights")
            result.details["replicas_in_sync"] = True
        seconds = time.perf_counter() - t_start
        trained = step - start_step
        result.counts = {"steps": step, "samples": trained * samples_per_step}
        result.metrics = {k: v for k, v in last.items() if k not in ("step", "epoch")}
        result.metrics["samples_per_s"] = round(trained * samples_per_step / max(seconds, 1e-9), 2)
        result.outputs = {"checkpoint": str(out)}
    return result


def _assert_in_sync(accelerator, tensors: list[torch.Tensor], what: str) -> None:
    """All processes hold the same ``tensors`` (checksum compared across processes)."""
    flat = torch.cat([t.detach().float().reshape(-1) for t in tensors]) if tensors else torch.zeros(1)
    probe = torch.stack([flat.sum(), flat.abs().sum(), (flat * torch.arange(flat.numel(), device=flat.device) % 7).sum()])
    gathered = accelerator.gather(probe.unsqueeze(0))
    if not torch.allclose(gathered, gathered[:1].expand_as(gathered), rtol=1e-5, atol=1e-6):
        raise AssertionError(f"{what} differ between processes: {gathered.tolist()}")


def _is_checkpoint(folder: Path) -> bool:
    """A checkpoint folder written before folders carried cirkit's marker."""
    from cirkit.backbones import checkpoint_config

    try:
        return checkpoint_config(folder) is not None
    except CirkitError:
        return False


def _check_output(out: Path, config: TrainConfig, main: bool = True) -> None:
    from cirkit.io import restore_dir
    from cirkit.io.atomic import MARKER, check_replaceable

    # Never train into a folder whose files we would delete at the first save (the user's data).
    check_replaceable(out, CHECKPOINT_KIND, _is_checkpoint)
    if main and restore_dir(out):
        log.warning("%s: restored the last checkpoint from a save that was interrupted mid-swap", out)
    has_ckpt = (out / "config.json").exists() or (out / STATE_DIR).exists()
    if config.resume:
        if not (out / STATE_DIR / "state.json").exists():
            raise CirkitError(f"{out}: nothing to resume (no {STATE_DIR}/state.json); drop --resume to start fresh")
    elif has_ckpt:
        raise CirkitError(f"{out}: already holds a checkpoint; pass --resume to continue it or choose another --output")
    if config.init and Path(config.init).resolve() == out.resolve():
        raise CirkitError(f"--init and --output are the same folder ({out}); write the new stage elsewhere")
    if not main:
        return
    out.mkdir(parents=True, exist_ok=True)
    if not (out / MARKER).exists():  # ours from now on: metrics.jsonl is written here before the first save
        (out / MARKER).write_text(json.dumps({"kind": CHECKPOINT_KIND}) + "\n", encoding="utf-8")
    if not config.resume and (out / METRICS).exists():
        (out / METRICS).unlink()  # a run killed before its first save


def _check_resume(config: TrainConfig, out: Path, processes: int = 1) -> None:
    from cirkit.config import to_jsonable

    saved = json.loads((out / "train_args.json").read_text(encoding="utf-8"))
    # The process count shapes each step's global batch and the steps per epoch.
    now = {**to_jsonable(config), "processes": processes}
    # Settings that must be the same to continue a run exactly (a key the saved run lacks is not compared).
    diff = [k for k in (*resume_keys(type(config)), "processes") if k in saved and saved[k] != now.get(k)]
    if diff:
        shown = ", ".join(f"{k}: {saved[k]!r} -> {now.get(k)!r}" for k in diff)
        raise CirkitError(f"{out}: --resume needs the same settings as the interrupted run ({shown})")


def _load_trainable(model: torch.nn.Module, state: dict[str, torch.Tensor], where: Path) -> None:
    params = dict(model.named_parameters())
    missing = [n for n, p in params.items() if p.requires_grad and n not in state]
    unknown = [n for n in state if n not in params]
    reshaped = [f"{n} {tuple(t.shape)} vs {tuple(params[n].shape)}"
                for n, t in state.items() if n in params and t.shape != params[n].shape]
    if missing or unknown or reshaped:
        shapes = f", shape {reshaped[:3]}" if reshaped else ""
        raise CheckpointError(
            f"{where}: trainer state does not fit the model (missing {missing[:3]}, unknown {unknown[:3]}{shapes})"
        )
    with torch.no_grad():
        for n, t in state.items():
            params[n].copy_(t)


def _truncate_metrics(path: Path, step: int) -> None:
    """Drop log lines written after the checkpoint we resume from."""
    if not path.exists():
        return
    text = path.read_text(encoding="utf-8")
    keep = []
    for line in text.splitlines():
        try:
            if json.loads(line).get("step", 0) <= step:
                keep.append(line)
        except json.JSONDecodeError:
            continue
    if text == "".join(line + "\n" for line in keep):
        return  # nothing was logged past the checkpoint (e.g. the run had finished)
    from cirkit.io import atomic_write

    with atomic_write(path) as fh:
        fh.write("".join(line + "\n" for line in keep))
