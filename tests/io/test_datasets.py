"""The datasets input layer: what counts as a dataset, loading each kind, columns, sharding, records."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from cirkit.errors import CirkitError, ImageError
from cirkit.io import open_image
from cirkit.io.datasets import (
    DatasetImage,
    DatasetOptions,
    ImageStream,
    export_image,
    image_items,
    is_dataset,
    load,
    open_rows,
    records,
)

KINDS = ("parquet", "tar", "disk")


def _caption_ids(synth_dir, n=24):
    return [json.loads(x)["id"] for x in (synth_dir / "captions.jsonl").read_text().splitlines()[:n]]


# -- what is a dataset --------------------------------------------------------------------------
def test_folders_and_jsonl_stay_cirkit_inputs_datasets_are_recognised(dataset_files, synth_dir, tmp_path):
    caps = dataset_files["captions"]
    assert not is_dataset(synth_dir / "images")  # a folder of images: cirkit's own listing
    assert not is_dataset(synth_dir / "captions.jsonl")
    assert all(is_dataset(caps[k]) for k in KINDS)
    assert is_dataset(caps["tar"].parent)  # a folder holding only data files
    assert is_dataset(str(caps["tar"].parent / "*.tar"))  # a glob of shards
    assert is_dataset("someone/some-dataset") and is_dataset("hf://datasets/someone/x")
    assert not is_dataset(tmp_path / "missing" / "gallery.jsonl")  # a missing local file is reported as missing
    assert is_dataset(synth_dir / "images", DatasetOptions(format="imagefolder"))


def test_hub_id_offline_is_one_clear_line(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    import huggingface_hub.constants as c

    monkeypatch.setattr(c, "HF_HUB_OFFLINE", True)
    with pytest.raises(CirkitError, match=r"someone/nothing-here: not a local file or folder, and the Hugging Face "
                                          r"Hub is offline \(HF_HUB_OFFLINE=1\)") as e:
        load("someone/nothing-here")
    assert "\n" not in str(e.value)


@pytest.mark.parametrize("kind", KINDS)
def test_each_kind_loads_with_ids_images_and_text(dataset_files, synth_dir, kind):
    rows = open_rows(dataset_files["captions"][kind], text_names=("caption", "txt"), text_required=True)
    assert rows.id == ("__key__" if kind == "tar" else "id")
    assert rows.image == ("png" if kind == "tar" else "image")
    assert rows.ids() == _caption_ids(synth_dir)
    items = image_items(dataset_files["captions"][kind])
    assert [k for k, _ in items] == _caption_ids(synth_dir)
    key, ref = items[3]
    assert isinstance(ref, DatasetImage) and str(ref).endswith(f"#{key}")
    first = json.loads((synth_dir / "captions.jsonl").read_text().splitlines()[3])
    want = open_image(synth_dir / first["image"])
    assert open_image(ref).tobytes() == want.tobytes()  # the same pixels as the file


def test_imagefolder_through_datasets_keeps_file_paths(tmp_path):
    from PIL import Image

    folder = tmp_path / "imf"
    folder.mkdir()
    for c in ("red", "blue"):
        Image.new("RGB", (8, 8), c).save(folder / f"{c}.png")
    (folder / "metadata.jsonl").write_text('{"file_name": "red.png", "id": "r"}\n{"file_name": "blue.png", "id": "b"}\n')
    items = image_items(folder, DatasetOptions(format="imagefolder"))
    assert sorted(k for k, _ in items) == ["b", "r"]
    assert all(open_image(ref).getpixel((0, 0)) in ((255, 0, 0), (0, 0, 255)) for _, ref in items)


def test_a_column_of_paths_resolves_against_the_data_files_folder(tmp_path):
    from datasets import Dataset
    from PIL import Image

    (tmp_path / "pics").mkdir()
    Image.new("RGB", (8, 8), "green").save(tmp_path / "pics" / "g.png")
    Dataset.from_list([{"id": "g", "image": "pics/g.png"}, {"id": "gone", "image": "pics/gone.png"},
                       {"id": "web", "image": "http://example.com/x.png"}]).to_parquet(str(tmp_path / "d.parquet"))
    items = dict(image_items(tmp_path / "d.parquet"))
    assert items["g"] == (tmp_path / "pics" / "g.png").resolve()
    with pytest.raises(ImageError, match="no such file"):
        open_image(items["gone"])
    with pytest.raises(ImageError, match="image URLs are not downloaded"):
        open_image(items["web"])


def test_column_options_and_their_errors(dataset_files):
    src = dataset_files["captions"]["parquet"]
    with pytest.raises(CirkitError, match=r"has no column 'picture' \(--image-column\); its columns are id, image, caption"):
        open_rows(src, DatasetOptions(image_column="picture"))
    with pytest.raises(CirkitError, match="has no split 'test'; it has train"):
        load(src, DatasetOptions(split="test"))
    rows = open_rows(src, DatasetOptions(id_column="caption"))
    assert rows.id == "caption"


def test_duplicate_ids_are_refused_naming_the_id(tmp_path):
    from datasets import Dataset

    Dataset.from_list([{"key": "a", "image": "x.png"}, {"key": "a", "image": "y.png"}]).to_parquet(
        str(tmp_path / "dup.parquet"))
    with pytest.raises(CirkitError, match="id 'a' appears more than once in column 'key'"):
        image_items(tmp_path / "dup.parquet", DatasetOptions(id_column="key"))


def test_bad_dataset_files_are_one_line_errors(tmp_path):
    (tmp_path / "broken.parquet").write_bytes(b"PAR1 not really")
    with pytest.raises(CirkitError, match="broken.parquet: cannot read it as a dataset") as e:
        load(tmp_path / "broken.parquet")
    assert "\n" not in str(e.value)
    with pytest.raises(CirkitError, match="no files match this pattern"):
        load(str(tmp_path / "nothing-*.tar"))


def test_streaming_needs_an_id_column(tmp_path):
    from datasets import Dataset

    Dataset.from_list([{"image": "a.png"}]).to_parquet(str(tmp_path / "noid.parquet"))
    with pytest.raises(CirkitError, match="a streamed dataset needs an id column"):
        open_rows(tmp_path / "noid.parquet", DatasetOptions(streaming=True))


# -- sharding ------------------------------------------------------------------------------------
@pytest.mark.parametrize("world", [2, 3])
def test_process_shares_are_disjoint_and_cover_the_dataset(dataset_files, synth_dir, world):
    src = dataset_files["captions"]["disk"]
    shares = [[k for k, _ in image_items(src, rank=r, world=world)] for r in range(world)]
    flat = [k for s in shares for k in s]
    assert sorted(flat) == sorted(_caption_ids(synth_dir)) and len(flat) == len(set(flat))
    assert all(shares)


@pytest.mark.parametrize("kind", ["parquet", "tar"])
def test_a_stream_is_split_between_processes_and_skips_done_ids(dataset_files, synth_dir, kind):
    src = str(dataset_files["captions"][kind])
    opts = DatasetOptions(streaming=True)
    ids = _caption_ids(synth_dir)
    whole = [k for k, _ in ImageStream(src, opts)]
    assert whole == ids
    parts = [k for r in range(3) for k, _ in ImageStream(src, opts, r, 3)]
    assert sorted(parts) == sorted(ids) and len(parts) == len(ids)
    rest = [k for k, _ in ImageStream(src, opts, skip=frozenset(ids[:5]))]
    assert rest == ids[5:]
    key, image = next(iter(ImageStream(src, opts)))
    assert open_image(image).size == (64, 64)


# -- records and exported images -----------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["parquet", "disk"])
def test_triplet_records_carry_dataset_images(dataset_files, synth_dir, kind):
    from cirkit.records import Triplet

    recs = records(dataset_files["triplets"][kind], DatasetOptions(), Triplet, ("reference", "target"),
                   "instruction", ("text",))
    want = [json.loads(x) for x in (synth_dir / "triplets.jsonl").read_text().splitlines()[:16]]
    assert [(r.id, r.instruction) for r in recs] == [(t["id"], t["instruction"]) for t in want]
    assert open_image(recs[0].target).size == open_image(synth_dir / want[0]["target"]).size


def test_exported_images_are_named_by_content_once(dataset_files, tmp_path):
    (key, ref), (_, other) = image_items(dataset_files["captions"]["parquet"])[:2]
    a, b = export_image(ref, tmp_path / "x"), export_image(ref, tmp_path / "x")
    assert a == b and a.suffix == ".png" and a.read_bytes() == ref.image_source()
    assert export_image(other, tmp_path / "x") != a
    assert len(list((tmp_path / "x").iterdir())) == 2


def test_open_image_checks_bytes_like_files(tmp_path):
    import io

    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (2000, 1), "red").save(buf, "PNG")
    with pytest.raises(ImageError, match="aspect ratio"):
        open_image(buf.getvalue())
    with pytest.raises(ImageError, match="empty image"):
        open_image(b"")
    with pytest.raises(ImageError, match="not an image PIL can identify"):
        open_image(b"hello")


def test_settings_are_declared_once_and_reach_every_stage():
    from cirkit.caption import CaptionConfig
    from cirkit.embed import EmbedConfig
    from cirkit.train.config import TrainConfig

    names = ("image_column", "id_column", "dataset_split", "input_format")
    for cls in (CaptionConfig, EmbedConfig, TrainConfig):
        fields = cls.__dataclass_fields__
        assert all(n in fields for n in names), cls
    assert "streaming" in EmbedConfig.__dataclass_fields__
    assert Path  # noqa: B018 (keeps the import used in type hints above)
