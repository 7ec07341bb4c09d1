"""The keyword baseline: BM25 over catalog titles (bm25s), so the report shows what the image model
adds over plain text search, and the keyword half of hybrid retrieval."""

from __future__ import annotations

import logging
import re

WORD = re.compile(r"(?u)\b\w\w+\b")  # bm25s's default token pattern


class Bm25Index:
    """BM25 over titles, indexed once and searched many times (the serving path keeps one per table)."""

    def __init__(self, titles: list[str], ids: list[str], k1: float = 1.5, b: float = 0.75, method: str = "lucene"):
        import bm25s

        logging.getLogger("bm25s").setLevel(logging.WARNING)  # its import sets DEBUG: one line per index built
        # bm25s keeps words of two or more characters and cannot index a vocabulary of none
        self.ids = list(ids) if any(WORD.search(t) for t in titles) else []
        self.retriever = bm25s.BM25(k1=k1, b=b, method=method)
        if self.ids:
            self.retriever.index(bm25s.tokenize(titles, stopwords=None, show_progress=False), show_progress=False)

    def search(self, queries: list[str], k: int) -> list[list[tuple[str, float]]]:
        """Top-k (id, BM25 score) per query; titles sharing no term with the query are not retrieved."""
        import bm25s

        if not self.ids or not queries:
            return [[] for _ in queries]
        docs, scores = self.retriever.retrieve(bm25s.tokenize(queries, stopwords=None, show_progress=False),
                                               k=min(k, len(self.ids)), show_progress=False)
        return [[(self.ids[d], float(s)) for d, s in zip(row, row_scores, strict=True) if s > 0]
                for row, row_scores in zip(docs.tolist(), scores.tolist(), strict=True)]


def bm25_search(queries: list[str], titles: list[str], ids: list[str], k: int) -> list[list[tuple[str, float]]]:
    """Top-k (id, BM25 score) per query against each title; titles sharing no term with the query
    are not retrieved (keyword search returns nothing for them)."""
    return Bm25Index(titles, ids).search(queries, k)

