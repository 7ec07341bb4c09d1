"""Evaluate's definitions: filtered ranking and product-level relevance."""

import polars as pl

from pipeline.config import EvaluateConfig
from pipeline.retrieval.metrics import per_query_metrics
from pipeline.stages.evaluate import known_positives, load_test_set

IMAGES = pl.DataFrame({
    "image_id": ["a1", "t1", "t2", "t3", "v1"], "path": ["a1.png", "t1.png", "t2.png", "t3.png", "v1.png"],
    "product_id": ["R", "P", "P", "Q", None], "title": ["", "", "", "", ""],
    "split": ["train", "test", "test", "test", "val"], "group_id": ["a1", "t1", "t2", "t3", "v1"]})
PAIRS = pl.DataFrame({
    "query": ["navy mug", "navy mug", "navy mug"], "image_id": ["t1", "a1", "v1"], "clicks": [2, 3, 1],
    "weight": [2.0, 3.0, 1.0], "split": ["test", "train", "val"], "query_heldout": [False, False, False],
    "impressions": [10, 10, 10]})


def _test_set(tmp_path, **settings):
    PAIRS.write_parquet(tmp_path / "pairs.parquet")
    IMAGES.write_parquet(tmp_path / "images.parquet")
    return load_test_set(tmp_path / "pairs.parquet", tmp_path / "images.parquet", EvaluateConfig(**settings))


def test_known_right_answers_are_the_querys_other_clicks_and_the_relevant_products_other_photos():
    known = known_positives(["navy mug"], PAIRS.filter(pl.col("split") == "test"), PAIRS, IMAGES, {})
    assert known == [{"a1", "v1", "t2"}]  # clicked in train and val; t2 is another photo of product P


def test_filtered_ranking_neither_rewards_nor_punishes_other_right_answers(tmp_path):
    ranked = ["a1", "t2", "v1", "t3", "t1"]  # the model ranks the query's other right answers first
    filtered = _test_set(tmp_path)
    unfiltered = _test_set(tmp_path, filtered=False)
    top2 = [filtered.ranked_items(ranked, filtered.known[0], 2)]
    assert top2 == [["t3", "t1"]]
    assert per_query_metrics(top2, filtered.relevant, [2])["recall@2"][0] == 1.0
    plain = [unfiltered.ranked_items(ranked, unfiltered.known[0], 2)]
    assert plain == [["a1", "t2"]] and per_query_metrics(plain, unfiltered.relevant, [2])["recall@2"][0] == 0.0


def test_product_relevance_counts_any_photo_of_the_product_once(tmp_path):
    test = _test_set(tmp_path, relevance="product")
    assert test.relevant == [{"product:P": 2.0}]
    items = test.ranked_items(["t2", "t1", "t3"], test.known[0], 2)
    assert items == ["product:P", "product:Q"]  # t1 and t2 are one product, counted once
    assert per_query_metrics([items], test.relevant, [1])["recall@1"][0] == 1.0


def test_an_image_deleted_after_split_is_left_out_not_a_crash(tmp_path):
    for path in IMAGES["path"].to_list():
        (tmp_path / path).write_bytes(b"an image")
    (tmp_path / "t1.png").unlink()  # the only clicked test image, deleted after split
    PAIRS.write_parquet(tmp_path / "pairs.parquet")
    extra = pl.DataFrame({"query": ["red hat"], "image_id": ["t3"], "clicks": [1], "weight": [1.0],
                          "split": ["test"], "query_heldout": [False], "impressions": [5]})
    pl.concat([PAIRS, extra]).write_parquet(tmp_path / "pairs.parquet")
    IMAGES.write_parquet(tmp_path / "images.parquet")
    test = load_test_set(tmp_path / "pairs.parquet", tmp_path / "images.parquet", EvaluateConfig(), tmp_path)
    assert test.missing == ["t1"] and "t1" not in test.catalog_ids
    assert test.queries == ["red hat"]  # navy mug has no held-out image left to find


def test_hubness_is_the_share_of_top_slots_the_most_frequent_results_fill():
    from pipeline.stages.evaluate import hubness

    hubs = [["h1", "h2", f"x{i}"] for i in range(10)]  # two images in every list
    result = hubness(hubs, k=3, images=2)
    assert result["top_share"] == round(20 / 30, 4) and result["most_frequent"] == ["h1", "h2"]
    assert hubness([[f"a{i}", f"b{i}"] for i in range(10)], k=2, images=2)["top_share"] == 0.1


def test_the_report_states_the_decision_gate_by_gate():
    from pipeline.report.markdown import render_decision

    summary = {"decision": {"promoted": False, "reason": "failed", "gates": [
        {"gate": "beats_baseline", "passed": False, "detail": "95% CI lower bound -0.0100 ≤ margin 0.0"},
        {"gate": "no_nan", "passed": True, "detail": "training finished without NaN"}]}}
    text = render_decision(summary)
    assert "**do not promote**" in text
    assert "| beats_baseline | **FAIL** | 95% CI lower bound -0.0100 ≤ margin 0.0 |" in text


def test_the_champion_is_scored_as_it_serves_and_only_an_unrecorded_model_is_tuned(tmp_path):
    """hybrid(champion) was re-tuned (β, w) on this week's validation queries, though its live index
    had its own β baked into its vectors and its own fusion weight."""
    import numpy as np

    from pipeline.retrieval.served import ServedConfig
    from pipeline.stages.evaluate import Embedded, KeywordLists, keyword_depth, score_configurations

    test = _test_set(tmp_path)
    val = load_test_set(tmp_path / "pairs.parquet", tmp_path / "images.parquet", EvaluateConfig(), split="val")
    rng = np.random.default_rng(0)
    unit = lambda n: (lambda v: v / np.linalg.norm(v, axis=1, keepdims=True))(rng.normal(size=(n, 8)))  # noqa: E731
    embedded = Embedded(unit(5), unit(5), np.ones(5, bool), {"test": unit(1), "seen": np.zeros((0, 8)),
                                                             "val": unit(1)}, 1.0)
    base = ServedConfig(mode="hybrid", title_weight=0.0)
    keyword = KeywordLists(test, val, keyword_depth(test, val, 50, []))
    recorded = base.with_(title_weight=0.5, fusion_weight=0.3, model_version="4", tuned="recorded")
    champion = score_configurations("champion", embedded, test, val, keyword, EvaluateConfig(), "recall@10", base,
                                    recorded)
    served = champion.served["hybrid(champion)"]
    assert (served.title_weight, served.fusion_weight, served.tuned) == (0.5, 0.3, "recorded")
    assert served.ranking_digest == recorded.ranking_digest  # exactly as it serves
    assert champion.tuning["how"] == "recorded" and champion.tuning["hybrid_curve"] == []
    start = score_configurations("start", embedded, test, val, keyword, EvaluateConfig(), "recall@10", base)
    assert start.tuning["how"] == "validation" and start.tuning["hybrid_curve"]
    assert start.served["hybrid(start)"].tuned == "validation"
