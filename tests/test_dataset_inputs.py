"""A parquet, a webdataset tar and a save_to_disk folder made in the test feed caption --from, caption,
embed, train and evaluate generic, with the same results as the JSONL/folder inputs they were made from."""

from __future__ import annotations

import json

import numpy as np
import pytest

pytest.importorskip("torch")

from cirkit.io import read_records  # noqa: E402
from cirkit.io.embeddings import read_embeddings  # noqa: E402
from cirkit.records import Caption  # noqa: E402

KINDS = ("parquet", "tar", "disk")


def _jsonl(path):
    return [json.loads(x) for x in path.read_text().splitlines() if x.strip()]


@pytest.mark.parametrize("kind", KINDS)
def test_caption_from_a_dataset_writes_image_files_the_captions_name(dataset_files, synth_dir, tmp_path, kind):
    from cirkit.caption import CaptionConfig, images_folder, run

    out = tmp_path / "captions.jsonl"
    r = run(CaptionConfig(from_file=dataset_files["captions"][kind], output=out))
    want = _jsonl(synth_dir / "captions.jsonl")[:24]
    got = read_records(out, Caption)
    assert r.counts["imported"] == 24 and [(c.id, c.caption) for c in got] == [(w["id"], w["caption"]) for w in want]
    for c, w in zip(got, want, strict=True):  # every image is a file beside the output, byte for byte
        path = out.parent / c.image
        assert path.parent == images_folder(out) and path.read_bytes() == (synth_dir / w["image"]).read_bytes()
    again = run(CaptionConfig(from_file=dataset_files["captions"][kind], output=out))
    assert again.counts["imported"] == 0 and len(list(images_folder(out).iterdir())) == 24


@pytest.mark.parametrize("kind", KINDS)
def test_embed_a_dataset_equals_embedding_the_files(dataset_files, synth_dir, tmp_path, kind):
    from cirkit.embed import EmbedConfig, run

    caps = _jsonl(synth_dir / "captions.jsonl")[:24]
    gallery = tmp_path / "gallery.jsonl"
    gallery.write_text("".join(json.dumps({"id": c["id"], "image": str(synth_dir / c["image"])}) + "\n" for c in caps))
    run(EmbedConfig(input=gallery, output=tmp_path / "files.lance", backbone="fake", num_workers=0))
    r = run(EmbedConfig(input=dataset_files["captions"][kind], output=tmp_path / "ds.lance", backbone="fake",
                        num_workers=0, batch_size=5))
    assert r.counts == {"images": 24, "embedded": 24, "already_stored": 0, "failed": 0}
    _, ids, images, vecs = read_embeddings(tmp_path / "ds.lance")
    _, ids0, _, vecs0 = read_embeddings(tmp_path / "files.lance")
    assert ids == ids0 and np.allclose(vecs, vecs0, atol=1e-6)
    assert all(i.endswith(f"#{k}") for i, k in zip(images, ids, strict=True))  # named <dataset>#<id>


def test_embed_streams_a_dataset_and_resumes(dataset_files, tmp_path):
    from cirkit.embed import EmbedConfig, run

    src = dataset_files["captions"]["tar"]
    out = tmp_path / "s.lance"
    r = run(EmbedConfig(input=src, output=out, backbone="fake", num_workers=2, streaming=True, batch_size=4))
    assert r.counts["embedded"] == 24 and r.counts["images"] == 24
    r = run(EmbedConfig(input=src, output=out, backbone="fake", num_workers=0, streaming=True))
    assert r.counts["embedded"] == 0
    assert len(set(read_embeddings(out)[1])) == 24


def test_cli_embed_a_parquet_with_named_columns(tmp_path):
    import io

    from datasets import Dataset, Features, Image, Value
    from PIL import Image as PILImage
    from typer.testing import CliRunner

    from cirkit.cli import app

    def png(c):
        buf = io.BytesIO()
        PILImage.new("RGB", (8, 8), c).save(buf, "PNG")
        return {"bytes": buf.getvalue(), "path": None}

    Dataset.from_list([{"sku": s, "photo": png(c)} for s, c in (("a1", "red"), ("b2", "blue"))],
                      features=Features(sku=Value("string"), photo=Image())).to_parquet(str(tmp_path / "p.parquet"))
    r = CliRunner().invoke(app, ["-q", "embed", str(tmp_path / "p.parquet"), "--backbone", "fake", "-o",
                                 str(tmp_path / "p.lance"), "--id-column", "sku", "--image-column", "photo",
                                 "--num-workers", "0", "--json"])
    assert r.exit_code == 0, r.output
    assert sorted(read_embeddings(tmp_path / "p.lance")[1]) == ["a1", "b2"]
    r = CliRunner().invoke(app, ["-q", "embed", str(tmp_path / "p.parquet"), "--backbone", "fake", "-o",
                                 str(tmp_path / "q.lance"), "--image-column", "picture"])
    assert r.exit_code == 1 and "error:" in r.stderr and "--image-column" in r.stderr and "Traceback" not in r.stderr


@pytest.mark.parametrize("kind", KINDS)
def test_evaluate_generic_on_datasets_equals_the_jsonl_benchmark(dataset_files, synth_dir, kind):
    from cirkit.evaluate import EvaluateConfig, run

    def scores(data):
        m = run(EvaluateConfig(benchmark="generic", data=data, backbone="fake", num_workers=0,
                               mode=["composed", "image"])).metrics
        return {k: v for k, v in m.items() if "/" in k and not k.startswith("protocol")}

    want = scores(synth_dir / "benchmark" / "test")
    got = scores(dataset_files["bench"][kind])
    assert got == want and got["composed/test/R@1"] > 0


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["parquet", "disk"])
def test_train_stage2_on_a_dataset_of_triplets(dataset_files, tmp_path, kind):
    from cirkit.train import run
    from cirkit.train.plugin import TrainConfig

    r = run(TrainConfig(backbone="vit", stage="2", data=dataset_files["triplets"][kind], output=tmp_path / "m",
                        model="cirkit-tiny", max_steps=2, batch_size=4, warmup_steps=1, num_workers=0, log_every=1,
                        save_every=0))
    assert r.counts["samples"] == 8 and (tmp_path / "m" / "model.safetensors").exists()


@pytest.mark.slow
def test_train_stage1_on_webdataset_captions(dataset_files, tmp_path):
    from cirkit.train import run
    from cirkit.train.plugin import TrainConfig

    r = run(TrainConfig(backbone="vit", stage="1", data=dataset_files["captions"]["tar"], output=tmp_path / "m",
                        model="cirkit-tiny", max_steps=2, batch_size=4, warmup_steps=1, num_workers=0, log_every=1,
                        save_every=0))
    assert r.counts["samples"] == 8


@pytest.mark.slow
def test_caption_a_dataset_with_a_model(dataset_files, tmp_path):
    from cirkit.caption import CaptionConfig, images_folder, run
    from cirkit.testing import build_tiny_blip

    blip = str(build_tiny_blip(tmp_path / "blip"))
    out = tmp_path / "c.jsonl"
    r = run(CaptionConfig(images=dataset_files["captions"]["parquet"], output=out, model=blip, num_workers=0,
                          max_new_tokens=4, limit=5, device="cpu"))
    caps = read_records(out, Caption)
    assert r.counts["captioned"] == 5 and len(caps) == 5
    assert all((out.parent / c.image).parent == images_folder(out) for c in caps)
