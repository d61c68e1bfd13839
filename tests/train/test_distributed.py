"""Two CPU processes (gloo) train in lockstep: gradients and weights stay identical."""

import json
import os
import socket
import subprocess
import sys

import pytest

from .conftest import tiny_config


@pytest.mark.slow
def test_two_processes_keep_gradients_and_weights_in_sync(synth_dir, tmp_path):
    from cirkit.train import run

    run(tiny_config(synth_dir, tmp_path / "s1", stage=1, max_steps=1))
    recipe = tmp_path / "ddp.yaml"
    recipe.write_text(
        "train:\n  model: cirkit-tiny\n  max_steps: 2\n  batch_size: 4\n  num_workers: 0\n  warmup_steps: 1\n"
        "  log_every: 1\n  save_every: 0\n"
    )
    # The loop compares gradient and weight checksums across processes each step (a test-only switch).
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CIRKIT_CHECK_SYNC": "1"}
    with socket.socket() as sock:  # a free port: parallel runs must not share a rendezvous
        sock.bind(("127.0.0.1", 0))
        port = str(sock.getsockname()[1])
    # torchrun is what `accelerate launch --multi_gpu` uses; with no GPU the loop picks gloo.
    train = ["-m", "cirkit", "-q", "train", str(synth_dir / "triplets.jsonl"), "--stage", "2",
             "--init", str(tmp_path / "s1"), "-c", str(recipe), "--json"]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", port,
           *train, "-o", str(tmp_path / "ddp")]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    summaries = [json.loads(x) for x in proc.stdout.splitlines() if x.startswith("{")]
    assert len(summaries) == 1  # only the main process prints
    s = summaries[0]
    assert s["details"]["processes"] == 2 and s["details"]["replicas_in_sync"] is True
    assert s["counts"]["samples"] == 2 * 4 * 2
    assert (tmp_path / "ddp" / "model.safetensors").exists()
    # Negatives gathered across processes (issue 15.3): 2 processes x 4 train exactly like 1 process x 8
    # (the same global batches, the same global contrast), so they end with the same weights.
    one = subprocess.run([sys.executable, *train, "-o", str(tmp_path / "one"), "--batch-size", "8"],
                         capture_output=True, text=True, env=env, timeout=600)
    assert one.returncode == 0, one.stderr[-3000:]
    assert json.loads(one.stdout.splitlines()[-1])["metrics"]["loss"] == pytest.approx(s["metrics"]["loss"], rel=1e-4)
    _same_weights(tmp_path / "ddp" / "model.safetensors", tmp_path / "one" / "model.safetensors")


def _same_weights(a, b, atol=2e-5):
    from safetensors.torch import load_file

    wa, wb = load_file(str(a)), load_file(str(b))
    assert wa.keys() == wb.keys()
    for k in wa:
        assert wa[k].shape == wb[k].shape and (wa[k] - wb[k]).abs().max() <= atol, k


# -- negatives across processes (issue 15.3) ---------------------------------------------------
def _free_port() -> str:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return str(sock.getsockname()[1])


def _global_case(seed: int = 0):
    """A global batch of 8 rows: a linear 'encoder' (the parameters), inputs, and keys with duplicates."""
    import torch

    from cirkit.train.losses import key_ids

    g = torch.Generator().manual_seed(seed)
    enc = torch.nn.Linear(6, 5)
    with torch.no_grad():
        enc.weight.copy_(torch.randn(5, 6, generator=g))
        enc.bias.copy_(torch.randn(5, generator=g))
    xq, xt = torch.randn(8, 6, generator=g), torch.randn(8, 6, generator=g)
    # rows 1 and 6 share a caption (one on each process), rows 2, 3 share one on process 0
    keys = key_ids(["a", "b", "c", "c", "d", "e", "b", "f"], [f"t{i}" for i in range(8)])
    return enc, xq, xt, keys


def _losses(enc, xq, xt, keys, scale, gather):
    from cirkit.train.losses import info_nce

    q, t = enc(xq), enc(xt)
    one, _ = info_nce(q, t, scale, keys, symmetric=False, gather=gather)
    both, _ = info_nce(q, t.detach(), scale, keys, symmetric=True, gather=gather)  # a frozen (EMA-like) side
    return one + both


