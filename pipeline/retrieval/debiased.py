"""Click metrics without the logging ranker's position bias: self-normalised inverse propensity
scoring (SNIPS) over held-out clicks.

Every held-out (query, item) click carries the weight extract gave it: Σ over its clicks of
1 / max(θ(position), clip), θ the estimated examination probability of the position it was shown
at. For rankings r_q of the held-out queries (after filtering, cut at k):
- SNIPS recall@k = Σ_q Σ_i w_qi · [i in r_q top k] / Σ_q Σ_i w_qi
- SNIPS nDCG@k   = Σ_q DCG_q / Σ_q IDCG_q, gains w_qi (DCG as in metrics.ndcg)
- effective sample size = (Σ w)² / Σ w² over the held-out clicked pairs.
With raw click counts as weights the same formulas give the raw click metrics, which favour
whatever the logging ranker showed on top.

Per-query values are scaled so their mean is the estimate (Q · numerator_q / Σ denominator): the
paired bootstrap then resamples queries with the denominator held at its observed value. A report
slice's mean of these values uses the whole set's denominator, so it compares models within the
slice; it is not the slice's own SNIPS estimate.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np


def _dcg(results: Sequence[str], gains: Mapping[str, float], k: int) -> tuple[float, float]:
    discounts = 1.0 / np.log2(np.arange(2, k + 2))
    dcg = sum(gains.get(item, 0.0) * d for item, d in zip(results[:k], discounts, strict=False))
    ideal = sum(g * d for g, d in zip(sorted(gains.values(), reverse=True)[:k], discounts, strict=False))
    return float(dcg), float(ideal)


def snips_per_query(ranked: Sequence[Sequence[str]], weights: Sequence[Mapping[str, float]], ks: Sequence[int],
                    ndcg_k: int = 10, prefix: str = "snips_") -> dict[str, np.ndarray]:
    """Per-query contributions (their mean is the estimate) of `{prefix}recall@k` and
    `{prefix}ndcg@{ndcg_k}`; `weights` holds per query item -> its summed click weight."""
    if len(ranked) != len(weights):
        raise ValueError("ranked and weights must have one entry per query")
    queries = len(ranked)
    out: dict[str, np.ndarray] = {}
    total = sum(sum(w.values()) for w in weights)
    for k in ks:
        # each item once, in rank order: summing over a set would add in an order that changes with
        # the process's string-hash seed, and so the last bits of the figure from run to run
        found = np.array([sum(w.get(item, 0.0) for item in dict.fromkeys(results[:k])) for results, w in
                          zip(ranked, weights, strict=True)])
        out[f"{prefix}recall@{k}"] = found * queries / total if total > 0 else np.zeros(queries)
    dcgs = [_dcg(results, w, ndcg_k) for results, w in zip(ranked, weights, strict=True)]
    ideal = sum(i for _, i in dcgs)
    out[f"{prefix}ndcg@{ndcg_k}"] = (np.array([d for d, _ in dcgs]) * queries / ideal if ideal > 0
                                     else np.zeros(queries))
    return out


def effective_sample_size(weights: Sequence[Mapping[str, float]]) -> float:
    values = np.array([v for w in weights for v in w.values()], dtype=float)
    squares = float((values ** 2).sum())
    return float(values.sum() ** 2 / squares) if squares > 0 else 0.0
