"""Serve's impression log (pipeline/serving/impressions.py): events-contract rows extract reads as
they are, crash-safe files, bounded memory, a full disk that stops logging but never serving."""

from __future__ import annotations

import errno
import signal
import subprocess
import sys
import textwrap
import time
from datetime import datetime, timedelta
from pathlib import Path

import duckdb
import pyarrow.parquet as pq
import pytest

from pipeline.serving.impressions import ImpressionLog, UnknownRequest
from tests.conftest import shop_config


class Clock:
    def __init__(self, start: datetime):
        self.now = start

    def __call__(self) -> datetime:
        return self.now


def _catalog(shop: Path) -> list[str]:
    return pq.read_table(shop / "images.parquet", columns=["image_id"])["image_id"].to_pylist()


def test_extract_reads_the_log_as_written_and_joins_each_click_onto_its_impression(tiny_shop, tmp_path):
    from pipeline.stages.extract import extract

    images = _catalog(tiny_shop)
    clock = Clock(datetime(2026, 11, 2, 23, 59, 58))
    log = ImpressionLog(tmp_path / "log", clock=clock)
    first = log.shown("s1", "Red Mug", "3", [(images[0], 1, None, None), (images[1], 2, None, None),
                                            (images[2], 3, None, None)])
    second = log.shown("s2", "blue lamp", "3", [(images[3], 1, None, None), (images[4], 2, None, None)])
    clock.now += timedelta(seconds=5)  # after midnight: the clicks still land in their impressions' day
    log.clicked(first, images[1], 42_000)
    log.clicked(first, images[1], 9_000)  # a second click on the same result: one clicked impression
    log.clicked(second, images[3], None)
    log.flush()
    orphan = log.shown("s3", "green chair", "3", [(images[5], 1, None, None)])
    log.flush()
    (only_impression,) = [p for p in (tmp_path / "log").rglob("*.parquet")
                          if orphan in pq.read_table(p)["request_id"].to_pylist()]
    only_impression.unlink()  # as if that file was lost: its click stays a row of its own
    log.clicked(orphan, images[5], 1_000)
    log.flush()
    for part in (tmp_path / "log").rglob("*.parquet"):  # a click after midnight joins its impression's day
        day = part.parent.name.removeprefix("date=").replace("-", "")
        assert {r[:8] for r in pq.read_table(part)["request_id"].to_pylist()} == {day}
    assert (tmp_path / "log" / "date=2026-11-02").is_dir() and (tmp_path / "log" / "date=2026-11-03").is_dir()
    assert not list((tmp_path / "log").rglob("*.tmp"))

    cfg = shop_config(tiny_shop, tmp_path, data={"events": {"path": str(tmp_path / "log")},
                                                 "images": {"path": str(tiny_shop / "images.parquet")},
                                                 "image_root": str(tiny_shop / "images")})
    (tmp_path / "extract").mkdir()
    result = extract(cfg, tmp_path / "extract")
    summary = result.summary
    assert summary["rows_read"] == 6  # 5 impressions + the click whose impression was lost
    assert summary["click_rows_joined"] == 3
    assert summary["rows_kept"] + summary["rows_quarantined"] + summary["rows_outside_window"] == 6
    con = duckdb.connect()
    pairs = dict(con.execute("SELECT query || '|' || image_id, clicks FROM read_parquet(?)",
                             [str(result.pairs)]).fetchall())
    assert pairs[f"red mug|{images[1]}"] == 1 and pairs[f"red mug|{images[0]}"] == 0
    assert pairs[f"blue lamp|{images[3]}"] == 1
    assert pairs[f"green chair|{images[5]}"] == 1


def test_a_click_on_a_request_this_process_did_not_answer_is_refused_and_counted(tmp_path):
    log = ImpressionLog(tmp_path / "log", recent_requests=1)
    first = log.shown("s", "mug", "1", [("a", 1, None, None)])
    log.shown("s", "lamp", "1", [("b", 1, None, None)])  # pushes the first out of the recent requests
    with pytest.raises(UnknownRequest):
        log.clicked(first, "a", None)
    with pytest.raises(UnknownRequest):
        log.clicked("20261102-nosuchrequest", "a", None)
    assert log.metrics()["clicks_unknown_request"] == 2


def test_memory_is_bounded_and_what_did_not_fit_is_counted(tmp_path):
    log = ImpressionLog(tmp_path / "log", max_buffered_rows=5)
    for _ in range(3):
        log.shown("s", "mug", "1", [("a", 1, None, None), ("b", 2, None, None)])
    metrics = log.metrics()
    assert metrics["buffered_rows"] == 5 and metrics["rows_dropped"] == 1
    log.flush()
    assert sum(pq.read_table(p).num_rows for p in (tmp_path / "log").rglob("*.parquet")) == 5


def test_a_full_disk_stops_logging_says_so_and_resumes_when_writes_succeed(tmp_path, monkeypatch, caplog):
    log = ImpressionLog(tmp_path / "log")
    real_write = log._write

    def full(day, rows):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(log, "_write", full)
    log.shown("s", "mug", "1", [("a", 1, None, None)])
    log.flush()
    metrics = log.metrics()
    assert metrics["logging"] == "stopped" and "No space left" in metrics["stopped_because"]
    assert metrics["write_failures"] == 1 and metrics["rows_dropped"] == 1
    assert "impression logging stopped" in caplog.text
    monkeypatch.setattr(log, "_write", real_write)
    log.shown("s", "mug", "1", [("a", 1, None, None)])
    log.flush()
    assert log.metrics()["logging"] == "on" and log.metrics()["rows_written"] == 1
    assert "resumed" in caplog.text


