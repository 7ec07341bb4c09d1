"""The weeks before this one: what each earlier run of the same shop measured and decided, read
from their manifests under runs_dir, beside this run's figures; and whether what serves is getting
better or worse over the last weeks.

Each week's figures are measured on that week's test queries (the sticky test split grows as the
catalog does), so the series says how the served model did when it was judged, not on one fixed set.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

TREND_WEEKS = 4  # the summary's trend is over this many weeks, this one included
FLAT = 0.005  # a slope under this (metric per week) is flat


def _week(manifest: dict, metric: str) -> dict | None:
    stages = manifest.get("stages", {})
    extract, evaluation, decision = (stages.get(s, {}).get("summary") for s in ("extract", "evaluate", "promote"))
    if not extract or not evaluation:
        return None
    served = evaluation.get("served", {"candidate": "candidate", "baseline": evaluation.get("baseline")})
    models = evaluation.get("models", {})
    if metric not in models.get(served["candidate"], {}) or metric not in models.get(served["baseline"], {}):
        return None
    return {"run_id": manifest.get("run_id"), "until": (extract.get("window") or {}).get("until"),
            "finished_at": stages["evaluate"].get("finished_at", ""),
            "candidate": models[served["candidate"]][metric], "baseline": models[served["baseline"]][metric],
            "baseline_name": evaluation.get("baseline"), "champion_version": evaluation.get("champion_version"),
            "version": decision.get("version") if decision else None,
            "promoted": decision.get("promoted") if decision else None}


def earlier_weeks(runs_dir: Path, name: str, run_id: str, metric: str, until: str | None = None,
                  rolled_back: set[str] = frozenset()) -> list[dict]:
    """Every other run folder of config `name` that got as far as evaluate, oldest window first: only
    windows ending before `until` (a backfilled or redone week sees the weeks before it, not after),
    one run per window (the latest evaluated), versions in `rolled_back` (the registry's) marked."""
    weeks = []
    for path in sorted(runs_dir.glob("*/manifest.json")):
        if path.parent.name == run_id:
            continue
        try:
            manifest = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError):
            continue
        if (manifest.get("config") or {}).get("name") != name:
            continue
        if (week := _week(manifest, metric)) is not None and (until is None or (week["until"] or "") < until):
            week["rolled_back"] = week["version"] is not None and str(week["version"]) in rolled_back
            weeks.append(week)
    latest: dict[str, dict] = {}
    for week in sorted(weeks, key=lambda w: (w["until"] or "", w["finished_at"])):
        latest[week["until"] or week["run_id"]] = week  # a week run twice: its last evaluation
    return sorted(latest.values(), key=lambda w: (w["until"] or "", w["finished_at"]))


def served_after(week: dict) -> float:
    """What served once the week was decided: its candidate if promoted (and not rolled back since),
    else the baseline it lost to (or that a rollback brought back)."""
    return week["candidate"] if week["promoted"] and not week.get("rolled_back") else week["baseline"]


def history(earlier: list[dict], this_week: dict, metric: str) -> dict:
    """The table's weeks (this one last) and the trend of what served after each."""
    weeks = [*earlier, this_week]
    decided = [w for w in weeks if w["promoted"] is not None]
    series = [served_after(w) for w in decided][-TREND_WEEKS:]
    if len(series) < 2:
        trend, slope = "too few weeks to tell", None
    else:
        slope = float(np.polyfit(np.arange(len(series)), series, 1)[0])
        trend = "flat" if abs(slope) < FLAT else "rising" if slope > 0 else "falling"
    sentence = (f"served {metric} over the last {len(series)} decided weeks: "
                + " → ".join(f"{v:.4f}" for v in series)
                + (f", {trend} ({slope:+.4f} a week)" if slope is not None else f" ({trend})"))
    return {"metric": metric, "weeks": weeks, "trend": trend, "slope_per_week": slope, "sentence": sentence}


def plot_history(record: dict, path: Path) -> Path:
    """Candidate and what served after each week, promoted weeks marked."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    weeks = record["weeks"]
    labels = [w["until"] or w["run_id"] for w in weeks]
    x = np.arange(len(weeks))
    fig, ax = plt.subplots(figsize=(6, 3.2), dpi=110)
    ax.plot(x, [w["candidate"] for w in weeks], marker="o", label="candidate that week")
    ax.plot(x, [w["baseline"] for w in weeks], marker="s", linestyle="--", label="baseline (champion) that week")
    promoted = [i for i, w in enumerate(weeks) if w["promoted"]]
    ax.scatter(promoted, [weeks[i]["candidate"] for i in promoted], s=120, facecolors="none", edgecolors="green",
               label="promoted", zorder=3)
    ax.set_xticks(x, labels, rotation=30, ha="right", fontsize=7)
    ax.set(ylabel=record["metric"], title=f"Served {record['metric']} week by week ({record['trend']})")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path
