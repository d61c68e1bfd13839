"""cirkit.checkpoint on its own: config.json, weights by content, folder checks, trainer state, the save."""

from __future__ import annotations

import io
import json
import os
import tarfile

import pytest
import torch
from safetensors.torch import save_file

from cirkit import checkpoint
from cirkit.errors import CheckpointError

VIT = {"model": "cirkit-tiny", "embed_dim": 32, "cross_attn": True, "cross_attn_layers": [0, 1],
       "predictor_hidden": 64, "temperature": 0.07, "weights": "model.safetensors"}


def _vit_folder(tmp_path, **overrides):
    folder = tmp_path / "ck"
    folder.mkdir()
    checkpoint.write_config(folder, "vit", **VIT)
    save_file({"w": torch.ones(2, 2)}, str(folder / checkpoint.WEIGHTS))
    if overrides:
        data = json.loads((folder / checkpoint.CONFIG).read_text())
        data.update(overrides)
        (folder / checkpoint.CONFIG).write_text(json.dumps(data))
    return folder


# -- config.json ---------------------------------------------------------------------------------
def test_write_config_adds_version_and_family_and_reads_back(tmp_path):
    import cirkit

    data = checkpoint.write_config(tmp_path, "vit", **VIT)
    assert data["cirkit"] == cirkit.__version__ and data["backbone"] == "vit"
    assert checkpoint.read_config(tmp_path) == data


def test_a_writer_out_of_step_with_the_schema_fails_at_write(tmp_path):
    with pytest.raises(ValueError, match="missing 'base_model'"):
        checkpoint.write_config(tmp_path, "mllm", templates={})
    with pytest.raises(ValueError, match="'embed_dim' must be an integer"):  # optional, but typed when present
        checkpoint.write_config(tmp_path, "vit", **{**VIT, "embed_dim": "32"})
    assert not (tmp_path / checkpoint.CONFIG).exists()


def test_folders_that_are_not_cirkit_checkpoints_read_as_none(tmp_path):
    assert checkpoint.read_config(tmp_path / "nowhere") is None
    assert checkpoint.read_config(tmp_path) is None  # no config.json
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llava", "backbone": "resnet50"}))
    assert checkpoint.read_config(tmp_path) is None  # a transformers folder (its own 'backbone' key)


@pytest.mark.parametrize("content, problem", [
    (b'{"backbone": "vit",\n', "not valid JSON"),
    (b"\xff\xfe{}", "not valid JSON (not UTF-8 text)"),
    (json.dumps({"cirkit": "0.1.0", "backbone": "vit", "embed_dim": 32}).encode(), "missing 'model' (a string)"),
    (b"[1, 2]", "not a JSON object"),
    (json.dumps({"cirkit": "0.1.0", "backbone": "vit", "model": "m", "embed_dim": "big"}).encode(),
     "'embed_dim' must be an integer, not 'big'"),
    (json.dumps({"cirkit": "0.1.0", "backbone": "vit", "model": "m", "embed_dim": True}).encode(),
     "'embed_dim' must be an integer, not True"),
    (json.dumps({**VIT, "cirkit": "0.1.0", "backbone": "vit", "cross_attn_layers": "all"}).encode(),
     "'cross_attn_layers' must be a list of block indexes or null"),
    (json.dumps({**VIT, "cirkit": "0.1.0", "backbone": "vit", "weights": "../../etc/passwd"}).encode(),
     "'weights' must be a file name inside the checkpoint folder"),
    (json.dumps({"cirkit": "0.1.0", "backbone": "mllm", "base_model": 7}).encode(), "'base_model' must be a string"),
    (json.dumps({"cirkit": "0.1.0", "backbone": "mllm"}).encode(), "missing 'base_model'"),
    (json.dumps({"cirkit": "0.1.0", "backbone": "clip"}).encode(), "'backbone' must be one of vit, mllm"),
    (json.dumps({"cirkit": "0.1.0"}).encode(), "'backbone' must be one of vit, mllm, reformulator, not None"),
])
def test_a_damaged_config_is_one_checkpoint_error_naming_the_file(tmp_path, content, problem):
    (tmp_path / "config.json").write_bytes(content)
    with pytest.raises(CheckpointError) as e:
        checkpoint.read_config(tmp_path)
    assert str(e.value).startswith(f"{tmp_path / 'config.json'}: {problem}")
    assert "\n" not in str(e.value)


# -- weights, judged by content ------------------------------------------------------------------
def _torch_zip(path):
    torch.save({"w": torch.zeros(2)}, path)