def _gather_worker(rank: int, world: int, port: str, rows: list, out: str) -> None:
    import torch
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        enc, xq, xt, keys = _global_case()
        scale = torch.tensor(2.5, requires_grad=True)
        mine = slice(sum(rows[:rank]), sum(rows[: rank + 1]))
        loss = _losses(enc, xq[mine], xt[mine], keys[mine], scale, gather=True)
        loss.backward()
        grads = [enc.weight.grad, enc.bias.grad, scale.grad.reshape(1)]
        for g in grads:  # what DDP does: average the gradients over processes
            dist.all_reduce(g)
            g /= world
        total = loss.detach().clone()
        dist.all_reduce(total)  # the loop logs the mean of the processes' losses
        if rank == 0:
            torch.save({"loss": total / world, "grads": grads}, out)
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
@pytest.mark.parametrize("rows", [[4, 4], [3, 5]], ids=["equal", "unequal"])
def test_two_processes_gathering_negatives_give_the_one_process_loss_and_gradients(tmp_path, rows):
    """A 2-process gloo run on halves of the global batch = one process on all of it (loss and gradients),
    duplicates masked across processes, also when an unreadable image made one half shorter."""
    import torch
    import torch.multiprocessing as mp

    enc, xq, xt, keys = _global_case()
    scale = torch.tensor(2.5, requires_grad=True)
    loss = _losses(enc, xq, xt, keys, scale, gather=True)  # one process: gathering is a no-op
    loss.backward()
    want = [enc.weight.grad, enc.bias.grad, scale.grad.reshape(1)]
    out = tmp_path / "rank0.pt"
    mp.spawn(_gather_worker, args=(2, _free_port(), rows, str(out)), nprocs=2, join=True)
    got = torch.load(out, weights_only=True)
    if rows[0] == rows[1]:  # every process holds as many rows: the logged loss is the global loss too
        assert float(got["loss"]) == pytest.approx(float(loss.detach()), rel=1e-5)
    for g, w in zip(got["grads"], want, strict=True):
        torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-6)


def _local_worker(rank: int, world: int, port: str, out: str) -> None:
    import torch
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        enc, xq, xt, keys = _global_case()
        mine = slice(4 * rank, 4 * rank + 4)
        loss = _losses(enc, xq[mine], xt[mine], keys[mine], torch.tensor(2.5), gather=False)
        total = loss.detach().clone()
        dist.all_reduce(total)
        if rank == 0:
            torch.save(total / world, out)
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_without_gathering_each_process_contrasts_only_its_own_rows(tmp_path):
    """--local-negatives: the old behaviour, a different (weaker, 4-way) contrast than the global batch."""
    import torch
    import torch.multiprocessing as mp

    enc, xq, xt, keys = _global_case()
    want = [float(_losses(enc, xq[s], xt[s], keys[s], torch.tensor(2.5), gather=False)) for s in (slice(0, 4), slice(4, 8))]
    out = tmp_path / "local.pt"
    mp.spawn(_local_worker, args=(2, _free_port(), str(out)), nprocs=2, join=True)
    got = float(torch.load(out, weights_only=True))
    assert got == pytest.approx(sum(want) / 2, rel=1e-5)
    assert got != pytest.approx(float(_losses(enc, xq, xt, keys, torch.tensor(2.5), gather=True)), rel=1e-3)


@pytest.mark.slow
def test_ddp_trains_the_vision_tower_of_a_llava_15_layout_and_gathers_negatives(tmp_path, mllm_data):
    """--train-vision on LLaVA-1.5's layout (vision_feature_layer -2: the tower's last block and
    post-layernorm feed nothing) under DDP (gloo, 2 processes): the unused parameters are not trained,
    so the first gradient reduction succeeds, and 2 x 3 examples train like 1 x 6 (stage 2, the
    target-image loss, duplicate target captions masked across processes) (issue 15.7, 15.3)."""
    from transformers import LlavaConfig

    from cirkit.testing import build_tiny_llava

    assert LlavaConfig().vision_feature_layer == -2  # the real LLaVA-1.5 default the tiny model copies
    model = build_tiny_llava(tmp_path / "llava15", vision_feature_layer=-2, layers=3)
    recipe = tmp_path / "mllm.yaml"
    recipe.write_text(
        f"train:\n  backbone: mllm\n  stage: '2'\n  model: {model}\n  max_steps: 2\n  batch_size: 3\n"
        "  lr: 0.01\n  warmup_steps: 1\n  num_workers: 0\n  log_every: 1\n  save_every: 0\n  lora_r: 4\n"
        "  lora_alpha: 8\n  lora_dropout: 0.0\n  freeze_vision: false\n  target_image_loss: true\n"
        "  max_length: 32\n"
    )
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CIRKIT_CHECK_SYNC": "1"}
    train = ["-m", "cirkit", "-q", "train", str(mllm_data / "triplets.jsonl"), "-c", str(recipe), "--json"]
    ddp = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
                          _free_port(), *train, "-o", str(tmp_path / "ddp")],
                         capture_output=True, text=True, env=env, timeout=600)
    assert ddp.returncode == 0, ddp.stderr[-3000:]
    s = json.loads(ddp.stdout.splitlines()[-1])
    assert s["details"]["processes"] == 2 and s["details"]["replicas_in_sync"] is True
    one = subprocess.run([sys.executable, *train, "-o", str(tmp_path / "one"), "--batch-size", "6"],
                         capture_output=True, text=True, env=env, timeout=600)
    assert one.returncode == 0, one.stderr[-3000:]
    assert json.loads(one.stdout.splitlines()[-1])["metrics"]["loss"] == pytest.approx(s["metrics"]["loss"], rel=1e-4)
    _same_weights(tmp_path / "ddp" / "adapter_model.safetensors", tmp_path / "one" / "adapter_model.safetensors",
                  atol=1e-4)
