"""The generic training loop: accelerate, AdamW, warmup + decay, accumulation, clipping, exact resume.

Works as one process and unchanged under ``accelerate launch -m cirkit train ...`` (DDP on
GPUs, gloo on CPUs). :func:`train` runs explicit phases, the way torchtune recipes
(``setup / train / save_checkpoint / cleanup``) and litgpt (``setup / main / fit``) read:
:func:`_setup` (output, model, data, optimiser, resume), :func:`_fit` (:func:`_step` per
optimiser step, :func:`_save` every ``save_every`` steps and at the end), :func:`_finish`.
What it asks of a :class:`~cirkit.train.plugin.TrainPlugin`, in call order:

* ``build()``, then ``dataset()``; ``prepare(model)`` after ``accelerator.prepare`` (the
  EMA target is made there), then ``load_state_dict`` when resuming.
* ``loss(model, batch)`` receives the *prepared* model (DDP-wrapped when distributed) and
  must run every trainable computation through ``model(...)`` (its ``forward``), since
  DDP only synchronises gradients of work done inside its forward. The batch is already
  on the device (tensors inside dicts/lists/tuples are moved); the loop has taken out the
  batch's ``skipped`` images (counted in the summary) and its ``examples`` count.
* ``after_step``, ``save`` receive the unwrapped model; ``state_dict``/``load_state_dict``
  carry extra state (EMA) through the trainer state.

Data order is a function of (seed, epoch) only: each epoch is one seeded permutation,
cut into global batches of ``batch_size x processes`` (the remainder is dropped), and
process ``r`` takes the ``r``-th slice of each. Resume therefore replays the exact order
from the saved step. ``batch_size`` is per process; in-batch negatives are per process.

The output folder is a checkpoint (:mod:`cirkit.checkpoint`: its files, the atomic swap,
safetensors + JSON only), and the whole run holds its single-writer lock. Running the same
command again continues an interrupted run (a trainer state short of its ``max_steps``,
saved with the same settings); ``--resume`` insists on continuing. Ctrl-C finishes the
current step, saves it and stops (a second Ctrl-C stops at once), and the message says
exactly what was kept.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import random
import signal
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from cirkit.checkpoint import STATE_DIR, STATE_JSON
from cirkit.device import mixed_precision  # --precision -> accelerate's mixed_precision, one table for all
from cirkit.errors import CheckpointError, CirkitError
from cirkit.summary import StageResult, make_progress, timed
from cirkit.train.config import CHECK_SYNC_ENV, resume_keys
from cirkit.train.plugin import TrainConfig, TrainPlugin

log = logging.getLogger("cirkit")



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


# -- the run and its phases ----------------------------------------------------------------------
class Interrupted(CirkitError):
    """Ctrl-C during training; the message says what was saved and how to continue."""

    exit_code = 130


@dataclass
class _Run:
    """One training run's state, handed from phase to phase."""

    config: TrainConfig
    plugin: TrainPlugin
    out: Path
    accelerator: Any
    result: StageResult
    model: Any = None                 # prepared (DDP-wrapped when distributed)
    raw: Any = None                   # the same model unwrapped
    optimizer: Any = None
    scheduler: Any = None
    dataset: Any = None
    collate: Any = None
    max_steps: int = 0
    steps_per_epoch: int = 0
    step: int = 0
    start_step: int = 0
    saved_step: int | None = None     # the step the output folder's checkpoint holds
    last: dict[str, Any] = field(default_factory=lambda: {"loss": float("nan")})
    skipped: dict[str, str] = field(default_factory=dict)   # unreadable image -> reason
    stop: _StopRequest | None = None
    t_start: float = 0.0
    window: list[float] = field(default_factory=lambda: [0.0, 0.0])  # (start time, samples) since the last log

    @property
    def main(self) -> bool:
        return self.accelerator.is_main_process

    @property
    def world(self) -> int:
        return self.accelerator.num_processes

    @property
    def rank(self) -> int:
        return self.accelerator.process_index

    @property
    def device(self) -> torch.device:
        return self.accelerator.device

    @property
    def accum(self) -> int:
        return max(1, int(self.config.grad_accum))

    @property
    def samples_per_step(self) -> int:
        return int(self.config.batch_size) * self.accum * self.world


