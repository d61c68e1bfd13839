"""The batched JPEG decode path (``--gpu-decode``), exercised on the CPU: torchvision's decode_jpeg
and the backbone's preprocessing as tensor ops give the vectors PIL gives, within resampling noise."""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")

from cirkit.errors import CirkitError  # noqa: E402
from cirkit.io.gpu_decode import device_plan, wanted  # noqa: E402


@pytest.fixture(scope="module")
def clip_tiny():
    from cirkit.backbones import load_backbone
    from cirkit.backbones.base import BackboneSpec

    torch.manual_seed(0)
    return load_backbone(BackboneSpec(backbone="clip", model="cirkit-tiny", device="cpu"))


@pytest.fixture
def photos(tmp_path):
    import numpy as np
    from PIL import Image, ImageFilter

    folder = tmp_path / "photos"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for i in range(10):
        arr = rng.integers(0, 255, (30 + i, 40, 3), dtype=np.uint8)
        im = Image.fromarray(arr).resize((150 + 13 * i, 120 + 7 * i), Image.BICUBIC).filter(ImageFilter.GaussianBlur(2))
        im.save(folder / f"p{i}.jpg", quality=92)
    Image.new("RGB", (90, 70), (200, 30, 30)).save(folder / "flat.png")  # not a JPEG: decoded in the worker
    Image.new("L", (80, 80), 128).save(folder / "grey.jpg")  # a greyscale JPEG: decoded as RGB
    (folder / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 this is not a jpeg")
    Image.new("RGB", (5000, 40), "blue").save(folder / "strip.jpg")  # refused by the header check
    return folder


def _embed(backbone, folder, out, mode, workers=0):
    from cirkit.embed import EmbedConfig, run
    from cirkit.io.embeddings import read_embeddings

    r = run(EmbedConfig(input=folder, output=out, num_workers=workers, batch_size=4, gpu_decode=mode), backbone=backbone)
    _, ids, _, vecs = read_embeddings(out)
    return r, dict(zip(ids, vecs, strict=True))


def test_the_plan_is_read_from_open_clip_preprocessing_only(clip_tiny):
    from cirkit.backbones.fake import FakeBackbone

    plan = device_plan(clip_tiny.image_transform())
    assert plan is not None and plan.size == plan.crop[0] == 32 and plan.interpolation == "bicubic"
    assert device_plan(FakeBackbone().image_transform()) is None
    assert wanted("auto", clip_tiny) is None  # auto: only when the model runs on CUDA
    assert wanted("off", clip_tiny) is None and wanted("on", clip_tiny) == plan
    with pytest.raises(CirkitError, match="--gpu-decode on: the fake backbone's preprocessing cannot run"):
        wanted("on", FakeBackbone())


@pytest.mark.parametrize("workers", [0, 2])
def test_batched_decode_gives_the_pil_vectors_and_the_same_failures(clip_tiny, photos, tmp_path, workers):
    r_on, on = _embed(clip_tiny, photos, tmp_path / "on.lance", "on", workers)
    r_off, off = _embed(clip_tiny, photos, tmp_path / "off.lance", "off", workers)
    assert sorted(on) == sorted(off) and len(on) == 12
    assert r_on.counts == r_off.counts == {"images": 14, "embedded": 12, "already_stored": 0, "failed": 2}
    assert {s[1].split(":")[0][:20] for s in r_on.skipped} == {s[1].split(":")[0][:20] for s in r_off.skipped}
    assert any("aspect ratio" in reason for _, reason in r_on.skipped)
    for k in on:
        cos = float((torch.tensor(on[k]) * torch.tensor(off[k])).sum())
        assert cos > (0.9999 if k == "flat" else 0.99), (k, cos)  # the PNG went the CPU way: identical


def test_a_streamed_dataset_takes_the_batched_decode_path_too(clip_tiny, dataset_files, tmp_path):
    from cirkit.embed import EmbedConfig, run
    from cirkit.io.embeddings import read_embeddings

    src = dataset_files["captions"]["tar"]
    got = {}
    for mode in ("on", "off"):
        run(EmbedConfig(input=src, output=tmp_path / f"{mode}.lance", streaming=True, num_workers=0, batch_size=5,
                        gpu_decode=mode), backbone=clip_tiny)
        _, ids, _, vecs = read_embeddings(tmp_path / f"{mode}.lance")
        got[mode] = dict(zip(ids, vecs, strict=True))
    assert sorted(got["on"]) == sorted(got["off"]) and len(got["on"]) == 24
    # PNGs (the synth images) go the CPU way in both: identical vectors
    assert all(float(abs(got["on"][k] - got["off"][k]).max()) < 1e-6 for k in got["on"])
