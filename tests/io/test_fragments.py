"""Lance fragments per process + one commit: idempotent, torn journals, journals of a deleted store."""

from __future__ import annotations

import shutil

import numpy as np
import pytest

from cirkit.io.embeddings import (
    EmbeddingStore,
    FragmentWriter,
    clear_journal,
    commit_fragments,
    journal_dir,
    journal_entries,
    read_embeddings,
)
from cirkit.records import EmbeddingManifest

M = EmbeddingManifest(backbone="fake", checkpoint="fake", dim=4)


def _rows(lo, hi):
    ids = [f"id{i:03d}" for i in range(lo, hi)]
    vecs = np.eye(4, dtype=np.float32)[np.arange(lo, hi) % 4]
    return ids, [f"{k}.png" for k in ids], vecs


def _versions(path) -> int:
    import lance

    return lance.dataset(str(path)).version


def test_two_writers_one_commit_and_a_second_commit_adds_nothing(tmp_path):
    path = tmp_path / "s.lance"
    store = EmbeddingStore.open_for_append(path, M)
    writers = [FragmentWriter(store, r, rows_per_fragment=3) for r in (0, 1)]
    for n, lo in enumerate(range(0, 20, 2)):
        writers[n % 2].append(*_rows(lo, lo + 2))
    for w in writers:
        w.close()
    entries = [e for _, e in journal_entries(path)]
    assert sum(e["rows"] for e in entries) == 20
    assert commit_fragments(store, entries) == 20
    assert commit_fragments(store, entries) == 0  # committed before the journal was cleared: never twice
    clear_journal([f for f, _ in journal_entries(path)])
    _, ids, _, _ = read_embeddings(path)
    assert sorted(ids) == [f"id{i:03d}" for i in range(20)]
    assert _versions(path) == 2 and not journal_dir(path).exists()


def test_a_torn_journal_line_is_passed_over(tmp_path):
    path = tmp_path / "s.lance"
    store = EmbeddingStore.open_for_append(path, M)
    w = FragmentWriter(store, 0, rows_per_fragment=2)
    w.append(*_rows(0, 2))
    w.append(*_rows(2, 4))
    w.close()
    with open(w.journal, "a") as fh:
        fh.write('{"fragment": {"id": 0, "files": [{"path": "x')  # killed while writing its line
    entries = journal_entries(path)
    assert len(entries) == 2 and commit_fragments(store, [e for _, e in entries]) == 4


def test_fragments_journaled_for_a_deleted_store_are_left_out(tmp_path, caplog):
    path = tmp_path / "s.lance"
    old = EmbeddingStore.open_for_append(path, M)
    w = FragmentWriter(old, 0, rows_per_fragment=2)
    w.append(*_rows(0, 4))
    w.close()
    shutil.rmtree(path)  # the user deletes the store; the journal beside it stays
    new = EmbeddingStore.open_for_append(path, M)
    assert new.identity != old.identity
    assert commit_fragments(new, [e for _, e in journal_entries(path)]) == 0
    assert "journaled for an earlier table" in caplog.text
    assert read_embeddings(path)[1] == []


@pytest.mark.parametrize("fragment_rows, versions", [(None, 4), (2, 2)])
def test_one_process_commits_every_batch_or_once_with_fragment_rows(tmp_path, fragment_rows, versions):
    from PIL import Image

    from cirkit.embed import EmbedConfig, run

    folder = tmp_path / "imgs"
    folder.mkdir()
    for i in range(6):
        Image.new("RGB", (8, 8), (40 * i, 0, 0)).save(folder / f"{i}.png")
    out = tmp_path / "g.lance"
    r = run(EmbedConfig(input=folder, output=out, backbone="fake", num_workers=0, batch_size=2,
                        fragment_rows=fragment_rows))
    assert r.counts["embedded"] == 6 and len(read_embeddings(out)[1]) == 6
    assert _versions(out) == versions  # created + 3 batch commits, or created + 1 commit
    assert not journal_dir(out).exists()