def train(config: TrainConfig, plugin: TrainPlugin, stop_at: int | None = None) -> StageResult:
    """Train ``plugin``'s model per ``config``; ``stop_at`` ends early after a save (simulates a kill)."""
    from cirkit.checkpoint import check_output

    result = StageResult("train")
    out = Path(config.output)
    with timed(result):
        check_output(out, _inputs(config))  # one-line refusals before any work, on every process
        accelerator = _accelerator(config)
        run = _Run(config, plugin, out, accelerator, result)
        try:
            with _writer(run):
                if _already_complete(run):
                    return result
                _setup(run)
                with _graceful_interrupt(run):
                    _fit(run, stop_at)
                _finish(run)
        except KeyboardInterrupt:
            raise Interrupted(_interrupted_message(run)) from None
    return result


def _accelerator(config: TrainConfig):
    from accelerate import Accelerator
    from accelerate.utils import DistributedDataParallelKwargs

    world_env = int(os.environ.get("WORLD_SIZE", "1"))
    return Accelerator(
        mixed_precision=mixed_precision(config.precision),
        cpu=not torch.cuda.is_available() and world_env > 1,
        kwargs_handlers=[DistributedDataParallelKwargs(find_unused_parameters=False)],
    )


def _inputs(config: TrainConfig) -> dict[str, Any]:
    """What the run reads, by the name the user gave it: an output may not be, hold or sit inside one."""
    model = str(config.model or "")
    return {"the training data": config.data, "--init": config.init, "--pretrained": config.pretrained,
            "--model": model[len("local-dir:"):] if model.startswith("local-dir:") else model}


@contextlib.contextmanager
def _writer(run: _Run):
    """The whole run holds the output's single-writer lock (main process); the others wait for it."""
    from cirkit.checkpoint import open_output, unclaim_output
    from cirkit.io.lock import output_lock

    wait = bool(run.config.wait)
    with output_lock(run.out, wait=wait, what="checkpoint") if run.main else contextlib.nullcontext():
        if run.main:
            open_output(run.out)
        run.accelerator.wait_for_everyone()
        try:
            yield
        except BaseException:
            if run.main:
                unclaim_output(run.out)  # a run that failed before writing anything leaves no folder behind
            raise


def _seed(seed: int, rank: int | None = None) -> None:
    """Same seed on every process for the model (DDP also broadcasts rank 0's weights); with
    ``rank``, per-process randomness (dropout, augmentation) that differs between processes."""
    if rank is None:
        torch.manual_seed(seed)
        random.seed(seed)
        np.random.seed(seed)
    else:
        torch.manual_seed(seed + 7919 * (rank + 1))
        random.seed(seed + rank)
        np.random.seed(seed + rank)


def _setup(run: _Run) -> None:
    """Decide fresh vs resume, build model and data, make optimiser and schedule, restore state."""
    from cirkit.checkpoint import claim_output, load_trainer_state, truncate_metrics

    c = run.config
    resume_at = _resume_step(c, run.out, run.world)
    if run.main:
        claim_output(run.out, fresh=resume_at is None)
    _seed(c.seed)
    model = run.plugin.build()
    run.dataset, run.collate = run.plugin.dataset()
    _schedule(run)
    _seed(c.seed, run.rank)
    groups = [g for g in run.plugin.parameters(model) if g["params"]]
    if not groups:
        raise CirkitError(f"nothing to train in stage {c.stage}: every parameter is frozen")
    optimizer = torch.optim.AdamW(groups, lr=c.lr, betas=(0.9, 0.98), eps=1e-6)
    run.scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: lr_factor(s, int(c.warmup_steps), run.max_steps, c.scheduler)
    )
    state = load_trainer_state(run.out) if resume_at is not None else None
    if state is not None:
        _load_trainable(model, state.trainable, run.out / STATE_DIR)
        run.step = run.start_step = run.saved_step = state.step
    run.model, run.optimizer = run.accelerator.prepare(model, optimizer)
    run.raw = run.accelerator.unwrap_model(run.model)
    run.plugin.prepare(run.raw)
    if state is not None:
        run.optimizer.load_state_dict(state.optimizer)
        run.scheduler.load_state_dict(state.scheduler)
        run.plugin.load_state_dict(state.plugin)
        if run.rank == 0:
            from cirkit.checkpoint import restore_rng

            restore_rng(state.rng, run.device)
        else:
            torch.manual_seed(c.seed + 7919 * (run.rank + 1) + run.step)
        if run.main:
            truncate_metrics(run.out, run.step)
        log.info("resuming %s at step %d of %d", run.out, run.step, run.max_steps)
    run.result.details.update(
        max_steps=run.max_steps, steps_per_epoch=run.steps_per_epoch, processes=run.world,
        samples_per_step=run.samples_per_step, trainable_parameters=sum(p.numel() for g in groups for p in g["params"]),
        mixed_precision=run.accelerator.mixed_precision, device=str(run.device),
    )


