"""Report slices: the same held-out queries cut by frequency band, by whether the query was ever
trained on, and by product category; a slice is flagged when the candidate is confidently worse.
"""

from __future__ import annotations

import re
from collections import Counter

import numpy as np
import polars as pl
from scipy.stats import ttest_1samp

from pipeline.data.queries import frequency_bands
from pipeline.retrieval.metrics import paired_bootstrap

IDENTIFIER_TOKEN = re.compile(r"[a-z]*\d[a-z\d]*", re.IGNORECASE)  # a token holding a digit: SKU, model number


def query_kind(query: str, brands: frozenset[str] = frozenset()) -> str:
    """"identifier" for a query naming a SKU or model number (a token of 3+ characters with a digit) or a
    brand of the catalog's optional `brand` column; "descriptive" otherwise. Keyword search should win
    the first kind: the words are in the title, and an image model cannot read them off a photo."""
    tokens = re.split(r"[^\w]+", query.lower())
    if any(len(t) >= 3 and IDENTIFIER_TOKEN.fullmatch(t) for t in tokens) or brands & set(tokens):
        return "identifier"
    return "descriptive"


def query_slices(queries: list[str], relevant: list[dict[str, float]], pairs: pl.DataFrame,
                 images: pl.DataFrame) -> dict[str, list[str]]:
    """Slice family -> the slice value of each query, in order."""
    brands = frozenset(b.lower() for b in images["brand"].drop_nulls().unique().to_list()) \
        if "brand" in images.columns else frozenset()
    bands = frequency_bands(pairs)
    heldout = dict(pairs.group_by("query").agg(pl.col("query_heldout").first()).iter_rows())
    category = dict(zip(images["image_id"], images["category"], strict=True))
    families = {
        "frequency": [bands.get(q, "tail") for q in queries],
        "query": ["new query / new image" if heldout.get(q) else "seen query / new image" for q in queries],
        "query kind": [query_kind(q, brands) for q in queries],
    }
    categories = [Counter(category.get(i) for i in rel).most_common(1)[0][0] for rel in relevant]
    if any(c is not None for c in categories):
        families["category"] = [c or "unknown" for c in categories]
    return families


def slice_table(per_query: dict[str, dict[str, np.ndarray]], baseline: str, families: dict[str, list[str | None]],
                metric: str, tolerance: float, min_queries: int = 30, alpha: float = 0.05) -> list[dict]:
    """One row per slice: size, candidate and baseline means, the difference with its paired BCa
    interval, and whether the slice is confidently regressed.

    Only slices of at least `min_queries` queries are gated; smaller ones are shown, never flagged.
    A gated slice is flagged when a one-sided paired t-test rejects "candidate − baseline ≥ −tolerance"
    at family-wise level `alpha` over all gated slices (Holm's step-down), so twenty noisy
    categories do not cry wolf. A query whose family value is None belongs to no slice of it."""
    rows = []
    candidate, base = per_query["candidate"][metric], per_query[baseline][metric]
    for family, values in families.items():
        labels = np.array(values, dtype=object)
        for value in sorted({v for v in values if v is not None}):
            mask = labels == value
            delta = candidate[mask] - base[mask]
            mean, low, high = paired_bootstrap(candidate[mask], base[mask])
            keyword = float(per_query["bm25"][metric][mask].mean()) if "bm25" in per_query else None
            rows.append({"family": family, "slice": value, "queries": int(mask.sum()),
                         "candidate": float(candidate[mask].mean()), "baseline": float(base[mask].mean()),
                         "keyword": keyword,
                         "delta": mean, "low": low, "high": high, "gated": bool(mask.sum() >= min_queries),
                         "p_value": regression_p_value(delta, tolerance)})
    rejected = holm_rejections([row["p_value"] for row in rows if row["gated"]], alpha)
    flags = iter(rejected)
    for row in rows:
        row["flagged"] = bool(next(flags)) if row["gated"] else False
    return rows


def regression_p_value(delta: np.ndarray, tolerance: float) -> float:
    """One-sided paired t-test p-value of "the mean difference is below −tolerance"."""
    shifted = delta + tolerance
    if len(shifted) < 2 or np.ptp(shifted) == 0:
        return 0.0 if len(shifted) and shifted[0] < 0 else 1.0
    return float(ttest_1samp(shifted, 0.0, alternative="less").pvalue)


def holm_rejections(p_values: list[float], alpha: float) -> list[bool]:
    """Holm's step-down test of a family of hypotheses at family-wise error `alpha`.

    Written here because scipy offers Benjamini–Hochberg (false_discovery_control), not Holm."""
    order = np.argsort(p_values, kind="stable")
    rejected = [False] * len(p_values)
    for rank, i in enumerate(order):
        if p_values[i] > alpha / (len(p_values) - rank):
            break
        rejected[i] = True
    return rejected
