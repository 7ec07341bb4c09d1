"""The served configuration: one value that says how a query is ranked, and the one function that ranks.

Evaluate builds a `ServedConfig` for every configuration it scores, the gate decides on the
candidate's, promote stores it with the registered version, publish builds the index from it and
records it with the index table, and `clickclip search` / `serve` read it back from the record of
the table that serves (never from the live config file). `rank` turns (queries, their vectors,
a configuration, the stores' search functions) into rankings; evaluate calls it over in-memory
exact search, serving over the index database, and publish's replay compares the two
(`replay_parity`).

A ranking, for `mode: hybrid`:
1. the query is normalised as extract normalised the logged queries (`normalise_query`);
2. the dense list is the top `fusion_depth` catalog images by cosine with the query vector, the
   keyword list the top `fusion_depth` by BM25 over the titles, normalised the same way;
3. the two are fused by `weighted_fusion` with `fusion_weight`. Both lists are cut at
   `fusion_depth` whatever a caller asks for, so the order of the first k results never depends on
   k: a request for more than `fusion_depth` results gets `fusion_depth` of them.
With `mode: dense` the dense list alone is the ranking (no normalisation, so any k).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np

from pipeline.data.queries import normalise_query
from pipeline.errors import StageError
from pipeline.retrieval.bm25 import Bm25Index
from pipeline.retrieval.fusion import Ranked, weighted_fusion

FUSION_DEPTH = 100  # the smallest fusion depth evaluate records: deeper when filtered scoring needs it
RECORD_TAG = "clickclip.served_config"  # the registry tag a version's served configuration is stored under
PARITY_TOLERANCE = 1e-5  # two scores closer than this are a tie: float32 sums in another order differ by ~1e-7

DenseSearch = Callable[[np.ndarray, int], list[Ranked]]  # (query vectors, depth) -> per query (image, cosine)
KeywordSearch = Callable[[list[str], int], list[Ranked]]  # (normalised queries, depth) -> per query (image, BM25)


@dataclass(frozen=True)
class ServedConfig:
    """Everything that decides a ranking. `tuned` says where the weights came from: "validation"
    (tuned on this run's validation queries), "recorded" (read back from the version that serves),
    or "untuned" (no validation queries: defaults)."""

    mode: Literal["dense", "hybrid"]
    title_weight: float  # β: catalog vectors are normalise((1 − β)·image + β·title)
    fusion_weight: float = 1.0  # w on the dense list (hybrid only)
    fusion: Literal["weighted"] = "weighted"  # w·minmax(dense) + (1 − w)·max-scaled(keyword)
    fusion_depth: int = FUSION_DEPTH
    keyword: Literal["bm25"] = "bm25"
    bm25_k1: float = 1.5  # bm25s's defaults, written down so a new bm25s cannot change them unseen
    bm25_b: float = 0.75
    bm25_method: str = "lucene"
    query_normalisation: str = "nfkc+casefold+control+whitespace"
    strip_punctuation: bool = False  # extract.strip_punctuation
    text_context: int = 77  # the text tower's context: longer queries are truncated
    backend: Literal["pgvector", "faiss"] = "pgvector"
    hnsw_m: int = 16
    hnsw_ef_construction: int = 64
    ef_search: int = 100
    model_version: str | None = None  # set once registered
    tuned: Literal["validation", "recorded", "untuned"] = "validation"

    def __post_init__(self) -> None:
        if self.mode not in ("dense", "hybrid"):
            raise ValueError(f"served mode {self.mode!r} is not 'dense' or 'hybrid'")
        if not 0.0 <= self.fusion_weight <= 1.0 or not 0.0 <= self.title_weight <= 1.0:
            raise ValueError(f"served weights outside [0, 1]: title {self.title_weight}, fusion {self.fusion_weight}")
        if self.fusion_depth < 1:
            raise ValueError(f"fusion depth {self.fusion_depth} must be at least 1")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)

    @classmethod
    def from_dict(cls, record: dict) -> ServedConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(record) - known)
        if unknown:
            raise ValueError(f"a served configuration with unknown fields {unknown} (written by a newer clickclip?)")
        return cls(**record)

    @classmethod
    def from_json(cls, text: str) -> ServedConfig:
        return cls.from_dict(json.loads(text))

    def with_(self, **changes) -> ServedConfig:
        return dataclasses.replace(self, **changes)

    @property
    def ranking_digest(self) -> str:
        """A digest of what decides the order (not where it came from): equal digests rank alike."""
        decides = {k: v for k, v in self.to_dict().items() if k not in ("model_version", "tuned")}
        return hashlib.sha256(json.dumps(decides, sort_keys=True).encode()).hexdigest()[:12]

    def describe(self) -> str:
        weights = f"β {self.title_weight:g}" + (f", fusion w {self.fusion_weight:g} over the top {self.fusion_depth}"
                                                f" of each list" if self.mode == "hybrid" else "")
        return f"{self.mode} ({weights}; {self.tuned})"

    def depth(self, k: int) -> int:
        """How many results a request for k gets: k for dense, at most fusion_depth for hybrid."""
        return k if self.mode == "dense" else min(k, self.fusion_depth)


def gated(evaluation: dict) -> ServedConfig:
    """The candidate's served configuration in evaluate's summary: what the gate decided on, what
    publish builds and promote records with the version."""
    record = (evaluation.get("served_config") or {}).get("candidate")
    if record is None:
        raise StageError("the evaluation has no served configuration (written by an older clickclip): rerun evaluate")
    return ServedConfig.from_dict(record)


def query_text(query: str, served: ServedConfig) -> str:
    """A shopper's query as extract normalised the logged ones (the only spelling the models saw)."""
    return normalise_query(query, served.strip_punctuation)


def title_text(title: str, served: ServedConfig) -> str:
    """A catalog title as BM25 indexes it: normalised like queries, so "Straße" meets "strasse"."""
    return normalise_query(title, served.strip_punctuation)


def keyword_index(titles: Sequence[str], ids: Sequence[str], served: ServedConfig) -> Bm25Index:
    """BM25 over the titles as `served` indexes them (normalised, with its parameters)."""
    return Bm25Index([title_text(t, served) for t in titles], list(ids), served.bm25_k1, served.bm25_b,
                     served.bm25_method)


def fuse(dense: Ranked, keyword: Ranked, served: ServedConfig) -> Ranked:
    """One query's ranking from its dense and keyword lists under `served`."""
    if served.mode == "dense":
        return list(dense)
    return weighted_fusion(dense[:served.fusion_depth], keyword[:served.fusion_depth], served.fusion_weight)


def rank(queries: Sequence[str], vectors: np.ndarray, served: ServedConfig, dense: DenseSearch,
         keyword: KeywordSearch, k: int) -> list[Ranked]:
    """The ranking of each query under `served`, at most `served.depth(k)` long. `queries` are the
    shoppers' text (normalised here), `vectors` their text-tower embeddings of the normalised text."""
    if served.mode == "dense":
        return [row[:k] for row in dense(vectors, k)]
    depth = served.fusion_depth
    texts = [query_text(q, served) for q in queries]
    return [fuse(d, kw, served)[:depth][:k] for d, kw in zip(dense(vectors, depth), keyword(texts, depth),
                                                             strict=True)]


@dataclass(frozen=True)
class Parity:
    """Replayed queries against the reference rankings: how many came back identical with exact
    search, and the mean top-k overlap through the approximate index."""

    queries: int
    identical: int
    overlap: float
    k: int
    first_mismatch: str | None = None

    def as_dict(self) -> dict:
        return dataclasses.asdict(self)

    def sentence(self) -> str:
        return (f"replay parity: {self.identical}/{self.queries} test queries identical top-{self.k} with exact "
                f"search; top-{self.k} overlap through the HNSW index {self.overlap:.4f}")


def identical(reference: Ranked, served: Ranked, k: int, tolerance: float = PARITY_TOLERANCE) -> bool:
    """The same top k images in the same order, where images whose reference scores are within
    `tolerance` of each other count as tied (their order is float rounding's, not the ranking's).
    `reference` may run deeper than k, so an image tied with the k-th at the cut is recognised."""
    want, got = reference[:k], served[:k]
    if len(want) != len(got):
        return False
    score = dict(reference)
    return all(image == expected or (image in score and abs(score[image] - expected_score) <= tolerance)
               for (expected, expected_score), (image, _) in zip(want, got, strict=True))


def overlap(reference: Ranked, served: Ranked) -> float:
    want = {image for image, _ in reference}
    return len(want & {image for image, _ in served}) / max(1, len(want))


def replay_parity(queries: Sequence[str], reference: Sequence[Ranked], exact: Sequence[Ranked],
                  approximate: Sequence[Ranked], k: int) -> Parity:
    """Compare the served rankings (through exact and approximate search) with the reference."""
    same = [identical(list(r), list(e), k) for r, e in zip(reference, exact, strict=True)]
    mismatch = next((q for q, ok in zip(queries, same, strict=True) if not ok), None)
    overlaps = [overlap(list(r[:k]), list(a[:k])) for r, a in zip(reference, approximate, strict=True)]
    return Parity(len(same), sum(same), round(float(np.mean(overlaps)) if overlaps else 1.0, 4), k, mismatch)