def _schedule(run: _Run) -> None:
    c = run.config
    bs = int(c.batch_size)
    per_epoch = EpochBatches(len(run.dataset), bs, run.world, run.rank, c.seed, 0).batches_per_epoch()
    run.steps_per_epoch = per_epoch // run.accum
    if run.steps_per_epoch < 1:
        raise CirkitError(
            f"{c.data}: {len(run.dataset)} examples are fewer than one optimiser step "
            f"({bs} x {run.world} processes x {run.accum} accumulation); lower --batch-size"
        )
    run.max_steps = int(c.epochs) * run.steps_per_epoch if c.epochs else int(c.max_steps)


def _resume_step(config: TrainConfig, out: Path, processes: int) -> int | None:
    """The step to continue from, or None for a fresh run; refuses a folder that must not be overwritten.

    Without --resume, a run that stopped short of its ``max_steps`` with the same settings
    continues (so "re-run the same command" after Ctrl-C or a crash is true); a finished run,
    or one with other settings, is refused rather than overwritten.
    """
    from cirkit.checkpoint import is_checkpoint, read_progress

    progress = read_progress(out)
    if config.resume:
        if progress is None:
            raise CirkitError(f"{out}: nothing to resume (no {STATE_DIR}/{STATE_JSON}); drop --resume to start fresh")
        _check_resume(config, out, processes)
        return progress["step"]
    if progress is None:
        if is_checkpoint(out):
            raise CirkitError(f"{out}: already holds a checkpoint; choose another --output")
        return None
    step, total = progress["step"], progress["max_steps"]
    if step >= total:
        raise _finished_elsewhere(out, total, _resume_diff(config, out, processes) or "other settings")
    diff = _resume_diff(config, out, processes)
    if diff:
        raise CirkitError(f"{out}: holds an interrupted run (step {step} of {total}) with other settings ({diff}); "
                          "run it with its own settings to continue it, or choose another --output")
    log.info("%s: continuing its interrupted run (same settings) at step %d of %d", out, step, total)
    return step


def _already_complete(run: _Run) -> bool:
    """A finished run with these settings in the output: report it and touch nothing (True).

    With other settings it is refused in one line naming the fix: a run only continues with
    the settings it was started with (its schedule depends on them), so more or different
    training starts from it with ``--init`` into a new folder.
    """
    from cirkit.checkpoint import read_progress

    progress = read_progress(run.out)
    if progress is None or progress["step"] < progress["max_steps"]:
        return False
    diff = _resume_diff(run.config, run.out, run.world)
    if diff:
        if run.config.resume:
            raise CirkitError(f"{run.out}: --resume needs the same settings as the finished run ({diff})")
        raise _finished_elsewhere(run.out, progress["max_steps"], diff)
    step = progress["step"]
    log.info("%s: already complete (the finished run of %d steps with these settings); nothing to do", run.out, step)
    r = run.result
    r.counts = {"steps": step, "samples": 0}
    r.details.update(already_complete=True, max_steps=progress["max_steps"])
    r.outputs = {"checkpoint": str(run.out)}
    return True


