"""Shared fixtures: everything offline, small artefacts built once per session."""

import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
# datasets prepares local parquet/tar inputs under its cache: a private one per test session
# (set before anything imports datasets, which reads it once), never the user's.
if "HF_DATASETS_CACHE" not in os.environ:
    import tempfile

    os.environ["HF_DATASETS_CACHE"] = tempfile.mkdtemp(prefix="cirkit-test-hf-datasets-")


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


# -- Hugging Face dataset inputs ----------------------------------------------------------------
@pytest.fixture(scope="session")
def dataset_files(synth_dir, tmp_path_factory):
    """The synth data as datasets, images as bytes: ``{kind: {"parquet"|"tar"|"disk": path}}`` for
    kind ``captions`` (id, image, caption), ``triplets`` (Triplet fields, reference/target images) and
    ``bench`` (a generic benchmark folder: gallery + queries datasets), built from synth_dir."""
    return write_dataset_files(synth_dir, tmp_path_factory.mktemp("datasets"))


def _rows(path: Path) -> list[dict]:
    import json

    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _image(path: Path) -> dict:
    return {"bytes": path.read_bytes(), "path": None}  # bytes only: no file behind it


def _write_tar(path: Path, samples: list[tuple[str, dict[str, bytes]]]) -> None:
    """A webdataset shard: each sample's members ``<key>.<ext>``, one sample after another."""
    import io
    import tarfile

    with tarfile.open(path, "w") as tf:
        for key, members in samples:
            for ext, data in members.items():
                info = tarfile.TarInfo(f"{key}.{ext}")
                info.size = len(data)
                tf.addfile(info, io.BytesIO(data))


def _three_ways(rows: list[dict], features, out: Path, name: str, tar_samples) -> dict[str, Path]:
    from datasets import Dataset

    ds = Dataset.from_list(rows, features=features)
    ds.to_parquet(str(out / "parquet" / f"{name}.parquet"))
    ds.save_to_disk(str(out / "disk" / name))
    _write_tar(out / "tar" / f"{name}-000.tar", tar_samples)
    return {"parquet": out / "parquet" / f"{name}.parquet", "disk": out / "disk" / name,
            "tar": out / "tar" / f"{name}-000.tar"}


def write_dataset_files(synth: Path, out: Path) -> dict[str, dict[str, Path]]:
    """See :func:`dataset_files`."""
    import json

    from datasets import Features, Image, Sequence, Value

    for kind in ("parquet", "disk", "tar"):
        (out / kind).mkdir(parents=True, exist_ok=True)
    caps = _rows(synth / "captions.jsonl")[:24]
    cap_rows = [{"id": c["id"], "image": _image(synth / c["image"]), "caption": c["caption"]} for c in caps]
    files = {"captions": _three_ways(
        cap_rows, Features(id=Value("string"), image=Image(), caption=Value("string")), out, "captions",
        [(c["id"], {"png": (synth / c["image"]).read_bytes(), "txt": c["caption"].encode()}) for c in caps])}
    trips = _rows(synth / "triplets.jsonl")[:16]
    trip_rows = [{"id": t["id"], "reference": _image(synth / t["reference"]), "instruction": t["instruction"],
                  "target": _image(synth / t["target"]), "target_caption": t["target_caption"]} for t in trips]
    feats = Features(id=Value("string"), reference=Image(), instruction=Value("string"), target=Image(),
                     target_caption=Value("string"))
    files["triplets"] = _three_ways(trip_rows, feats, out, "triplets", [])
    files["triplets"].pop("tar")  # a triplet has two images: webdataset shards hold one sample image each
    bench = synth / "benchmark" / "test"
    gallery, queries = _rows(bench / "gallery.jsonl"), _rows(bench / "queries.jsonl")
    by_path = {(bench / x["image"]).resolve(): x["id"] for x in gallery}
    for x in queries:  # what the JSONL reader infers from the reference path, stated (bytes have no path)
        if x.get("reference") and not x.get("reference_id"):
            x["reference_id"] = by_path.get((bench / x["reference"]).resolve())
    files["bench"] = {}
    for kind in ("parquet", "disk", "tar"):
        folder = out / "bench" / kind
        folder.mkdir(parents=True)
        (folder / "meta.json").write_bytes((bench / "meta.json").read_bytes()) if (bench / "meta.json").exists() else None
        files["bench"][kind] = folder
    from datasets import Dataset

    g = Dataset.from_list([{"id": x["id"], "image": _image(bench / x["image"])} for x in gallery],
                          features=Features(id=Value("string"), image=Image()))
    qf = Features(id=Value("string"), reference=Image(), text=Value("string"), targets=Sequence(Value("string")),
                  reference_id=Value("string"))
    q = Dataset.from_list([{"id": x["id"], "reference": _image(bench / x["reference"]), "text": x.get("text"),
                            "targets": x.get("targets", []), "reference_id": x.get("reference_id")} for x in queries],
                          features=qf)
    g.to_parquet(str(files["bench"]["parquet"] / "gallery.parquet"))
    q.to_parquet(str(files["bench"]["parquet"] / "queries.parquet"))
    g.save_to_disk(str(files["bench"]["disk"] / "gallery"))
    q.save_to_disk(str(files["bench"]["disk"] / "queries"))
    _write_tar(files["bench"]["tar"] / "gallery-000.tar",
               [(x["id"], {"png": (bench / x["image"]).read_bytes()}) for x in gallery])
    _write_tar(files["bench"]["tar"] / "queries-000.tar",
               [(x["id"], {"png": (bench / x["reference"]).read_bytes(),
                           "json": json.dumps({k: x.get(k) for k in ("id", "text", "targets", "reference_id")
                                               if x.get(k) is not None}).encode()}) for x in queries])
    return files
