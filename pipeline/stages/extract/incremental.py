"""Incremental extract: a watermark of the date partitions already read, and their statistics.

With `extract.incremental: true`, extract keeps, in `<state_dir>/<name>/extract/`, the usable
impressions summed per (day, query, image, position) (`stats-<run>.parquet`) and a watermark
(`current.json`): the size and mtime of every partition file already read. A nightly run reads only
the partitions that are new or whose files changed since, replaces those days' statistics, keeps
the other days (inside the window), and recomputes propensities and pair weights over the merged
statistics.

A run that is redone (same run id, e.g. after a crash) plans against the state as it was before
that run, so a rerun reads the same partitions and writes the same outputs.

The pairs equal a full extract of the same partitions except in two cases, each pinned by a test
in tests/test_extract.py:
- Bot sessions and exact duplicates are judged within the partitions one run reads. A session
  whose events fall in two date partitions read by different runs (one that crosses midnight) is
  judged per part, where a full extract judges it whole.
- Rows quarantined as `unknown_image` stay quarantined: when their image joins the catalog later,
  the days already read are not read again. Delete `<state_dir>/<name>/extract/` to rebuild.
An image that later leaves the catalog drops out of the kept statistics, and so of the
propensities and the pairs, as a full extract quarantines its rows (`unknown_image`); its pairs
are counted in the summary (`pairs_dropped_image_left_catalog`).
Settings that change the kept statistics (`settings_of`: time zone, query normalisation, the
tokenizer and text context that judge long queries, long-query policy, bot and dwell settings)
invalidate the state: the run reads every partition in the window again and says which changed.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass, field
from datetime import date
from pathlib import Path

from pipeline.config import ExtractConfig, RunConfig
from pipeline.data.files import atomic_write, file_sha256, text_sha256
from pipeline.data.partitions import partition_date, source_files
from pipeline.errors import DataContractError

STATE_VERSION = 1
KEEP_STATS_FILES = 2  # the current statistics and the ones before them (a redone run plans against those)


@dataclass(frozen=True)
class IncrementalPlan:
    """What an incremental run reads, and what it merges from earlier runs."""

    state_dir: Path
    run_id: str
    settings: str
    settings_values: dict
    read_files: list[Path]
    read_days: list[date]
    reused_days: list[date]
    previous_stats: Path | None  # statistics of earlier runs; only `reused_days` of it are merged
    status: str  # "first run", "resumed", or why the state was rebuilt
    previous_run: str | None
    files: dict[str, list[int]] = field(default_factory=dict)  # the watermark after this run

    def summary(self) -> dict:
        return {"status": self.status, "previous_run": self.previous_run,
                "partitions_read": [str(d) for d in self.read_days], "partitions_reused": len(self.reused_days)}


def settings_of(cfg: RunConfig) -> dict:
    """What the kept statistics depend on besides the data: the day a row falls on (time zone), the
    query it is summed under (normalisation), which queries are too long (the tokenizer and its
    context, the policy), which sessions are bots and which clicks satisfied: changing any of it
    rebuilds them."""
    from pipeline.training.model import text_encoder_limits  # open_clip loads slowly: only here

    ecfg: ExtractConfig = cfg.extract
    _, context, tokenizer = text_encoder_limits(cfg.train)
    return {"time_zone": ecfg.time_zone, "strip_punctuation": ecfg.strip_punctuation, "tokenizer": tokenizer,
            "text_context": context, "long_queries": ecfg.long_queries, "bots": ecfg.bots.model_dump(mode="json"),
            "satisfied_dwell_ms": ecfg.satisfied_dwell_ms}


def settings_key(settings: dict) -> str:
    return text_sha256(STATE_VERSION, settings)


def changed_settings(before: dict | None, now: dict) -> str:
    """`time_zone 'UTC' -> 'Europe/Berlin'` for each setting that differs (all, for an old state)."""
    if not before:
        return "the watermark does not record its settings"
    return ", ".join(f"{key} {before.get(key)!r} -> {value!r}" for key, value in now.items()
                     if before.get(key) != value)


def _load(state_dir: Path, run_id: str) -> dict | None:
    """The state to plan against: the current one, or the one before it when this run is being redone."""
    current = state_dir / "current.json"
    if not current.is_file():
        return None
    state = json.loads(current.read_text())
    if state.get("run_id") == run_id:
        state = state.get("previous")
    if not state or state.get("version") != STATE_VERSION:
        return None
    stats = state_dir / state["stats"]
    if not stats.is_file() or file_sha256(stats) != state["sha256"]:
        return {"corrupt": True}
    return state


def _snapshot(path: Path) -> list[int]:
    stat = path.stat()
    return [stat.st_size, stat.st_mtime_ns]


def plan(cfg: RunConfig, files: list[Path] | None, since: date | None, until: date | None,
         run_id: str) -> IncrementalPlan:
    """Which partitions to read: every one the watermark lacks or whose files changed."""
    source = cfg.data.events
    if source.format != "parquet":
        raise DataContractError(f"{source.format} source {source.path}: incremental extract needs a Parquet "
                                "source partitioned by date=YYYY-MM-DD")
    files = source_files(source) if files is None else files
    by_day: dict[date, list[Path]] = {}
    for path in files:
        day = partition_date(path)
        if day is None:
            raise DataContractError(f"parquet source {source.path}: {path} is not under a date=YYYY-MM-DD "
                                    "partition, which incremental extract needs")
        by_day.setdefault(day, []).append(path)
    snapshot = {str(p): _snapshot(p) for p in files}
    state_dir = cfg.state_dir / cfg.name / "extract"
    values = settings_of(cfg)
    settings = settings_key(values)
    state = _load(state_dir, run_id)
    status, old_files, old_days = "first run", {}, set()
    if state and state.get("corrupt"):
        status = "rebuilt: the kept statistics are missing or damaged"
    elif state and state["settings"] != settings:
        status = (f"rebuilt: settings the kept statistics depend on changed since the watermark was written "
                  f"({changed_settings(state.get('settings_values'), values)})")
    elif state:
        status, old_files, old_days = "resumed", state["files"], {date.fromisoformat(d) for d in state["days"]}

    old_by_day: dict[date | None, dict[str, list[int]]] = {}
    for path, stat in old_files.items():
        old_by_day.setdefault(partition_date(path), {})[path] = stat

    def unchanged(day: date) -> bool:
        return day in old_days and old_by_day.get(day) == {str(p): snapshot[str(p)] for p in by_day[day]}

    reused = sorted(d for d in by_day if unchanged(d))
    # days only the state knows (their partitions were deleted since) stay while they are in the window
    reused += sorted(d for d in old_days - set(by_day)
                     if (since is None or d >= since) and (until is None or d <= until))
    read_days = sorted(d for d in by_day if d not in reused)
    kept_files = {p: s for p, s in old_files.items() if partition_date(p) in set(reused)}
    return IncrementalPlan(
        state_dir=state_dir, run_id=run_id, settings=settings, settings_values=values,
        read_files=[p for d in read_days for p in by_day[d]], read_days=read_days, reused_days=sorted(reused),
        previous_stats=state_dir / state["stats"] if status == "resumed" else None, status=status,
        previous_run=state.get("run_id") if status == "resumed" else None,
        files={**kept_files, **{str(p): snapshot[str(p)] for d in read_days for p in by_day[d]}})


def commit(plan: IncrementalPlan, stats: Path, days: list[date]) -> None:
    """Keep this run's merged statistics and move the watermark to them (the watermark last)."""
    plan.state_dir.mkdir(parents=True, exist_ok=True)
    name = f"stats-{plan.run_id}.parquet"
    with atomic_write(plan.state_dir / name) as tmp:
        shutil.copyfile(stats, tmp)
    current = plan.state_dir / "current.json"
    before = json.loads(current.read_text()) if current.is_file() else None
    if before and before.get("run_id") == plan.run_id:
        before = before.get("previous")
    if before:
        before.pop("previous", None)
    state = {"version": STATE_VERSION, "run_id": plan.run_id, "settings": plan.settings,
             "settings_values": plan.settings_values, "stats": name,
             "sha256": file_sha256(plan.state_dir / name), "days": [str(d) for d in days],
             "files": plan.files, "previous": before}
    with atomic_write(current) as tmp:
        tmp.write_text(json.dumps(state, indent=1))
    wanted = {name, before["stats"] if before else None}
    olds = sorted(plan.state_dir.glob("stats-*.parquet"), key=os.path.getmtime)
    for old in olds[:-KEEP_STATS_FILES]:
        if old.name not in wanted:
            old.unlink()
