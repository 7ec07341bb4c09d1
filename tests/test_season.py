"""Six weeks of the weekly loop through the real scheduler, on init's config: benchmarks/bench_season.py
--tiny (its docstring lists what is checked after every week), here asserted week by week."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
WEEKS = 6
BAD_WEEK = 4  # the season generator's default
ROLLBACK_WEEK = 5

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def season(tmp_path_factory) -> dict:
    assert (REPO / ".venv-airflow" / "bin" / "python").is_file(), "no .venv-airflow: run `make test`, which creates it"
    home = tmp_path_factory.mktemp("season")
    done = subprocess.run([sys.executable, str(REPO / "benchmarks" / "bench_season.py"), "--tiny", "--weeks",
                           str(WEEKS), "--rollback-week", str(ROLLBACK_WEEK), "--home", str(home)],
                          capture_output=True, text=True, timeout=2400)
    lines = done.stdout.strip().splitlines()
    assert lines and lines[-1].startswith("{"), f"no JSON line:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    result = json.loads(lines[-1])
    result["stdout"] = done.stdout
    return result


def _checks(season: dict, name: str) -> dict[int, dict]:
    return {c["week"]: c for c in season["per_check"] if c["check"] == name}


def test_every_week_ran_through_the_dag_and_every_check_passed(season):
    assert season["weeks"] == WEEKS, season["stdout"][-3000:]
    assert season["failed"] == [], season["failed"]
    assert season["checks_failed"] == 0


@pytest.mark.parametrize("name", ["dag_run", "window", "incremental_equals_full", "split_sticky",
                                  "hashed_only_new_or_changed", "decision_recorded", "serving_agrees"])
def test_each_weekly_check_ran_every_week(season, name):
    checks = _checks(season, name)
    assert sorted(checks) == list(range(1, WEEKS + 1)), name
    assert all(c["passed"] for c in checks.values()), [c for c in checks.values() if not c["passed"]]


def test_the_earlier_held_out_gate_compares_queries_every_week_after_the_first(season):
    checks = _checks(season, "earlier_heldout_compared")
    assert sorted(checks) == list(range(2, WEEKS + 1))
    assert all(c["passed"] for c in checks.values())
    assert all(row["earlier_queries"] > 0 for row in season["per_week"][1:])


def test_only_new_and_re_shot_images_are_hashed_after_the_first_week(season):
    rows = season["per_week"]
    assert rows[0]["images_read"] > 100
    assert all(0 < row["images_read"] < rows[0]["images_read"] / 5 for row in rows[1:])


def test_the_bad_week_is_refused_and_the_others_promote(season):
    assert _checks(season, "bad_week_refused")[BAD_WEEK]["passed"]
    decisions = [row["decision"].split(",")[0] for row in season["per_week"]]
    assert decisions[BAD_WEEK - 1] == "refused"
    # the test's gates pass any week whose data gates pass, so there is a `previous` to roll back to
    assert all(d == "promoted" for i, d in enumerate(decisions, start=1) if i != BAD_WEEK)
    assert season["per_week"][BAD_WEEK - 1]["quarantine_rate"] > 0.2


def test_a_rollback_makes_the_next_week_compare_against_the_rolled_back_to_champion(season):
    rows = season["per_week"]
    assert "rolled back to" in rows[ROLLBACK_WEEK - 1]["decision"]
    after = _checks(season, "compares_with_rolled_back_champion")
    assert sorted(after) == [ROLLBACK_WEEK + 1] and after[ROLLBACK_WEEK + 1]["passed"]


def test_the_report_carries_the_season_so_far(season):
    checks = _checks(season, "history_in_report")
    assert sorted(checks) == list(range(2, WEEKS + 1)) and all(c["passed"] for c in checks.values())
    assert season["per_week"][-1]["trend"] in ("rising", "falling", "flat")
