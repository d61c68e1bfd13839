"""The Lance embeddings store: manifest kept with the vectors, resumable appends, clear refusals."""

import numpy as np
import pytest

from cirkit.errors import CirkitError
from cirkit.io.embeddings import EmbeddingStore, read_embeddings
from cirkit.records import EmbeddingManifest


def _m(dim=4, checkpoint="ck"):
    return EmbeddingManifest(backbone="fake", checkpoint=checkpoint, dim=dim)


@pytest.mark.slow
def test_append_resume_and_read_back(tmp_path):
    p = tmp_path / "g.lance"
    v = np.eye(4, dtype=np.float32)
    s = EmbeddingStore.open_for_append(p, _m())
    assert s.append(["a", "b"], ["a.png", "b.png"], v[:2]) == 2
    s2 = EmbeddingStore.open_for_append(p, _m())  # a re-run
    assert s2.done == {"a", "b"}
    assert s2.append(["b", "c"], ["b.png", "c.png"], v[1:3]) == 1
    manifest, ids, images, vectors = read_embeddings(p)
    assert manifest.backbone == "fake" and manifest.dim == 4
    assert ids == ["a", "b", "c"] and images[2] == "c.png"
    np.testing.assert_array_equal(vectors, v[:3])


@pytest.mark.slow
def test_refuses_vectors_from_another_model(tmp_path):
    p = tmp_path / "g.lance"
    EmbeddingStore.open_for_append(p, _m()).append(["a"], ["a.png"], np.ones((1, 4)))
    with pytest.raises(CirkitError, match="holds vectors from fake ck \\(dim 4\\), not fake other"):
        EmbeddingStore.open_for_append(p, _m(checkpoint="other"))


def test_refuses_wrong_dimension(tmp_path):
    s = EmbeddingStore.open_for_append(tmp_path / "g.lance", _m())
    with pytest.raises(CirkitError, match="do not match dim 4"):
        s.append(["a"], ["a.png"], np.ones((1, 5)))


def test_path_must_end_in_lance(tmp_path):
    with pytest.raises(CirkitError, match="must end in .lance"):
        EmbeddingStore.open_for_append(tmp_path / "g.db", _m())


def test_missing_store(tmp_path):
    with pytest.raises(CirkitError, match="no such embeddings store"):
        read_embeddings(tmp_path / "none.lance")


# -- damaged and foreign stores: one-line errors, never a traceback -------------------------------


def _raw_table(path, schema, rows=None, **kwargs):
    import lancedb

    db = lancedb.connect(str(path.parent))
    return db.create_table(path.stem, data=rows, **kwargs) if rows is not None else db.create_table(path.stem, schema=schema)


def test_null_vectors_are_refused_naming_the_row(tmp_path):
    import pyarrow as pa

    from cirkit.io.embeddings import row_schema

    schema = row_schema(_m())
    rows = pa.table({"id": ["a", "b"], "image": ["a.png", "b.png"],
                     "vector": pa.array([[1.0, 0, 0, 0], None], pa.list_(pa.float32(), 4))}, schema=schema)
    _raw_table(tmp_path / "g.lance", schema, rows, on_bad_vectors="null")
    with pytest.raises(CirkitError, match=r"g.lance: row 'b' has a null vector; re-embed into a new store"):
        read_embeddings(tmp_path / "g.lance")


def test_null_values_inside_a_vector_are_refused(tmp_path):
    import pyarrow as pa

    from cirkit.io.embeddings import row_schema

    schema = row_schema(_m())
    vec = pa.FixedSizeListArray.from_arrays(pa.array([1.0, None, 0, 0], pa.float32()), 4)
    _raw_table(tmp_path / "g.lance", schema, pa.table({"id": ["a"], "image": ["a.png"], "vector": vec}, schema=schema))
    with pytest.raises(CirkitError, match="row 'a' has a null vector"):
        read_embeddings(tmp_path / "g.lance")


@pytest.mark.parametrize("meta, message", [
    ({b"cirkit": b"{not json"}, "its cirkit manifest is not valid JSON"),
    ({b"cirkit": b"[1, 2]"}, "expected a JSON object for a manifest record"),
    ({b"cirkit": b'{"backbone": "fake", "checkpoint": "c", "dim": 0}'}, "its cirkit manifest has dim 0"),
    ({b"other": b"x"}, "no cirkit manifest; was it written by 'cirkit embed'"),
])
def test_a_bad_or_missing_manifest_is_one_line(tmp_path, meta, message):
    import pyarrow as pa

    schema = pa.schema([("id", pa.string()), ("image", pa.string()), ("vector", pa.list_(pa.float32(), 4))], metadata=meta)
    _raw_table(tmp_path / "g.lance", schema)
    for call in (lambda: read_embeddings(tmp_path / "g.lance"), lambda: EmbeddingStore.open_for_append(tmp_path / "g.lance", _m())):
        with pytest.raises(CirkitError, match=message) as e:
            call()
        assert "\n" not in str(e.value)


