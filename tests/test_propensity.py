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
