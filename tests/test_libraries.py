"""cirkit and the libraries under it (issue 14): their output, the hub offline, models users pass,
shipped recipes, ``cirkit doctor``, and finished stages that say what to do.
"""

from __future__ import annotations

import http.server
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from typer.testing import CliRunner

from cirkit.cli import app
from cirkit.errors import CirkitError

ROOT = Path(__file__).resolve().parents[1]


def invoke(*args, **kw):
    return CliRunner().invoke(app, [str(a) for a in args], **kw)


def one_error(res, code: int = 1) -> str:
    assert res.exit_code == code, (res.exit_code, res.stdout, res.stderr, res.exception)
    assert "Traceback" not in res.stderr
    lines = [x for x in res.stderr.splitlines() if x.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), res.stderr
    return lines[0]


def child(code: str, env: dict | None = None, timeout: float = 300) -> subprocess.CompletedProcess:
    full = {**os.environ, "PYTHONPATH": str(ROOT), "COLUMNS": "200", **(env or {})}
    for k, v in list(full.items()):
        if v is None:
            del full[k]
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=full, timeout=timeout)


# -- library logging, warnings and progress bars: one line each on stderr, through cirkit ------------
LIBRARY_NOISE = """
import sys, warnings
from cirkit.cli._common import setup_logging
setup_logging(verbose={verbose}, quiet=False)
import transformers
from transformers.utils import logging as tl
from huggingface_hub.utils import logging as hl, are_progress_bars_disabled
from datasets.utils import logging as dl
tl.get_logger("transformers.modeling_utils").warning("Some weights were not initialized")
tl.get_logger("transformers.modeling_utils").info("loading file model.safetensors")
hl.get_logger("huggingface_hub.file_download").warning("a hub warning")
dl.get_logger("datasets.load").warning("a datasets warning")
for _ in range(3):  # one place: shown once
    warnings.warn("`foo` is deprecated and will be removed", FutureWarning)
print("bars off" if are_progress_bars_disabled() and not tl.is_progress_bar_enabled() else "bars on", file=sys.stderr)
"""


@pytest.mark.slow
def test_library_messages_reach_stderr_once_each_through_cirkit():
    proc = child(LIBRARY_NOISE.format(verbose=False), env={"HF_HUB_DISABLE_PROGRESS_BARS": None})
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == ""
    lines = [ln.strip() for ln in proc.stderr.splitlines() if ln.strip()]
    assert lines == [
        "WARNING  transformers: Some weights were not initialized",
        "WARNING  huggingface_hub: a hub warning",
        "WARNING  datasets: a datasets warning",
        "WARNING  FutureWarning: `foo` is deprecated and will be removed",
        "bars off",
    ], proc.stderr


@pytest.mark.slow
def test_verbose_brings_back_library_info_and_progress_bars():
    proc = child(LIBRARY_NOISE.format(verbose=True), env={"HF_HUB_DISABLE_PROGRESS_BARS": None,
                                                          "HF_DATASETS_DISABLE_PROGRESS_BARS": None})
    assert proc.returncode == 0, proc.stderr
    assert "transformers: loading file model.safetensors" in proc.stderr  # INFO under -v
    assert "FutureWarning: `foo` is deprecated" in proc.stderr and "<string>:" in proc.stderr  # where, under -v
    assert proc.stderr.strip().splitlines()[-1] == "bars on"


@pytest.mark.slow
def test_training_progress_never_shows_loss_nan(synth_dir, tmp_path):
    """Under a terminal, the bar's loss reads '-' until the first logged step (was 'loss nan')."""
    import pty

    master, slave = pty.openpty()
    cmd = [sys.executable, "-m", "cirkit", "train", str(synth_dir / "captions.jsonl"), "--stage", "1", "-o",
           str(tmp_path / "s1"), "--model", "cirkit-tiny", "--max-steps", "3", "--log-every", "3", "--batch-size", "4",
           "--num-workers", "0", "--save-every", "0"]
    proc = subprocess.Popen(cmd, stdin=slave, stdout=slave, stderr=slave, env={
        **os.environ, "PYTHONPATH": str(ROOT), "COLUMNS": "120", "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"})
    os.close(slave)
    out = bytearray()
    while True:
        try:
            data = os.read(master, 65536)
        except OSError:
            break
        if not data:
            break
        out.extend(data)
    assert proc.wait(timeout=300) == 0, out.decode(errors="replace")[-2000:]
    text = out.decode(errors="replace")
    assert "train stage 1" in text and "loss -" in text and "loss nan" not in text