def _finished_elsewhere(out: Path, total: int, diff: str) -> CirkitError:
    steps = f"{total} step" + ("" if total == 1 else "s")
    return CirkitError(
        f"{out}: already holds a finished run of {steps} with other settings ({diff}); to train on from it, "
        f"pass --init {out} with a new --output (or choose another --output to start over)")


def _fit(run: _Run, stop_at: int | None) -> None:
    """Steps until ``max_steps``: periodic saves, the final save, and early stops that save first."""
    from rich.progress import TextColumn

    c = run.config
    progress = make_progress(TextColumn("loss {task.fields[loss]}")) if run.main else contextlib.nullcontext()
    run.t_start = time.perf_counter()
    run.window = [run.t_start, 0.0]
    with progress:
        task = progress.add_task(f"train stage {c.stage}", total=run.max_steps, completed=run.step, rate="",
                                 loss="-") if run.main else None
        while run.step < run.max_steps:
            epoch, start_batch = divmod(run.step, run.steps_per_epoch)
            batches = iter(_loader(run, epoch, start_batch))
            for _ in range(start_batch, run.steps_per_epoch):
                if run.step >= run.max_steps:
                    break
                _log(run, epoch, *_step(run, batches))
                if run.main:
                    done = (run.step - run.start_step) * run.samples_per_step
                    progress.update(task, advance=1, loss=_shown_loss(run.last),
                                    rate=f"{done / (time.perf_counter() - run.t_start):.1f} samples/s")
                if c.save_every and run.step % c.save_every == 0 and run.step < run.max_steps:
                    _save(run)
                if stop_at is not None and stop_at <= run.step < run.max_steps:
                    _save(run, once=True)
                    run.result.details["stopped_at"] = run.step
                    return
                if _stop_requested(run):
                    _save(run, once=True)
                    raise KeyboardInterrupt
            del batches
    if run.step > run.start_step:
        _save(run)  # (resuming a finished run trains nothing and leaves its checkpoint as it is)


def _shown_loss(last: dict[str, Any]) -> str:
    """The progress bar's loss: the last logged one, "-" until a step has been logged (never "nan")."""
    loss = last.get("loss")
    if "step" not in last or not isinstance(loss, (int, float)) or not math.isfinite(loss):
        return "-"
    return f"{loss:.4f}"


def _loader(run: _Run, epoch: int, start_batch: int):
    c = run.config
    sampler = EpochBatches(len(run.dataset), int(c.batch_size), run.world, run.rank, c.seed, epoch,
                           start_batch * run.accum)
    return torch.utils.data.DataLoader(
        run.dataset, batch_sampler=sampler, collate_fn=run.collate, num_workers=int(c.num_workers),
        pin_memory=run.device.type == "cuda", persistent_workers=False, worker_init_fn=_worker_ignores_ctrl_c,
    )


