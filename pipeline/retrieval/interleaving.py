"""Team-draft interleaving (Radlinski, Kurup and Joachims, CIKM 2008) and its readout.

Written here: the PyPI package `interleaving` is now a 5 kB placeholder (0.0.0.dev0, 2025) without
team-draft, and its namesake research library was never released in a usable version.

Each interleaved list is drawn by a random generator seeded from the serve seed and the request
id, so the same request gives the same list on a replay. A search's outcome is the team whose
items got more clicks (a tie when equal; no outcome without clicks). The readout's preference is
the share of decided searches the challenger won, minus one half, with an exact (Clopper-Pearson)
interval and a two-sided sign test; the gate acts once enough searches have a click. A "query" of
the interleaving literature is a search here: one response, with its request id. The interval is a
fixed-horizon one: reading it again and again (every week) and acting on the first crossing
raises the chance of a wrong verdict above 1 - confidence (benchmarks/RESULTS.md, bench_online).
"""

from __future__ import annotations

import hashlib
import random
from collections.abc import Sequence
from dataclasses import asdict, dataclass

from scipy.stats import binomtest, norm

CHAMPION, CHALLENGER = "champion", "challenger"
POWER = 0.8  # of the sample size the readout says a verdict needs


def request_rng(seed: int, request_id: str) -> random.Random:
    """A generator fixed by the serve seed and the request id (sha256: stable across processes)."""
    return random.Random(int.from_bytes(hashlib.sha256(f"{seed}:{request_id}".encode()).digest()[:8], "big"))


def team_draft(champion: Sequence[str], challenger: Sequence[str], k: int, rng: random.Random
               ) -> list[tuple[str, str]]:
    """Up to k (item, team): the team with fewer picks so far picks next (a coin flip when even), each
    time its highest-ranked item not yet shown; when one list runs out, the other fills the rest."""
    shown: list[tuple[str, str]] = []
    seen: set[str] = set()
    lists = {CHAMPION: list(champion), CHALLENGER: list(challenger)}
    cursor = {CHAMPION: 0, CHALLENGER: 0}
    picks = {CHAMPION: 0, CHALLENGER: 0}

    def next_of(team: str) -> str | None:
        ranking = lists[team]
        while cursor[team] < len(ranking) and ranking[cursor[team]] in seen:
            cursor[team] += 1
        return ranking[cursor[team]] if cursor[team] < len(ranking) else None

    while len(shown) < k:
        first = CHAMPION if picks[CHAMPION] < picks[CHALLENGER] else CHALLENGER if picks[CHALLENGER] < picks[
            CHAMPION] else (CHAMPION if rng.random() < 0.5 else CHALLENGER)
        other = CHALLENGER if first == CHAMPION else CHAMPION
        for team in (first, other):
            item = next_of(team)
            if item is not None:
                break
        else:
            break  # both lists are used up
        seen.add(item)
        shown.append((item, team))
        picks[team] += 1
    return shown


def outcome(clicked_teams: Sequence[str]) -> str | None:
    """The team-draft credit of one search: the team whose items got more clicks, 'tie' when both got
    as many, None when nothing was clicked."""
    if not clicked_teams:
        return None
    challenger = sum(t == CHALLENGER for t in clicked_teams)
    champion = sum(t == CHAMPION for t in clicked_teams)
    return CHALLENGER if challenger > champion else CHAMPION if champion > challenger else "tie"


@dataclass(frozen=True)
class Readout:
    """Interleaved searches with a click: won by the challenger, by the champion, tied; the
    preference (share of decided searches the challenger won, minus 0.5) and its interval."""

    wins: int
    losses: int
    ties: int
    searches: int  # interleaved searches shown, with or without a click
    preference: float | None
    low: float | None
    high: float | None
    p_value: float | None
    confidence: float
    min_queries: int
    # searches with a click a fixed-horizon sign test needs (this confidence, 80% power) if the
    # preference seen so far is the true one
    needed: int | None

    @property
    def with_clicks(self) -> int:
        return self.wins + self.losses + self.ties

    @property
    def decision(self) -> str:
        """'promote' (lower bound above zero), 'retire' (upper bound below zero), or 'continue', and
        never before min_queries searches with a click."""
        if self.low is None or self.with_clicks < self.min_queries:
            return "continue"
        if self.low > 0:
            return "promote"
        if self.high < 0:
            return "retire"
        return "continue"

    def sentence(self) -> str:
        if self.preference is None:
            return (f"{self.searches} interleaved searches, none decided yet ({self.ties} ties): no preference "
                    f"to read")
        still = max(0, self.min_queries - self.with_clicks)
        needs = (f"; about {max(0, self.needed - self.with_clicks):,} more searches with a click to decide at this "
                 "preference" if self.needed is not None and self.decision == "continue" else "")
        floor = f"; the gate waits for {still} more searches with a click" if still else ""
        return (f"challenger won {self.wins}, lost {self.losses}, tied {self.ties} of {self.with_clicks} searches "
                f"with a click ({self.searches} interleaved): preference {self.preference:+.3f} "
                f"[{self.low:+.3f}, {self.high:+.3f}] at {self.confidence:.0%}, sign test p = {self.p_value:.3g}"
                f"{needs}{floor} → {self.decision}")

    def as_dict(self) -> dict:
        return {**asdict(self), "with_clicks": self.with_clicks, "decision": self.decision,
                "sentence": self.sentence()}


def readout(outcomes: Sequence[str | None], confidence: float = 0.95, min_queries: int = 200) -> Readout:
    """The readout of interleaved searches' outcomes (`outcome` of each; None: no click)."""
    wins = sum(o == CHALLENGER for o in outcomes)
    losses = sum(o == CHAMPION for o in outcomes)
    ties = sum(o == "tie" for o in outcomes)
    decided = wins + losses
    if decided == 0:
        return Readout(wins, losses, ties, len(outcomes), None, None, None, None, confidence, min_queries, None)
    test = binomtest(wins, decided, 0.5)
    interval = test.proportion_ci(confidence, method="exact")
    share = wins / decided
    needed = None
    if share != 0.5:  # a fixed-horizon sign test at this confidence and 80% power, normal approximation
        z = norm.ppf(0.5 + confidence / 2) + norm.ppf(POWER)
        decided_needed = z * z * share * (1 - share) / (share - 0.5) ** 2
        needed = int(decided_needed * (wins + losses + ties) / decided) + 1
    return Readout(wins, losses, ties, len(outcomes), share - 0.5, interval.low - 0.5, interval.high - 0.5,
                   float(test.pvalue), confidence, min_queries, needed)


def swap_pair(n: int, rate: float, rng: random.Random) -> tuple[int, float] | None:
    """A randomised swap (RandPair-style) for a list of n results: with probability `rate`, one
    adjacent pair (i, i+1), 0-based, each of the n-1 pairs equally likely; returns (i, the chance
    that this pair was swapped), or None for no swap."""
    if n < 2 or rate <= 0 or rng.random() >= rate:
        return None
    return rng.randrange(n - 1), rate / (n - 1)
