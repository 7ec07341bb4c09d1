"""Catalog vectors in FAISS index files, for shops without PostgreSQL (`publish.backend: faiss`).

The same contract as the pgvector store: one HNSW index (inner product over L2-normalised
vectors, i.e. cosine) per publishing run in `<folder>/<table>.faiss` with its rows in
`<table>.parquet`, a record of every table in `indexes.json`, and the serving pointer in
`serving.json`. Every file is written to a temporary name and renamed, so a crash leaves the old
file whole; the pointer is one rename, so it flips whole.
"""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import polars as pl

from pipeline.data.files import atomic_write
from pipeline.errors import StageError
from pipeline.retrieval.search import normalise
from pipeline.retrieval.served import ServedConfig
from pipeline.serving.index import IDENTIFIER, HnswSettings, IndexStore, Row, Serving, ef_for


class FaissStore(IndexStore):
    """A folder of FAISS HNSW index files and the JSON records that say which one serves."""

    def __init__(self, folder: Path):
        super().__init__()
        self.folder = folder
        folder.mkdir(parents=True, exist_ok=True)
        self._loaded: dict[str, tuple[object, list[str]]] = {}
        self._rows: dict[str, dict[str, Row]] = {}

    def close(self) -> None:
        self._loaded.clear()
        self._rows.clear()

    def _path(self, table: str, suffix: str) -> Path:
        if not IDENTIFIER.fullmatch(table):
            raise StageError(f"{table!r} is not an index table name")
        return self.folder / f"{table}{suffix}"

    def _records(self, name: str) -> dict:
        path = self.folder / name
        return json.loads(path.read_text()) if path.exists() else {}

    def _write_records(self, name: str, records: dict) -> None:
        with atomic_write(self.folder / name) as tmp:
            tmp.write_text(json.dumps(records, indent=2, sort_keys=True))

    def write(self, table: str, image_ids: Sequence[str], product_ids: Sequence[str | None],
              titles: Sequence[str | None], digests: Sequence[str], paths: Sequence[str | None], vectors: np.ndarray,
              hnsw: HnswSettings, model_name: str, run_id: str, served: ServedConfig) -> int:
        """(Re)build `table`'s index file and rows; returns the row count."""
        import faiss

        vectors = np.ascontiguousarray(normalise(vectors), dtype=np.float32)
        index = faiss.IndexHNSWFlat(vectors.shape[1], int(hnsw.m), faiss.METRIC_INNER_PRODUCT)
        index.hnsw.efConstruction = int(hnsw.ef_construction)
        index.add(vectors)
        rows = pl.DataFrame({"image_id": list(image_ids), "product_id": list(product_ids), "title": list(titles),
                             "digest": list(digests), "path": list(paths)},
                            schema={"image_id": pl.String, "product_id": pl.String, "title": pl.String,
                                    "digest": pl.String, "path": pl.String})
        with atomic_write(self._path(table, ".parquet")) as tmp:
            rows.write_parquet(tmp)
        with atomic_write(self._path(table, ".faiss")) as tmp:
            faiss.write_index(index, str(tmp))
        records = self._records("indexes.json")
        records[table] = {"model_name": model_name, "run_id": run_id, "served_config": served.to_dict(),
                          "built_at": time.time()}
        self._write_records("indexes.json", records)
        self._loaded.pop(table, None)
        self._rows.pop(table, None)
        return self.count(table)

    def _load(self, table: str) -> tuple[object, list[str]]:
        import faiss

        if table not in self._loaded:
            if not self.exists(table):
                raise StageError(f"index file {self._path(table, '.faiss')} does not exist")
            index = faiss.read_index(str(self._path(table, ".faiss")))
            ids = pl.read_parquet(self._path(table, ".parquet"), columns=["image_id"])["image_id"].to_list()
            if index.ntotal != len(ids):
                raise StageError(f"index file {self._path(table, '.faiss')} holds {index.ntotal} vectors but its "
                                 f"rows file {len(ids)}: rebuild it (rerun publish)")
            self._loaded[table] = (index, ids)
        return self._loaded[table]

    def count(self, table: str) -> int:
        return len(self._load(table)[1])

    def exists(self, table: str) -> bool:
        return self._path(table, ".faiss").exists() and self._path(table, ".parquet").exists()

    def search(self, table: str, query: np.ndarray, k: int, ef_search: int, exact: bool = False
               ) -> list[tuple[str, float]]:
        """Top-k (image_id, cosine similarity) from the HNSW index (its candidate list at least k),
        or with `exact` from the flat storage beneath it (every vector, FAISS IndexFlatIP)."""
        import faiss

        index, ids = self._load(table)
        searched = faiss.downcast_index(index.storage) if exact else index
        if not exact:
            index.hnsw.efSearch = ef_for(k, ef_search)
        scores, rows = searched.search(np.ascontiguousarray(normalise(query[None]), dtype=np.float32), int(k))
        return [(ids[j], float(s)) for j, s in zip(rows[0], scores[0], strict=True) if j >= 0]

    def rows(self, table: str, image_ids: Sequence[str]) -> dict[str, Row]:
        if table not in self._rows:
            frame = pl.read_parquet(self._path(table, ".parquet"))
            if "path" not in frame.columns:
                frame = frame.with_columns(pl.lit(None, pl.String).alias("path"))
            self._rows[table] = {image: Row(title, product, path) for image, title, product, path in
                                 frame.select("image_id", "title", "product_id", "path").iter_rows()}
        known = self._rows[table]
        return {image: known[image] for image in image_ids if image in known}

    def titles(self, table: str) -> tuple[list[str], list[str]]:
        rows = pl.read_parquet(self._path(table, ".parquet"), columns=["image_id", "title"]).sort("image_id")
        return rows["image_id"].to_list(), rows["title"].fill_null("").to_list()

    def flip(self, model_name: str, version: str, table: str) -> None:
        """Point serving at (version, table) with one rename; the table must exist."""
        if not self.exists(table):
            raise StageError(f"cannot serve index {table}: its files are not in {self.folder}")
        pointers = self._records("serving.json")
        pointers[model_name] = {"version": str(version), "table": table, "flipped_at": time.time()}
        self._write_records("serving.json", pointers)

    def serving(self, model_name: str) -> Serving | None:
        pointer = self._records("serving.json").get(model_name)
        if pointer is None:
            return None
        run_id = self._records("indexes.json").get(pointer["table"], {}).get("run_id", "")
        return Serving(model_name, pointer["version"], pointer["table"], self.record(pointer["table"]), run_id)

    def unpoint(self, key: str) -> bool:
        pointers = self._records("serving.json")
        if pointers.pop(key, None) is None:
            return False
        self._write_records("serving.json", pointers)
        return True

    def record(self, table: str) -> ServedConfig | None:
        """The served configuration `table` was built from (None: none recorded, or no such table)."""
        record = self._records("indexes.json").get(table, {}).get("served_config")
        return ServedConfig.from_dict(record) if record else None

    def drop_old(self, model_name: str, keep: int) -> list[str]:
        """Delete this model's index files but the newest `keep` and those serving (champion, challenger)."""
        records = self._records("indexes.json")
        tables = sorted((r["built_at"], t) for t, r in records.items() if r["model_name"] == model_name)
        tables = [t for _, t in tables]
        kept = set(tables[-keep:]) | self.kept_tables(model_name)
        dropped = [t for t in tables if t not in kept]
        for table in dropped:
            for suffix in (".faiss", ".parquet"):
                self._path(table, suffix).unlink(missing_ok=True)
            records.pop(table)
            self._loaded.pop(table, None)
        if dropped:
            self._write_records("indexes.json", records)
        return dropped
