"""cirkit index: incremental upserts/deletes, model refusal, exact vs ANN search, filters."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest

from cirkit.errors import CirkitError
from cirkit.index import IndexConfig, run
from cirkit.io.embeddings import EmbeddingStore
from cirkit.records import EmbeddingManifest
from cirkit.search import ann_params, open_index


def unit(rng, n, d):
    v = rng.standard_normal((n, d)).astype(np.float32)
    return v / np.linalg.norm(v, axis=1, keepdims=True)


def make_store(path: Path, ids, vectors, backbone="fake", checkpoint="fake", images=None) -> Path:
    m = EmbeddingManifest(backbone=backbone, checkpoint=checkpoint, dim=vectors.shape[1])
    store = EmbeddingStore.open_for_append(path, m)
    store.append(list(ids), images or [f"img/{i}.png" for i in ids], vectors)
    return path


@pytest.fixture
def base(tmp_path):
    rng = np.random.default_rng(0)
    ids = [f"i{k:03d}" for k in range(60)]
    vec = unit(rng, 60, 16)
    store = make_store(tmp_path / "a.lance", ids, vec)
    meta = tmp_path / "meta.jsonl"
    meta.write_text("\n".join(json.dumps({"id": i, "colour": ["red", "blue"][k % 2], "n": k}) for k, i in enumerate(ids)))
    return tmp_path, store, meta, ids, vec


def test_create_then_rerun_changes_nothing(base):
    tmp, store, meta, ids, vec = base
    cfg = IndexConfig(embeddings=store, output=str(tmp / "idx"), metadata=meta)
    r1 = run(cfg)
    assert r1.counts["added"] == 60 and r1.counts["rows"] == 60
    v1 = open_index(tmp / "idx").version
    rows1 = open_index(tmp / "idx").table.to_arrow().sort_by("id")
    r2 = run(cfg)
    assert r2.counts["added"] == 0 and r2.counts["updated"] == 0 and r2.counts["unchanged"] == 60
    ix = open_index(tmp / "idx")
    assert ix.version == v1
    assert ix.table.to_arrow().sort_by("id").equals(rows1)
    # same again without the metadata file: still nothing to do
    run(IndexConfig(embeddings=store, output=str(tmp / "idx")))
    assert open_index(tmp / "idx").version == v1


def test_upsert_by_id(base):
    tmp, store, meta, ids, vec = base
    run(IndexConfig(embeddings=store, output=str(tmp / "idx"), metadata=meta))
    rng = np.random.default_rng(1)
    new = unit(rng, 2, 16)
    store2 = make_store(tmp / "b.lance", [ids[0], "new1"], new)
    r = run(IndexConfig(embeddings=store2, output=str(tmp / "idx")))
    assert (r.counts["added"], r.counts["updated"], r.counts["rows"]) == (1, 1, 61)
    ix = open_index(tmp / "idx")
    got = ix.search(new[0], k=1, strategy="exact")[0][0]
    assert got.id == ids[0] and got.score == pytest.approx(1.0, abs=1e-5)
    # metadata of an updated row survives an upsert that did not mention it
    row = ix.table.search().where(f"id = '{ids[0]}'").select(["colour"]).to_arrow().to_pylist()
    assert row == [{"colour": "red"}]
    v = ix.version
    r = run(IndexConfig(embeddings=store2, output=str(tmp / "idx")))
    assert r.counts["unchanged"] == 2 and open_index(tmp / "idx").version == v


def test_delete_is_idempotent(base):
    tmp, store, meta, ids, vec = base
    run(IndexConfig(embeddings=store, output=str(tmp / "idx")))
    r = run(IndexConfig(output=str(tmp / "idx"), delete=f"{ids[1]},{ids[2]},nope"))
    assert r.counts["deleted"] == 2 and r.counts["rows"] == 58
    assert [i for i, _ in r.skipped] == ["nope"]
    v = open_index(tmp / "idx").version
    lst = tmp / "del.txt"
    lst.write_text(f"{ids[1]}\n{ids[2]}\n")
    r = run(IndexConfig(output=str(tmp / "idx"), delete=str(lst)))
    assert r.counts["deleted"] == 0 and open_index(tmp / "idx").version == v
    hits = open_index(tmp / "idx").search(vec[1], k=3, strategy="exact")[0]
    assert ids[1] not in [h.id for h in hits]


def test_other_model_refused_naming_both(base):
    tmp, store, meta, ids, vec = base
    run(IndexConfig(embeddings=store, output=str(tmp / "idx")))
    other = make_store(tmp / "o.lance", ["x"], vec[:1], backbone="clip", checkpoint="ViT-B-32@openai")
    with pytest.raises(CirkitError, match=r"fake fake \(dim 16\).*clip ViT-B-32@openai \(dim 16\)"):
        run(IndexConfig(embeddings=other, output=str(tmp / "idx")))
    with pytest.raises(CirkitError, match="clip ViT-B-32@openai"):
        open_index(tmp / "idx").check_model(EmbeddingManifest(backbone="clip", checkpoint="ViT-B-32@openai", dim=16))


def test_wrong_dimension_refused(base):
    tmp, store, meta, ids, vec = base
    run(IndexConfig(embeddings=store, output=str(tmp / "idx")))
    rng = np.random.default_rng(2)
    wrong = make_store(tmp / "w.lance", ["x"], unit(rng, 1, 8))
    with pytest.raises(CirkitError, match="dim-16 vectors.*dim 8"):
        run(IndexConfig(embeddings=wrong, output=str(tmp / "idx")))
    with pytest.raises(CirkitError, match="dim 8"):
        open_index(tmp / "idx").search(unit(rng, 1, 8), k=1)


def test_exact_search_matches_brute_force(base):
    tmp, store, meta, ids, vec = base
    run(IndexConfig(embeddings=store, output=str(tmp / "idx")))
    ix = open_index(tmp / "idx")
    q = unit(np.random.default_rng(3), 5, 16)
    got = ix.search(q, k=7, strategy="exact")
    want = np.argsort(-(q @ vec.T), axis=1, kind="stable")[:, :7]
    assert [[h.id for h in hs] for hs in got] == [[ids[j] for j in row] for row in want]
    assert got[0][0].score == pytest.approx(float((q[0] @ vec.T).max()), abs=1e-5)


def test_where_filter_exact_and_metadata_only_update(base):
    tmp, store, meta, ids, vec = base
    run(IndexConfig(embeddings=store, output=str(tmp / "idx"), metadata=meta))
    ix = open_index(tmp / "idx")
    hits = ix.search(vec[0], k=5, where="colour = 'blue'", strategy="exact")[0]
    assert len(hits) == 5 and all(int(h.id[1:]) % 2 == 1 for h in hits)
    hits = ix.search(vec[0], k=100, where="n < 3")[0]
    assert sorted(h.id for h in hits) == ids[:3]
    # new metadata column arrives later: only metadata changes, the vectors stay
    m2 = tmp / "m2.jsonl"
    m2.write_text(json.dumps({"id": ids[4], "tag": "star"}) + "\n" + json.dumps({"id": "ghost", "tag": "x"}) + "\n")
    r = run(IndexConfig(output=str(tmp / "idx"), metadata=m2))
    assert r.counts["updated"] == 1 and [i for i, _ in r.skipped] == ["ghost"]
    hits = open_index(tmp / "idx").search(vec[0], k=5, where="tag = 'star'")[0]
    assert [h.id for h in hits] == [ids[4]]
    with pytest.raises(CirkitError, match="--where"):
        open_index(tmp / "idx").search(vec[0], k=5, where="no_such_column = 1")


def test_exclude_fetches_deeper(base):
    tmp, store, meta, ids, vec = base
    run(IndexConfig(embeddings=store, output=str(tmp / "idx")))
    ix = open_index(tmp / "idx")
    full = [h.id for h in ix.search(vec[0], k=4)[0]]
    got = [h.id for h in ix.search(vec[0], k=3, exclude=[[ids[0], "img/none.png"]])[0]]
    assert got == full[1:4]


def clustered(n_clusters=12, per=60, d=32, seed=0):
    rng = np.random.default_rng(seed)
    centres = unit(rng, n_clusters, d)
    pts = centres.repeat(per, 0) + 0.15 * rng.standard_normal((n_clusters * per, d)).astype(np.float32) / np.sqrt(d)
    return (pts / np.linalg.norm(pts, axis=1, keepdims=True)).astype(np.float32), centres


def test_ann_top1_matches_exact_with_filter(tmp_path):
    vec, centres = clustered()
    ids = [f"c{k:04d}" for k in range(len(vec))]
    store = make_store(tmp_path / "c.lance", ids, vec)
    meta = tmp_path / "m.jsonl"
    meta.write_text("\n".join(json.dumps({"id": i, "half": k % 2}) for k, i in enumerate(ids)))
    r = run(IndexConfig(embeddings=store, output=str(tmp_path / "idx"), metadata=meta, ann=True))
    assert r.details["search"] == "ann" and r.details["ann"]["index_type"] == "IVF_PQ"
    ix = open_index(tmp_path / "idx")
    q = vec[::37] + 0.01
    exact = ix.search(q, k=1, strategy="exact")
    ann = ix.search(q, k=1)  # auto -> ANN
    assert [h[0].id for h in ann] == [h[0].id for h in exact]
    ex_f = ix.search(q, k=3, where="half = 1", strategy="exact")
    an_f = ix.search(q, k=3, where="half = 1", strategy="ann")
    assert [h[0].id for h in an_f] == [h[0].id for h in ex_f]
    assert all(int(h.id[1:]) % 2 == 1 for hs in an_f for h in hs)
    # --no-ann drops it; auto threshold leaves small tables exact
    r = run(IndexConfig(output=str(tmp_path / "idx"), ann=False))
    assert r.details["search"] == "exact" and open_index(tmp_path / "idx").vector_index() is None


def test_cache_follows_table_version(base):
    tmp, store, meta, ids, vec = base
    run(IndexConfig(embeddings=store, output=str(tmp / "idx")))
    ix = open_index(tmp / "idx")
    assert len(ix.cache()) == 60
    ix.table.delete(f"id = '{ids[0]}'")  # a writer that is not cirkit
    ix2 = open_index(tmp / "idx")
    assert len(ix2.cache()) == 59 and ix2.search(vec[0], k=1)[0][0].id != ids[0]
    files = sorted(p.name for p in (tmp / "idx" / "images.cache").iterdir() if not p.name.startswith("."))
    assert files == [f"{ix2.cache_key}.rows.arrow", f"{ix2.cache_key}.vectors.npy"]
    assert ix2.cache_key == f"{ix.identity}-v{ix2.version}"


def test_ann_params_formula():
    assert ann_params(1_000_000, 512) == {"num_partitions": 1000, "num_sub_vectors": 64}
    assert ann_params(100_000, 512) == {"num_partitions": 316, "num_sub_vectors": 64}
    assert ann_params(720, 32)["num_partitions"] == 2
    assert ann_params(10, 30)["num_sub_vectors"] == 3


def test_missing_index_is_a_user_error(tmp_path):
    with pytest.raises(CirkitError, match="cirkit index"):
        open_index(tmp_path / "nothing")


# -- data safety -------------------------------------------------------------------------------


@pytest.mark.parametrize("table", ["../victim", "/tmp/abs", "a/b", "..", ".hidden", "x y"])
def test_table_names_that_escape_the_index_are_refused(base, table):
    tmp, store, meta, ids, vec = base
    victim = tmp / "victim.lance"
    victim.mkdir()
    (victim / "data.bin").write_bytes(b"precious")
    (victim / "_versions").mkdir()  # an uncommitted-looking Lance folder: the old code removed it
    with pytest.raises(CirkitError, match=r"--table .* is not a plain name"):
        run(IndexConfig(embeddings=store, output=str(tmp / "idx"), table=table))
    assert (victim / "data.bin").read_bytes() == b"precious"
    with pytest.raises(CirkitError, match="is not a plain name"):
        open_index(tmp / "idx", table)


def test_a_recipe_table_path_is_refused_too(base, tmp_path):
    from cirkit.config import resolve

    tmp, store, meta, ids, vec = base
    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"index:\n  table: {tmp}/victim\n")
    cfg = resolve(IndexConfig, recipe, {"embeddings": store, "output": str(tmp / "idx")}, section="index")
    with pytest.raises(CirkitError, match="is not a plain name"):
        run(cfg)


@pytest.mark.parametrize("value, message", [
    (2**64, "holds an integer beyond 64 bits; write such numbers as strings"),
    (-(2**70), "holds an integer beyond 64 bits"),
])
def test_metadata_integers_arrow_cannot_hold_are_one_line(base, value, message):
    tmp, store, meta, ids, vec = base
    m = tmp / "big.jsonl"
    m.write_text(json.dumps({"id": ids[0], "n": 1}) + "\n" + json.dumps({"id": ids[1], "n": value}) + "\n")
    with pytest.raises(CirkitError, match=message) as e:
        run(IndexConfig(embeddings=store, output=str(tmp / "idx"), metadata=m))
    assert "\n" not in str(e.value) and "'n'" in str(e.value)
    assert not (tmp / "idx" / "images.lance").exists()
    # the same on an update of an existing table
    run(IndexConfig(embeddings=store, output=str(tmp / "idx"), metadata=meta))
    with pytest.raises(CirkitError, match="metadata column 'n'"):
        run(IndexConfig(output=str(tmp / "idx"), metadata=m))


def test_metadata_of_another_type_than_the_table_is_one_line(base):
    tmp, store, meta, ids, vec = base
    run(IndexConfig(embeddings=store, output=str(tmp / "idx"), metadata=meta))
    m = tmp / "m.jsonl"
    m.write_text(json.dumps({"id": ids[0], "n": {"nested": [1, 2]}}) + "\n")
    with pytest.raises(CirkitError, match=r"metadata column 'n' has values of mixed or wrong types \(the index stores it as int64\)"):
        run(IndexConfig(output=str(tmp / "idx"), metadata=m))


@pytest.mark.parametrize("where", ["store", "inside", "table"])
def test_the_index_is_never_written_into_its_own_input(base, where):
    tmp, store, meta, ids, vec = base
    out = {"store": store, "inside": store / "sub", "table": tmp / "idx"}[where]
    emb = store if where != "table" else tmp / "idx" / "images.lance"
    if where == "table":
        run(IndexConfig(embeddings=store, output=str(tmp / "idx")))
    before = sorted(p.relative_to(tmp) for p in tmp.rglob("*"))
    with pytest.raises(CirkitError, match="would be written into its own embeddings store"):
        run(IndexConfig(embeddings=emb, output=str(out)))
    assert sorted(p.relative_to(tmp) for p in tmp.rglob("*")) == before


@pytest.mark.parametrize("field, value, message", [
    ("num_partitions", 0, "--num-partitions must be at least 1, got 0"),
    ("num_sub_vectors", -4, "--num-sub-vectors must be at least 1, got -4"),
    ("ann_threshold", -1, "--ann-threshold must be at least 0, got -1"),
])
def test_bad_numbers_are_refused_before_work(base, field, value, message):
    tmp, store, meta, ids, vec = base
    with pytest.raises(CirkitError, match=message):
        run(IndexConfig(embeddings=store, output=str(tmp / "idx"), **{field: value}))
    assert not (tmp / "idx").exists()


def test_a_table_cut_off_before_its_first_commit_is_rebuilt(base):
    tmp, store, meta, ids, vec = base
    t = tmp / "idx" / "images.lance"
    (t / "_versions").mkdir(parents=True)
    (t / "data").mkdir()
    (t / "data" / "part.lance").write_bytes(b"half")
    r = run(IndexConfig(embeddings=store, output=str(tmp / "idx")))
    assert r.counts["added"] == 60 and open_index(tmp / "idx").count() == 60


def test_a_folder_of_user_files_named_like_the_table_is_never_removed(base):
    tmp, store, meta, ids, vec = base
    t = tmp / "idx" / "images.lance"
    t.mkdir(parents=True)
    (t / "holiday.jpg").write_bytes(b"mine")
    with pytest.raises(CirkitError, match=r"is not a Lance table \(it holds holiday.jpg\)"):
        run(IndexConfig(embeddings=store, output=str(tmp / "idx")))
    assert (t / "holiday.jpg").read_bytes() == b"mine"


@pytest.mark.parametrize("key, value, message", [
    ("a.b", 1, "field 'a.b': not a usable column name"),
    ("", 1, "odd.jsonl:1: not a usable column name"),
    ("tab\there", 1, "not a usable column name"),
    ("u", {}, "metadata column 'u' holds an empty object {}"),
    ("v", [{"x": {}}], "metadata column 'v' holds an empty object {}"),
])
def test_metadata_the_index_cannot_store_is_one_line(base, key, value, message):
    tmp, store, meta, ids, vec = base
    m = tmp / "odd.jsonl"
    m.write_text(json.dumps({"id": ids[0], key: value}) + "\n")
    with pytest.raises(CirkitError, match=re.escape(message)):
        run(IndexConfig(embeddings=store, output=str(tmp / "idx"), metadata=m))
    assert not (tmp / "idx" / "images.lance").exists()


def test_metadata_names_with_spaces_and_accents_are_kept(base):
    tmp, store, meta, ids, vec = base
    m = tmp / "ok.jsonl"
    m.write_text(json.dumps({"id": ids[0], "a b": 1, "ÄÖ": "ü", "t": []}) + "\n")
    run(IndexConfig(embeddings=store, output=str(tmp / "idx"), metadata=m))
    hit = open_index(tmp / "idx").search(vec[0], k=1, metadata=True)[0][0]
    assert hit.id == ids[0] and hit.metadata == {"a b": 1, "ÄÖ": "ü", "t": []}
