"""`cirkit train` and the data around it: outputs it must not touch, one writer, damaged
checkpoints, killed saves, Ctrl-C, unreadable images. Real CLI runs (in process or as
subprocesses that are killed or interrupted); every refusal is exit 1, one ``error:`` line,
and leaves every file as it was.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from .conftest import cli_env, fails, invoke, kill_when, ok, png_folder, read_lines, spawn

pytest.importorskip("torch")

N = 12


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    """12 small distinct PNGs and their captions.jsonl (image paths relative to it)."""
    root = tmp_path_factory.mktemp("train-data")
    png_folder(root / "imgs", N)
    (root / "captions.jsonl").write_text("".join(
        json.dumps({"id": f"im{i:03d}", "image": f"imgs/im{i:03d}.png", "caption": f"picture number {i}"}) + "\n"
        for i in range(N)))
    return root / "captions.jsonl"


def _args(data: Path, out: Path | str, steps: int = 2, *extra: str) -> list[str]:
    return ["train", str(data), "--stage", "1", "-o", str(out), "--model", "cirkit-tiny", "--max-steps", str(steps),
            "--batch-size", "4", "--lr", "1e-3", "--warmup-steps", "1", "--num-workers", "0", "--log-every", "1",
            "--save-every", "0", *extra]


def _snapshot(root: Path) -> dict[str, bytes | str]:
    """Every file, folder and link under ``root`` (links by target, never followed; lock files aside)."""
    out: dict[str, bytes | str] = {}
    for dirpath, dirs, files in os.walk(root):
        for name in dirs + [f for f in files if not (f.startswith(".") and f.endswith(".lock"))]:
            p = Path(dirpath) / name
            rel = str(p.relative_to(root))
            out[rel] = ("-> " + os.readlink(p)) if p.is_symlink() else ("dir" if p.is_dir() else p.read_bytes())
    return out


def _weights(folder: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(str(folder / "model.safetensors"))


def _same_run(a: Path, b: Path) -> None:
    import torch

    la, lb = read_lines(a / "metrics.jsonl"), read_lines(b / "metrics.jsonl")
    assert [m["step"] for m in la] == [m["step"] for m in lb]
    for x, y in zip(la, lb, strict=True):
        assert x["loss"] == pytest.approx(y["loss"], rel=1e-4, abs=1e-5), x["step"]
    wa, wb = _weights(a), _weights(b)
    assert wa.keys() == wb.keys()
    for k in wa:
        assert torch.allclose(wa[k], wb[k], atol=1e-5), k


# -- outputs a training run must not write ----------------------------------------------------------
def _refused(args: list[str], root: Path, cwd: Path | None = None) -> str:
    before = _snapshot(root)
    line = fails(args, cwd=cwd)
    assert _snapshot(root) == before, "a refused run changed files"
    return line


def test_output_is_the_current_folder_or_above(data, tmp_path):
    work = tmp_path / "work"
    work.mkdir()
    for out in (".", "..", str(work)):
        line = _refused(_args(data, out), tmp_path, cwd=work)
        assert line == f"error: {out}: is the current folder or one above it; write the checkpoint to a new subfolder"


def test_output_is_a_link_or_a_file(data, tmp_path):
    target = tmp_path / "real"
    target.mkdir()
    (target / "keep.txt").write_text("mine")
    (tmp_path / "link").symlink_to(target)
    (tmp_path / "dangling").symlink_to(tmp_path / "gone")
    (tmp_path / "file.txt").write_text("mine too")
    for name in ("link", "dangling"):
        line = _refused(_args(data, tmp_path / name), tmp_path)
        assert line.startswith(f"error: {tmp_path / name}: is a symbolic link; cirkit does not replace links")
    line = _refused(_args(data, tmp_path / "file.txt"), tmp_path)
    assert line == f"error: {tmp_path / 'file.txt'}: exists and is not a folder; choose another output folder"


def test_output_whose_parent_is_a_file(data, tmp_path):
    (tmp_path / "file.txt").write_text("mine")
    line = _refused(_args(data, tmp_path / "file.txt" / "run"), tmp_path)
    assert line.startswith(f"error: {tmp_path / 'file.txt' / 'run'}: its parent {tmp_path / 'file.txt'} is a file")


def test_output_is_or_holds_the_training_data(data, tmp_path):
    import shutil

    copy = tmp_path / "d"
    shutil.copytree(data.parent, copy)
    line = _refused(_args(copy / "captions.jsonl", copy / "captions.jsonl"), tmp_path)
    assert line == (f"error: {copy / 'captions.jsonl'}: is the training data ({copy / 'captions.jsonl'}); "
                    "write the checkpoint to a new folder")
    line = _refused(_args(copy / "captions.jsonl", copy), tmp_path)
    assert line == (f"error: {copy}: holds the training data ({copy / 'captions.jsonl'}), which the first save "
                    "would delete; write the checkpoint to a new folder")
    # the same through a relative spelling and a link to the data's folder
    (tmp_path / "via").symlink_to(copy)
    line = _refused(_args(tmp_path / "via" / "captions.jsonl", "d"), tmp_path, cwd=tmp_path)
    assert line.startswith("error: d: holds the training data")


def test_output_is_holds_or_sits_inside_the_init_checkpoint(data, tmp_path):
    init = tmp_path / "runs" / "s1"
    ok(_args(data, init, 1))
    for out, want in ((init, f"is --init ({init}); write the checkpoint to a new folder"),
                      (init / "s2", f"is inside --init ({init}); write the checkpoint to a folder outside it"),
                      (tmp_path / "runs", f"holds --init ({init}), which the first save would delete")):
        line = _refused([*_args(data, out, 1), "--init", str(init)], tmp_path)
        assert line.startswith(f"error: {out}: {want}")


def test_output_folder_of_user_files_is_refused_before_training(data, tmp_path):
    work = tmp_path / "work"
    work.mkdir()
    (work / "thesis.tex").write_text("years of work")
    line = _refused(_args(data, work), tmp_path)
    assert line == (f"error: {work}: holds files cirkit did not write; cirkit only replaces a checkpoint folder it "
                    "created, so choose a new or empty folder")


def test_a_finished_run_is_not_overwritten_and_its_settings_are_compared(data, tmp_path):
    # Issue 14: the same command again reports the finished run (exit 0) and rewrites nothing;
    # other settings are refused, naming --init (before: both refused with "already holds a checkpoint").
    out = tmp_path / "run"
    ok(_args(data, out, 2))
    before = _snapshot(out)
    again = ok(_args(data, out, 2))
    assert again["details"]["already_complete"] is True and again["counts"]["steps"] == 2
    assert _snapshot(out) == before
    line = _refused(_args(data, out, 3), tmp_path)
    assert line == (f"error: {out}: already holds a finished run of 2 steps with other settings (max_steps: 2 -> 3); "
                    f"to train on from it, pass --init {out} with a new --output (or choose another --output to "
                    "start over)")
    assert _snapshot(out) == before


def test_files_added_to_a_checkpoint_folder_survive_its_next_save(data, tmp_path):
    out = tmp_path / "run"
    ok([*_args(data, out, 4), "--save-every", "2"][:-2] + ["--save-every", "2"])  # full run, saves at 2 and 4
    (out / "eval.json").write_text('{"R@1": 1}')
    from cirkit.train import run
    from cirkit.train.plugin import TrainConfig
    from cirkit.train.vit import VitTrainPlugin

    cfg = TrainConfig(backbone="vit", stage="1", data=data, output=tmp_path / "run2", model="cirkit-tiny", max_steps=4,
                      batch_size=4, lr=1e-3, warmup_steps=1, num_workers=0, log_every=1, save_every=0)
    from cirkit.train.loop import train

    train(cfg, VitTrainPlugin(cfg), stop_at=2)
    (tmp_path / "run2" / "notes.txt").write_text("keep")
    run(cfg)  # the same settings: continues the interrupted run and saves twice more
    assert (tmp_path / "run2" / "notes.txt").read_text() == "keep"
    assert (out / "eval.json").read_text() == '{"R@1": 1}'


# -- one writer ---------------------------------------------------------------------------------------
HOLD = """
import sys, time
from cirkit.io.lock import output_lock
with output_lock(sys.argv[1], what="checkpoint"):
    print("holding", flush=True)
    time.sleep(float(sys.argv[2]))
