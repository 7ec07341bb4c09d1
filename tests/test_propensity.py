import json

import numpy as np
import pytest

from pipeline.data.propensity import examination_propensities
from pipeline.demo.shop import generate
from pipeline.stages.extract import extract
from tests.conftest import shop_config


def test_em_recovers_propensities_of_a_dense_synthetic_log():
    rng = np.random.default_rng(0)
    theta = 1 / (1 + 0.35 * np.arange(10))
    pairs = 2000
    gamma = rng.uniform(0, 1, pairs)
    pair, position = np.repeat(np.arange(pairs), 10), np.tile(np.arange(1, 11), pairs)
    impressions = rng.integers(1, 6, len(pair))
    clicks = rng.binomial(impressions, theta[position - 1] * gamma[pair])
    got = examination_propensities(pair, position, clicks, impressions, 10, 500)
    np.testing.assert_allclose(got.examination, theta, rtol=0.06)
    assert got.examination[0] == 1.0


@pytest.fixture(scope="module")
def demo_shop(tmp_path_factory):
    """The demo's default log size (600 products, 20,000 sessions): EM needs that much data."""
    out = tmp_path_factory.mktemp("demo_shop")
    generate(out, products=600, sessions=20_000, seed=0)
    return out


def test_em_on_the_demo_log_recovers_the_generators_propensities(demo_shop, tmp_path):
    result = extract(shop_config(demo_shop, tmp_path), tmp_path)
    estimated = np.array(json.loads(result.propensity.read_text())["examination"][:10])
    truth = np.array(json.loads((demo_shop / "truth" / "propensities.json").read_text())["examination"])
    np.testing.assert_allclose(estimated, truth, rtol=0.10)
    assert (tmp_path / "propensity.png").stat().st_size > 1000


def _confounded_log(swap_rate: float, responses: int = 400_000, positions: int = 10, seed: int = 0):
    """A ranker that always shows each query's results in one order, best first: every pair is seen
    at one position only, so position and relevance are confounded. With `swap_rate`, a response
    swaps one random adjacent pair (serve's randomised swaps). Aggregated (pair, ranked, shown,
    clicks, impressions) rows, and the true examination."""
    rng = np.random.default_rng(seed)
    theta = 1.0 / np.arange(1, positions + 1) ** 0.9
    queries = 2000
    gamma = np.clip(0.7 - 0.05 * np.arange(positions)[None, :] + rng.normal(0, 0.08, (queries, positions)), 0.02, 1)
    query = rng.integers(0, queries, responses)
    shown = np.tile(np.arange(1, positions + 1), (responses, 1))
    swapped = rng.random(responses) < swap_rate
    pivot = rng.integers(1, positions, responses)  # swap positions pivot and pivot + 1
    rows = np.flatnonzero(swapped)
    shown[rows, pivot[rows] - 1], shown[rows, pivot[rows]] = pivot[rows] + 1, pivot[rows]
    clicked = rng.random((responses, positions)) < theta[shown - 1] * gamma[query]
    pair = (query[:, None] * positions + np.arange(positions)[None, :]).ravel()
    ranked = np.tile(np.arange(1, positions + 1), responses)
    keys = np.stack([pair, ranked, shown.ravel()])
    unique, inverse = np.unique(keys, axis=1, return_inverse=True)
    clicks = np.bincount(inverse.ravel(), weights=clicked.ravel())
    impressions = np.bincount(inverse.ravel())
    return unique[0], unique[1], unique[2], clicks, impressions, theta


def test_randomised_swaps_recover_examination_where_the_em_on_a_confounded_log_cannot():
    from pipeline.data.propensity import swap_propensities

    pair, ranked, shown, clicks, impressions, truth = _confounded_log(swap_rate=0.0)
    _, pair_index = np.unique(pair, return_inverse=True)
    em = examination_propensities(pair_index, shown, clicks, impressions, 10).examination
    assert np.max(np.abs(em / (truth / truth[0]) - 1)) > 0.10  # the EM alone is off

    pair, ranked, shown, clicks, impressions, truth = _confounded_log(swap_rate=0.3)
    estimate = swap_propensities(ranked, shown, clicks, impressions, 10)
    relative = estimate.propensities.examination / (truth / truth[0])
    assert np.all(np.abs(relative - 1) < 0.10), relative
    assert estimate.swapped_impressions == int(impressions[ranked != shown].sum()) > 0
    assert swap_propensities(ranked[ranked == shown], shown[ranked == shown], clicks[ranked == shown],
                             impressions[ranked == shown], 10) is None  # no swaps: no estimate
