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