"""


def _holder(out: Path, seconds: float) -> subprocess.Popen:
    proc = subprocess.Popen([sys.executable, "-c", HOLD, str(out), str(seconds)], env=cli_env(),
                            stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "holding"
    return proc


def test_a_second_writer_fails_at_once_naming_the_holder(data, tmp_path):
    out = tmp_path / "run"
    holder = _holder(out, 60)
    try:
        t0 = time.monotonic()
        line = fails(_args(data, out))
        assert time.monotonic() - t0 < 30
        assert line.startswith(f"error: {out}: another cirkit run is writing this checkpoint (pid {holder.pid} on ")
        assert line.endswith("wait for it to finish, or pass --wait to queue behind it")
        assert not out.exists()
    finally:
        holder.kill()
        holder.wait()
    ok(_args(data, out, 1))  # a killed holder's lock is free again


def test_two_real_training_runs_into_one_output(data, tmp_path):
    out = tmp_path / "run"
    first = spawn(_args(data, out, 400))
    try:
        deadline = time.monotonic() + 120
        while not (out / "metrics.jsonl").exists():
            assert first.poll() is None and time.monotonic() < deadline, "the first run never started"
            time.sleep(0.05)
        line = fails(_args(data, out, 400))
        assert f"another cirkit run is writing this checkpoint (pid {first.pid} on " in line
    finally:
        first.send_signal(signal.SIGKILL)
        first.wait()
        first.stderr.close()
    lines = read_lines(out / "metrics.jsonl") if (out / "metrics.jsonl").read_bytes().endswith(b"\n") else []
    assert len({m["step"] for m in lines}) == len(lines)  # one writer: no step logged twice


def test_wait_queues_behind_the_holder(data, tmp_path):
    from cirkit.train import run
    from cirkit.train.plugin import TrainConfig

    out = tmp_path / "run"
    cfg = TrainConfig(backbone="vit", stage="1", data=data, output=out, model="cirkit-tiny", max_steps=1,
                      batch_size=4, warmup_steps=1, num_workers=0, log_every=1, save_every=0)
    cfg.wait = True  # the `wait` setting (TrainConfig field and --wait flag come from the settings change)
    holder = _holder(out, 2)
    t0 = time.monotonic()
    try:
        assert run(cfg).counts["steps"] == 1
        assert holder.poll() is not None and time.monotonic() - t0 > 1.0
    finally:
        holder.kill()
        holder.wait()


# -- damaged checkpoints: one line naming the file ------------------------------------------------------
@pytest.fixture
def ck(vit_checkpoint, tmp_path) -> Path:
    import shutil

    return Path(shutil.copytree(vit_checkpoint, tmp_path / "ck"))


def _embed(ck: Path, tmp_path: Path) -> list[str]:
    png_folder(tmp_path / "g", 2)
    return ["embed", str(tmp_path / "g"), "--model", str(ck), "-o", str(tmp_path / "g.lance"), "--num-workers", "0"]


def _edit_config(ck: Path, **changes) -> None:
    cfg = json.loads((ck / "config.json").read_text())
    for k, v in changes.items():
        if v is ...:
            cfg.pop(k)
        else:
            cfg[k] = v
    (ck / "config.json").write_text(json.dumps(cfg))


@pytest.mark.parametrize("cut", [0.5, 0.999, 8])
def test_truncated_weights_are_one_line(ck, tmp_path, cut):
    w = ck / "model.safetensors"
    raw = w.read_bytes()
    w.write_bytes(raw[: int(len(raw) * cut) if cut < 1 else cut])
    line = fails(_embed(ck, tmp_path))
    assert line.startswith(f"error: {w}: ") and ("truncated" in line or "not a safetensors file" in line)
    assert line.endswith("re-save or re-train the checkpoint")


def test_weights_that_are_not_safetensors_are_one_line(ck, tmp_path):
    (ck / "model.safetensors").write_bytes(b"\x80\x04garbage that is not safetensors")
    line = fails(_embed(ck, tmp_path))
    assert line.startswith(f"error: {ck / 'model.safetensors'}: not a safetensors file")


@pytest.mark.parametrize("changes, problem", [
    ({"null_text": 0}, "'null_text' must be a string, not 0"),
    ({"model": ...}, "missing 'model' (a string)"),
    ({"embed_dim": "32"}, "'embed_dim' must be an integer, not '32'"),
    ({"cross_attn": "yes"}, "'cross_attn' must be true or false, not 'yes'"),
    ({"cross_attn_layers": [0, "1"]}, "'cross_attn_layers' must be a list of block indexes or null, not [0, '1']"),
    ({"predictor_hidden": 1.5}, "'predictor_hidden' must be an integer or null, not 1.5"),
    ({"weights": "../outside.safetensors"},
     "'weights' must be a file name inside the checkpoint folder, not '../outside.safetensors'"),
    ({"backbone": "vvit"}, "'backbone' must be one of vit, mllm, reformulator, not 'vvit'"),
])
def test_config_with_a_missing_or_wrong_typed_key_is_one_line(ck, tmp_path, changes, problem):
    _edit_config(ck, **changes)
    line = fails(_embed(ck, tmp_path))
    assert line == f"error: {ck / 'config.json'}: {problem}; the checkpoint config is damaged, re-save or re-train it"


@pytest.mark.parametrize("content", [b"", b"[1, 2]\n", b"\xff\xfe\x00garbage"])
def test_config_that_is_not_a_json_object(ck, tmp_path, content):
    (ck / "config.json").write_bytes(content)
    line = fails(_embed(ck, tmp_path))
    if content == b"[1, 2]\n":
        assert line == (f"error: {ck / 'config.json'}: not a JSON object; the checkpoint config is damaged, "
                        "re-save or re-train it")
    else:
        assert line.startswith(f"error: {ck / 'config.json'}: not valid JSON")


def test_init_from_a_damaged_checkpoint_is_one_line_before_training(ck, data, tmp_path):
    raw = (ck / "model.safetensors").read_bytes()
    (ck / "model.safetensors").write_bytes(raw[:-10])
    line = fails([*_args(data, tmp_path / "s2", 1), "--init", str(ck)])
    assert line.startswith(f"error: {ck / 'model.safetensors'}: truncated")


@pytest.mark.parametrize("damage", ["state", "optimizer", "train_args"])
def test_resume_from_a_damaged_trainer_state_is_one_line(data, tmp_path, damage):
    from cirkit.train.loop import train
    from cirkit.train.plugin import TrainConfig
    from cirkit.train.vit import VitTrainPlugin

    out = tmp_path / "run"
    cfg = TrainConfig(backbone="vit", stage="1", data=data, output=out, model="cirkit-tiny", max_steps=4,
                      batch_size=4, lr=1e-3, warmup_steps=1, num_workers=0, log_every=1, save_every=0)
    train(cfg, VitTrainPlugin(cfg), stop_at=2)
    if damage == "state":
        (out / "trainer_state" / "state.json").write_text('{"step": 2')
        want = f"error: {out / 'trainer_state' / 'state.json'}: not valid JSON"
    elif damage == "optimizer":
        (out / "trainer_state" / "optimizer.safetensors").write_bytes(b"\x00" * 4)
        want = f"error: {out / 'trainer_state' / 'optimizer.safetensors'}: not a safetensors file"
    else:
        (out / "train_args.json").unlink()
        want = f"error: {out / 'train_args.json'}: missing; the checkpoint has no record of its settings"
    for extra in ([], ["--resume"]):
        assert fails([*_args(data, out, 4), *extra]).startswith(want)


# -- killed saves, Ctrl-C -------------------------------------------------------------------------------
SLOW_SAVE = """
import sys, time
from pathlib import Path
import cirkit.checkpoint as ck
real = ck.save_trainer_state
def stall(folder, state):
    real(folder, state)
    if state.step == int(sys.argv[2]):
        Path(sys.argv[1]).write_text("inside the save")
        time.sleep(120)