def test_progress_loss_text():
    from cirkit.train.loop import _shown_loss

    assert _shown_loss({"loss": float("nan")}) == "-"
    assert _shown_loss({"step": 3, "loss": 1.23456}) == "1.2346"
    assert _shown_loss({"step": 3, "loss": float("inf")}) == "-"


# -- the hub offline: one line at once, naming what to do --------------------------------------------
@pytest.fixture
def empty_cache(tmp_path, monkeypatch):
    from cirkit import hub

    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf-cache"))
    monkeypatch.setattr(hub, "_probed", {})
    return tmp_path / "hf-cache"


def test_offline_mode_and_a_model_not_in_the_cache(empty_cache, monkeypatch):
    from cirkit import hub

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(hub, "probe", lambda *a, **k: pytest.fail("no probe in offline mode"))
    with pytest.raises(CirkitError) as e:
        hub.check_model("llava-hf/llava-1.5-7b-hf", "captioning model", extra=", or import captions with --from FILE")
    assert str(e.value) == (
        f"llava-hf/llava-1.5-7b-hf: this captioning model is not in the local Hugging Face cache ({empty_cache}) and "
        "HF_HUB_OFFLINE is set, so it cannot be downloaded; download it where there is network (huggingface-cli "
        f"download llava-hf/llava-1.5-7b-hf) and copy {empty_cache} here, or pass a local model folder "
        "(-m path/to/folder), or import captions with --from FILE")
    snap = empty_cache / "models--llava-hf--llava-1.5-7b-hf" / "snapshots" / "abc123"
    snap.mkdir(parents=True)
    (snap / "config.json").write_text("{}")
    hub.check_model("llava-hf/llava-1.5-7b-hf")  # cached: loads from the cache
    hub.check_model(str(snap))  # a local folder is never checked


class _Hub(http.server.BaseHTTPRequestHandler):
    status = 503

    def do_HEAD(self):  # noqa: N802 - the http.server API
        self.send_response(self.status)
        self.end_headers()

    def log_message(self, *args):
        pass


@pytest.fixture
def failing_hub(monkeypatch):
    server = http.server.HTTPServer(("127.0.0.1", 0), _Hub)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{server.server_port}")
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
    yield server
    server.shutdown()


def test_a_failing_hub_is_one_line_and_a_cached_model_goes_offline(empty_cache, failing_hub, monkeypatch):
    from cirkit import hub

    with pytest.raises(CirkitError, match=r"cannot download this language model: http://127.0.0.1:\d+ is "
                                          r"unreachable \(it answers HTTP 503\) and it is not in the local Hugging "
                                          r"Face cache .*; set HF_HUB_OFFLINE=1 to skip this check$"):
        hub.check_model("org/lm", "language model")
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    snap = empty_cache / "models--org--lm" / "snapshots" / "r1"
    snap.mkdir(parents=True)
    (snap / "config.json").write_text("{}")
    hub.check_model("org/lm")
    assert os.environ["HF_HUB_OFFLINE"] == "1"  # no retries while loading it from the cache
    _Hub.status = 404  # reachable: the hub decides (a private or missing repo is its own error)
    monkeypatch.setattr(hub, "_probed", {})
    assert hub.probe() is None
    _Hub.status = 503


@pytest.mark.slow
@pytest.mark.parametrize("offline", [True, False])
def test_caption_with_an_unreachable_hub_fails_fast_in_one_line(tmp_path, offline):
    from PIL import Image

    (tmp_path / "photos").mkdir()
    Image.new("RGB", (8, 8), "red").save(tmp_path / "photos" / "a.png")
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_CACHE": str(tmp_path / "cache"), "COLUMNS": "300"}
    env.pop("TRANSFORMERS_OFFLINE", None)
    if offline:
        env["HF_HUB_OFFLINE"] = "1"
    else:
        env.pop("HF_HUB_OFFLINE", None)
        env["HF_ENDPOINT"] = "http://127.0.0.1:9"  # the discard port: connection refused at once
    t0 = time.monotonic()
    proc = subprocess.run([sys.executable, "-m", "cirkit", "caption", "photos", "-o", "c.jsonl", "-m",
                           "Salesforce/blip-image-captioning-base", "--num-workers", "0"], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=300)
    took = time.monotonic() - t0
    assert proc.returncode == 1 and "Traceback" not in proc.stderr and "Retrying" not in proc.stderr, proc.stderr
    line = [x for x in proc.stderr.splitlines() if x.startswith("error:")]
    assert len(line) == 1 and "--from FILE" in line[0] and str(tmp_path / "cache") in line[0]
    assert ("HF_HUB_OFFLINE is set" if offline else "is unreachable") in line[0]
    assert took < 60, f"took {took:.0f} s"  # the libraries' own retries took 36-62 s before any message


