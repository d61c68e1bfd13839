"""The embeddings store: a Lance table ``<name>.lance`` with id, image, vector, and a manifest.

The manifest (:class:`cirkit.records.EmbeddingManifest`) lives in the table's schema
metadata under the key ``cirkit``, so it can never drift from the vectors. Appends are
Lance commits (atomic per batch), so a killed ``embed`` keeps every finished batch and a
re-run skips the ids already stored.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from cirkit.errors import CirkitError
from cirkit.records import EmbeddingManifest

MANIFEST_KEY = b"cirkit"


def _split(path: str | Path) -> tuple[str, str]:
    p = Path(path)
    if p.suffix != ".lance":
        raise CirkitError(f"{path}: an embeddings store path must end in .lance (e.g. gallery.lance)")
    return str(p.parent if str(p.parent) else "."), p.stem


def _schema(dim: int, manifest: EmbeddingManifest):
    import pyarrow as pa

    return pa.schema(
        [("id", pa.string()), ("image", pa.string()), ("vector", pa.list_(pa.float32(), dim))],
        metadata={MANIFEST_KEY: json.dumps(manifest.to_dict())},
    )


def read_manifest_from_schema(schema, where: str, made_by: str = "embed") -> EmbeddingManifest:
    """The manifest kept in a Lance schema's metadata (stores by ``cirkit embed``, indexes by ``cirkit index``)."""
    meta = schema.metadata or {}
    if MANIFEST_KEY not in meta:
        raise CirkitError(f"{where}: no cirkit manifest; was it written by 'cirkit {made_by}'?")
    return EmbeddingManifest.from_dict(json.loads(meta[MANIFEST_KEY]), where)


class EmbeddingStore:
    """Append-only, resumable store of normalised vectors (see module docstring)."""

    def __init__(self, path: str | Path, manifest: EmbeddingManifest, table, existing: set[str]):
        self.path, self.manifest, self._table, self.done = Path(path), manifest, table, existing

    @classmethod
    def open_for_append(cls, path: str | Path, manifest: EmbeddingManifest) -> EmbeddingStore:
        """Open (or create) a store; refuses to mix vectors from another model or dimension."""
        import lancedb

        root, name = _split(path)
        Path(root).mkdir(parents=True, exist_ok=True)
        db = lancedb.connect(root)
        if Path(path).exists():
            table = db.open_table(name)
            have = read_manifest_from_schema(table.schema, str(path))
            if have.fingerprint() != manifest.fingerprint():
                raise CirkitError(
                    f"{path}: holds vectors from {have.backbone} {have.checkpoint} (dim {have.dim}), "
                    f"not {manifest.backbone} {manifest.checkpoint} (dim {manifest.dim}); write to a new file"
                )
            ids = set(table.to_arrow().column("id").to_pylist()) if table.count_rows() else set()
            return cls(path, have, table, ids)
        table = db.create_table(name, schema=_schema(manifest.dim, manifest))
        return cls(path, manifest, table, set())

    def append(self, ids: Sequence[str], images: Sequence[str], vectors) -> int:
        """Add the rows whose ids are new; returns how many were added."""
        import pyarrow as pa

        vectors = np.asarray(vectors, dtype=np.float32)
        if vectors.ndim != 2 or vectors.shape[1] != self.manifest.dim:
            raise CirkitError(f"{self.path}: vectors of shape {vectors.shape} do not match dim {self.manifest.dim}")
        keep = [i for i, k in enumerate(ids) if k not in self.done]
        if not keep:
            return 0
        vec = vectors[keep]
        table = pa.table(
            {
                "id": [ids[i] for i in keep],
                "image": [images[i] for i in keep],
                "vector": pa.FixedSizeListArray.from_arrays(pa.array(vec.ravel(), pa.float32()), self.manifest.dim),
            },
            schema=_schema(self.manifest.dim, self.manifest),
        )
        self._table.add(table)
        self.done.update(ids[i] for i in keep)
        return len(keep)


def read_embeddings(path: str | Path) -> tuple[EmbeddingManifest, list[str], list[str], np.ndarray]:
    """Load a whole store: manifest, ids, image paths, and an (N, dim) float32 matrix."""
    import lancedb

    if not Path(path).exists():
        raise CirkitError(f"{path}: no such embeddings store (make one with 'cirkit embed')")
    root, name = _split(path)
    table = lancedb.connect(root).open_table(name)
    manifest = read_manifest_from_schema(table.schema, str(path))
    data = table.to_arrow()
    ids = data.column("id").to_pylist()
    images = data.column("image").to_pylist()
    flat = data.column("vector").combine_chunks()
    vectors = flat.values.to_numpy(zero_copy_only=False).reshape(len(ids), manifest.dim) if ids else np.zeros((0, manifest.dim), np.float32)
    return manifest, ids, images, vectors.astype(np.float32, copy=False)
