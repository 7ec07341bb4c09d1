"""What every index backend shares: table names, HNSW settings, the serving pointer's record, the
check against exact search, BM25 over the served titles, and the answer to one query.

A backend (pgvector.VectorStore, faiss_file.FaissStore) stores one table of catalog vectors per
publishing run, a record of each table (model, run, tuned weights) and a pointer per model naming
the version and table that serve.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from pipeline.errors import ConfigError, StageError
from pipeline.retrieval.search import exact_search

IDENTIFIER = re.compile(r"[a-z][a-z0-9_]{0,62}")


def table_name(model_name: str, key: str) -> str:
    """`vectors_<model>_<key>`, lower-case, other characters as `_` (key: the run that built it, as
    a short digest); refused unless a plain identifier of at most 63 characters (PostgreSQL's limit)."""
    name = "vectors_" + re.sub(r"[^a-z0-9]+", "_", model_name.lower()).strip("_") + "_" + key
    if not IDENTIFIER.fullmatch(name) or not re.fullmatch(r"[a-z0-9]{1,16}", key):
        raise ConfigError(f"cannot make an index table name from model {model_name!r} and key {key!r} "
                          "(model names of letters, digits and separators, at most 38 characters)")
    return name


def run_key(run_id: str) -> str:
    """A short, stable, identifier-safe key for a run id."""
    return "r" + hashlib.sha256(run_id.encode()).hexdigest()[:11]


class VersionMismatch(StageError):
    """The serving pointer names another version than the text tower that encoded the query."""


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
    title_weight: float
    fusion_weight: float


class IndexStore:
    """The parts of a backend that only need its `search` and `titles`."""

    def __init__(self) -> None:
        self._bm25: dict = {}  # table -> its BM25 index, built on the first keyword search

    def search(self, table: str, query: np.ndarray, k: int, ef_search: int) -> list[tuple[str, float]]:
        raise NotImplementedError

    def titles(self, table: str) -> tuple[list[str], list[str]]:
        """(image ids, titles, '' where none) of a table, in one order."""
        raise NotImplementedError

    def serving(self, model_name: str) -> Serving | None:
        raise NotImplementedError

    def keyword_search(self, table: str, query: str, k: int) -> list[tuple[str, float]]:
        raise NotImplementedError

    def recall_against_exact(self, table: str, image_ids: Sequence[str], vectors: np.ndarray,
                             queries: np.ndarray, k: int, ef_search: int) -> float:
        """Share of the exact top k (the same vectors, searched exactly) that the index returns."""
        exact, _ = exact_search(queries, vectors, k)
        found = 0
        for query, row in zip(queries, exact, strict=True):
            expected = {image_ids[j] for j in row if j >= 0}
            found += len(expected & {image for image, _ in self.search(table, query, k, ef_search)})
        return found / max(1, exact.size)

    def bm25_search(self, table: str, query: str, k: int) -> list[tuple[str, float]]:
        """Top-k (image_id, BM25 score) over the table's titles: the keyword search evaluate tuned the
        fusion weight with. The BM25 index is built once per table and process."""
        from pipeline.retrieval.bm25 import Bm25Index

        if table not in self._bm25:
            ids, titles = self.titles(table)
            self._bm25[table] = Bm25Index(titles, ids)
        return self._bm25[table].search([query], k)[0]


def answer(store: IndexStore, model_name: str, loaded_version: str, query_vector: np.ndarray, query: str,
           k: int, ef_search: int, hybrid: bool, keyword: str = "bm25") -> dict:
    """One query against what serves now: HNSW top-k from the pointer's table, fused with keyword
    hits over titles (`keyword`: "bm25", as evaluate tuned it, or "fulltext", PostgreSQL's) when
    `hybrid`, with the weight the index was built with.

    Refuses when the pointer names another version than the text tower that encoded the query:
    vectors of two models are not comparable."""
    from pipeline.retrieval.fusion import weighted_fusion

    current = store.serving(model_name)
    if current is None:
        raise StageError(f"nothing serves for model {model_name!r} yet: no promoted version has a published index")
    if current.version != str(loaded_version):
        raise VersionMismatch(f"the serving index is version {current.version}'s, but the query was encoded by version "
                              f"{loaded_version}'s text tower: reload the model (vectors of two versions do not "
                              "compare)")
    depth = max(k, 50)
    results = store.search(current.table, query_vector, depth, ef_search)
    if hybrid:
        hits = store.bm25_search(current.table, query, depth) if keyword == "bm25" else \
            store.keyword_search(current.table, query, depth)
        results = weighted_fusion(results, hits, current.fusion_weight)
    return {"query": query, "model_name": model_name, "version": current.version, "table": current.table,
            "served_as": "hybrid" if hybrid else "dense",
            "results": [{"image_id": image, "score": round(score, 6)} for image, score in results[:k]]}
