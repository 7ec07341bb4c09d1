"""Retrieval metrics over ranked result lists; definitions are repeated in the report.

For one query with relevant set R and ranked results r_1..r_n:
- recall@k = |R ∩ {r_1..r_k}| / |R|
- hit@k    = 1 if R ∩ {r_1..r_k} is non-empty, else 0
- MRR      = 1 / (rank of the first relevant result), 0 if none is retrieved
- nDCG@k   = DCG@k / ideal DCG@k, DCG@k = Σ_{i≤k} gain(r_i) / log2(i + 1), with graded gains
             (the click weights of held-out pairs); 1 when the k best-gain items lead in order
Each is averaged over queries with at least one relevant item.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
from scipy.stats import bootstrap


def ndcg(results: Sequence[str], gains: Mapping[str, float], k: int) -> float:
    discounts = 1.0 / np.log2(np.arange(2, k + 2))
    dcg = sum(gains.get(item, 0.0) * d for item, d in zip(results[:k], discounts, strict=False))
    ideal = sum(g * d for g, d in zip(sorted(gains.values(), reverse=True)[:k], discounts, strict=False))
    return dcg / ideal if ideal > 0 else 0.0


def per_query_metrics(ranked: Sequence[Sequence[str]], relevant: Sequence[set[str] | Mapping[str, float]],
                      ks: Sequence[int], ndcg_k: int = 10) -> dict[str, np.ndarray]:
    """Per-query values, one array per metric name, in the order of `ranked`.

    `relevant` holds, per query, a set of relevant items (gain 1 each) or item -> graded gain."""
    if len(ranked) != len(relevant):
        raise ValueError("ranked and relevant must have one entry per query")
    out = {f"recall@{k}": np.zeros(len(ranked)) for k in ks}
    out.update({f"hit@{k}": np.zeros(len(ranked)) for k in ks})
    out["mrr"] = np.zeros(len(ranked))
    out[f"ndcg@{ndcg_k}"] = np.zeros(len(ranked))
    for q, (results, rel) in enumerate(zip(ranked, relevant, strict=True)):
        gains = rel if isinstance(rel, Mapping) else dict.fromkeys(rel, 1.0)
        out[f"ndcg@{ndcg_k}"][q] = ndcg(results, gains, ndcg_k)
        if not rel:
            raise ValueError(f"query {q} has no relevant items")
        hits = np.array([item in rel for item in results], dtype=bool)
        for k in ks:
            found = int(hits[:k].sum())
            out[f"recall@{k}"][q] = found / len(rel)
            out[f"hit@{k}"][q] = float(found > 0)
        first = np.flatnonzero(hits)
        out["mrr"][q] = 1.0 / (first[0] + 1) if len(first) else 0.0
    return out


def mean_metrics(per_query: dict[str, np.ndarray]) -> dict[str, float]:
    return {name: float(values.mean()) if len(values) else 0.0 for name, values in per_query.items()}


def rank_by_similarity(query_embeddings: np.ndarray, item_embeddings: np.ndarray, item_ids: Sequence[str],
                       k: int) -> list[list[str]]:
    """Top-k item ids per query by inner product (exact, numpy); for small in-training checks."""
    scores = query_embeddings @ item_embeddings.T
    k = min(k, scores.shape[1])
    top = np.argsort(-scores, axis=1, kind="stable")[:, :k]
    return [[item_ids[j] for j in row] for row in top]


def paired_bootstrap(candidate: np.ndarray, baseline: np.ndarray, resamples: int = 2000, seed: int = 0,
                     level: float = 0.95) -> tuple[float, float, float]:
    """Mean of candidate − baseline over queries and its bias-corrected and accelerated (BCa)
    bootstrap confidence interval, from scipy.

    Paired: both models are scored on the same resampled queries, so query difficulty cancels.
    With fewer than two queries, or identical differences, the interval is the mean itself."""
    if candidate.shape != baseline.shape or candidate.ndim != 1:
        raise ValueError("candidate and baseline need one value per query, in the same order")
    differences = candidate - baseline
    if len(differences) == 0:
        return 0.0, 0.0, 0.0
    mean = float(differences.mean())
    if len(differences) < 2 or np.ptp(differences) == 0:
        return mean, mean, mean
    result = bootstrap((candidate, baseline), _mean_difference, paired=True, vectorized=True,
                       n_resamples=resamples, confidence_level=level, method="BCa",
                       batch=max(1, 2**22 // len(differences)), rng=np.random.default_rng(seed))
    low, high = result.confidence_interval
    return mean, float(low), float(high)


def _mean_difference(candidate: np.ndarray, baseline: np.ndarray, axis: int = -1) -> np.ndarray:
    return np.mean(candidate - baseline, axis=axis)