ck.save_trainer_state = stall
from cirkit.cli import app
app(sys.argv[3:], prog_name="cirkit")
"""


def test_a_save_killed_midway_leaves_the_last_checkpoint_and_its_temp_is_removed(data, tmp_path):
    ref = tmp_path / "ref"
    ok([*_args(data, ref, 6)[:-2], "--save-every", "2"])
    out = tmp_path / "run"
    args = [*_args(data, out, 6)[:-2], "--save-every", "2"]
    flag = tmp_path / "in-save"
    proc = subprocess.Popen([sys.executable, "-c", SLOW_SAVE, str(flag), "4", "-q", *args], env=cli_env(),
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    assert kill_when(proc, flag.exists), "the run finished before its second save"
    temps = [p for p in tmp_path.iterdir() if p.name.startswith(".run.cirkit-tmp-")]
    assert len(temps) == 1 and (temps[0] / "trainer_state" / "state.json").exists()  # the half-made save
    assert json.loads((out / "trainer_state" / "state.json").read_text())["step"] == 2  # the last complete one

    summary = ok(args)  # the same command: continues from step 2, removes the dead save's temp
    assert summary["counts"]["steps"] == 6
    assert not [p for p in tmp_path.iterdir() if ".cirkit-tmp-" in p.name or ".cirkit-old-" in p.name]
    _same_run(out, ref)


def test_ctrl_c_saves_the_step_and_the_same_command_resumes(data, tmp_path):
    ref = tmp_path / "ref"
    ok(_args(data, ref, 60))
    out = tmp_path / "run"
    args = _args(data, out, 60)  # --save-every 0, like the CPU recipes: nothing would be saved before the end
    proc = spawn(args)
    deadline = time.monotonic() + 120
    while len(read_lines(out / "metrics.jsonl") if (out / "metrics.jsonl").exists()
               and (out / "metrics.jsonl").read_bytes().endswith(b"\n") else []) < 2:
        assert proc.poll() is None and time.monotonic() < deadline, proc.stderr.read().decode()[-2000:]
        time.sleep(0.02)
    proc.send_signal(signal.SIGINT)
    assert proc.wait(timeout=120) == 130
    err = proc.stderr.read().decode()
    proc.stderr.close()
    assert "Traceback" not in err
    last = [x for x in err.splitlines() if x.strip()][-1]
    step = json.loads((out / "trainer_state" / "state.json").read_text())["step"]
    assert 2 <= step < 60
    assert last == f"error: interrupted: saved {out} at step {step} of 60; run the same command again to resume"
    assert [m["step"] for m in read_lines(out / "metrics.jsonl")] == list(range(1, step + 1))

    summary = ok(args)  # exactly the same command, no --resume
    assert summary["counts"]["steps"] == 60
    _same_run(out, ref)


def test_ctrl_c_before_the_first_step_says_nothing_was_saved(data, tmp_path, monkeypatch):
    from cirkit.train import vit as vit_train

    def interrupted(self):
        raise KeyboardInterrupt

    monkeypatch.setattr(vit_train.VitTrainPlugin, "build", interrupted)
    r = invoke(["-q", *_args(data, tmp_path / "run")])
    assert r.exit_code == 130
    assert r.stderr.strip() == (f"error: interrupted before any step was saved; nothing was saved to {tmp_path / 'run'}, "
                                "so running the same command again starts from the beginning")


def _interrupt_at(step: int, times: int = 1):
    """A vit plugin that presses Ctrl-C ``times`` times after optimiser step ``step``."""
    from cirkit.train.vit import VitTrainPlugin

    class Plugin(VitTrainPlugin):
        def after_step(self, model, s):
            super().after_step(model, s)
            if s == step:
                for _ in range(times):
                    signal.raise_signal(signal.SIGINT)

    return Plugin


def test_ctrl_c_in_process_finishes_the_step_saves_and_resumes_exactly(data, tmp_path):
    from cirkit.errors import CirkitError
    from cirkit.train import run
    from cirkit.train.loop import Interrupted, train
    from cirkit.train.plugin import TrainConfig

    def cfg(out):
        return TrainConfig(backbone="vit", stage="2" if False else "1", data=data, output=out, model="cirkit-tiny",
                           max_steps=5, batch_size=4, lr=1e-3, warmup_steps=1, num_workers=0, log_every=1,
                           save_every=0)

    run(cfg(tmp_path / "ref"))
    c = cfg(tmp_path / "run")
    before = signal.getsignal(signal.SIGINT)  # Python's default, or SIG_IGN when the suite runs as a background job
    with pytest.raises(Interrupted) as e:
        train(c, _interrupt_at(2)(c))
    assert isinstance(e.value, CirkitError) and e.value.exit_code == 130
    assert str(e.value) == f"interrupted: saved {tmp_path / 'run'} at step 2 of 5; run the same command again to resume"
    assert signal.getsignal(signal.SIGINT) is before  # the handler is put back
    run(c)
    _same_run(tmp_path / "run", tmp_path / "ref")

    # A second Ctrl-C stops at once: nothing new is saved, and the message says what the folder holds.
    c2 = cfg(tmp_path / "twice")
    with pytest.raises(Interrupted, match="interrupted before any step was saved; nothing was saved"):
        train(c2, _interrupt_at(2, times=2)(c2))
    run(c2)  # starts again from the beginning
    _same_run(tmp_path / "twice", tmp_path / "ref")


def test_the_same_command_with_other_settings_does_not_continue_an_interrupted_run(data, tmp_path):
    from cirkit.train.loop import train
    from cirkit.train.plugin import TrainConfig
    from cirkit.train.vit import VitTrainPlugin

    out = tmp_path / "run"
    cfg = TrainConfig(backbone="vit", stage="1", data=data, output=out, model="cirkit-tiny", max_steps=4,
                      batch_size=4, lr=1e-3, warmup_steps=1, num_workers=0, log_every=1, save_every=0)
    train(cfg, VitTrainPlugin(cfg), stop_at=2)
    line = fails([*_args(data, out, 4)[:-10], "--batch-size", "4", "--lr", "2e-3", "--warmup-steps", "1",
                  "--num-workers", "0", "--log-every", "1", "--save-every", "0"])
    assert line == (f"error: {out}: holds an interrupted run (step 2 of 4) with other settings (lr: 0.001 -> 0.002); "
                    "run it with its own settings to continue it, or choose another --output")


# -- unreadable training images ----------------------------------------------------------------------------
@pytest.fixture
def broken_data(data, tmp_path) -> Path:
    import shutil

    root = Path(shutil.copytree(data.parent, tmp_path / "d"))
    (root / "imgs" / "im003.png").write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    return root / "captions.jsonl"


def test_unreadable_training_images_are_counted_in_the_summary(broken_data, tmp_path):
    summary = ok(_args(broken_data, tmp_path / "run", 6))  # two epochs: the image is met twice, counted once
    bad = str((broken_data.parent / "imgs" / "im003.png").resolve())
    assert summary["skipped"] == 1
    assert [s["item"] for s in summary["skipped_items"]] == [bad]
    assert summary["counts"]["steps"] == 6


def test_strict_fails_on_the_first_unreadable_training_image(broken_data, tmp_path):
    from cirkit.errors import CirkitError
    from cirkit.train import run
    from cirkit.train.plugin import TrainConfig

    cfg = TrainConfig(backbone="vit", stage="1", data=broken_data, output=tmp_path / "run", model="cirkit-tiny",
                      max_steps=6, batch_size=4, warmup_steps=1, num_workers=0, log_every=1, save_every=0)
    cfg.strict = True  # the `strict` setting (TrainConfig field and --strict flag come from the settings change)
    bad = (broken_data.parent / "imgs" / "im003.png").resolve()
    with pytest.raises(CirkitError, match=rf"^{bad}: .*\(--strict stops at the first unreadable training image\)$"):
        run(cfg)


def test_a_batch_with_too_few_readable_images_is_one_line(data, tmp_path):
    import shutil

    root = Path(shutil.copytree(data.parent, tmp_path / "d"))
    for p in (root / "imgs").iterdir():
        p.write_bytes(b"not an image")
    line = fails(_args(root / "captions.jsonl", tmp_path / "run", 2, "--num-workers", "1"))
    assert line.startswith("error: a training batch has 0 readable examples, fewer than the 2 in-batch contrastive "
                           "training needs (4 of its images could not be decoded, e.g. ")
    assert line.endswith("fix or remove them); or raise --batch-size")


def test_ctrl_c_while_a_resumed_run_loads_says_what_the_folder_holds(data, tmp_path, monkeypatch):
    from cirkit.train import vit as vit_train
    from cirkit.train.loop import train
    from cirkit.train.plugin import TrainConfig
    from cirkit.train.vit import VitTrainPlugin

    out = tmp_path / "run"
    cfg = TrainConfig(backbone="vit", stage="1", data=data, output=out, model="cirkit-tiny", max_steps=4,
                      batch_size=4, lr=1e-3, warmup_steps=1, num_workers=0, log_every=1, save_every=0)
    train(cfg, VitTrainPlugin(cfg), stop_at=2)

    def interrupted(self):
        raise KeyboardInterrupt

    monkeypatch.setattr(vit_train.VitTrainPlugin, "build", interrupted)
    r = invoke(["-q", *_args(data, out, 4)])
    assert r.exit_code == 130
    assert r.stderr.strip() == (f"error: interrupted; {out} holds step 2 of 4 (its last save): "
                                "run the same command again to resume from there")
