"""cirkit.search: the ANN parameters an index was built with, cache identity, hits with metadata."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from cirkit.errors import CirkitError
from cirkit.index import IndexConfig, run
from cirkit.io.embeddings import EmbeddingStore
from cirkit.records import EmbeddingManifest, Hit, Result
from cirkit.search import ANN_KEY, ann_params, default_nprobes, open_index


def unit(rng, n, d):
    v = rng.standard_normal((n, d)).astype(np.float32)
    return v / np.linalg.norm(v, axis=1, keepdims=True)


def make_store(path: Path, ids, vectors) -> Path:
    store = EmbeddingStore.open_for_append(path, EmbeddingManifest(backbone="fake", checkpoint="fake", dim=vectors.shape[1]))
    store.append(list(ids), [f"img/{i}.png" for i in ids], vectors)
    return path


# -- ANN parameters: recorded at build, used at search -----------------------------------------


@pytest.fixture(scope="module")
def ann_index(tmp_path_factory):
    """720 x 32 vectors, an IVF_PQ index built with --num-partitions 3 (the formula would give 2)."""
    root = tmp_path_factory.mktemp("ann")
    vec = unit(np.random.default_rng(0), 760, 32)
    ids = [f"r{k:04d}" for k in range(760)]
    make_store(root / "a.lance", ids[:720], vec[:720])
    make_store(root / "more.lance", ids[720:], vec[720:])
    r = run(IndexConfig(embeddings=root / "a.lance", output=str(root / "idx"), ann=True, num_partitions=3))
    assert r.counts["ann_built"] == 1
    return root, ids, vec


def test_the_partitions_actually_built_are_recorded_and_reported(ann_index):
    root, ids, vec = ann_index
    assert ann_params(720, 32)["num_partitions"] == 2  # the formula would say 2
    ix = open_index(root / "idx")
    info = ix.ann_info()
    assert info["recorded"] is True
    assert (info["num_partitions"], info["num_sub_vectors"], info["rows_at_build"]) == (3, 4, 720)
    assert info["index_type"] == "IVF_PQ" and info["nprobes"] == default_nprobes(3) == 3
    assert ix.nprobes() == 3


def test_rows_added_since_the_build_do_not_change_the_recorded_parameters(ann_index, tmp_path):
    root, ids, vec = ann_index
    idx = tmp_path / "idx"
    shutil.copytree(root / "idx", idx)
    # 40 new rows: under 10% unindexed, so the ANN index stays; cirkit index --json reports it as built
    res = CliRunner().invoke(__import__("cirkit.cli", fromlist=["app"]).app,
                             ["index", str(root / "more.lance"), "-o", str(idx), "--json"])
    assert res.exit_code == 0, res.output
    ann = json.loads(res.stdout.strip().splitlines()[-1])["details"]["ann"]
    assert ann["num_partitions"] == 3 and ann["rows_at_build"] == 720
    assert ann["indexed_rows"] == 720 and ann["unindexed_rows"] == 40
    ix = open_index(idx)
    assert ix.count() == 760 and ix.nprobes() == 3
    # ANN search still finds a row added after the build (LanceDB scans unindexed rows)
    assert ix.search(vec[750], k=1, strategy="ann")[0][0].id == ids[750]


def test_ann_search_uses_the_recorded_nprobes(ann_index, monkeypatch):
    root, ids, vec = ann_index
    from lancedb.query import LanceVectorQueryBuilder

    seen = []
    real = LanceVectorQueryBuilder.nprobes
    monkeypatch.setattr(LanceVectorQueryBuilder, "nprobes", lambda self, n: (seen.append(n), real(self, n))[1])
    ix = open_index(root / "idx")
    ix.search(vec[:2], k=3, strategy="ann")
    assert seen == [3, 3]
    ix.search(vec[:1], k=3, strategy="ann", nprobes=2)
    assert seen[-1] == 2


def test_an_index_cut_off_before_its_record_is_rebuilt(ann_index, tmp_path):
    root, ids, vec = ann_index
    idx = tmp_path / "idx"
    shutil.copytree(root / "idx", idx)
    ix = open_index(idx)
    # what a kill between create_index and the record leaves: a record of another index
    rec = json.loads(ix.table.schema.field("vector").metadata[ANN_KEY])
    ix.table.update_field_metadata({"path": "vector", "metadata": {ANN_KEY.decode(): json.dumps({**rec, "index_uuid": "x"})}})
    ix = open_index(idx)
    assert ix.ann_record() is None
    info = ix.ann_info()
    assert info["recorded"] is False and info["num_partitions"] is None and info["num_sub_vectors"] == 4
    assert ix.nprobes() == default_nprobes(ann_params(720, 32)["num_partitions"])  # formula at the indexed rows
    r = run(IndexConfig(embeddings=root / "a.lance", output=str(idx), ann=True, num_partitions=3))
    assert r.counts["ann_built"] == 1 and r.details["ann"]["recorded"] is True
    assert open_index(idx).ann_info()["num_partitions"] == 3


def test_hnsw_records_no_sub_vectors(tmp_path):
    vec = unit(np.random.default_rng(1), 300, 16)
    store = make_store(tmp_path / "h.lance", [f"h{k}" for k in range(300)], vec)
    r = run(IndexConfig(embeddings=store, output=str(tmp_path / "idx"), ann=True, index_type="IVF_HNSW_SQ"))
    ann = r.details["ann"]
    assert ann["index_type"] == "IVF_HNSW_SQ" and ann["num_sub_vectors"] is None and ann["num_partitions"] == 1


# -- the exact-search cache is keyed by table identity -------------------------------------------


def _two_stores(tmp_path):
    rng = np.random.default_rng(5)
    ids = [f"i{k:02d}" for k in range(20)]
    a = make_store(tmp_path / "a.lance", ids, unit(rng, 20, 8))
    b_vec = unit(rng, 20, 8)
    b = make_store(tmp_path / "b.lance", [f"new{k:02d}" for k in range(20)], b_vec)
    return ids, a, b, b_vec


def test_a_dropped_and_recreated_table_never_reads_the_old_cache(tmp_path):
    import lancedb

    ids, a, b, b_vec = _two_stores(tmp_path)
    idx = str(tmp_path / "idx")
    run(IndexConfig(embeddings=a, output=idx))
    v1 = open_index(idx).version
    lancedb.connect(idx).drop_table("images")
    r = run(IndexConfig(embeddings=b, output=idx))
    assert r.counts["added"] == 20
    ix = open_index(idx)
    assert ix.version == v1  # same version number as the old table's cache
    got = ix.search(b_vec[3], k=1, strategy="exact")[0][0]
    assert got.id == "new03" and got.score == pytest.approx(1.0, abs=1e-5)
    # and the index stage compares against the new table's rows: a real update is not "unchanged"
    r = run(IndexConfig(embeddings=a, output=idx))
    assert r.counts["added"] == 20 and r.counts["unchanged"] == 0 and r.counts["rows"] == 40


def test_a_table_whose_folder_was_removed_and_rebuilt_gets_its_own_cache(tmp_path):
    ids, a, b, b_vec = _two_stores(tmp_path)
    idx = tmp_path / "idx"
    run(IndexConfig(embeddings=a, output=str(idx)))
    shutil.rmtree(idx / "images.lance")  # the user removes the table; its cache folder stays
    run(IndexConfig(embeddings=b, output=str(idx)))
    assert {h.id for h in open_index(idx).search(b_vec[:5], k=3, strategy="exact")[0]} <= {f"new{k:02d}" for k in range(20)}


def test_two_indexes_sharing_a_cache_dir_keep_their_own_ids(tmp_path):
    ids, a, b, b_vec = _two_stores(tmp_path)
    cache = tmp_path / "shared-cache"
    run(IndexConfig(embeddings=a, output=str(tmp_path / "one"), cache_dir=cache))
    run(IndexConfig(embeddings=b, output=str(tmp_path / "two"), cache_dir=cache))
    one, two = open_index(tmp_path / "one", cache_dir=cache), open_index(tmp_path / "two", cache_dir=cache)
    assert one.version == two.version and one.identity != two.identity
    assert {h.id for h in one.search(b_vec[0], k=20)[0]} == set(ids)
    assert {h.id for h in two.search(b_vec[0], k=20)[0]} == {f"new{k:02d}" for k in range(20)}
    # each build keeps the other's files
    names = sorted(p.name for p in cache.iterdir() if not p.name.startswith("."))
    assert names == sorted(f"{ix.cache_key}.{ext}" for ix in (one, two) for ext in ("rows.arrow", "vectors.npy"))


def test_a_table_made_before_identities_is_told_apart_by_its_commit_time(tmp_path):
    import lancedb
    import pyarrow as pa

    from cirkit.io.embeddings import row_schema, rows_table

    m = EmbeddingManifest(backbone="fake", checkpoint="fake", dim=4)
    schema = row_schema(m)  # no table id, as an older cirkit wrote it
    db = lancedb.connect(str(tmp_path / "idx"))
    db.create_table("images", data=rows_table(["a"], ["a.png"], np.eye(1, 4, dtype=np.float32), schema))
    first = open_index(tmp_path / "idx")
    assert first.identity.startswith("legacy") and first.identity == open_index(tmp_path / "idx").identity
    assert first.search(np.eye(1, 4, dtype=np.float32), k=1)[0][0].id == "a"
    db.drop_table("images")
    db.create_table("images", data=pa.table(rows_table(["b"], ["b.png"], np.eye(1, 4, dtype=np.float32), schema)))
    again = open_index(tmp_path / "idx")
    assert again.version == first.version and again.identity != first.identity
    assert again.search(np.eye(1, 4, dtype=np.float32), k=1)[0][0].id == "b"


# -- hits are records with the index's metadata ---------------------------------------------------


def test_hits_carry_metadata_in_exact_and_ann_search(ann_index, tmp_path):
    root, ids, vec = ann_index
    idx = tmp_path / "idx"
    shutil.copytree(root / "idx", idx)
    meta = tmp_path / "m.jsonl"
    meta.write_text("".join(json.dumps({"id": i, "n": k, "tag": f"t{k % 3}"}) + "\n" for k, i in enumerate(ids[:720])))
    run(IndexConfig(output=str(idx), metadata=meta))
    ix = open_index(idx)
    for strategy in ("exact", "ann"):
        hits = ix.search(vec[5], k=3, strategy=strategy, metadata=True, where="n < 100")[0]
        assert isinstance(hits[0], Hit) and hits[0].id == ids[5]
        assert hits[0].metadata == {"n": 5, "tag": "t2"}, strategy
        assert all(h.metadata["n"] < 100 for h in hits)
    assert ix.search(vec[5], k=1)[0][0].metadata == {}  # not asked: no extra read


def test_result_round_trips_its_hits_as_records():
    rec = Result(id="q", hits=[Hit(1, "a", 0.51234567, "/x/a.png", {"year": 2020})], text="t")
    d = rec.to_dict()
    assert d["hits"] == [{"rank": 1, "id": "a", "score": 0.512346, "image": "/x/a.png", "metadata": {"year": 2020}}]
    back = Result.from_dict(json.loads(json.dumps(d)))
    assert back.hits[0] == Hit(1, "a", 0.512346, "/x/a.png", {"year": 2020})
    with pytest.raises(CirkitError, match=r"r.jsonl:4: field 'hits\[0\].score': expected float"):
        Result.from_dict({"id": "q", "hits": [{"rank": 1, "id": "a", "score": "high"}]}, "r.jsonl", 4)


def test_unknown_search_strategy_is_a_user_error(ann_index):
    root, ids, vec = ann_index
    with pytest.raises(CirkitError, match="unknown search strategy 'fast'"):
        open_index(root / "idx").search(vec[0], strategy="fast")


def test_an_unwritable_cache_location_searches_from_memory(tmp_path, caplog):
    ids, a, b, b_vec = _two_stores(tmp_path)
    run(IndexConfig(embeddings=b, output=str(tmp_path / "idx")))
    not_a_dir = tmp_path / "cache-file"
    not_a_dir.write_text("a file where a folder should be")
    ix = open_index(tmp_path / "idx", cache_dir=not_a_dir)
    assert ix.search(b_vec[7], k=1)[0][0].id == "new07"
    assert "searching from memory" in caplog.text and not_a_dir.read_text().startswith("a file")


def test_an_index_built_before_records_is_kept_and_searched_with_the_formula(ann_index, tmp_path):
    root, ids, vec = ann_index
    idx = tmp_path / "idx"
    shutil.copytree(root / "idx", idx)
    ix = open_index(idx)
    ix.table.update_field_metadata({"path": "vector", "metadata": {ANN_KEY.decode(): None}})  # as an older cirkit left it
    ix = open_index(idx)
    assert ix.ann_info()["recorded"] is False
    r = run(IndexConfig(embeddings=root / "a.lance", output=str(idx), ann=True))
    assert "ann_built" not in r.counts and r.counts["unchanged"] == 720  # no silent rebuild of a large index
    assert open_index(idx).nprobes() == default_nprobes(ann_params(720, 32)["num_partitions"])


def test_a_build_killed_after_its_pending_record_is_rebuilt(ann_index, tmp_path, monkeypatch):
    root, ids, vec = ann_index
    idx = tmp_path / "idx"
    shutil.copytree(root / "idx", idx)
    import lancedb.table

    def killed(self, *a, **k):
        raise KeyboardInterrupt  # stands in for the kill: after the pending record, before the index

    monkeypatch.setattr(lancedb.table.LanceTable, "create_index", killed)
    with pytest.raises(KeyboardInterrupt):  # a change of type forces a rebuild
        run(IndexConfig(embeddings=root / "a.lance", output=str(idx), ann=True, index_type="IVF_HNSW_SQ"))
    monkeypatch.undo()
    ix = open_index(idx)
    assert ix.ann_record() is None and ix.ann_info()["recorded"] is False  # the record names no index
    r = run(IndexConfig(embeddings=root / "a.lance", output=str(idx), ann=True, num_partitions=5))
    assert r.counts["ann_built"] == 1 and open_index(idx).ann_info()["num_partitions"] == 5


def test_hits_serialise_to_strict_json():
    import datetime

    h = Hit(1, "a", 0.5, None, {"nan": float("nan"), "inf": float("-inf"), "when": datetime.date(2020, 1, 2),
                                "raw": b"\x01", "nested": {"x": [float("nan"), 1.5]}})
    text = json.dumps(Result(id="q", hits=[h]).to_dict(), allow_nan=False)
    assert json.loads(text)["hits"][0]["metadata"] == {"nan": None, "inf": None, "when": "2020-01-02", "raw": "01",
                                                       "nested": {"x": [None, 1.5]}}
