"""Benchmark annotation fixtures per source, the facts each one pins, and placeholder images.

Every test taking ``fixtures`` runs on the project's own files (``[project]``, always) and,
when present, on the real upstream samples (``[upstream]``; see ``tests/conftest.py``).
Expectations that follow from the files are computed from them in the tests; the literal
ones (counts, a record's text, where a quirk sits) are listed per source in ``FACTS``.
"""

import json
from dataclasses import dataclass
from pathlib import Path

import pytest


@dataclass(frozen=True)
class Facts:
    """What a fixture source holds, written out by hand so the adapters are checked against it."""

    fiq_val_queries: list[int]  # per category: dress, shirt, toptee
    fiq_val_gallery: list[int]
    fiq_test_queries: list[int]
    fiq_test_gallery_dress: int  # = hits per test ranking (the gallery is smaller than 50)
    fiq_first: tuple[str, str, str]  # dress val record 0: joined text, target, candidate
    fiq_empty_first: tuple[int, int, str]  # (category index, record index, text) of a record with caption 1 = ""
    cirr_val: tuple[int, int]  # (queries, gallery images)
    cirr_test1: tuple[int, int]
    cirr_gallery_entry: tuple[str, str]  # one image_splits entry: name, relative path
    cirr_query: tuple[str, str]  # pairid, target_hard
    cirr_soft_missing: str  # pairid whose target_hard is missing from target_soft
    cirr_blank_caption: str  # test1 pairid whose caption is " "
    circo_first: tuple[str, list[str]]  # val query 0: reference id, targets (target_img_id first)
    circo_test_queries: int
    genecis_queries: list[int]  # focus_object, change_object
    genecis_target_copy: tuple[int, str, str]  # change_object record whose target is in its gallery
    genecis_focus_reference: str  # focus_object record 1's reference id


FACTS = {
    # tests/fixtures/benchmarks (generate.py)
    "project": Facts(
        fiq_val_queries=[6, 7, 8], fiq_val_gallery=[22, 24, 26], fiq_test_queries=[3, 3, 3],
        fiq_test_gallery_dress=9,
        fiq_first=("is longer and red and has no sleeves", "CKDRE00002", "CKDRE00001"),
        fiq_empty_first=(1, 6, "is brown with a dragon on the back"),
        cirr_val=(12, 24), cirr_test1=(6, 12),
        cirr_gallery_entry=("dev-9134-0-img0", "./dev/dev-9134-0-img0.png"),
        cirr_query=("1001", "dev-9133-3-img1"), cirr_soft_missing="1005", cirr_blank_caption="2004",
        circo_first=("781644", ["733481", "797227", "746993"]), circo_test_queries=6,
        genecis_queries=[8, 8], genecis_target_copy=(5, "surfboard", "812773"), genecis_focus_reference="820892",
    ),
    # ../shared/fixtures (real records; see its PROVENANCE.md files)
    "upstream": Facts(
        fiq_val_queries=[30, 31, 32], fiq_val_gallery=[69, 75, 75], fiq_test_queries=[10, 10, 10],
        fiq_test_gallery_dress=20,
        fiq_first=("is shiny and silver with shorter sleeves and fit and flare", "B0084Y8XIU", "B005X4PL1G"),
        fiq_empty_first=(1, 30, "is grey with a design on the back"),
        cirr_val=(56, 41), cirr_test1=(38, 30),
        cirr_gallery_entry=("dev-244-0-img0", "./dev/dev-244-0-img0.png"),
        cirr_query=("12060", "dev-1028-1-img1"), cirr_soft_missing="12130", cirr_blank_caption="27098",
        circo_first=("271520", ["355099", "528417", "534704"]), circo_test_queries=20,
        genecis_queries=[30, 30], genecis_target_copy=(19, "toaster", "175364"), genecis_focus_reference="189213",
    ),
}


@pytest.fixture(scope="session")
def fixtures(benchmark_fixtures) -> Path:
    """The annotation root of this run's source (holds fashioniq/, cirr/, circo/, genecis/)."""
    return benchmark_fixtures[1]


@pytest.fixture(scope="session")
def facts(benchmark_fixtures) -> Facts:
    return FACTS[benchmark_fixtures[0]]


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
