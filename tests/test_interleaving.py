"""Team-draft interleaving, its click credit and the readout's statistics and gate."""

from __future__ import annotations

import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy.stats import binomtest

from pipeline.retrieval.interleaving import CHALLENGER, CHAMPION, outcome, readout, request_rng, team_draft

rankings = st.lists(st.sampled_from([f"i{n}" for n in range(30)]), unique=True, max_size=25)


@settings(max_examples=200, deadline=None)
@given(rankings, rankings, st.integers(1, 30), st.integers(0, 2**32))
def test_team_draft_shows_each_item_once_in_each_teams_order_and_keeps_the_teams_even(a, b, k, seed):
    shown = team_draft(a, b, k, random.Random(seed))
    items = [item for item, _ in shown]
    assert len(items) == len(set(items)) == min(k, len(set(a) | set(b)))
    for team, ranking in ((CHAMPION, a), (CHALLENGER, b)):
        picked = [item for item, t in shown if t == team]
        assert all(item in ranking for item in picked)
        assert picked == sorted(picked, key=ranking.index)  # each team picks in its own order
    # while both teams still had an item to give, neither got two picks ahead
    counts = {CHAMPION: 0, CHALLENGER: 0}
    for position, (_, team) in enumerate(shown):
        counts[team] += 1
        rest = {item for item, _ in shown[: position + 1]}
        if set(a) - rest and set(b) - rest:
            assert abs(counts[CHAMPION] - counts[CHALLENGER]) <= 1


def test_identical_rankings_interleave_to_that_ranking_and_a_replay_gives_the_same_list():
    ranking = [f"i{n}" for n in range(10)]
    assert [i for i, _ in team_draft(ranking, ranking, 10, request_rng(0, "r1"))] == ranking
    assert team_draft(ranking, ranking[::-1], 6, request_rng(7, "20261102-ab")) == \
        team_draft(ranking, ranking[::-1], 6, request_rng(7, "20261102-ab"))
    lists = {tuple(team_draft(ranking, ranking[::-1], 6, request_rng(7, f"r{n}"))) for n in range(20)}
    assert 1 < len(lists) <= 8  # a coin decides who picks first in each of the 3 rounds


def test_clicks_at_random_on_two_equal_rankers_favour_neither():
    rng = random.Random(3)
    ranking = [f"i{n}" for n in range(10)]
    outcomes = []
    for n in range(4000):
        shown = team_draft(ranking, rng.sample(ranking, 10), 10, request_rng(0, f"r{n}"))
        outcomes.append(outcome([team for _, team in shown if rng.random() < 0.15]))
    result = readout(outcomes, min_queries=100)
    assert result.low < 0 < result.high and result.decision == "continue"


def test_a_search_is_credited_to_the_team_with_more_clicks():
    assert outcome([CHALLENGER, CHALLENGER, CHAMPION]) == CHALLENGER
    assert outcome([CHAMPION]) == CHAMPION
    assert outcome([CHAMPION, CHALLENGER]) == "tie"
    assert outcome([]) is None


def test_readout_statistics_are_the_sign_test_and_its_exact_interval():
    outcomes = [CHALLENGER] * 60 + [CHAMPION] * 40 + ["tie"] * 10 + [None] * 30
    result = readout(outcomes, confidence=0.95, min_queries=50)
    expected = binomtest(60, 100, 0.5)
    interval = expected.proportion_ci(0.95, method="exact")
    assert (result.wins, result.losses, result.ties, result.searches, result.with_clicks) == (60, 40, 10, 140, 110)
    assert result.preference == pytest.approx(0.1)
    assert result.low == pytest.approx(interval.low - 0.5) and result.high == pytest.approx(interval.high - 0.5)
    assert result.p_value == pytest.approx(expected.pvalue)
    # at a share of 0.6, 95% and 80% power: (1.96 + 0.8416)² · 0.24 / 0.01 = 188.4 decided searches, and
    # 110 searches with a click hold 100 decided ones: 207.2, so 208
    assert result.needed == 208
    assert "won 60, lost 40, tied 10" in result.sentence()


@pytest.mark.parametrize(("wins", "losses", "min_queries", "decision"), [
    (80, 20, 50, "promote"),
    (80, 20, 500, "continue"),  # clear, but too few searches yet
    (20, 80, 50, "retire"),
    (52, 48, 50, "continue"),
    (0, 0, 1, "continue"),
])
def test_the_interleaving_gate_promotes_retires_or_waits(wins, losses, min_queries, decision):
    result = readout([CHALLENGER] * wins + [CHAMPION] * losses, min_queries=min_queries)
    assert result.decision == decision