def test_other_stages_check_the_hub_too(empty_cache, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    line = one_error(invoke("-q", "reformulate", _captions_file(empty_cache.parent), "-o",
                            empty_cache.parent / "t.jsonl", "-m", "Qwen/Qwen2.5-1.5B-Instruct"))
    assert "Qwen/Qwen2.5-1.5B-Instruct: this language model is not in the local Hugging Face cache" in line
    line = one_error(invoke("-q", "embed", empty_cache.parent, "--backbone", "mllm", "-m", "llava-hf/llava-1.5-7b-hf",
                            "-o", empty_cache.parent / "g.lance"))
    assert "llava-hf/llava-1.5-7b-hf: this multimodal model is not in the local Hugging Face cache" in line
    line = one_error(invoke("-q", "embed", empty_cache.parent, "--backbone", "clip", "-m", "ViT-B-32", "--pretrained",
                            "openai", "-o", empty_cache.parent / "g.lance"))
    assert "timm/vit_base_patch32_clip_224.openai: this open_clip model (ViT-B-32, weights openai) is not in" in line
    assert "or pass a local weights file (--pretrained path/to/open_clip_model.safetensors)" in line


def _captions_file(folder: Path) -> Path:
    from PIL import Image

    (folder / "img").mkdir(exist_ok=True)
    rows = []
    for n in ("red", "blue", "green"):
        Image.new("RGB", (8, 8), n).save(folder / "img" / f"{n}.png")
        rows.append(json.dumps({"id": n, "image": f"img/{n}.png", "caption": f"a {n} circle"}))
    path = folder / "captions.jsonl"
    path.write_text("\n".join(rows) + "\n")
    return path


# -- every model a user can pass to caption works or fails in one line --------------------------------
TEXT_ONLY_TEMPLATE = ("{% for m in messages %}<|im_start|>{{ m['role'] + ' ' + m['content'] }}<|im_end|> "
                      "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant {% endif %}")


@pytest.fixture(scope="module")
def text_template_llava(tmp_path_factory):
    """A LLaVA whose processor has only its LLM's text chat template, as the offline SmolLM2 demo MLLM has."""
    from transformers import AutoProcessor

    from cirkit.testing import build_tiny_llava

    folder = build_tiny_llava(tmp_path_factory.mktemp("demo") / "llava")
    processor = AutoProcessor.from_pretrained(folder)
    processor.chat_template = TEXT_ONLY_TEMPLATE
    processor.tokenizer.chat_template = TEXT_ONLY_TEMPLATE
    processor.save_pretrained(folder)
    return folder


def test_caption_with_a_text_only_chat_template_works(text_template_llava, tmp_path):
    photos = tmp_path / "photos"
    _captions_file(tmp_path)
    photos.mkdir()
    res = invoke("caption", tmp_path / "img", "-o", tmp_path / "c.jsonl", "-m", text_template_llava,
                 "--max-new-tokens", "3", "--num-workers", "0", "--json")
    assert res.exit_code == 0, (res.stderr, res.exception)
    assert json.loads(res.stdout)["counts"]["captioned"] == 3
    from cirkit.generation import chat_with_image, load_captioner

    text = chat_with_image(load_captioner(str(text_template_llava)).processor, "Describe it.")
    assert text.startswith("<|im_start|>user <image>\nDescribe it.")


def test_caption_models_that_cannot_caption_fail_in_one_line(tmp_path):
    from cirkit.testing import build_tiny_causal_lm

    _captions_file(tmp_path)
    lm = build_tiny_causal_lm(tmp_path / "lm")
    (tmp_path / "empty").mkdir()
    (tmp_path / "weights.gguf").write_bytes(b"GGUF not really")
    for model, want in ((lm, "a 'llama' model cannot caption images"),
                        (tmp_path / "empty", "cannot load captioning model"),
                        (tmp_path / "weights.gguf", "cannot load captioning model")):
        line = one_error(invoke("-q", "caption", tmp_path / "img", "-o", tmp_path / "c.jsonl", "-m", model,
                                "--num-workers", "0"))
        assert want in line, line


# -- shipped recipes: package data, by name from anywhere, listed -------------------------------------
def test_recipes_ship_inside_the_package_and_the_clone_links_them():
    import tomllib

    from cirkit.config import RECIPES

    assert RECIPES == ROOT / "cirkit" / "recipes" and (ROOT / "recipes").resolve() == RECIPES
    globs = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"]["cirkit"]
    assert any(Path("recipes/x.yaml").match(g) or g == "**/*.yaml" for g in globs)
    assert sorted(RECIPES.glob("*.yaml")) and not list(RECIPES.glob("*.yml"))


def test_a_recipe_by_name_or_clone_path_from_any_folder(tmp_path, monkeypatch):
    from cirkit.config import RECIPES, find_recipe, resolve
    from cirkit.train.config import TrainConfig

    monkeypatch.chdir(tmp_path)
    for ref in ("vit-synth-cpu", "vit-synth-cpu.yaml", "recipes/vit-synth-cpu.yaml"):
        assert find_recipe(ref) == RECIPES / "vit-synth-cpu.yaml"
        cfg = resolve(TrainConfig, ref, {"data": Path("d.jsonl"), "output": Path("o")}, section="train")
        assert cfg.model == "cirkit-tiny"
    (tmp_path / "recipes").mkdir()
    (tmp_path / "recipes" / "vit-synth-cpu.yaml").write_text("train:\n  model: mine\n")  # a user's own file wins
    assert resolve(TrainConfig, "recipes/vit-synth-cpu.yaml", {}, section="train").model == "mine"
    with pytest.raises(CirkitError, match=r"^no-such: recipe not found; give a YAML file or a shipped recipe's name "
                                          r"\(caption-blip, .*'cirkit recipes' describes them\)$"):
        find_recipe("no-such")
    with pytest.raises(CirkitError, match="recipe not found"):
        find_recipe("elsewhere/vit-synth-cpu.yaml")  # another folder is not silently replaced by a shipped file


def test_cirkit_recipes_lists_and_prints_them():
    from cirkit.config import RECIPES

    res = invoke("recipes", "--json")
    assert res.exit_code == 0, res.stderr
    listed = {r["name"]: r for r in json.loads(res.stdout)}
    assert set(listed) == {p.stem for p in RECIPES.glob("*.yaml")}
    assert listed["eval-cirr"]["command"] == "evaluate" and listed["vit-synth-cpu"]["command"] == "train"
    assert listed["caption-blip"]["description"].startswith("Plain image-to-text captions with BLIP")
    assert all(r["description"] for r in listed.values())
    table = invoke("recipes", env={"COLUMNS": "250"})
    assert table.exit_code == 0 and "index-ann" in table.stdout and "index " in table.stdout
    shown = invoke("recipes", "eval-cirr")
    assert shown.exit_code == 0 and shown.stdout == (RECIPES / "eval-cirr.yaml").read_text()
    assert "recipe not found" in one_error(invoke("recipes", "nope"))


# -- cirkit doctor ---------------------------------------------------------------------------------------
@pytest.mark.slow
def test_doctor_is_fast_torch_free_and_reports_the_environment():
    probe = ("import sys, json, io, contextlib\nfrom cirkit.cli import app\nbuf = io.StringIO()\n"
             "with contextlib.redirect_stdout(buf):\n    try:\n        app(['doctor', '--json'], prog_name='cirkit')\n"
             "    except SystemExit as e:\n        assert e.code in (0, None), e.code\n"
             "heavy = [m for m in ('torch', 'transformers', 'open_clip', 'lancedb') if m in sys.modules]\n"
             "assert not heavy, heavy\nprint(buf.getvalue())\n")
    proc = child(probe, env={"HF_HUB_OFFLINE": "1"})
    assert proc.returncode == 0, proc.stderr
    data = json.loads(proc.stdout)
    for pkg in ("torch", "transformers", "open_clip_torch", "lancedb", "accelerate", "peft", "datasets"):
        assert data["versions"][pkg], pkg
    assert data["cirkit"] and data["python"] == ".".join(map(str, sys.version_info[:3]))
    assert data["hub"]["offline_mode"] is True and "HF_HUB_OFFLINE" in data["hub"]["models_load_from"]
    assert set(data["demo_models"]) == {"SmolLM2-135M-Instruct (GGUF)", "all-MiniLM-L6-v2"}
    assert set(data["extras"]) >= {"serve", "llama-cpp"} and "devices" not in data


def test_doctor_devices_and_text(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    res = invoke("doctor", "--devices", "--json")
    assert res.exit_code == 0, res.stderr
    data = json.loads(res.stdout)
    assert data["devices"][0] == {"device": "cpu", "bf16": False}
    assert data["precision_auto"] in ("fp32", "bf16") and data["default_device"]
    text = invoke("doctor", env={"COLUMNS": "300"})
    assert text.exit_code == 0 and "offline mode: on (HF_HUB_OFFLINE)" in text.stdout
    assert "demo model SmolLM2-135M-Instruct (GGUF)" in text.stdout and "extra serve:" in text.stdout


# -- finished work: reported, or one line naming the fix ------------------------------------------------
def test_too_few_examples_for_one_batch_names_the_fix(tmp_path):
    data = _captions_file(tmp_path)
    line = one_error(invoke("-q", "train", data, "--stage", "1", "-o", tmp_path / "s1", "--model", "cirkit-tiny",
                            "--batch-size", "8", "--num-workers", "0"))
    assert line == (f"error: {data}: 3 examples are fewer than one optimiser step (8 x 1 processes x 1 "
                    "accumulation); lower --batch-size")
    assert not (tmp_path / "s1" / "model.safetensors").exists()


# -- the image baseline answers only queries with a reference ------------------------------------------
def test_image_mode_without_a_reference_is_refused_not_answered_with_the_text(tmp_path):
    from cirkit.backbones import load_backbone
    from cirkit.backbones.base import BackboneSpec

    bb = load_backbone(BackboneSpec(backbone="fake", model="fake", mode="image"))
    with pytest.raises(CirkitError, match="query mode 'image' needs a reference image; this query has none"):
        bb.embed_queries(None, ["make it red"])
    bb.spec.mode = "text"
    with pytest.raises(CirkitError, match="query mode 'text' needs a modification text"):
        bb.embed_queries(bb.collate([bb.image_transform()(_red())]), [""])


def _red():
    from PIL import Image

    return Image.new("RGB", (8, 8), "red")


def test_evaluate_leaves_text_only_queries_out_of_the_image_row(tmp_path):
    """Two queries have only a text: image mode answered them with it (66.7 instead of 0); now they are left out."""
    from PIL import Image

    from cirkit.backbones.fake import COLOURS

    bench = tmp_path / "bench"
    (bench / "img").mkdir(parents=True)
    names = ["red", "green", "blue", "yellow"]
    for n in names:
        Image.new("RGB", (16, 16), tuple(int(255 * c) for c in COLOURS[n])).save(bench / "img" / f"{n}.png")
    (bench / "gallery.jsonl").write_text("".join(json.dumps({"id": n, "image": f"img/{n}.png"}) + "\n" for n in names))
    queries = [{"id": "q1", "reference": "img/red.png", "text": "make it blue", "targets": ["blue"]},
               {"id": "t1", "reference": None, "text": "green", "targets": ["green"]},
               {"id": "t2", "reference": None, "text": "yellow", "targets": ["yellow"]}]
    (bench / "queries.jsonl").write_text("".join(json.dumps(q) + "\n" for q in queries))
    res = invoke("evaluate", "generic", "-d", bench, "--backbone", "fake", "-m", "fake", "--mode", "image",
                 "--mode", "text", "--num-workers", "0", "--json", env={"COLUMNS": "300"})
    assert res.exit_code == 0, (res.stderr, res.exception)
    m = json.loads(res.stdout)["metrics"]
    assert m["count/test/image/left_out"] == 2 and "count/test/text/left_out" not in m
    assert m["image/test/R@1"] == 0.0  # q1 alone (its reference is red, its target blue)
    assert m["text/test/R@1"] == 100.0
    assert "mode image: 2 queries without a reference image are left out of its scores" in res.stderr
