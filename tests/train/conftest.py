"""Tiny training settings shared by the training tests (cirkit-tiny, a few steps, one thread)."""

import pytest
import torch


@pytest.fixture(autouse=True)
def one_thread():
    """Shared CI cores: oversubscribed torch threads spin, one thread is faster and deterministic."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def tiny_config(synth_dir, out, **kw):
    from cirkit.train.plugin import TrainConfig

    stage = str(kw.pop("stage", "1"))
    data = synth_dir / ("captions.jsonl" if stage == "1" else "triplets.jsonl")
    base = dict(backbone="vit", stage=stage, data=data, output=out, model="cirkit-tiny", max_steps=4,
                batch_size=8, lr=1e-3, warmup_steps=1, num_workers=0, log_every=1, save_every=0)
    base.update(kw)
    return TrainConfig(**base)
