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
