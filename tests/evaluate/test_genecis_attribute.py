"""GeneCIS attribute tasks: official instance crops, cached, scored like the object tasks.

The upstream attribute files are not in the fixtures (see their PROVENANCE.md), so these
tests write a few records in the schema the official loader reads (``image_id``,
``instance_bbox``, ``condition``) to check the crop geometry and the plumbing only.
"""

import json

import pytest
from PIL import Image

from cirkit.evaluate import EvaluateConfig, detect_benchmark, load_benchmark, run
from cirkit.evaluate.genecis import vaw_crop


def test_vaw_crop_geometry():
    im = Image.new("RGB", (100, 60))
    # x=40, y=20, w=10, h=10: left 33, top 13, right 33+17=50, bottom 13+17=30 -> 17x17, already square
    assert vaw_crop(im, [40, 20, 10, 10]).size == (17, 17)
    # clipped at the image border and padded to a square
    out = vaw_crop(im, [90, 10, 20, 5])
    assert out.size[0] == out.size[1]
    wide = Image.new("RGB", (100, 60), (255, 255, 255))
    sq = vaw_crop(wide, [10, 10, 40, 10])  # 68 x 17 crop, padded with black rows
    assert sq.size == (68, 68) and sq.getpixel((0, 0)) == (0, 0, 0) and sq.getpixel((34, 34)) == (255, 255, 255)


@pytest.fixture
def attribute_task(tmp_path, monkeypatch):
    monkeypatch.setenv("CIRKIT_CACHE_DIR", str(tmp_path / "cache"))
    vg = tmp_path / "vg" / "VG_100K"
    vg.mkdir(parents=True)
    for i in range(1, 8):
        Image.new("RGB", (64, 48), (0, 0, 0)).save(vg / f"{i}.jpg")

    def inst(i, x=8):
        return {"image_id": i, "instance_bbox": [x, 8, 16, 12], "object_name": "shirt"}

    recs = [
        {"reference": inst(1), "target": inst(2), "gallery": [inst(3), inst(4), inst(5)], "condition": "red"},
        {"reference": inst(2), "target": inst(3, x=20), "gallery": [inst(4), inst(6), inst(7)], "condition": "blue"},
    ]
    data = tmp_path / "genecis"
    data.mkdir()
    (data / "change_attribute.json").write_text(json.dumps(recs))
    return data, tmp_path / "vg"


def test_attribute_task_crops_and_scores(attribute_task, tmp_path):
    data, images = attribute_task
    assert detect_benchmark(data) == "genecis"
    (task,) = load_benchmark("genecis", data, images).load("val")
    assert task.name == "change_attribute" and len(task.queries) == 2
    crops = sorted((tmp_path / "cache" / "genecis-crops").glob("*.png"))
    assert len(crops) == len(task.gallery) + 1  # + the first reference, which is in no gallery
    # box [8, 8, 16, 12]: left/top clip to 0, right 0 + 1.7 * 16 = 27.2, bottom 20.4 -> 27 x 20, padded
    assert Image.open(task.gallery[task.queries[0].targets[0]]).size == (27, 27)
    m = run(EvaluateConfig(benchmark="genecis", data=data, images=images, backbone="fake", num_workers=0)).metrics
    assert m["composed/val/R@1"] == 0.0 and m["composed/val/R@3"] == 0.0  # all-black crops: every score ties
    assert "attribute_crop" in " ".join(m)
