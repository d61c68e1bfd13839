"""The vit training plugin on its own: --init compatibility checks and the EMA update."""

import pytest
import torch

from cirkit.backbones.vit import build_model, save_checkpoint
from cirkit.errors import CirkitError
from cirkit.train.vit import VitTrainPlugin

from .conftest import tiny_config


@pytest.fixture
def last_block_ckpt(tmp_path):
    """A cirkit-tiny (2 blocks) checkpoint with cross-attention in block 1 only."""
    torch.manual_seed(0)
    model, _, _ = build_model({"model": "cirkit-tiny", "cross_attn": True, "cross_attn_layers": [1]})
    save_checkpoint(model, tmp_path / "ckpt", stage="1")
    return tmp_path / "ckpt"


@pytest.mark.parametrize("layers", [[-1], [1], [1, -1]])
def test_init_accepts_cross_attn_layers_naming_the_same_blocks(synth_dir, tmp_path, last_block_ckpt, layers):
    cfg = tiny_config(synth_dir, tmp_path / "out", stage=2, init=str(last_block_ckpt), cross_attn_layers=layers)
    model = VitTrainPlugin(cfg).build()
    assert sorted(model.xattn) == ["1"]


@pytest.mark.parametrize("layers", [[0], [-2], [0, 1]])
def test_init_refuses_cross_attn_layers_naming_other_blocks(synth_dir, tmp_path, last_block_ckpt, layers):
    cfg = tiny_config(synth_dir, tmp_path / "out", stage=2, init=str(last_block_ckpt), cross_attn_layers=layers)
    with pytest.raises(CirkitError, match="differs from the --init checkpoint's"):
        VitTrainPlugin(cfg).build()


def test_freeze_text_encoder_stops_gradients_to_the_text_tower_only(synth_dir, tmp_path):
    cfg = tiny_config(synth_dir, tmp_path / "out", stage=2, train_text_encoder=False)
    model = VitTrainPlugin(cfg).build()
    text_prefixes = ("clip.text.", "clip.transformer.", "clip.token_embedding.", "clip.ln_final.",
                     "clip.positional_embedding", "clip.text_projection")
    params = dict(model.named_parameters())
    text = [n for n in params if n.startswith(text_prefixes)]
    assert text and not any(params[n].requires_grad for n in text)
    assert all(p.requires_grad for n, p in params.items() if n.startswith(("clip.visual.", "xattn.", "predictor.")))
    trained = VitTrainPlugin(tiny_config(synth_dir, tmp_path / "out2", stage=2)).build()
    assert all(p.requires_grad for n, p in trained.named_parameters() if n in text)


class _Tiny(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = torch.nn.Linear(3, 2)
        self.norm = torch.nn.BatchNorm1d(2)


def test_ema_update_is_momentum_times_target_plus_the_rest_times_online(synth_dir, tmp_path):
    m = 0.9
    plugin = VitTrainPlugin(tiny_config(synth_dir, tmp_path / "out", stage=2, ema_momentum=m))
    torch.manual_seed(0)
    online, target = _Tiny(), _Tiny()
    online.norm.running_mean.fill_(3.0)
    plugin.target = target
    before = {n: p.detach().clone() for n, p in target.named_parameters()}
    wrapped = torch.nn.Module()
    wrapped.module = online  # the loop may hand over a DDP-style wrapper
    for model in (online, wrapped):
        plugin.after_step(model, 1)
        for n, o in online.named_parameters():
            want = m * before[n] + (1 - m) * o.detach()
            torch.testing.assert_close(dict(target.named_parameters())[n], want)
            before[n] = want
    assert torch.equal(target.norm.running_mean, online.norm.running_mean)  # buffers are copied


def test_no_ema_update_without_ema_or_in_stage_1(synth_dir, tmp_path):
    for kw in ({"stage": 2, "ema": False}, {"stage": 1}):
        plugin = VitTrainPlugin(tiny_config(synth_dir, tmp_path / "out", **kw))
        plugin.target = target = _Tiny()
        before = [p.detach().clone() for p in target.parameters()]
        plugin.after_step(_Tiny(), 1)
        assert all(torch.equal(p, q) for p, q in zip(target.parameters(), before, strict=True))


def test_the_target_encoder_is_made_in_prepare_not_in_the_loss(synth_dir, tmp_path):
    plugin = VitTrainPlugin(tiny_config(synth_dir, tmp_path / "o", stage=2))
    model = plugin.build()
    assert plugin.target is None
    plugin.prepare(model)
    assert plugin.target is not None and not any(p.requires_grad for p in plugin.target.parameters())
    for (n, a), b in zip(plugin.target.state_dict().items(), model.state_dict().values(), strict=True):
        assert torch.equal(a, b), n
    assert not hasattr(plugin, "_pending_target")
    for kw in ({"stage": 1}, {"stage": 2, "ema": False}):  # these train without a target encoder
        p = VitTrainPlugin(tiny_config(synth_dir, tmp_path / "o", **kw))
        p.prepare(p.build())
        assert p.target is None and p.state_dict() == {}


def test_the_combiner_target_is_the_init_checkpoints_ema_encoder(synth_dir, tmp_path):
    torch.manual_seed(0)
    online, _, _ = build_model({"model": "cirkit-tiny", "cross_attn": True, "cross_attn_layers": None})
    ema = __import__("copy").deepcopy(online)
    with torch.no_grad():
        for p in ema.parameters():
            p.add_(0.5)
    save_checkpoint(online, tmp_path / "s2", ema=ema, stage="2")
    plugin = VitTrainPlugin(tiny_config(synth_dir, tmp_path / "c", stage="combiner", init=str(tmp_path / "s2")))
    model = plugin.build()
    plugin.prepare(model)
    for (n, a), b in zip(plugin.target.state_dict().items(), ema.state_dict().values(), strict=True):
        assert torch.equal(a, b), n
    plugin.save(model, tmp_path / "out")  # saved before any step: the inherited EMA encoder goes with it
    from safetensors.torch import load_file

    saved = load_file(str(tmp_path / "out" / "model.safetensors"))
    assert torch.equal(saved["ema.predictor.fc1.weight"], ema.predictor.fc1.weight)


@pytest.mark.parametrize("stage", ["1", "2"])
def test_the_vit_loss_logs_the_shared_keys(synth_dir, tmp_path, stage):
    plugin = VitTrainPlugin(tiny_config(synth_dir, tmp_path / "o", stage=stage))
    model = plugin.build()
    plugin.prepare(model)
    ds, collate = plugin.dataset()
    batch = collate([ds[i] for i in range(4)])
    assert batch.pop("skipped") == [] and batch.pop("examples") == 4
    loss, logs = plugin.loss(model, batch)
    assert set(logs) == {"acc", "temperature"} and logs["temperature"] == pytest.approx(0.07, rel=1e-4)
    assert loss.ndim == 0 and loss.requires_grad
