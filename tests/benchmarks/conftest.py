"""Fixture annotations (real upstream samples, read in place) and placeholder-image helpers."""

import json
from pathlib import Path

import pytest

FIXTURES = Path(__file__).resolve().parents[2].parent / "shared" / "fixtures"


@pytest.fixture(scope="session")
def fixtures() -> Path:
    if not FIXTURES.is_dir():
        pytest.skip(f"benchmark fixtures not found at {FIXTURES}")
    return FIXTURES


@pytest.fixture(scope="session")
def load_json(fixtures):
    def load(rel: str):
        return json.loads((fixtures / rel).read_text(encoding="utf-8"))

    return load


@pytest.fixture(scope="session")
def solid():
    """``solid(path, (r, g, b))`` writes an 8x8 image of one colour (format from the suffix)."""
    from PIL import Image

    def make(path: Path, rgb=(0, 0, 0)) -> Path:
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (8, 8), tuple(rgb)).save(path, quality=100) if path.suffix == ".jpg" else Image.new(
            "RGB", (8, 8), tuple(rgb)
        ).save(path)
        return path

    return make