def _torch_legacy(path):
    torch.save({"w": torch.zeros(2)}, path, _use_new_zipfile_serialization=False)


def _torch_tar(path):
    with tarfile.open(path, "w") as tar:
        data = b"\x80\x02}q\x00."
        info = tarfile.TarInfo("pickle")
        info.size = len(data)
        tar.addfile(info, io.BytesIO(data))


@pytest.mark.parametrize("write", [_torch_zip, _torch_legacy, _torch_tar], ids=["zip", "legacy", "tar"])
@pytest.mark.parametrize("name", ["w.ckpt", "w.PT", "w.pkl", "weights", "w.safetensors.bak", "model.bin"])
def test_pickle_is_recognised_by_content_whatever_the_name(tmp_path, write, name):
    path = tmp_path / name
    write(path)
    assert checkpoint.weights_format(path) == "pickle"
    with pytest.raises(CheckpointError, match="pickle checkpoints can run code when loaded"):
        checkpoint.refuse_pickle(path, allow_pickle=False)
    assert checkpoint.refuse_pickle(path, allow_pickle=True) == "pickle"


def test_safetensors_is_recognised_by_content_whatever_the_name(tmp_path):
    path = tmp_path / "weights.bin"
    save_file({"w": torch.zeros(3)}, str(path))
    assert checkpoint.weights_format(path) == "safetensors"
    assert checkpoint.refuse_pickle(path, allow_pickle=False) == "safetensors"
    checkpoint.check_safetensors(path)


@pytest.mark.parametrize("content", [b"", b"(dp0\nS'a'\n.", b"not weights at all", b"\x00" * 64])
def test_anything_else_is_refused_too_unless_allowed(tmp_path, content):
    path = tmp_path / "w.ckpt"
    path.write_bytes(content)
    assert checkpoint.weights_format(path) == "unknown"
    with pytest.raises(CheckpointError, match="not a safetensors file, and loading it would unpickle it"):
        checkpoint.refuse_pickle(path, allow_pickle=False)


def test_truncated_and_garbage_safetensors_are_one_line_errors(tmp_path):
    path = tmp_path / "model.safetensors"
    save_file({"w": torch.arange(1000, dtype=torch.float32)}, str(path))
    whole = path.read_bytes()
    path.write_bytes(whole[:-100])
    with pytest.raises(CheckpointError, match=rf"^{path}: truncated \(\d+ bytes, the header promises \d+\)"):
        checkpoint.check_safetensors(path)
    with pytest.raises(CheckpointError, match="truncated"):
        checkpoint.load_safetensors(path)
    path.write_bytes(whole[:5])
    with pytest.raises(CheckpointError, match="not a safetensors file"):
        checkpoint.check_safetensors(path)
    path.write_bytes(len(b"[1, 2]").to_bytes(8, "little") + b"[1, 2]")
    with pytest.raises(CheckpointError, match="its header is not a mapping"):
        checkpoint.check_safetensors(path)
    path.write_bytes((20).to_bytes(8, "little") + b"{not json at all ...")
    with pytest.raises(CheckpointError, match="its header is not JSON"):
        checkpoint.check_safetensors(path)


# -- folder checks ---------------------------------------------------------------------------------
def test_check_folder_names_what_is_missing_and_the_fix(tmp_path):
    folder = _vit_folder(tmp_path)
    assert checkpoint.check_folder(folder, "vit")["model"] == "cirkit-tiny"
    with pytest.raises(CheckpointError, match=rf"^{folder}: a vit checkpoint, not mllm$"):
        checkpoint.check_folder(folder, "mllm")
    (folder / checkpoint.WEIGHTS).unlink()
    with pytest.raises(CheckpointError, match=rf"^{folder}: missing model.safetensors; the checkpoint is incomplete$"):
        checkpoint.check_folder(folder)
    _torch_zip(folder / "renamed.dat")  # a pickle under any name is named as one
    with pytest.raises(CheckpointError, match=r"only pickle weights \(renamed.dat\); cirkit checkpoints load from "
                                              "safetensors only, never from pickle"):
        checkpoint.check_folder(folder)
    with pytest.raises(CheckpointError, match=rf"^{tmp_path / 'none'}: no such checkpoint folder$"):
        checkpoint.check_folder(tmp_path / "none")
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match=r"not a cirkit checkpoint \(no config.json\)"):
        checkpoint.check_folder(tmp_path / "empty")


