"""The generic loop: schedule, data order, stages, checkpoint folder, exact resume, refusals."""

import json

import pytest
import torch
from safetensors.torch import load_file

from cirkit.errors import CirkitError
from cirkit.train import run
from cirkit.train.loop import EpochBatches, lr_factor, train
from cirkit.train.vit import VitTrainPlugin

from .conftest import tiny_config


def test_lr_schedule():
    assert lr_factor(0, 4, 10, "cosine") == pytest.approx(0.25)
    assert lr_factor(3, 4, 10, "cosine") == pytest.approx(1.0)
    assert lr_factor(4, 4, 10, "cosine") == pytest.approx(1.0)
    assert lr_factor(10, 4, 10, "cosine") == pytest.approx(0.0)
    assert lr_factor(7, 4, 10, "linear") == pytest.approx(0.5)
    assert lr_factor(9, 0, 10, "constant") == 1.0
    with pytest.raises(CirkitError):
        lr_factor(5, 0, 10, "bogus")


def test_epoch_batches_are_disjoint_across_processes_and_resumable():
    ranks = [list(EpochBatches(50, 4, 2, r, seed=3, epoch=1)) for r in range(2)]
    flat = [i for r in ranks for b in r for i in b]
    assert len(flat) == len(set(flat)) == 48  # 50 // (4 * 2) = 6 global batches
    assert list(EpochBatches(50, 4, 2, 1, seed=3, epoch=1, start=2)) == ranks[1][2:]
    assert list(EpochBatches(50, 4, 2, 0, seed=3, epoch=2)) != ranks[0]


@pytest.mark.slow
def test_three_stages_write_complete_checkpoints(synth_dir, tmp_path):
    s1 = run(tiny_config(synth_dir, tmp_path / "s1", stage=1))
    assert s1.counts["steps"] == 4 and s1.metrics["samples_per_s"] > 0
    s2 = run(tiny_config(synth_dir, tmp_path / "s2", stage=2, init=str(tmp_path / "s1")))
    comb = run(tiny_config(synth_dir, tmp_path / "c", stage="combiner", init=str(tmp_path / "s2"), combiner="gate"))
    eq3 = run(tiny_config(synth_dir, tmp_path / "eq3", stage="combiner", init=str(tmp_path / "s2")))
    for name in ("s1", "s2", "c", "eq3"):
        folder = tmp_path / name
        names = {p.name for p in folder.iterdir()}
        assert {"config.json", "model.safetensors", "train_args.json", "metrics.jsonl", "trainer_state"} <= names
        assert not [p for p in folder.rglob("*") if p.suffix in (".pt", ".bin", ".pkl")]
        lines = (folder / "metrics.jsonl").read_text().splitlines()
        assert [json.loads(x)["step"] for x in lines] == [1, 2, 3, 4]
    cfg = json.loads((tmp_path / "c" / "config.json").read_text())
    assert cfg["combiner_trained"] and cfg["stage"] == "combiner" and cfg["has_ema"]
    keys = load_file(str(tmp_path / "s2" / "model.safetensors")).keys()
    assert any(k.startswith("ema.") for k in keys) and any(k.startswith("xattn.") for k in keys)
    # the combiner stage trains the combiner only: the per-query gate with the temperature (an option),
    # or by default eq. 3's one weight with everything else, the temperature included, frozen (§II-C)
    trained = load_file(str(tmp_path / "c" / "trainer_state" / "model.safetensors"))
    assert sorted(trained) == ["combiner.gate.bias", "combiner.gate.weight", "logit_scale"]
    assert s2.details["trainable_parameters"] > comb.details["trainable_parameters"]
    assert sorted(load_file(str(tmp_path / "eq3" / "trainer_state" / "model.safetensors"))) == ["combiner.logit"]
    assert eq3.details["trainable_parameters"] == 1
    assert not any(k.startswith("xattn.") for k in load_file(str(tmp_path / "s1" / "model.safetensors")))


