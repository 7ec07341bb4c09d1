"""The keyword baseline: BM25 over catalog titles (bm25s), so the report shows what the image model
adds over plain text search, and the keyword half of hybrid retrieval."""

from __future__ import annotations

import logging


def bm25_search(queries: list[str], titles: list[str], ids: list[str], k: int) -> list[list[tuple[str, float]]]:
    """Top-k (id, BM25 score) per query against each title; titles sharing no term with the query
    are not retrieved (keyword search returns nothing for them)."""
    import bm25s

    logging.getLogger("bm25s").setLevel(logging.WARNING)  # its import sets DEBUG: one line per index built
    if not ids or not queries:
        return [[] for _ in queries]
    retriever = bm25s.BM25()
    retriever.index(bm25s.tokenize(titles, stopwords=None, show_progress=False), show_progress=False)
    docs, scores = retriever.retrieve(bm25s.tokenize(queries, stopwords=None, show_progress=False),
                                      k=min(k, len(ids)), show_progress=False)
    return [[(ids[d], float(s)) for d, s in zip(row, row_scores, strict=True) if s > 0] for row, row_scores in zip(
        docs.tolist(), scores.tolist(), strict=True)]


def bm25_rankings(queries: list[str], titles: list[str], ids: list[str], k: int) -> list[list[str]]:
    """Top-k ids per query, as bm25_search."""
    return [[item for item, _ in row] for row in bm25_search(queries, titles, ids, k)]
