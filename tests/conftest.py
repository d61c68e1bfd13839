"""Shared fixtures: everything offline, small artefacts built once per session."""

import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


@pytest.fixture(scope="session")
def synth_dir(tmp_path_factory):
    """A small synth benchmark (seed 0, 64 px, 70 train triplets, 28 queries per split); returns OUT."""
    from cirkit.synth import SynthConfig, run

    out = tmp_path_factory.mktemp("synth") / "synth"
    run(SynthConfig(out=out, seed=0, train_triplets=70, test_queries=28, distractors=20, image_size=64))
    return out


MLLM_COLOURS = {"red": (230, 30, 30), "blue": (30, 30, 230), "green": (30, 200, 30), "yellow": (240, 230, 40)}


@pytest.fixture(scope="session")
def tiny_llava(tmp_path_factory):
    """A tiny random LLaVA saved as a transformers folder (the mllm backbone and its training share it)."""
    from cirkit.testing import build_tiny_llava

    return build_tiny_llava(tmp_path_factory.mktemp("mllm") / "tiny-llava")


@pytest.fixture(scope="session")
def mllm_data(tmp_path_factory):
    """Four coloured-circle images, their captions.jsonl and the 12 triplets between them."""
    import json

    from PIL import Image, ImageDraw

    d = tmp_path_factory.mktemp("mllm-data")
    (d / "img").mkdir()
    caps, trips = [], []
    for name, rgb in MLLM_COLOURS.items():
        im = Image.new("RGB", (40, 32), (128, 128, 128))
        ImageDraw.Draw(im).ellipse((8, 6, 30, 28), fill=rgb)
        im.save(d / "img" / f"{name}.png")
        caps.append({"id": name, "image": f"img/{name}.png", "caption": f"a {name} circle"})
    for a in MLLM_COLOURS:
        for b in MLLM_COLOURS:
            if a != b:
                trips.append({"id": f"{a}-{b}", "reference": f"img/{a}.png", "instruction": f"make it {b}",
                              "target": f"img/{b}.png", "target_caption": f"a {b} circle"})
    (d / "captions.jsonl").write_text("".join(json.dumps(x) + "\n" for x in caps))
    (d / "triplets.jsonl").write_text("".join(json.dumps(x) + "\n" for x in trips))
    return d


# -- benchmark annotation fixtures ---------------------------------------------------------------
# "project": files written by cirkit (tests/fixtures/benchmarks/README.md), always present.
# "upstream": real samples of the released files, read in place when this checkout sits beside the
# workspace's ../shared/fixtures (or CIRKIT_UPSTREAM_FIXTURES names a folder; point it at a missing
# path to hide them). They are an extra check on real data and its quirks, so tests taking
# ``benchmark_fixtures`` run once per source present, and a clone without them skips nothing.
BENCHMARK_FIXTURES = {"project": Path(__file__).resolve().parent / "fixtures" / "benchmarks"}
_UPSTREAM = Path(os.environ.get("CIRKIT_UPSTREAM_FIXTURES") or Path(__file__).resolve().parents[2] / "shared" / "fixtures")
if _UPSTREAM.is_dir():
    BENCHMARK_FIXTURES["upstream"] = _UPSTREAM


def pytest_report_header(config):
    upstream = f"upstream samples at {_UPSTREAM}" if "upstream" in BENCHMARK_FIXTURES else (
        f"no upstream samples at {_UPSTREAM} (their [upstream] cases are not collected)")
    return f"benchmark fixtures: project ({BENCHMARK_FIXTURES['project']}) + {upstream}"


@pytest.fixture(scope="session", params=list(BENCHMARK_FIXTURES))
def benchmark_fixtures(request) -> tuple[str, Path]:
    """``(source, root)``: the annotation-fixture root of each source present (see above)."""
    return request.param, BENCHMARK_FIXTURES[request.param]
