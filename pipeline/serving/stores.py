"""The configured index backend: pgvector (the shop's PostgreSQL or the embedded one) or FAISS files."""

from __future__ import annotations

from pathlib import Path

from pipeline.config import PublishConfig
from pipeline.serving.index import IndexStore


def open_store(publish: PublishConfig, state: Path) -> IndexStore:
    """`publish.backend`'s store: pgvector at `publish.dsn`, else the embedded PostgreSQL under
    `state`/pg; or FAISS index files under `state`/faiss."""
    if publish.backend == "faiss":
        from pipeline.serving.faiss_file import FaissStore

        return FaissStore(state / "faiss")
    from pipeline.serving.pgvector import VectorStore, embedded_dsn

    return VectorStore(publish.dsn or embedded_dsn(state / "pg"))