@pytest.mark.slow
def test_resume_continues_to_the_same_result(synth_dir, tmp_path):
    kw = dict(stage=2, max_steps=6, save_every=3)
    run(tiny_config(synth_dir, tmp_path / "s1", stage=1, max_steps=2))
    init = str(tmp_path / "s1")
    straight = train(tiny_config(synth_dir, tmp_path / "a", init=init, **kw), VitTrainPlugin(tiny_config(synth_dir, tmp_path / "a", init=init, **kw)))
    cfg_b = tiny_config(synth_dir, tmp_path / "b", init=init, **kw)
    half = train(cfg_b, VitTrainPlugin(cfg_b), stop_at=3)
    assert half.details["stopped_at"] == 3
    assert json.loads((tmp_path / "b" / "trainer_state" / "state.json").read_text())["step"] == 3
    cfg_b.resume = True
    resumed = train(cfg_b, VitTrainPlugin(cfg_b))
    assert resumed.counts["steps"] == 6
    assert resumed.metrics["loss"] == pytest.approx(straight.metrics["loss"], rel=1e-4, abs=1e-5)
    wa = load_file(str(tmp_path / "a" / "model.safetensors"))
    wb = load_file(str(tmp_path / "b" / "model.safetensors"))
    assert wa.keys() == wb.keys()
    for k in wa:  # query encoder and EMA target encoder
        assert torch.allclose(wa[k], wb[k], atol=1e-5), k
    steps = [json.loads(x)["step"] for x in (tmp_path / "b" / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4, 5, 6]


def test_refuses_to_overwrite_and_to_resume_nothing(synth_dir, tmp_path):
    run(tiny_config(synth_dir, tmp_path / "s1", stage=1, max_steps=1))
    weights = (tmp_path / "s1" / "model.safetensors").read_bytes()
    again = run(tiny_config(synth_dir, tmp_path / "s1", stage=1, max_steps=1))  # finished: reported, not redone
    assert again.details["already_complete"] and (tmp_path / "s1" / "model.safetensors").read_bytes() == weights
    with pytest.raises(CirkitError, match="already holds a finished run of 1 step with other settings"):
        run(tiny_config(synth_dir, tmp_path / "s1", stage=1, max_steps=3))
    with pytest.raises(CirkitError, match="nothing to resume"):
        run(tiny_config(synth_dir, tmp_path / "new", stage=1, resume=True))
    with pytest.raises(CirkitError, match="--resume needs the same settings"):
        run(tiny_config(synth_dir, tmp_path / "s1", stage=1, max_steps=2, resume=True))
    with pytest.raises(CirkitError, match="pass --init"):
        run(tiny_config(synth_dir, tmp_path / "c", stage="combiner"))
    with pytest.raises(CirkitError, match="fewer than one optimiser step"):
        run(tiny_config(synth_dir, tmp_path / "big", stage=1, batch_size=100000))


@pytest.mark.slow
def test_ablation_switches(synth_dir, tmp_path):
    run(tiny_config(synth_dir, tmp_path / "s1", stage=1, max_steps=1))
    init = str(tmp_path / "s1")
    run(tiny_config(synth_dir, tmp_path / "noema", stage=2, init=init, ema=False, max_steps=2))
    run(tiny_config(synth_dir, tmp_path / "nox", stage=2, init=init, cross_attn=False, max_steps=2))
    noema = load_file(str(tmp_path / "noema" / "model.safetensors"))
    nox = load_file(str(tmp_path / "nox" / "model.safetensors"))
    assert not any(k.startswith("ema.") for k in noema)
    assert not any(k.startswith("xattn.") for k in nox)
    assert json.loads((tmp_path / "nox" / "config.json").read_text())["cross_attn"] is False


def test_trainer_state_of_the_wrong_shape_is_a_checkpoint_error_naming_the_folder(tmp_path):
    from cirkit.errors import CheckpointError
    from cirkit.train.loop import _load_trainable

    model = torch.nn.Linear(3, 2)
    with pytest.raises(CheckpointError, match=r"trainer_state: trainer state does not fit the model .*weight \(4, 3\) vs \(2, 3\)"):
        _load_trainable(model, {"weight": torch.zeros(4, 3), "bias": torch.zeros(2)}, tmp_path / "trainer_state")
    _load_trainable(model, {"weight": torch.ones(2, 3), "bias": torch.ones(2)}, tmp_path / "trainer_state")
    assert model.weight.sum() == 6 and model.bias.sum() == 2


def test_resume_from_a_trainer_state_that_does_not_fit_is_refused(synth_dir, tmp_path):
    from safetensors.torch import save_file

    from cirkit.errors import CheckpointError

    cfg = tiny_config(synth_dir, tmp_path / "s1", stage=1, max_steps=2)
    train(cfg, VitTrainPlugin(cfg), stop_at=1)
    state_file = tmp_path / "s1" / "trainer_state" / "model.safetensors"
    state = load_file(str(state_file))
    state["logit_scale"] = torch.zeros(3)
    save_file(state, str(state_file))
    cfg.resume = True
    with pytest.raises(CheckpointError, match="trainer_state: trainer state does not fit the model"):
        train(cfg, VitTrainPlugin(cfg))


def test_resume_with_a_changed_setting_is_refused_with_the_setting_named(synth_dir, tmp_path):
    cfg = tiny_config(synth_dir, tmp_path / "s1", stage=1, max_steps=2)
    train(cfg, VitTrainPlugin(cfg), stop_at=1)
    changed = tiny_config(synth_dir, tmp_path / "s1", stage=1, max_steps=2, resume=True, learn_temperature=False)
    with pytest.raises(CirkitError, match=r"--resume needs the same settings .*learn_temperature: True -> False"):
        train(changed, VitTrainPlugin(changed))


@pytest.mark.parametrize("key, value", [("lora_r", 8), ("lora_alpha", 4), ("lora_dropout", 0.2),
                                        ("lora_target_modules", ["q_proj"]), ("full_finetune", True),
                                        ("freeze_vision", False), ("target_image_loss", True), ("max_length", 64),
                                        ("temperature", 0.2), ("learn_temperature", False)])
def test_resume_compares_the_settings_a_run_saved_and_only_those(tmp_path, key, value):
    from cirkit.config import to_jsonable
    from cirkit.train.loop import _check_resume
    from cirkit.train.plugin import TrainConfig

    saved = {**to_jsonable(TrainConfig(backbone="mllm", output=tmp_path)), "processes": 1}
    (tmp_path / "train_args.json").write_text(json.dumps(saved))
    now = TrainConfig(backbone="mllm", output=tmp_path, resume=True, **{key: value})
    with pytest.raises(CirkitError, match=f"{key}: "):
        _check_resume(now, tmp_path, 1)
    # A checkpoint saved before the setting was recorded still resumes.
    del saved[key]
    (tmp_path / "train_args.json").write_text(json.dumps(saved))
    _check_resume(now, tmp_path, 1)


def test_resume_under_another_process_count_is_refused(tmp_path):
    from cirkit.config import to_jsonable
    from cirkit.train.loop import _check_resume
    from cirkit.train.plugin import TrainConfig

    cfg = TrainConfig(output=tmp_path)
    (tmp_path / "train_args.json").write_text(json.dumps({**to_jsonable(cfg), "processes": 2}))
    _check_resume(cfg, tmp_path, 2)
    with pytest.raises(CirkitError, match=r"processes: 2 -> 1"):
        _check_resume(cfg, tmp_path, 1)
    (tmp_path / "train_args.json").write_text(json.dumps(to_jsonable(cfg)))  # saved without the count
    _check_resume(cfg, tmp_path, 1)
