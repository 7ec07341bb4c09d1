"""Hybrid retrieval: a dense (image model) result list fused with a keyword (BM25) result list.

Two fusions, as in ranx (whose `fuse` a test checks these against):
- weighted: score = w · minmax(dense) + (1 − w) · max(keyword), a list's missing item scoring 0.
  Keyword scores are divided by the list's best (ranx's "max" norm), not min-max scaled: a BM25
  score of 0 means "no term matched", a natural zero, and min-max would send a query's weakest
  keyword hit, or its only one, to 0, below every dense result. Cosine scores have no natural zero,
  so the dense list is min-max scaled over what it retrieved;
- reciprocal rank fusion (RRF): score = Σ over lists of 1 / (k + rank), rank from 1.
Ties are broken by keyword rank, then dense rank, so weight 0 returns the keyword list in its own
order followed by the dense list, and weight 1 the dense list: a weight tuned over a grid holding 0
is never worse than keyword search on the queries it was tuned on.

Written here rather than called from ranx because serving fuses one query at a time (ranx builds
numba-compiled runs over whole query sets) and the tie order above is part of the guarantee.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

Ranked = list[tuple[str, float]]  # (item, score), best first
RRF_K = 60  # the constant of Cormack et al. (2009), ranx's default


def min_max(run: Ranked) -> dict[str, float]:
    """Scores scaled to [0, 1] over the list (all 0 when they are equal)."""
    if not run:
        return {}
    scores = [score for _, score in run]
    low, high = min(scores), max(scores)
    span = high - low
    return {item: (score - low) / span if span > 0 else 0.0 for item, score in run}


def _ranks(run: Ranked) -> dict[str, int]:
    ranks: dict[str, int] = {}
    for rank, (item, _) in enumerate(run, start=1):
        ranks.setdefault(item, rank)
    return ranks


def _ordered(scores: dict[str, float], dense: Ranked, keyword: Ranked) -> Ranked:
    dense_rank, keyword_rank = _ranks(dense), _ranks(keyword)
    missing = len(dense) + len(keyword) + 1
    return sorted(scores.items(), key=lambda kv: (-kv[1], keyword_rank.get(kv[0], missing),
                                                  dense_rank.get(kv[0], missing)))


def max_scaled(run: Ranked) -> dict[str, float]:
    """Non-negative scores divided by the list's largest (all 0 when it is 0)."""
    high = max((score for _, score in run), default=0.0)
    return {item: score / high if high > 0 else 0.0 for item, score in run}


def weighted_fusion(dense: Ranked, keyword: Ranked, weight: float) -> Ranked:
    """w · minmax(dense) + (1 − w) · max-scaled(keyword), w = `weight` on the dense list."""
    if not 0.0 <= weight <= 1.0:
        raise ValueError(f"fusion weight {weight} is outside [0, 1]")
    scores: dict[str, float] = {}
    for item, score in min_max(dense).items():
        scores[item] = weight * score
    for item, score in max_scaled(keyword).items():
        scores[item] = scores.get(item, 0.0) + (1.0 - weight) * score
    return _ordered(scores, dense, keyword)


def reciprocal_rank_fusion(dense: Ranked, keyword: Ranked, k: int = RRF_K) -> Ranked:
    scores: dict[str, float] = {}
    for run in (dense, keyword):
        for item, rank in _ranks(run).items():
            scores[item] = scores.get(item, 0.0) + 1.0 / (k + rank)
    return _ordered(scores, dense, keyword)


def tune(grid: Sequence[float], score: Callable[[float], float]) -> tuple[float, list[tuple[float, float]]]:
    """The grid value with the best `score` (the first of equals, so list the safest first), and
    every (value, score) tried."""
    if not grid:
        raise ValueError("an empty grid has nothing to tune")
    curve = [(float(value), float(score(value))) for value in grid]
    best = max(curve, key=lambda vs: vs[1])  # max keeps the first of equal scores
    return best[0], curve