def _worker_ignores_ctrl_c(_: int) -> None:
    """Ctrl-C reaches the whole process group: the main process decides, workers keep serving the step."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def _step(run: _Run, batches) -> tuple[float, dict[str, float], Any]:
    """One optimiser step over ``grad_accum`` micro-batches; returns (mean loss, mean logs, grad norm)."""
    acc, model = run.accelerator, run.model
    model.train()
    loss_sum, logs = 0.0, {}
    for micro in range(run.accum):
        batch = _next_batch(run, batches)
        sync = contextlib.nullcontext() if micro == run.accum - 1 else acc.no_sync(model)
        with sync:
            loss, mlogs = run.plugin.loss(model, batch)
            acc.backward(loss / run.accum)
        loss_sum += float(loss.detach()) / run.accum
        for k, v in mlogs.items():
            logs[k] = logs.get(k, 0.0) + float(v) / run.accum
    if _check_sync(run.config) and run.world > 1:
        _assert_in_sync(acc, [p.grad for p in run.raw.parameters() if p.grad is not None], "gradients")
    grad_norm = acc.clip_grad_norm_(model.parameters(), run.config.max_grad_norm) if run.config.max_grad_norm else None
    run.optimizer.step()
    run.scheduler.step()
    run.optimizer.zero_grad(set_to_none=True)
    run.step += 1
    run.plugin.after_step(run.raw, run.step)
    if not math.isfinite(loss_sum):
        raise CirkitError(f"loss became {loss_sum} at step {run.step}; lower --lr or use --precision fp32")
    return loss_sum, logs, grad_norm


def _next_batch(run: _Run, batches) -> Any:
    """The next batch on the device, its unreadable images counted (or, with --strict, an error)."""
    batch = next(batches)
    if isinstance(batch, dict):
        skipped = batch.pop("skipped", [])
        examples = batch.pop("examples", None)
        for path, reason in skipped:
            if run.config.strict:
                raise CirkitError(f"{path}: {reason} (--strict stops at the first unreadable training image)")
            if path not in run.skipped:
                log.warning("skipping unreadable training image %s: %s", path, reason)
            run.skipped.setdefault(path, reason)
        if not batch:  # the collate could not make a batch of the rest
            why = (f" ({len(skipped)} of its images could not be decoded, e.g. {skipped[0][0]}: {skipped[0][1]}; "
                   "fix or remove them)") if skipped else ""
            raise CirkitError(f"a training batch has {examples} readable examples, fewer than the 2 in-batch "
                              f"contrastive training needs{why}; or raise --batch-size")
    return to_device(batch, run.device)


def _log(run: _Run, epoch: int, loss_sum: float, logs: dict[str, float], grad_norm: Any) -> None:
    """Every ``log_every`` steps (and the last): one ``metrics.jsonl`` line, the loss averaged over processes."""
    from cirkit.checkpoint import append_metrics

    run.window[1] += run.samples_per_step
    if run.step % max(1, run.config.log_every) and run.step != run.max_steps:
        return
    mean_loss = float(run.accelerator.reduce(torch.tensor(loss_sum, device=run.device), "mean"))
    now = time.perf_counter()
    sps = run.window[1] / max(now - run.window[0], 1e-9)
    run.window = [now, 0.0]
    run.last = {"step": run.step, "epoch": epoch, "loss": round(mean_loss, 6), "lr": run.scheduler.get_last_lr()[0],
                "samples_per_s": round(sps, 2), **{k: round(v, 6) for k, v in logs.items()}}
    if grad_norm is not None:
        run.last["grad_norm"] = round(float(grad_norm), 4)
    if run.main:
        append_metrics(run.out, run.last)


def _save(run: _Run, once: bool = False) -> None:
    """Write the whole checkpoint at the current step (main process; the others wait); ``once``: unless it holds it."""
    from cirkit import checkpoint
    from cirkit.config import to_jsonable

    if once and run.saved_step == run.step:
        return
    run.accelerator.wait_for_everyone()
    if run.main:
        args = {**to_jsonable(run.config), "resume": False, "resolved_max_steps": run.max_steps,
                "processes": run.world}
        state = checkpoint.TrainerState(
            step=run.step, max_steps=run.max_steps, epoch=run.step // run.steps_per_epoch,
            trainable={n: p for n, p in run.raw.named_parameters() if p.requires_grad},
            optimizer=run.optimizer.state_dict(), scheduler=run.scheduler.state_dict(),
            plugin=run.plugin.state_dict(), rng=checkpoint.capture_rng(run.device),
        )
        checkpoint.save(run.out, lambda folder: run.plugin.save(run.raw, folder), args, state)
    run.accelerator.wait_for_everyone()
    run.saved_step = run.step


def _finish(run: _Run) -> None:
    """Check replicas agree (when asked), gather the skipped images, fill in the summary."""
    r = run.result
    if _check_sync(run.config) and run.world > 1:
        _assert_in_sync(run.accelerator, [p.detach() for p in run.raw.parameters()], "weights")
        r.details["replicas_in_sync"] = True
    skipped = run.skipped
    if run.world > 1:
        from accelerate.utils import gather_object

        skipped = {k: v for part in gather_object([run.skipped]) for k, v in part.items()}
    r.skipped = sorted(skipped.items())
    seconds = time.perf_counter() - run.t_start
    trained = run.step - run.start_step
    r.counts = {"steps": run.step, "samples": trained * run.samples_per_step}
    r.metrics = {k: v for k, v in run.last.items() if k not in ("step", "epoch")}
    r.metrics["samples_per_s"] = round(trained * run.samples_per_step / max(seconds, 1e-9), 2)
    r.outputs = {"checkpoint": str(run.out)}


def _check_sync(config: TrainConfig) -> bool:
    """Test switch: compare gradient and weight checksums across processes every step."""
    return os.environ.get(CHECK_SYNC_ENV) == "1"


# -- Ctrl-C: finish the step, save, say so ---------------------------------------------------------
class _StopRequest:
    """SIGINT handler: the first Ctrl-C asks the loop to stop after this step (and save it); the second stops now."""

    def __init__(self) -> None:
        self.requested = False

    def __call__(self, signum: int, frame: Any) -> None:
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True
        # os.write, not logging: a signal handler may interrupt a logging call holding its lock.
        os.write(2, b"\ninterrupted: finishing this step, then saving it (Ctrl-C again stops at once, unsaved)\n")


@contextlib.contextmanager
def _graceful_interrupt(run: _Run):
    run.stop = _StopRequest()
    if threading.current_thread() is not threading.main_thread():
        yield  # signal handlers live in the main thread; elsewhere Ctrl-C is a plain KeyboardInterrupt
        return
    previous = signal.signal(signal.SIGINT, run.stop)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)


def _stop_requested(run: _Run) -> bool:
    """Whether any process was asked to stop; every process agrees, or the save's barrier would hang."""
    asked = run.stop is not None and run.stop.requested
    if run.world > 1:
        asked = float(run.accelerator.reduce(torch.tensor(float(asked), device=run.device), "sum")) > 0
    return asked


