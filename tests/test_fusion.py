"""Hybrid fusion and debiased (SNIPS) metrics: the math against ranx and against hand computation."""

from __future__ import annotations

import numpy as np
import pytest

from pipeline.retrieval.debiased import effective_sample_size, snips_per_query
from pipeline.retrieval.fusion import min_max, reciprocal_rank_fusion, tune, weighted_fusion


def _runs(rng: np.random.Generator, queries: int = 30):
    dense, keyword = {}, {}
    for q in range(queries):
        items = [f"i{j}" for j in rng.choice(40, 15, replace=False)]
        dense[f"q{q}"] = {i: float(s) for i, s in zip(items, rng.normal(size=15), strict=True)}
        kw_items = [f"i{j}" for j in rng.choice(40, int(rng.integers(2, 10)), replace=False)]
        keyword[f"q{q}"] = {i: float(s) for i, s in zip(kw_items, rng.gamma(2.0, size=len(kw_items)), strict=True)}
    return dense, keyword


def _ranked(run: dict[str, float]):
    return sorted(run.items(), key=lambda kv: -kv[1])


@pytest.mark.parametrize("weight", [0.0, 0.3, 0.75, 1.0])
def test_weighted_fusion_equals_ranx_wsum(weight):
    from ranx import Run, fuse
    from ranx.normalization import max_norm, min_max_norm

    dense, keyword = _runs(np.random.default_rng(1))
    fused = fuse([min_max_norm(Run(dense)), max_norm(Run(keyword))], norm=None, method="wsum",
                 params={"weights": [weight, 1 - weight]}).to_dict()
    for q in dense:
        ours = dict(weighted_fusion(_ranked(dense[q]), _ranked(keyword[q]), weight))
        assert set(ours) == set(fused[q])
        for item, score in fused[q].items():
            assert ours[item] == pytest.approx(score, abs=1e-9)


def test_rrf_equals_ranx():
    from ranx import Run, fuse

    dense, keyword = _runs(np.random.default_rng(2))
    fused = fuse([Run(dense), Run(keyword)], method="rrf", params={"k": 60}).to_dict()
    for q in dense:
        ours = dict(reciprocal_rank_fusion(_ranked(dense[q]), _ranked(keyword[q])))
        assert ours == pytest.approx(dict(fused[q]))


def test_weight_zero_is_keyword_order_then_dense_and_one_is_dense():
    dense = [("a", 0.9), ("b", 0.8), ("c", 0.1)]
    keyword = [("c", 7.0), ("d", 3.0), ("e", 1.0)]
    assert [i for i, _ in weighted_fusion(dense, keyword, 0.0)] == ["c", "d", "e", "a", "b"]
    assert [i for i, _ in weighted_fusion(dense, keyword, 1.0)][:2] == ["a", "b"]
    assert min_max([("x", 2.0)]) == {"x": 0.0}
    # a query's only keyword hit keeps its full keyword score: a little dense weight cannot bury it
    assert weighted_fusion(dense, [("e", 4.2)], 0.1)[0][0] == "e"
    with pytest.raises(ValueError):
        weighted_fusion(dense, keyword, 1.5)


def test_tune_keeps_the_first_of_equal_scores():
    best, curve = tune([0.0, 0.5, 1.0], lambda w: {0.0: 0.2, 0.5: 0.4, 1.0: 0.4}[w])
    assert best == 0.5 and curve == [(0.0, 0.2), (0.5, 0.4), (1.0, 0.4)]


def test_snips_against_hand_computation():
    ranked = [["a", "x", "b"], ["y", "c"]]
    weights = [{"a": 2.0, "b": 1.0}, {"c": 4.0}]
    out = snips_per_query(ranked, weights, ks=[1, 2], ndcg_k=2)
    # recall@1: only "a" (2) of total 7; recall@2: "a" and "c": 6 of 7
    assert out["snips_recall@1"].mean() == pytest.approx(2 / 7)
    assert out["snips_recall@2"].mean() == pytest.approx(6 / 7)
    # nDCG@2: q1 DCG 2/1, IDCG 2 + 1/log2(3); q2 DCG 4/log2(3), IDCG 4
    dcg = 2 + 4 / np.log2(3)
    assert out["snips_ndcg@2"].mean() == pytest.approx(dcg / (2 + 1 / np.log2(3) + 4))
    assert effective_sample_size(weights) == pytest.approx(49 / 21)


def test_snips_recovers_the_true_order_that_raw_clicks_invert():
    """The logging ranker is model A; clicks = examination(position) x relevance. Raw click recall
    prefers A (it put its own favourites where people look); SNIPS, like the truth, prefers B."""
    rng = np.random.default_rng(0)
    queries, items, sessions, k = 60, 20, 3000, 5
    exam = 1.0 / np.arange(1, items + 1)
    truth, raw, snips = {"A": [], "B": []}, {}, {}
    rankings = {"A": [], "B": []}
    clicks, weights = [], []
    for _ in range(queries):
        rel = rng.uniform(0, 1, items)
        order_a = np.argsort(-(rel * (1 - rel)))  # A prefers middling items
        order_b = np.argsort(-rel)  # B ranks by true relevance
        logged_position = np.empty(items, int)
        logged_position[order_a] = np.arange(items)  # the log was ranked by A
        n_clicks = rng.binomial(sessions, exam[logged_position] * rel)
        clicks.append({f"i{j}": float(c) for j, c in enumerate(n_clicks) if c})
        weights.append({f"i{j}": float(c / exam[logged_position[j]]) for j, c in enumerate(n_clicks) if c})
        for name, order in (("A", order_a), ("B", order_b)):
            rankings[name].append([f"i{j}" for j in order])
            truth[name].append(rel[order[:k]].sum() / rel.sum())
    for name in ("A", "B"):
        raw[name] = snips_per_query(rankings[name], clicks, [k], prefix="")[f"recall@{k}"].mean()
        snips[name] = snips_per_query(rankings[name], weights, [k])[f"snips_recall@{k}"].mean()
    assert np.mean(truth["B"]) > np.mean(truth["A"])
    assert raw["A"] > raw["B"]  # the logging ranker's bias
    assert snips["B"] > snips["A"]
    assert abs(snips["B"] - np.mean(truth["B"])) < 0.05 and abs(snips["A"] - np.mean(truth["A"])) < 0.05


def test_demo_shop_plants_identifier_queries_and_untitled_lifestyle_photos(tmp_path):
    import polars as pl

    from pipeline.demo.shop import generate
    from pipeline.retrieval.slices import query_kind

    generate(tmp_path, products=60, sessions=1500, seed=3)
    queries = pl.read_parquet(tmp_path / "truth" / "queries.parquet")
    identifiers = queries.filter(pl.col("kind") == "identifier")
    assert identifiers.height > 0 and queries.filter(pl.col("kind") == "descriptive").height > 0
    # the report's identifier slice finds the planted model-number queries, and only those
    assert all(query_kind(q) == "identifier" for q in identifiers["query"])
    assert all(query_kind(q) == "descriptive" for q in queries.filter(pl.col("kind") == "descriptive")["query"])
    catalog = pl.read_parquet(tmp_path / "images.parquet")
    products = pl.read_parquet(tmp_path / "truth" / "products.parquet")
    assert products["untitled"].sum() > 0
    # each identifier's target model number is in the titles of its product's titled photos
    number = identifiers["target"][0]
    titled = catalog.join(products, on="image_id").filter((pl.col("model_number") == number)
                                                         & pl.col("title").is_not_null())
    assert titled.height == 0 or titled["title"].str.contains(number).any()