def test_check_folder_for_mllm_adapters(tmp_path):
    folder = tmp_path / "m"
    folder.mkdir()
    checkpoint.write_config(folder, "mllm", base_model="x")
    with pytest.raises(CheckpointError, match="missing model.safetensors or adapter_config.json"):
        checkpoint.check_folder(folder)
    (folder / checkpoint.ADAPTER_CONFIG).write_text("{}")
    with pytest.raises(CheckpointError, match="adapter_config.json without adapter_model.safetensors"):
        checkpoint.check_folder(folder)
    _torch_zip(folder / "adapter_model.bin")  # peft would torch.load it: never from a cirkit checkpoint
    with pytest.raises(CheckpointError, match=r"no adapter_model.safetensors, only pickle weights \(adapter_model.bin\)"):
        checkpoint.check_folder(folder)
    save_file({"w": torch.zeros(1)}, str(folder / checkpoint.ADAPTER_WEIGHTS))
    checkpoint.check_folder(folder)


def test_model_folders_are_judged_by_what_transformers_would_load(tmp_path):
    folder = tmp_path / "hf"
    folder.mkdir()
    (folder / "config.json").write_text("{}")
    checkpoint.check_model_folder(folder, allow_pickle=False)  # no weights at all: transformers says so
    _torch_zip(folder / "weights")  # no suffix, pickle content
    with pytest.raises(CheckpointError, match=rf"^{folder}: only pickle \(weights\) weights found"):
        checkpoint.check_model_folder(folder, allow_pickle=False)
    checkpoint.check_model_folder(folder, allow_pickle=True)
    (folder / "model.safetensors.index.json").write_text("{}")  # sharded safetensors: read instead
    checkpoint.check_model_folder(folder, allow_pickle=False)


# -- trainer state -----------------------------------------------------------------------------------
def test_trainer_state_round_trips_exactly_without_pickle(tmp_path):
    import random

    import numpy as np

    model = torch.nn.Linear(3, 2)
    opt = torch.optim.AdamW(model.parameters(), lr=0.1)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.5)
    model(torch.ones(4, 3)).sum().backward()
    opt.step()
    sched.step()
    rng = checkpoint.capture_rng(torch.device("cpu"))
    want = (torch.rand(3), random.random(), np.random.rand())
    state = checkpoint.TrainerState(step=3, max_steps=9, epoch=1, trainable=dict(model.named_parameters()),
                                    optimizer=opt.state_dict(), scheduler=sched.state_dict(),
                                    plugin={"ema.w": torch.ones(2)}, rng=rng)
    checkpoint.save_trainer_state(tmp_path, state)
    files = sorted(p.name for p in (tmp_path / checkpoint.STATE_DIR).iterdir())
    assert files == ["model.safetensors", "optimizer.safetensors", "plugin.safetensors", "rng.safetensors", "state.json"]
    back = checkpoint.load_trainer_state(tmp_path)
    assert (back.step, back.max_steps, back.epoch) == (3, 9, 1)
    assert torch.equal(back.trainable["weight"], model.weight.detach())
    opt2 = torch.optim.AdamW(torch.nn.Linear(3, 2).parameters(), lr=0.1)
    opt2.load_state_dict(back.optimizer)
    for a, b in zip(opt.state_dict()["state"].values(), opt2.state_dict()["state"].values(), strict=True):
        assert all(torch.equal(torch.as_tensor(a[k]), torch.as_tensor(b[k])) for k in a)
    checkpoint.restore_rng(back.rng, torch.device("cpu"))
    assert torch.equal(torch.rand(3), want[0]) and random.random() == want[1] and np.random.rand() == want[2]


@pytest.mark.parametrize("damage", ["state_json", "missing_optimizer", "truncated_model", "wrong_step"])
def test_a_damaged_trainer_state_is_one_line(tmp_path, damage):
    model = torch.nn.Linear(2, 2)
    opt = torch.optim.AdamW(model.parameters())
    checkpoint.save_trainer_state(tmp_path, checkpoint.TrainerState(
        step=1, max_steps=2, epoch=0, trainable=dict(model.named_parameters()), optimizer=opt.state_dict(),
        scheduler={}, rng=checkpoint.capture_rng(torch.device("cpu"))))
    sd = tmp_path / checkpoint.STATE_DIR
    if damage == "state_json":
        (sd / "state.json").write_text("{")
        want = f"{sd / 'state.json'}: not valid JSON"
    elif damage == "missing_optimizer":
        (sd / "optimizer.safetensors").unlink()
        want = f"{sd}: missing optimizer.safetensors; the trainer state is incomplete"
    elif damage == "truncated_model":
        raw = (sd / "model.safetensors").read_bytes()
        (sd / "model.safetensors").write_bytes(raw[:-4])
        want = f"{sd / 'model.safetensors'}: truncated"
    else:
        meta = json.loads((sd / "state.json").read_text())
        (sd / "state.json").write_text(json.dumps({**meta, "step": "one"}))
        want = f"{sd / 'state.json'}: 'step' must be an integer"
    with pytest.raises(CheckpointError) as e:
        checkpoint.load_trainer_state(tmp_path)
    assert str(e.value).startswith(want) and "\n" not in str(e.value)


