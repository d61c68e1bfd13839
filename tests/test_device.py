"""cirkit.device: one precision table and one device check, used by every loading path alike."""

from __future__ import annotations

import ast
from pathlib import Path
from types import SimpleNamespace

import pytest

torch = pytest.importorskip("torch")

from cirkit.device import (  # noqa: E402
    PRECISIONS,
    mixed_precision,
    pick_device,
    pick_dtype,
    precision_name,
    resolve_precision,
)
from cirkit.errors import CirkitError  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
CPU = torch.device("cpu")
SPELLINGS = {
    "auto": "auto", "AUTO": "auto", None: "auto", "": "auto",
    "fp32": "fp32", "float32": "fp32", "FP32": "fp32", " float32 ": "fp32",
    "bf16": "bf16", "bfloat16": "bf16", "BF16": "bf16", "BFloat16": "bf16",
    "fp16": "fp16", "float16": "fp16", "half": "fp16", "Half": "fp16", "HALF": "fp16",
}
# Each of these was accepted somewhere before (silently as fp32 by vit and mllm; "no" by train).
UNKNOWN = ["garbage", "no", "fp64", "float64", "double", "int8", "fp8", "bf 16", "32", "float", "autocast"]
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


# -- the table --------------------------------------------------------------------------------
@pytest.mark.parametrize("text,name", SPELLINGS.items())
def test_every_spelling_has_one_meaning(text, name):
    assert precision_name(text) == name
    want = "fp32" if name == "auto" else name  # auto is fp32 on a CPU
    assert resolve_precision(text, CPU) == want
    assert pick_dtype(text, CPU) == DTYPES[want]
    assert mixed_precision(text, CPU) == {"fp32": "no", "bf16": "bf16", "fp16": "fp16"}[want]


@pytest.mark.parametrize("text", UNKNOWN)
def test_unknown_precision_is_a_one_line_error_naming_the_choices(text):
    for parse in (precision_name, lambda t: pick_dtype(t, CPU), lambda t: mixed_precision(t, CPU)):
        with pytest.raises(CirkitError) as e:
            parse(text)
        msg = str(e.value)
        assert "\n" not in msg and repr(text) in msg
        assert all(choice in msg for choice in ("auto", "fp32", "bf16", "fp16", "half"))


def test_the_table_covers_exactly_the_documented_names():
    assert set(PRECISIONS) == {"auto", "fp32", "float32", "bf16", "bfloat16", "fp16", "float16", "half"}
    assert set(PRECISIONS.values()) == {"auto", "fp32", "bf16", "fp16"}


def _fake_cuda(monkeypatch, major: int = 8, count: int = 1, hip: str | None = None):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: count)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda i: SimpleNamespace(major=major))
    monkeypatch.setattr(torch.version, "hip", hip)


@pytest.mark.parametrize("major,hip,want", [(9, None, "bf16"), (8, None, "bf16"), (7, None, "fp32"),
                                            (6, "6.0", "bf16")])
def test_auto_is_bf16_only_on_gpus_with_native_bf16(monkeypatch, major, hip, want):
    _fake_cuda(monkeypatch, major, count=2, hip=hip)
    assert resolve_precision("auto", torch.device("cuda")) == want
    assert resolve_precision("auto", torch.device("cuda:1")) == want
    assert resolve_precision(None, None) == want  # None: the device pick_device chooses (cuda here)
    assert mixed_precision("auto") == {"bf16": "bf16", "fp32": "no"}[want]
    # An explicit choice is honoured whatever the hardware.
    assert resolve_precision("fp16", torch.device("cuda")) == "fp16"
    assert resolve_precision("bf16", CPU) == "bf16"


def test_auto_is_fp32_on_mps_and_cpu():
    assert resolve_precision("auto", torch.device("mps")) == "fp32"
    assert resolve_precision("auto", "cpu") == "fp32"


# -- devices ------------------------------------------------------------------------------------
def _no_accelerators(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)


def test_auto_device_prefers_cuda_then_mps_then_cpu(monkeypatch):
    _no_accelerators(monkeypatch)
    for name in (None, "", "auto", "AUTO"):
        assert pick_device(name) == CPU
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: True)
    assert pick_device(None).type == "mps"
    _fake_cuda(monkeypatch)
    assert pick_device("auto").type == "cuda"


def test_named_devices_are_checked_before_anything_loads(monkeypatch):
    _no_accelerators(monkeypatch)
    assert pick_device("cpu") == CPU and pick_device(" CPU ") == CPU
    cases = {"cuda": "CUDA is not available", "cuda:0": "CUDA is not available", "mps": "MPS is not available",
             "gpu": "use auto, cpu", "cuda:x": "use auto, cpu", "cuda:-1": "use auto, cpu",
             "meta": "cirkit runs on", "xpu": "cirkit runs on"}
    for name, fragment in cases.items():
        with pytest.raises(CirkitError, match=fragment) as e:
            pick_device(name)
        assert "\n" not in str(e.value) and repr(name) in str(e.value)


def test_a_gpu_index_past_the_last_gpu_is_an_error(monkeypatch):
    _fake_cuda(monkeypatch, count=1)
    assert pick_device("cuda:0") == torch.device("cuda:0")
    with pytest.raises(CirkitError, match=r"'cuda:7': this machine has 1 CUDA device\(s\), cuda:0 to cuda:0"):
        pick_device("cuda:7")


