"""What every index backend shares: table names, HNSW settings, the serving pointer's record, the
check against exact search, BM25 over the served titles, and the query path (`rank_table`, `answer`).

A backend (pgvector.VectorStore, faiss_file.FaissStore) stores one table of catalog vectors per
publishing run, a record of each table (model, run, and the served configuration it was built
from: how its queries are ranked) and a pointer per model naming the version and table that serve.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

from pipeline.errors import ConfigError, NothingServes, StageError
from pipeline.retrieval.search import exact_search
from pipeline.retrieval.served import Parity, ServedConfig, keyword_index, query_text, rank, replay_parity

IDENTIFIER = re.compile(r"[a-z][a-z0-9_]{0,62}")


def table_name(model_name: str, key: str) -> str:
    """`vectors_<model>_<key>`, lower-case, other characters as `_` (key: the run that built it, as
    a short digest); refused unless a plain identifier of at most 63 characters (PostgreSQL's limit)."""
    name = "vectors_" + re.sub(r"[^a-z0-9]+", "_", model_name.lower()).strip("_") + "_" + key
    if not IDENTIFIER.fullmatch(name) or not re.fullmatch(r"[a-z0-9]{1,16}", key):
        raise ConfigError(f"cannot make an index table name from model {model_name!r} and key {key!r} "
                          "(model names of letters, digits and separators, at most 38 characters)")
    return name


def challenger_key(model_name: str) -> str:
    """The pointer of the model's challenger (interleaved with the champion by serve), beside the
    champion's pointer, which is keyed by the model name itself."""
    return f"{model_name}@challenger"


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
    """The pointer of a model and the record of the table it names."""

    model_name: str
    version: str
    table: str
    served: ServedConfig | None  # None: a table published before served configurations were recorded
    run_id: str = ""  # the run that published the table


@dataclass(frozen=True)
class Row:
    """What a caller needs of a catalog image besides its score."""

    title: str | None
    product_id: str | None
    path: str | None  # relative to the image root


def ef_for(k: int, ef_search: int) -> int:
    """HNSW's candidate list: at least k (an index returns at most ef_search rows), at most 1000."""
    return min(1000, max(int(ef_search), int(k)))


class IndexStore:
    """The parts of a backend that only need its `search`, `titles` and `rows`."""

    def __init__(self) -> None:
        self._bm25: dict = {}  # (table, keyword settings) -> its BM25 index, built on the first keyword search

    def search(self, table: str, query: np.ndarray, k: int, ef_search: int, exact: bool = False
               ) -> list[tuple[str, float]]:
        """Top-k (image_id, cosine similarity): through the HNSW index, or every row with `exact`."""
        raise NotImplementedError

    def titles(self, table: str) -> tuple[list[str], list[str]]:
        """(image ids, titles, '' where none) of a table, in one order."""
        raise NotImplementedError

    def rows(self, table: str, image_ids: Sequence[str]) -> dict[str, Row]:
        raise NotImplementedError

    def serving(self, model_name: str) -> Serving | None:
        raise NotImplementedError

    def unpoint(self, key: str) -> bool:
        """Remove a pointer (the challenger's when it is promoted or retired); True when there was one."""
        raise NotImplementedError

    def kept_tables(self, model_name: str) -> set[str]:
        """Tables drop_old never drops: what the champion's and the challenger's pointers name."""
        pointers = (self.serving(model_name), self.serving(challenger_key(model_name)))
        return {p.table for p in pointers if p is not None}

    def recall_against_exact(self, table: str, image_ids: Sequence[str], vectors: np.ndarray,
                             queries: np.ndarray, k: int, ef_search: int) -> float:
        """Share of the exact top k (the same vectors, searched exactly) that the index returns."""
        exact, _ = exact_search(queries, vectors, k)
        found = 0
        for query, row in zip(queries, exact, strict=True):
            expected = {image_ids[j] for j in row if j >= 0}
            found += len(expected & {image for image, _ in self.search(table, query, k, ef_search)})
        return found / max(1, exact.size)

    def bm25_search(self, table: str, query: str, k: int, served: ServedConfig) -> list[tuple[str, float]]:
        """Top-k (image_id, BM25 score) over the table's titles, indexed as `served` says (the
        keyword search evaluate scored). The BM25 index is built once per table and process."""
        key = (table, served.strip_punctuation, served.bm25_k1, served.bm25_b, served.bm25_method)
        if key not in self._bm25:
            ids, titles = self.titles(table)
            self._bm25[key] = keyword_index(titles, ids, served)
        return self._bm25[key].search([query], k)[0]


def rank_table(store: IndexStore, table: str, served: ServedConfig, queries: Sequence[str], vectors: np.ndarray,
               k: int, exact: bool = False) -> list[list[tuple[str, float]]]:
    """The query path after encoding: `served`'s ranking of each query from one table."""
    def dense(query_vectors: np.ndarray, depth: int) -> list[list[tuple[str, float]]]:
        return [store.search(table, v, depth, served.ef_search, exact) for v in query_vectors]

    def keyword(texts: list[str], depth: int) -> list[list[tuple[str, float]]]:
        return [store.bm25_search(table, text, depth, served) for text in texts]

    return rank(queries, vectors, served, dense, keyword, k)


def current_serving(store: IndexStore, model_name: str) -> Serving:
    """What serves for `model_name`, with its recorded served configuration, or a StageError."""
    current = store.serving(model_name)
    if current is None:
        raise NothingServes(f"nothing serves for model {model_name!r} yet: no promoted version has a published index")
    if current.served is None:
        raise StageError(f"index {current.table} (version {current.version}) has no recorded served configuration: "
                         "it was published by an older clickclip, which read how to rank from the config file. "
                         "Rerun publish and promote for a version (clickclip run) so search serves what was gated")
    return current


def answer(store: IndexStore, model_name: str, loaded_version: str, encode: Callable[[list[str]], np.ndarray],
           query: str, k: int) -> dict:
    """One query against what serves now (`answer_from` the pointer's table and record).

    Refuses when the pointer names another version than the text tower that encoded the query:
    vectors of two models are not comparable."""
    current = current_serving(store, model_name)
    if current.version != str(loaded_version):
        raise VersionMismatch(f"the serving index is version {current.version}'s, but the query was encoded by version "
                              f"{loaded_version}'s text tower: reload the model (vectors of two versions do not "
                              "compare)")
    return answer_from(store, current, encode, query, k)


def answer_from(store: IndexStore, current: Serving, encode: Callable[[list[str]], np.ndarray], query: str, k: int,
                exact: bool = False) -> dict:
    """The query path: `query` normalised as extract normalised the logged queries, encoded by
    `encode` (the version's text tower), ranked from the table as its record says (`rank_table`),
    and each result with what a caller needs. `exact` searches every row (the replay's check)."""
    served = current.served
    text = query_text(query, served)
    if not text:
        raise StageError(f"the query {query!r} is empty once normalised: nothing to search for")
    results = rank_table(store, current.table, served, [query], encode([text]), k, exact)[0]
    rows = store.rows(current.table, [image for image, _ in results])
    return {"query": query, "normalised_query": text, "model_name": current.model_name,
            "version": current.version, "table": current.table, "served_as": served.mode,
            "served_config": served.to_dict(), "k_requested": k, "k": len(results),
            "results": [{"image_id": image, "score": round(score, 6), "title": rows[image].title,
                         "product_id": rows[image].product_id, "path": rows[image].path,
                         "version": current.version}
                        for image, score in results]}


def replay(store: IndexStore, current: Serving, encode: Callable[[list[str]], np.ndarray], reference: dict,
           count: int, k: int = 10) -> Parity:
    """Up to `count` of a run's test queries through the query path (`answer_from`: normalised,
    encoded, searched, fused, as `clickclip search` answers) against evaluate's rankings of the same
    served configuration: exact search must return them identically, HNSW overlap them. Refuses a
    reference of another configuration, or of no queries."""
    recorded = ServedConfig.from_dict(reference["served_config"])
    if recorded.ranking_digest != current.served.ranking_digest:
        raise StageError(f"the replay's reference rankings were scored for another served configuration "
                         f"({recorded.describe()}) than index {current.table} records ({current.served.describe()})")
    queries, rankings = reference["queries"], [[(i, float(s)) for i, s in row] for row in reference["rankings"]]
    if not queries:
        raise StageError(f"no test queries to replay against index {current.table}: parity cannot be shown")
    if len(queries) > count:
        keep = sorted(np.random.default_rng(0).choice(len(queries), count, replace=False).tolist())
        queries, rankings = [queries[i] for i in keep], [rankings[i] for i in keep]

    def ranked(exact: bool) -> list[list[tuple[str, float]]]:
        return [[(r["image_id"], r["score"]) for r in answer_from(store, current, encode, q, k, exact)["results"]]
                for q in queries]

    return replay_parity(queries, rankings, ranked(True), ranked(False), k)