def test_any_failed_write_stops_logging_loudly_and_the_writer_thread_lives_on(tmp_path, monkeypatch):
    """Not only a full disk: any failure of a write (here one Arrow refuses) is counted and said, and
    the background writer keeps running, so logging resumes once writes succeed."""
    log = ImpressionLog(tmp_path / "log", flush_seconds=0.02).start()
    real_write = log._write
    monkeypatch.setattr(log, "_write", lambda day, rows: (_ for _ in ()).throw(ValueError("refused by Arrow")))
    log.shown("s", "mug", "1", [("a", 1, None, None)])
    deadline = time.monotonic() + 10
    while log.metrics()["write_failures"] == 0 and time.monotonic() < deadline:
        time.sleep(0.01)
    assert log.metrics()["logging"] == "stopped" and "refused by Arrow" in log.metrics()["stopped_because"]
    monkeypatch.setattr(log, "_write", real_write)
    log.shown("s", "mug", "1", [("b", 1, None, None)])
    while log.metrics()["rows_written"] == 0 and time.monotonic() < deadline:
        time.sleep(0.01)
    log.close()
    assert log.metrics()["logging"] == "on" and log.metrics()["rows_written"] == 1


def test_a_dwell_the_log_cannot_hold_is_refused_before_it_reaches_the_buffer(tmp_path):
    log = ImpressionLog(tmp_path / "log")
    request = log.shown("s", "mug", "1", [("a", 1, None, None)])
    for bad in (-1, 2**40):
        with pytest.raises(ValueError, match="dwell_ms"):
            log.clicked(request, "a", bad)
    log.clicked(request, "a", 2**31 - 1)
    log.flush()
    assert log.metrics()["rows_written"] == 2 and log.metrics()["write_failures"] == 0


def test_a_killed_server_leaves_whole_files_only(tmp_path):
    """SIGKILL while the log writes every 50 ms: every file extract would read is a whole Parquet
    file, and each holds whole responses."""
    script = textwrap.dedent(f"""
        import sys, time
        from pathlib import Path
        from pipeline.serving.impressions import ImpressionLog
        log = ImpressionLog(Path({str(tmp_path / 'log')!r}), flush_seconds=0.05).start()
        n = 0
        while True:
            log.shown("s", "mug", "1", [(f"img{{i}}", i + 1, None, None) for i in range(20)])
            n += 20
            if n % 2000 == 0:
                print(n, flush=True)
            time.sleep(0.001)
    """)
    child = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True,
                             cwd=Path(__file__).resolve().parents[1])
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and len(list((tmp_path / "log").rglob("*.parquet"))) < 10:
            time.sleep(0.05)
    finally:
        child.send_signal(signal.SIGKILL)
        child.wait()
    files = sorted((tmp_path / "log").rglob("*.parquet"))
    assert len(files) >= 10
    rows = sum(pq.read_table(p).num_rows for p in files)  # every file reads whole
    assert rows > 0 and rows % 20 == 0  # responses are never split across a cut


def test_extract_weights_pairs_by_the_swap_estimate_when_serve_swapped_and_says_so(tiny_shop, tmp_path):
    """A confounded ranker (each query's results always in one order, best first) with serve's
    randomised swaps at 30%, logged through the impression log: extract uses the swap estimate,
    within 10% of the true examination, and reports the EM's beside it (on the pure confounded log
    the EM is far off: tests/test_propensity.py)."""
    import random

    import numpy as np

    from pipeline.retrieval.interleaving import swap_pair
    from pipeline.stages.extract import extract

    images = _catalog(tiny_shop)
    rng = random.Random(0)
    theta = [1 / (k ** 0.9) for k in range(1, 6)]  # five results a search: enough swaps per pair in 40,000
    rankings = {f"query {q}": rng.sample(images, 5) for q in range(40)}
    gamma = {q: [max(0.05, 0.7 - 0.1 * r + rng.gauss(0, 0.05)) for r in range(5)] for q in rankings}
    clock = Clock(datetime(2026, 11, 2, 8, 0, 0))
    log = ImpressionLog(tmp_path / "log", max_buffered_rows=10**7, clock=clock)
    for n in range(40_000):
        clock.now += timedelta(milliseconds=500)
        query = f"query {n % 40}"
        items = [(image, r + 1, None, None, r + 1) for r, image in enumerate(rankings[query])]
        relevance = list(gamma[query])
        swap = swap_pair(5, 0.3, rng)
        if swap is not None:
            i, chance = swap
            items[i], items[i + 1] = ((items[i + 1][0], i + 1, None, chance, i + 2),
                                      (items[i][0], i + 2, None, chance, i + 1))
            relevance[i], relevance[i + 1] = relevance[i + 1], relevance[i]
        request = log.shown(f"s{n}", query, "1", items)
        for (image, position, *_), rel in zip(items, relevance, strict=True):
            if rng.random() < theta[position - 1] * rel:
                log.clicked(request, image, 20_000)
    log.flush()
    cfg = shop_config(tiny_shop, tmp_path, data={"events": {"path": str(tmp_path / "log")},
                                                 "images": {"path": str(tiny_shop / "images.parquet")},
                                                 "image_root": str(tiny_shop / "images")},
                      extract={"bots": {"enabled": False}, "propensity": {"max_position": 5}})
    (tmp_path / "extract").mkdir()
    summary = extract(cfg, tmp_path / "extract").summary
    estimate = summary["propensity_estimate"]
    assert estimate["used"] == "swaps" and estimate["swapped_impressions"] > 20_000
    used = np.array(summary["propensity"]["examination"])
    assert used.tolist() == estimate["swaps"]["examination"]
    assert np.all(np.abs(used / np.array(theta) - 1) < 0.10), used / np.array(theta)
    assert len(estimate["em"]["examination"]) == 5  # the EM's curve is reported beside it