def _interrupted_message(run: _Run) -> str:
    held, total = run.saved_step, run.max_steps
    if held is None:  # stopped before setup knew: what does the folder hold?
        from cirkit.checkpoint import read_progress

        with contextlib.suppress(CirkitError, OSError):
            progress = read_progress(run.out)
            if progress is not None and progress["step"] < progress["max_steps"]:
                held, total = progress["step"], progress["max_steps"]
    if held is None:
        return (f"interrupted before any step was saved; nothing was saved to {run.out}, "
                "so running the same command again starts from the beginning")
    if held == run.step and held > run.start_step:
        return f"interrupted: saved {run.out} at step {held} of {total}; run the same command again to resume"
    return (f"interrupted; {run.out} holds step {held} of {total} (its last save): "
            "run the same command again to resume from there")


def _resume_diff(config: TrainConfig, out: Path, processes: int) -> str:
    """The settings that differ from those ``out``'s run saved, as ``name: saved -> now`` ('' if none)."""
    from cirkit.checkpoint import read_train_args
    from cirkit.config import to_jsonable

    saved = read_train_args(out)
    # The process count shapes each step's global batch and the steps per epoch.
    now = {**to_jsonable(config), "processes": processes}
    diff = [k for k in (*resume_keys(type(config)), "processes") if k in saved and saved[k] != now.get(k)]
    return ", ".join(f"{k}: {saved[k]!r} -> {now.get(k)!r}" for k in diff)


def _assert_in_sync(accelerator, tensors: list[torch.Tensor], what: str) -> None:
    """All processes hold the same ``tensors`` (checksum compared across processes)."""
    flat = torch.cat([t.detach().float().reshape(-1) for t in tensors]) if tensors else torch.zeros(1)
    probe = torch.stack([flat.sum(), flat.abs().sum(), (flat * torch.arange(flat.numel(), device=flat.device) % 7).sum()])
    gathered = accelerator.gather(probe.unsqueeze(0))
    if not torch.allclose(gathered, gathered[:1].expand_as(gathered), rtol=1e-5, atol=1e-6):
        raise AssertionError(f"{what} differ between processes: {gathered.tolist()}")


def _check_resume(config: TrainConfig, out: Path, processes: int = 1) -> None:
    """--resume: the settings must be those the interrupted run saved (only the keys it saved are compared)."""
    shown = _resume_diff(config, out, processes)
    if shown:
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
