import numpy as np
import polars as pl

from pipeline.data.queries import frequency_bands
from pipeline.retrieval.slices import query_slices, slice_table


def test_frequency_bands_by_traffic_share():
    pairs = pl.DataFrame({"query": ["a", "a", "b", "c", "d"], "impressions": [30, 20, 30, 15, 5]})
    # a holds the first 50% of 100 impressions, b the next 30%, c and d the rest
    assert frequency_bands(pairs) == {"a": "head", "b": "torso", "c": "tail", "d": "tail"}


def test_query_slices_mark_heldout_queries_and_categories():
    pairs = pl.DataFrame({"query": ["q1", "q2"], "impressions": [5, 5], "query_heldout": [False, True]})
    images = pl.DataFrame({"image_id": ["i1", "i2", "i3"], "category": ["mug", "mug", "hat"]})
    families = query_slices(["q1", "q2"], [{"i1": 1.0, "i2": 1.0}, {"i3": 2.0}], pairs, images)
    assert families["query"] == ["seen query / new image", "new query / new image"]
    assert families["category"] == ["mug", "hat"]


def test_only_confidently_worse_slices_are_flagged():
    rng = np.random.default_rng(0)
    base = rng.uniform(0.3, 0.7, 400)
    candidate = base.copy()
    candidate[:200] -= 0.2  # slice "a" clearly regressed
    candidate[200:] += rng.normal(0, 0.3, 200)  # slice "b" only noisy
    per_query = {"candidate": {"recall@10": candidate}, "champion": {"recall@10": base}}
    rows = slice_table(per_query, "champion", {"family": ["a"] * 200 + ["b"] * 200}, "recall@10", 0.02)
    flagged = {row["slice"]: row["flagged"] for row in rows}
    assert flagged == {"a": True, "b": False}


def test_a_one_query_slice_is_shown_but_never_blocks():
    per_query = {"candidate": {"recall@10": np.array([0.0] + [0.5] * 60)},
                 "champion": {"recall@10": np.array([1.0] + [0.5] * 60)}}
    rows = slice_table(per_query, "champion", {"category": ["lamp"] + ["mug"] * 60}, "recall@10", 0.02)
    lamp = next(row for row in rows if row["slice"] == "lamp")
    assert lamp["queries"] == 1 and lamp["delta"] == -1.0
    assert not lamp["gated"] and not lamp["flagged"]


def test_twenty_categories_without_a_difference_rarely_flag_any_slice():
    from pipeline.config import EvaluateConfig

    shipped = EvaluateConfig()
    runs, false_alarms = 200, 0
    for seed in range(runs):
        rng = np.random.default_rng(seed)
        labels = [f"category {i}" for i in range(20) for _ in range(40)]
        base = rng.binomial(1, 0.4, len(labels)).astype(float)
        candidate = rng.binomial(1, 0.4, len(labels)).astype(float)  # same distribution: no true difference
        per_query = {"candidate": {"recall@10": candidate}, "champion": {"recall@10": base}}
        rows = slice_table(per_query, "champion", {"category": labels}, "recall@10", shipped.slice_tolerance,
                           shipped.slice_min_queries, shipped.slice_alpha)
        false_alarms += any(row["flagged"] for row in rows)
    assert false_alarms / runs < 0.05, false_alarms


def test_holm_rejects_step_down():
    from pipeline.retrieval.slices import holm_rejections

    # alpha 0.05 over 4: 0.001 <= 0.05/4 and 0.01 <= 0.05/3 reject; 0.03 > 0.05/2 stops the rest
    assert holm_rejections([0.03, 0.01, 0.04, 0.001], 0.05) == [False, True, False, True]
    assert holm_rejections([], 0.05) == []
