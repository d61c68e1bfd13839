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


# -- the paper's cross-attention, combiner and learning rates (issue 15.2, 15.6) ------------------
VIT_RECIPES = sorted(p.name for p in (__import__("pathlib").Path(__file__).resolve().parents[2] / "recipes").glob("vit-*.yaml"))


def _recipe_plugin(tmp_path, recipe, **flags):
    """The recipe's stage-2 model as `cirkit train -c recipes/<recipe>` builds it, at one block per tower."""
    from pathlib import Path

    from cirkit.config import resolve
    from cirkit.testing import shallow_open_clip
    from cirkit.train.config import TrainConfig

    path = Path(__file__).resolve().parents[2] / "recipes" / recipe
    cfg = resolve(TrainConfig, path, {"output": tmp_path / "o", "num_workers": 0, "stage": "2", **flags},
                  section="train")
    plugin = VitTrainPlugin(cfg)
    with shallow_open_clip(layers=1):  # ViT-L-14 + openai: the real widths and activation, offline
        torch.manual_seed(0)
        model = plugin.build()
    plugin.prepare(model)
    return plugin, model


def _step0_grads(plugin, model):
    side = model.clip.visual.image_size
    side = side[0] if isinstance(side, (tuple, list)) else side
    g = torch.Generator().manual_seed(0)
    batch = {"images": torch.randn(3, 3, side, side, generator=g), "targets": torch.randn(3, 3, side, side, generator=g),
             "tokens": plugin.tokenizer(["make it red", "add a blue star on the left", "remove the circle"])}
    model.train()
    loss, _ = plugin.loss(model, batch)
    loss.backward()
    return {n: p.grad for n, p in model.named_parameters() if n.startswith("xattn.")}


def _attention_grads(grads):
    """The q/k/v and output projections' gradients of every cross-attention layer."""
    proj = ("in_proj_weight", "q_proj_weight", "k_proj_weight", "v_proj_weight", "out_proj.weight")
    return {n: g for n, g in grads.items() if n.endswith(proj)}


@pytest.mark.slow
@pytest.mark.parametrize("recipe", VIT_RECIPES)
def test_cross_attention_learns_from_step_0_on_every_vit_recipe(tmp_path, recipe):
    """§II-B/§IV-A: the plain Xavier-initialised residual branch gets non-zero q/k/v/out gradients at once."""
    from open_clip.transformer import QuickGELU

    plugin, model = _recipe_plugin(tmp_path, recipe)
    assert len(model.xattn) == len(model.clip.visual.transformer.resblocks)  # every block
    if plugin.config.pretrained == "openai":  # ViT-L-14 + openai: the weights' QuickGELU
        assert any(isinstance(m, QuickGELU) for m in model.clip.modules())
    grads = _attention_grads(_step0_grads(plugin, model))
    assert len(grads) >= 2 * len(model.xattn)  # q, k, v (separate or packed) and out per layer
    for name, g in grads.items():
        assert g is not None and float(g.abs().sum()) > 0, name


@pytest.mark.slow
@pytest.mark.parametrize("recipe", VIT_RECIPES)
def test_a_tanh_gate_at_0_gives_the_attention_exactly_zero_gradient_at_step_0(tmp_path, recipe):
    """Why the gate is not the default: tanh(0) = 0 multiplies the branch, so only the gate itself learns."""
    plugin, model = _recipe_plugin(tmp_path, recipe, gate_init=0.0)
    grads = _step0_grads(plugin, model)
    for name, g in _attention_grads(grads).items():
        assert g is None or float(g.abs().sum()) == 0.0, name
    gates = {n: g for n, g in grads.items() if n.endswith(".gate")}
    assert gates and all(float(g.abs().sum()) > 0 for g in gates.values())