# -- every loading path parses through the one table --------------------------------------------
CASES = {"half": torch.float16, "BF16": torch.bfloat16, " float32 ": torch.float32, None: torch.float32}


@pytest.fixture(scope="module")
def tiny_models(tmp_path_factory):
    from cirkit.testing import build_tiny_causal_lm, build_tiny_llava

    root = tmp_path_factory.mktemp("device-models")
    return {"lm": str(build_tiny_causal_lm(root / "lm")), "llava": str(build_tiny_llava(root / "llava"))}


def _loaders(models):
    """Each place a --precision string reaches a model, as a function of that string -> the dtype used."""
    from cirkit.backbones import load_backbone
    from cirkit.backbones.base import BackboneSpec
    from cirkit.generation import load_captioner, load_causal_lm

    def backbone(family, model):
        return lambda p: load_backbone(BackboneSpec(backbone=family, model=model, device="cpu", precision=p)).dtype

    return {
        "clip": backbone("clip", "cirkit-tiny"),
        "vit": backbone("vit", "cirkit-tiny"),
        "mllm": backbone("mllm", models["llava"]),
        "reformulate-lm": lambda p: load_causal_lm(models["lm"], device="cpu", precision=p).model.dtype,
        "caption": lambda p: load_captioner(models["llava"], device="cpu", precision=p).dtype,
    }


@pytest.mark.parametrize("text", list(CASES), ids=repr)
def test_the_same_string_loads_the_same_dtype_everywhere(tiny_models, text):
    got = {where: load(text) for where, load in _loaders(tiny_models).items()}
    assert got == {where: CASES[text] for where in got}


def test_unknown_precision_and_device_fail_the_same_way_everywhere_before_loading(tiny_models, monkeypatch):
    from cirkit.backbones import load_backbone
    from cirkit.backbones.base import BackboneSpec

    loaders = _loaders(tiny_models)
    loaders["fake"] = lambda p: load_backbone(BackboneSpec(backbone="fake", model="fake", precision=p))
    messages = {}
    for where, load in loaders.items():
        with pytest.raises(CirkitError) as e:
            load("garbage")
        messages[where] = str(e.value)
    expected = str(pytest.raises(CirkitError, precision_name, "garbage").value)
    assert messages == dict.fromkeys(loaders, expected)
    _no_accelerators(monkeypatch)
    for family, model in (("fake", "fake"), ("clip", "cirkit-tiny"), ("mllm", tiny_models["llava"])):
        with pytest.raises(CirkitError, match="CUDA is not available"):
            load_backbone(BackboneSpec(backbone=family, model=model, device="cuda:1"))
    from cirkit.generation import load_causal_lm
    from cirkit.text_embed import TextEmbedder

    for load in (lambda: TextEmbedder("no/such-model", device="cuda:1"),
                 lambda: load_causal_lm("no/such-model", device="cuda:1")):
        with pytest.raises(CirkitError, match="CUDA is not available"):  # not "cannot load": checked first
            load()


class _Stop(Exception):
    pass


@pytest.mark.parametrize("text,want", [("half", "fp16"), ("BF16", "bf16"), ("float32", "no"), ("auto", "no")])
def test_the_train_loop_hands_accelerate_the_same_precision(tmp_path, monkeypatch, text, want):
    import accelerate

    from cirkit.train import run
    from cirkit.train.plugin import TrainConfig

    _no_accelerators(monkeypatch)
    seen = {}

    def fake_accelerator(*args, **kwargs):
        seen.update(kwargs)
        raise _Stop

    monkeypatch.setattr(accelerate, "Accelerator", fake_accelerator)
    with pytest.raises(_Stop):
        run(TrainConfig(backbone="vit", stage="1", model="cirkit-tiny", output=tmp_path / "out", precision=text))
    assert seen["mixed_precision"] == want


def test_the_train_loop_refuses_an_unknown_precision_before_writing(tmp_path):
    from cirkit.train import run
    from cirkit.train.plugin import TrainConfig

    out = tmp_path / "out"
    with pytest.raises(CirkitError, match="unknown precision 'half-ish'"):
        run(TrainConfig(backbone="vit", stage="1", model="cirkit-tiny", output=out, precision="half-ish"))
    assert not out.exists()


# -- one home ---------------------------------------------------------------------------------
def _definitions() -> dict[str, list[str]]:
    """Top-level functions, classes and constants of every module in cirkit/, by name."""
    where: dict[str, list[str]] = {}
    for path in sorted((ROOT / "cirkit").rglob("*.py")):
        for node in ast.parse(path.read_text(encoding="utf-8")).body:
            names = []
            if isinstance(node, (ast.FunctionDef, ast.ClassDef)):
                names = [node.name]
            elif isinstance(node, ast.Assign):
                names = [t.id for t in node.targets if isinstance(t, ast.Name)]
            elif isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
                names = [node.target.id]
            for name in names:
                where.setdefault(name, []).append(str(path.relative_to(ROOT)))
    return where


def test_device_and_precision_have_one_home():
    where = _definitions()
    for name in ("pick_device", "pick_dtype", "precision_name", "resolve_precision", "mixed_precision",
                 "PRECISIONS", "ProcessInfo", "process_info", "shard_of"):
        assert where.get(name) == ["cirkit/device.py"], (name, where.get(name))
    for old in ("resolve_device", "_dtype_for", "_dtype", "_inference_dtype", "_embed_dim"):
        assert old not in where, (old, where[old])
    assert where.get("embed_dim") == ["cirkit/backbones/_openclip.py"]
