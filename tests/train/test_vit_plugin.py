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