def test_stage_1_is_a_plain_clip_and_stage_2_injects_xavier_cross_attention(synth_dir, tmp_path):
    s1 = VitTrainPlugin(tiny_config(synth_dir, tmp_path / "s1", stage=1))
    torch.manual_seed(0)
    m1 = s1.build()
    assert len(m1.xattn) == 0 and m1.settings["cross_attn"] is False
    s1.save(m1, tmp_path / "s1")
    for gate, layers in ((None, ["0", "1"]), (0.0, ["1"])):
        cfg = tiny_config(synth_dir, tmp_path / "s2", stage=2, init=str(tmp_path / "s1"), gate_init=gate,
                          cross_attn_layers=None if gate is None else [-1])
        m2 = VitTrainPlugin(cfg).build()
        assert sorted(m2.xattn) == layers and m2.settings["cross_attn_layers"] == [int(x) for x in layers]
        assert all((xa.gate is None) == (gate is None) for xa in m2.xattn.values())
        w = m2.xattn[layers[0]].attn.out_proj.weight.detach()
        bound = (6 / sum(w.shape)) ** 0.5  # Xavier-uniform
        assert float(w.abs().max()) <= bound and float(w.std()) > bound / 4
    # --no-cross-attn keeps a stage-1 model plain
    m3 = VitTrainPlugin(tiny_config(synth_dir, tmp_path / "s3", stage=2, init=str(tmp_path / "s1"), cross_attn=False)).build()
    assert len(m3.xattn) == 0


def test_new_layer_lr_gives_the_added_layers_their_own_rate(synth_dir, tmp_path):
    plugin = VitTrainPlugin(tiny_config(synth_dir, tmp_path / "o", stage=2, lr=1e-5, new_layer_lr=1e-3))
    model = plugin.build()
    groups = plugin.parameters(model)
    names = {id(p): n for n, p in model.named_parameters()}
    fast = [names[id(p)] for g in groups if g.get("lr") == 1e-3 for p in g["params"]]
    slow = [names[id(p)] for g in groups if "lr" not in g for p in g["params"]]
    assert fast and all(n.startswith(("xattn.", "predictor.")) for n in fast)
    assert slow and all(n.startswith(("clip.", "logit_scale")) for n in slow)
    assert sum(len(g["params"]) for g in groups) == sum(p.requires_grad for p in model.parameters())
    plain = VitTrainPlugin(tiny_config(synth_dir, tmp_path / "p", stage=2)).parameters(model)
    assert all("lr" not in g for g in plain)  # the paper: one rate for all (§IV-A)


def test_the_combiner_is_eq3_one_weight_and_the_gate_is_an_option(synth_dir, tmp_path):
    from cirkit.backbones.vit import Combiner, GatedCombiner

    torch.manual_seed(0)
    online, _, _ = build_model({"model": "cirkit-tiny"})
    save_checkpoint(online, tmp_path / "s2", ema=__import__("copy").deepcopy(online), stage="2")
    for kind, cls, trained in (("weight", Combiner, ["combiner.logit"]),
                               ("gate", GatedCombiner, ["combiner.gate.bias", "combiner.gate.weight", "logit_scale"])):
        plugin = VitTrainPlugin(tiny_config(synth_dir, tmp_path / kind, stage="combiner", init=str(tmp_path / "s2"),
                                            combiner=kind))
        model = plugin.build()
        plugin.prepare(model)  # the inherited EMA target loads although its combiner was of the other kind
        assert isinstance(model.combiner, cls) and model.settings["combiner"] == kind
        assert sorted(n for n, p in model.named_parameters() if p.requires_grad) == trained
    comb = Combiner(4)
    q, t = torch.eye(4)[:2], torch.eye(4)[2:]
    lam = torch.sigmoid(torch.tensor(2.0))
    assert torch.allclose(comb(q, t), lam * q + (1 - lam) * t)  # eq. 3 with one λ for every query
    assert comb.weight == pytest.approx(float(lam))


def test_a_checkpoint_from_before_these_settings_loads_as_it_was_trained(tmp_path):
    """Older config.json files lack gate_init/combiner/quick_gelu: they were gated at 0, per-query, GELU."""
    import json

    from cirkit.backbones import load_backbone
    from cirkit.backbones.base import BackboneSpec
    from cirkit.backbones.vit import GatedCombiner

    torch.manual_seed(0)
    old, _, _ = build_model({"model": "cirkit-tiny", "gate_init": 0.0, "combiner": "gate"})
    save_checkpoint(old, tmp_path)
    cfg = json.loads((tmp_path / "config.json").read_text())
    for key in ("gate_init", "combiner", "quick_gelu"):
        cfg.pop(key)
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    b = load_backbone(BackboneSpec(model=str(tmp_path)))
    assert isinstance(b.model.combiner, GatedCombiner)
    assert all(xa.gate is not None for xa in b.model.xattn.values())


def test_the_combiner_choices_are_the_models():
    """train/config.py (torch-free, for --help) repeats vit.COMBINERS: they must not drift apart."""
    from cirkit.backbones.vit import COMBINERS
    from cirkit.train import config

    assert config.COMBINERS == COMBINERS