def test_a_table_of_another_shape_is_refused(tmp_path):
    import json

    import pyarrow as pa

    meta = {b"cirkit": json.dumps(_m().to_dict()).encode()}
    schema = pa.schema([("id", pa.string()), ("image", pa.string()), ("vector", pa.list_(pa.float64()))], metadata=meta)
    _raw_table(tmp_path / "g.lance", schema)
    with pytest.raises(CirkitError, match=r"column 'vector' is list<item: double>, expected fixed_size_list<float>\[4\]"):
        read_embeddings(tmp_path / "g.lance")
    with pytest.raises(CirkitError, match="column 'vector'"):
        EmbeddingStore.open_for_append(tmp_path / "g.lance", _m())


def test_duplicate_ids_are_detected_on_read(tmp_path):
    from cirkit.io.embeddings import row_schema, rows_table

    schema = row_schema(_m())
    t = _raw_table(tmp_path / "g.lance", schema)
    t.add(rows_table(["a", "b"], ["a.png", "b.png"], np.eye(2, 4), schema))
    t.add(rows_table(["b"], ["b.png"], np.eye(1, 4), schema))  # what two writers at once used to leave
    with pytest.raises(CirkitError, match=r"id 'b' is stored more than once \(two writers at once\?\)"):
        read_embeddings(tmp_path / "g.lance")


def test_one_append_never_stores_an_id_twice(tmp_path):
    s = EmbeddingStore.open_for_append(tmp_path / "g.lance", _m())
    assert s.append(["a", "a", "b"], ["1.png", "2.png", "b.png"], np.eye(3, 4)) == 2
    _, ids, images, vectors = read_embeddings(tmp_path / "g.lance")
    assert ids == ["a", "b"] and images[0] == "1.png"


@pytest.mark.parametrize("name", ["my store.lance", "a;b.lance", ".hidden.lance", "é.lance"])
def test_store_names_lance_cannot_hold_are_one_line(tmp_path, name):
    with pytest.raises(CirkitError, match="is not a plain name: use letters, digits"):
        EmbeddingStore.open_for_append(tmp_path / name, _m())


def test_a_folder_with_spaces_above_the_store_is_fine(tmp_path):
    p = tmp_path / "my photos" / "g.lance"
    EmbeddingStore.open_for_append(p, _m()).append(["a"], ["a.png"], np.eye(1, 4))
    assert read_embeddings(p)[1] == ["a"]


def test_a_store_cut_off_before_its_first_commit_is_rebuilt(tmp_path):
    """What a kill inside lancedb's create_table used to leave: a folder with no committed version."""
    p = tmp_path / "g.lance"
    (p / "_versions").mkdir(parents=True)
    (p / "_transactions").mkdir()
    (p / "_transactions" / "0-x.txn").write_bytes(b"partial")
    with pytest.raises(CirkitError, match="has no committed version .* re-run 'cirkit embed'"):
        read_embeddings(p)
    s = EmbeddingStore.open_for_append(p, _m())
    assert s.append(["a"], ["a.png"], np.eye(1, 4)) == 1
    assert read_embeddings(p)[1] == ["a"]


def test_an_uncommitted_folder_with_user_files_is_never_removed(tmp_path):
    p = tmp_path / "g.lance"
    p.mkdir()
    (p / "notes.txt").write_text("mine")
    with pytest.raises(CirkitError, match=r"g.lance: is not a Lance table \(it holds notes.txt\)"):
        EmbeddingStore.open_for_append(p, _m())
    assert (p / "notes.txt").read_text() == "mine"


def test_a_new_store_appears_only_once_committed(tmp_path, monkeypatch):
    """A store is created in a temp folder and renamed in: a failure midway leaves nothing under its name."""
    import lancedb.db

    def boom(self, *a, **k):
        raise OSError("disk full")

    monkeypatch.setattr(lancedb.db.LanceDBConnection, "create_table", boom)
    with pytest.raises(OSError, match="disk full"):
        EmbeddingStore.open_for_append(tmp_path / "g.lance", _m())
    assert sorted(p.name for p in tmp_path.iterdir()) == []


def test_a_file_where_the_store_should_be_is_one_line(tmp_path):
    (tmp_path / "g.lance").write_text("x")
    with pytest.raises(CirkitError, match="is a file, not an embeddings store"):
        EmbeddingStore.open_for_append(tmp_path / "g.lance", _m())
    with pytest.raises(CirkitError, match="is a file, not an embeddings store"):
        read_embeddings(tmp_path / "g.lance")