# -- the output folder -----------------------------------------------------------------------------------
def _state():
    model = torch.nn.Linear(2, 2)
    return checkpoint.TrainerState(step=1, max_steps=2, epoch=0, trainable=dict(model.named_parameters()),
                                   optimizer=torch.optim.AdamW(model.parameters()).state_dict(), scheduler={},
                                   rng=checkpoint.capture_rng(torch.device("cpu")))


def test_save_writes_the_whole_folder_and_keeps_the_users_own_files(tmp_path):
    out = tmp_path / "run"

    def model_files(folder):
        checkpoint.write_config(folder, "vit", **VIT)
        save_file({"w": torch.zeros(1)}, str(folder / checkpoint.WEIGHTS))

    checkpoint.claim_output(out, fresh=True)
    checkpoint.append_metrics(out, {"step": 1, "loss": 1.0})
    checkpoint.save(out, model_files, {"lr": 1.0}, _state())
    names = sorted(p.name for p in out.iterdir())
    assert names == [".cirkit-output.json", "config.json", "metrics.jsonl", "model.safetensors", "train_args.json",
                     "trainer_state"]
    (out / "eval.json").write_text('{"R@1": 50}')  # the user's notes, written into the folder later
    (out / "notes").mkdir()
    (out / "notes" / "a.txt").write_text("keep me")
    checkpoint.save(out, model_files, {"lr": 1.0}, _state())
    assert (out / "eval.json").read_text() == '{"R@1": 50}' and (out / "notes" / "a.txt").read_text() == "keep me"
    assert not [p for p in tmp_path.iterdir() if ".cirkit-" in p.name]


def test_open_output_removes_a_dead_saves_temp_and_finishes_a_cut_swap(tmp_path):
    import subprocess
    import sys

    from cirkit.io.atomic import temp_name

    out = tmp_path / "run"
    out.mkdir()
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    stale = tmp_path / temp_name(out).name.replace(f"-{os.getpid()}-", f"-{dead.pid}-")
    stale.mkdir()
    (stale / "model.safetensors").write_bytes(b"0" * 1000)
    checkpoint.open_output(out)
    assert not stale.exists() and out.is_dir()
    aside = tmp_path / temp_name(out, "old").name  # a save killed between its two renames
    os.replace(out, aside)
    checkpoint.open_output(out)
    assert out.is_dir() and not aside.exists()


def test_claim_marks_the_folder_and_a_fresh_run_drops_stale_metrics(tmp_path):
    from cirkit.io.atomic import read_marker

    out = tmp_path / "run"
    checkpoint.claim_output(out, fresh=True)
    assert read_marker(out)["kind"] == "checkpoint"
    checkpoint.append_metrics(out, {"step": 1})
    checkpoint.claim_output(out, fresh=False)
    assert (out / checkpoint.METRICS).exists()
    checkpoint.claim_output(out, fresh=True)
    assert not (out / checkpoint.METRICS).exists()


def test_truncate_metrics_keeps_lines_up_to_the_resumed_step(tmp_path):
    for s in (1, 2, 3, 4):
        checkpoint.append_metrics(tmp_path, {"step": s})
    with open(tmp_path / checkpoint.METRICS, "a") as fh:
        fh.write('{"step": 5, "lo')  # torn by a kill
    checkpoint.truncate_metrics(tmp_path, 2)
    assert [json.loads(x)["step"] for x in (tmp_path / checkpoint.METRICS).read_text().splitlines()] == [1, 2]


def test_every_file_a_save_writes_is_in_the_layout_the_module_documents():
    """One place to read what a checkpoint holds: a file added to OWNED must be described there too."""
    for name in checkpoint.OWNED:
        assert name in checkpoint.__doc__, name
    for name in (checkpoint.STATE_JSON, checkpoint.STATE_OPTIMIZER, checkpoint.STATE_RNG):
        assert name.split(".")[0] in checkpoint.__doc__, name
