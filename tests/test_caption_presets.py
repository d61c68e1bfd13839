"""`caption --prompt NAME`: the cirkit and paper presets, reached from the CLI and the paper recipe;
and the ``group`` a nested folder tree gives each record (what ``reformulate --group-depth`` counts in)."""

from __future__ import annotations

import json

import pytest

torch = pytest.importorskip("torch")
from PIL import Image  # noqa: E402
from typer.testing import CliRunner  # noqa: E402

from cirkit.caption import DEFAULT_PROMPT, PAPER_PROMPT, PROMPT_PRESETS, resolve_prompt  # noqa: E402
from cirkit.cli import app  # noqa: E402
from cirkit.io import read_records  # noqa: E402
from cirkit.records import Caption  # noqa: E402
from cirkit.testing import build_tiny_blip, build_tiny_llava  # noqa: E402

FAST = ["--max-new-tokens", "4", "--batch-size", "2", "--num-workers", "0", "--device", "cpu"]


@pytest.fixture(scope="module")
def llava(tmp_path_factory):
    return str(build_tiny_llava(tmp_path_factory.mktemp("llava")))


@pytest.fixture
def tree(tmp_path):
    """A Fashion200k-shaped folder: women/<meta>/<category>/<product>/<photo>, plus one photo at the root."""
    root = tmp_path / "fashion200k"
    colours = iter([(200, 0, 0), (0, 200, 0), (0, 0, 200), (200, 200, 0), (0, 200, 200)])
    for meta, cat, product in (("dresses", "casual", "d1"), ("dresses", "party", "d2"), ("skirts", "mini", "s1")):
        folder = root / "women" / meta / cat / product
        folder.mkdir(parents=True)
        Image.new("RGB", (32, 32), next(colours)).save(folder / f"{product}_0.jpeg")
    Image.new("RGB", (32, 32), next(colours)).save(root / "loose.png")
    return root


def invoke(*args):
    return CliRunner().invoke(app, ["-q", "caption", *map(str, args)])


def test_presets_resolve_by_name_and_text_passes_through():
    assert PROMPT_PRESETS == {"cirkit": DEFAULT_PROMPT, "paper": PAPER_PROMPT}
    assert resolve_prompt("paper") == PAPER_PROMPT and resolve_prompt("cirkit") == DEFAULT_PROMPT
    assert resolve_prompt("What is in the photo?") == "What is in the photo?" and resolve_prompt(None) is None
    assert "detail" in PAPER_PROMPT  # section II-A: a detailed description (Table I's text is an image; see docstring)


@pytest.mark.slow
def test_each_preset_is_reachable_from_the_cli_and_recorded_as_its_text(tree, llava, tmp_path):
    for name, text in PROMPT_PRESETS.items():
        out = tmp_path / f"{name}.jsonl"
        res = invoke(tree, "-o", out, "-m", llava, "--prompt", name, *FAST)
        assert res.exit_code == 0, (res.stdout, res.stderr)
        caps = read_records(out, Caption)
        assert len(caps) == 4 and {c.prompt for c in caps} == {text}
    # resuming the paper captions under the default prompt would mix two prompts: refused, named
    Image.new("RGB", (32, 32), (9, 9, 9)).save(tree / "women" / "new.png")  # something left to caption
    res = invoke(tree, "-o", tmp_path / "paper.jsonl", "-m", llava, *FAST)
    assert res.exit_code == 1 and "another prompt" in res.stderr
    # ... while the preset's own text is the same prompt, and resumes
    res = invoke(tree, "-o", tmp_path / "paper.jsonl", "-m", llava, "--prompt", PAPER_PROMPT, *FAST)
    assert res.exit_code == 0, (res.stdout, res.stderr)


@pytest.mark.slow
def test_the_paper_recipe_uses_the_paper_preset(tree, llava, tmp_path):
    out = tmp_path / "c.jsonl"
    res = invoke(tree, "-o", out, "-c", "recipes/caption-llava-1.5-13b-paper.yaml", "-m", llava, *FAST, "--json")
    assert res.exit_code == 0, (res.stdout, res.stderr)
    caps = read_records(out, Caption)
    assert caps and {c.prompt for c in caps} == {PAPER_PROMPT}
    summary = json.loads(res.stdout.strip().splitlines()[-1])
    assert summary["details"]["prompt"] == PAPER_PROMPT


@pytest.mark.slow
def test_a_nested_tree_records_the_folder_below_the_root_as_group(tree, llava, tmp_path):
    out = tmp_path / "c.jsonl"
    assert invoke(tree, "-o", out, "-m", llava, *FAST).exit_code == 0
    groups = {c.id: c.group for c in read_records(out, Caption)}
    assert groups == {"women/dresses/casual/d1/d1_0": "women/dresses/casual/d1",
                      "women/dresses/party/d2/d2_0": "women/dresses/party/d2",
                      "women/skirts/mini/s1/s1_0": "women/skirts/mini/s1", "loose": None}


@pytest.mark.slow
def test_a_preset_on_a_plain_captioner_is_one_line(tree, tmp_path):
    blip = build_tiny_blip(tmp_path / "blip")
    out = tmp_path / "c.jsonl"
    res = invoke(tree, "-o", out, "-m", blip, "--prompt", "paper", *FAST)
    assert res.exit_code == 1, (res.stdout, res.stderr)
    lines = [x for x in res.stderr.splitlines() if x.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: --prompt paper: a preset instruction for chat models")
    assert not out.exists() or not out.read_text().strip()
