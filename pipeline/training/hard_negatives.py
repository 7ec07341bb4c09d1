"""Hard negatives that are really negative: for each query, the current model's nearest images
that are neither a known positive of the query nor a photo of the same product or near-duplicate
group as one. Shown-but-skipped results are never used as negatives (at Facebook they trained
worse than random ones: a skip is not a "no").

Training uses them through batch composition (samplers.unique_batches): a pair is packed next to
a pair whose image is one of its query's mined negatives, so the in-batch loss sees it, with no
change to the loss or to the negatives strategy.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np

from pipeline.retrieval.search import exact_search


def excluded_images(query: str, known: Mapping[str, set[str]], same: Mapping[str, set[str]]) -> set[str]:
    """A query's known positives and every image sharing a product or group with one of them."""
    positives = known.get(query, set())
    return set(positives).union(*(same.get(image, set()) for image in positives))


def mine_hard_negatives(query_vectors: np.ndarray, image_vectors: np.ndarray, queries: Sequence[str],
                        image_ids: Sequence[str], known: Mapping[str, set[str]], same: Mapping[str, set[str]],
                        per_query: int, pool: int = 50) -> dict[str, list[str]]:
    """Per query, up to `per_query` of its `pool` nearest images (cosine), nearest first, none of
    them excluded (see excluded_images)."""
    if not len(queries) or not len(image_ids):
        return {}
    top, _ = exact_search(query_vectors, image_vectors, min(pool, len(image_ids)))
    out: dict[str, list[str]] = {}
    for query, row in zip(queries, top.tolist(), strict=True):
        drop = excluded_images(query, known, same)
        out[query] = [image_ids[j] for j in row if j >= 0 and image_ids[j] not in drop][:per_query]
    return out


def buddy_pairs(queries: Sequence[str], image_ids: Sequence[str],
                negatives: Mapping[str, Sequence[str]]) -> dict[int, list[int]]:
    """Per training pair, the pairs whose image is a mined negative of its query."""
    pairs_of: dict[str, list[int]] = {}
    for index, image in enumerate(image_ids):
        pairs_of.setdefault(image, []).append(index)
    return {index: [j for image in negatives.get(query, ()) for j in pairs_of.get(image, ())]
            for index, query in enumerate(queries)}
