"""The served configuration and the one ranking function evaluate and serving share."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pipeline.data.queries import normalise_queries
from pipeline.retrieval.served import (
    ServedConfig,
    fuse,
    identical,
    query_text,
    rank,
    replay_parity,
)

HYBRID = ServedConfig(mode="hybrid", title_weight=0.25, fusion_weight=0.4, fusion_depth=30)


def test_a_served_configuration_round_trips_and_refuses_unknown_fields():
    assert ServedConfig.from_json(HYBRID.to_json()) == HYBRID
    with pytest.raises(ValueError, match="unknown fields"):
        ServedConfig.from_dict(HYBRID.to_dict() | {"keyword_weight": 2})
    with pytest.raises(ValueError, match="outside"):
        ServedConfig(mode="hybrid", title_weight=0.0, fusion_weight=1.5)
    # where the weights came from does not change the ranking, the weights do
    assert HYBRID.with_(tuned="recorded", model_version="4").ranking_digest == HYBRID.ranking_digest
    assert HYBRID.with_(fusion_depth=31).ranking_digest != HYBRID.ranking_digest


scores = st.lists(st.floats(0.0, 1.0, allow_nan=False), min_size=1, max_size=80)


@settings(max_examples=60, deadline=None)
@given(dense=scores, keyword=scores, k=st.integers(1, 40), more=st.integers(1, 60))
def test_the_first_k_results_never_depend_on_how_many_are_asked_for(dense, keyword, k, more):
    """Serving fused over max(k, 50) hits: the min-max scaling, and so the order, moved with k."""
    dense_list = sorted(((f"d{i}", s) for i, s in enumerate(dense)), key=lambda x: -x[1])
    keyword_list = sorted(((f"d{2 * i}", s + 0.1) for i, s in enumerate(keyword)), key=lambda x: -x[1])

    def search(lists):
        return lambda inputs, depth: [lists[:depth] for _ in range(len(inputs))]

    def ranked(n):
        return rank(["q"], np.zeros((1, 2)), HYBRID, search(dense_list), search(keyword_list), n)[0]

    few, many = ranked(k), ranked(k + more)
    assert few == many[:len(few)]
    assert len(many) <= HYBRID.fusion_depth


def test_fusion_uses_the_recorded_depth_of_each_list():
    dense = [(f"i{j}", 1.0 - j / 100) for j in range(60)]
    shallow = fuse(dense, [("i59", 3.0)], HYBRID)
    assert len(shallow) == 31  # the top 30 dense images and the keyword hit
    assert dict(shallow)["i59"] == pytest.approx(0.6)  # beyond the fusion depth: a keyword hit alone


@pytest.mark.parametrize(("typed", "expected"), [("ＮＡＶＹ rain shell", "navy rain shell"), ("ﬁtted", "fitted"),
                                                 ("Straße", "strasse"), ("NV\u20111042", "nv\u20101042"),
                                                 ("navy rain shell\u200b", "navy rain shell")])
def test_served_queries_are_normalised_exactly_as_extract_normalised_the_logs(typed, expected):
    extracted = normalise_queries(pa.array([typed])).to_pylist()[0]
    assert query_text(typed, HYBRID) == extracted == expected


def test_parity_counts_ties_within_float_rounding_as_the_same_order():
    reference = [("a", 0.9), ("b", 0.8), ("c", 0.8000001), ("d", 0.5), ("e", 0.49999999)]
    assert identical(reference, [("a", 0.9), ("c", 0.8), ("b", 0.8), ("d", 0.5)], k=4)
    assert identical(reference, [("a", 0.9), ("b", 0.8), ("c", 0.8), ("e", 0.5)], k=4)  # tied at the cut
    assert not identical(reference, [("b", 0.8), ("a", 0.9), ("c", 0.8), ("d", 0.5)], k=4)
    assert not identical(reference, [("a", 0.9), ("b", 0.8), ("c", 0.8)], k=4)
    parity = replay_parity(["q1", "q2"], [reference, reference], [reference, reference[::-1]],
                           [reference, reference[:2] + [("x", 0.1), ("y", 0.1)]], k=4)
    assert (parity.identical, parity.queries, parity.first_mismatch) == (1, 2, "q2")
    assert parity.overlap == pytest.approx(0.75)
