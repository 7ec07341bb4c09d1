"""Position bias: examination propensities estimated from the click log itself.

Position-based model (PBM): P(click | query, image, position k) = θ_k · γ_(query, image), where θ_k
is the probability that position k is examined and γ the probability that the pair is relevant.
Wang et al. (WSDM 2018) fit it with EM over the log; we do the same on impressions aggregated by
(pair, position), so the cost depends on distinct rows, not on the number of impressions.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Propensities:
    positions: np.ndarray  # 1..P
    examination: np.ndarray  # θ_k / θ_1, so position 1 is 1.0
    iterations: int
    log_likelihood: float

    def as_dict(self) -> dict:
        return {"positions": self.positions.tolist(), "examination": [round(float(v), 6) for v in self.examination],
                "iterations": self.iterations, "log_likelihood": round(self.log_likelihood, 3)}


def examination_propensities(pair: np.ndarray, position: np.ndarray, clicks: np.ndarray,
                             impressions: np.ndarray, max_position: int, iterations: int = 100,
                             tolerance: float = 1e-7, prior: tuple[float, float] = (1.0, 1.0)) -> Propensities:
    """EM for the PBM on aggregated rows.

    pair: int array of pair indices (0..n_pairs-1); position: 1-based positions, capped at
    max_position by the caller; clicks <= impressions per row. Returns θ normalised to θ_1 = 1.
    `prior` is a Beta(a, b) prior on each γ (MAP-EM): click logs see most pairs only a few
    times, and without it a pair clicked once would be "certainly relevant".
    """
    a, b = prior
    pos = position.astype(np.int64) - 1
    clicks = clicks.astype(np.float64)
    impressions = impressions.astype(np.float64)
    skips = impressions - clicks
    n_pairs = int(pair.max()) + 1 if len(pair) else 0
    theta = np.full(max_position, 0.5)
    per_pair_impressions = np.bincount(pair, weights=impressions, minlength=n_pairs)
    per_position_impressions = np.bincount(pos, weights=impressions, minlength=max_position)
    gamma = np.full(n_pairs, 0.5)
    previous, likelihood, done = -np.inf, 0.0, 0
    for step in range(1, iterations + 1):
        done = step
        t, g = theta[pos], gamma[pair]
        p_skip = np.clip(1 - t * g, 1e-12, None)
        # posterior shares of a skip: examined but not relevant, or relevant but not examined
        examined = clicks + skips * t * (1 - g) / p_skip
        relevant = clicks + skips * (1 - t) * g / p_skip
        theta = np.bincount(pos, weights=examined, minlength=max_position) / np.maximum(per_position_impressions, 1)
        gamma = (np.bincount(pair, weights=relevant, minlength=n_pairs) + a - 1) / (per_pair_impressions + a + b - 2)
        theta, gamma = np.clip(theta, 1e-6, 1.0), np.clip(gamma, 1e-6, 1.0)
        p_click = np.clip(theta[pos] * gamma[pair], 1e-12, 1 - 1e-12)
        likelihood = float((clicks * np.log(p_click) + skips * np.log(1 - p_click)).sum())
        if abs(likelihood - previous) < tolerance * max(1.0, abs(likelihood)):
            break
        previous = likelihood
    return Propensities(np.arange(1, max_position + 1), theta / theta[0], done, likelihood)
