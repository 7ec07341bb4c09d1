import numpy as np
import pytest

from pipeline.retrieval.metrics import mean_metrics, per_query_metrics, rank_by_similarity


def test_hand_computed_case():
    ranked = [["a", "x", "b", "y"], ["x", "y", "z", "c"], ["x", "y", "z", "w"]]
    relevant = [{"a", "b"}, {"c"}, {"q"}]
    got = mean_metrics(per_query_metrics(ranked, relevant, [1, 2, 4]))
    assert got["recall@1"] == pytest.approx((0.5 + 0 + 0) / 3)
    assert got["recall@4"] == pytest.approx((1 + 1 + 0) / 3)
    assert got["hit@2"] == pytest.approx(1 / 3)
    assert got["hit@4"] == pytest.approx(2 / 3)
    assert got["mrr"] == pytest.approx((1 + 1 / 4 + 0) / 3)


def test_query_without_relevant_items_is_an_error():
    with pytest.raises(ValueError, match="no relevant"):
        per_query_metrics([["a"]], [set()], [1])


def test_rank_by_similarity():
    items = np.array([[1.0, 0.0], [0.0, 1.0], [0.7, 0.7]])
    ranked = rank_by_similarity(np.array([[1.0, 0.1]]), items, ["x", "y", "z"], k=2)
    assert ranked == [["x", "z"]]


def test_ndcg_with_graded_gains_by_hand():
    ranked = [["b", "x", "a"]]
    gains = [{"a": 3.0, "b": 1.0}]
    got = per_query_metrics(ranked, gains, [1], ndcg_k=3)["ndcg@3"][0]
    dcg = 1.0 / np.log2(2) + 3.0 / np.log2(4)
    ideal = 3.0 / np.log2(2) + 1.0 / np.log2(3)
    assert got == pytest.approx(dcg / ideal)
    perfect = per_query_metrics([["a", "b", "x"]], gains, [1], ndcg_k=3)["ndcg@3"][0]
    assert perfect == pytest.approx(1.0)


def test_paired_bootstrap():
    from pipeline.retrieval.metrics import paired_bootstrap

    rng = np.random.default_rng(0)
    base = rng.uniform(0, 1, 400)
    mean, low, high = paired_bootstrap(base + 0.05, base)
    assert mean == pytest.approx(0.05) and low == pytest.approx(0.05) and high == pytest.approx(0.05)
    noisy = base + rng.normal(0.05, 0.2, 400)
    mean, low, high = paired_bootstrap(noisy, base)
    assert low < mean < high and low > 0 and high - low < 0.1
    mean, low, high = paired_bootstrap(base + rng.normal(0, 0.2, 400), base)
    assert low < 0 < high


def test_exact_search_equals_brute_force_and_hnsw_recall_is_measured_against_it():
    from pipeline.retrieval.search import EXACT_CHUNK, approximate_recall, exact_search

    rng = np.random.default_rng(0)
    gallery = rng.normal(size=(3000, 16)).astype(np.float32)
    queries = rng.normal(size=(EXACT_CHUNK + 7, 16)).astype(np.float32)  # more than one chunk
    top, info = exact_search(queries, gallery, 10, device="cpu")
    normed = gallery / np.linalg.norm(gallery, axis=1, keepdims=True)
    brute = np.argsort(-(queries @ normed.T), axis=1, kind="stable")[:, :10]
    assert info.index == "exact" and (top == brute).mean() > 0.999  # ties aside, the same lists
    hnsw = approximate_recall(queries, gallery, 10, top)
    assert hnsw.index == "hnsw" and 0.5 < hnsw.ann_recall_vs_exact <= 1.0
