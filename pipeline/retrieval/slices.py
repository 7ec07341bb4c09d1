"""Report slices: the same held-out queries cut by frequency band, by whether the query was ever
trained on, and by product category; a slice is flagged when the candidate is confidently worse.
"""

from __future__ import annotations

from collections import Counter

import numpy as np
import polars as pl

from pipeline.data.queries import frequency_bands
from pipeline.retrieval.metrics import paired_bootstrap


def query_slices(queries: list[str], relevant: list[dict[str, float]], pairs: pl.DataFrame,
                 images: pl.DataFrame) -> dict[str, list[str]]:
    """Slice family -> the slice value of each query, in order."""
    bands = frequency_bands(pairs)
    heldout = dict(pairs.group_by("query").agg(pl.col("query_heldout").first()).iter_rows())
    category = dict(zip(images["image_id"], images["category"], strict=True))
    families = {
        "frequency": [bands.get(q, "tail") for q in queries],
        "query": ["new query / new image" if heldout.get(q) else "seen query / new image" for q in queries],
    }
    categories = [Counter(category.get(i) for i in rel).most_common(1)[0][0] for rel in relevant]
    if any(c is not None for c in categories):
        families["category"] = [c or "unknown" for c in categories]
    return families


def slice_table(per_query: dict[str, dict[str, np.ndarray]], baseline: str, families: dict[str, list[str]],
                metric: str, tolerance: float) -> list[dict]:
    """One row per slice: size, candidate and baseline means, paired CI of the difference, flag.

    Flagged when the whole interval lies below −tolerance, so small noisy slices do not cry wolf."""
    rows = []
    candidate, base = per_query["candidate"][metric], per_query[baseline][metric]
    for family, values in families.items():
        labels = np.array(values)
        for value in sorted(set(values)):
            mask = labels == value
            mean, low, high = paired_bootstrap(candidate[mask], base[mask])
            rows.append({"family": family, "slice": value, "queries": int(mask.sum()),
                         "candidate": float(candidate[mask].mean()), "baseline": float(base[mask].mean()),
                         "delta": mean, "low": low, "high": high, "flagged": high < -tolerance})
    return rows
