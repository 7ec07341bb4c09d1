"""Serve's impression log: what each response showed, and the clicks reported on it, as rows of the
events contract (docs/DATA.md) in `date=YYYY-MM-DD/` Parquet files that extract reads as they are.

Every row has the seven contract columns and these optional ones: `request_id` (one per response;
it starts with the response's UTC date, so a click lands in its impression's partition), `event`
('impression' or 'click'), `served_version` (`<champion>|<challenger>` for an interleaved
response), `team` (the interleaving team that supplied the item, NULL outside an interleaved
response), `ranked_position` (where the ranker put the item) and `swap_propensity` (the probability
that this response swapped the item's adjacent pair, on the two swapped items; NULL on the others):
extract estimates examination by position from the swapped impressions. A click row repeats its
impression's columns with `clicked` true and the dwell;
extract joins it onto its impression by (request_id, image_id).

Rows wait in memory (at most `max_buffered_rows`; beyond that they are counted as dropped) and a
background thread writes them every `flush_seconds` as a new file, written under a temporary name,
synced and renamed: a kill loses at most the rows of the last interval and never leaves a partial
file where extract looks. A write that fails (a full disk) drops that batch, counts it, says so
once in the log and on `metrics()`, and serving goes on; logging resumes when a write succeeds.
"""

from __future__ import annotations

import logging
import os
import threading
import uuid
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, date, datetime
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

log = logging.getLogger("clickclip.serve")
MAX_DWELL_MS = 2**31 - 1  # the column is a 32-bit integer

SCHEMA = pa.schema([
    ("event_ts", pa.timestamp("ms")), ("session_id", pa.string()), ("query", pa.string()),
    ("image_id", pa.string()), ("position", pa.int32()), ("clicked", pa.bool_()), ("dwell_ms", pa.int32()),
    ("request_id", pa.string()), ("event", pa.string()), ("served_version", pa.string()),
    ("team", pa.string()), ("ranked_position", pa.int32()), ("swap_propensity", pa.float64()),
])


def new_request_id(now: datetime) -> str:
    """`YYYYMMDD-<32 hex>`: the response's UTC date, then a random id."""
    return f"{now:%Y%m%d}-{uuid.uuid4().hex}"


def request_date(request_id: str) -> date:
    return datetime.strptime(request_id[:8], "%Y%m%d").date()


@dataclass
class Shown:
    """One response as the log keeps it for its clicks: the query, session and version, and per
    image its position, team, swap propensity and ranked position."""

    ts: datetime
    session_id: str
    query: str
    version: str
    items: dict[str, tuple[int, str | None, float | None, int]] = field(default_factory=dict)


class UnknownRequest(KeyError):
    """A click on a request id this process did not answer, or no longer remembers."""


class ImpressionLog:
    def __init__(self, folder: Path, flush_seconds: float = 1.0, max_buffered_rows: int = 200_000,
                 recent_requests: int = 100_000, clock: Callable[[], datetime] | None = None):
        self.folder = folder
        self.flush_seconds = flush_seconds
        self.max_buffered_rows = max_buffered_rows
        self.recent_requests = recent_requests
        self.clock = clock or (lambda: datetime.now(UTC).replace(tzinfo=None))
        self._rows: list[dict] = []
        self._recent: OrderedDict[str, Shown] = OrderedDict()
        self._lock = threading.Lock()
        self._write_lock = threading.Lock()
        self._stop = threading.Event()
        self._sequence = 0
        self.counters = {"rows_logged": 0, "rows_written": 0, "files_written": 0, "rows_dropped": 0,
                         "write_failures": 0, "clicks_logged": 0, "clicks_unknown_request": 0}
        self.stopped: str | None = None  # why logging stopped, while it is stopped
        self._thread: threading.Thread | None = None

    def start(self) -> ImpressionLog:
        self.folder.mkdir(parents=True, exist_ok=True)
        self._thread = threading.Thread(target=self._run, name="impression-log", daemon=True)
        self._thread.start()
        return self

    def _run(self) -> None:
        while not self._stop.wait(self.flush_seconds):
            self.flush()  # never raises: a failed write is counted and said

    def close(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        self.flush()

    def _count(self, key: str, n: int = 1) -> None:
        with self._lock:
            self.counters[key] += n

    def _append(self, rows: list[dict]) -> None:
        with self._lock:
            room = self.max_buffered_rows - len(self._rows)
            if room < len(rows):
                self.counters["rows_dropped"] += len(rows) - max(room, 0)
                rows = rows[:max(room, 0)]
            self._rows.extend(rows)
            self.counters["rows_logged"] += len(rows)

    def shown(self, session_id: str, query: str, version: str,
              items: list[tuple], request_id: str | None = None) -> str:
        """Log one response (per item: image id, position, team, swap propensity, and the ranked
        position when a swap moved it: the position otherwise); its request id
        (`request_id` when given: made by `new_request_id` before the response was drawn)."""
        now = self.clock()
        request_id = request_id or new_request_id(now)
        record = Shown(now, session_id, query, version,
                       {image: (pos, team, p, ranked[0] if ranked else pos) for image, pos, team, p, *ranked in items})
        with self._lock:
            self._recent[request_id] = record
            while len(self._recent) > self.recent_requests:
                self._recent.popitem(last=False)
        self._append([_row(now, record, image, request_id, "impression", False, None) for image, *_ in items])
        return request_id

    def clicked(self, request_id: str, image_id: str, dwell_ms: int | None) -> None:
        """Log a click on an image a logged response showed; UnknownRequest when this process did not
        show it (restarted since, or older than the last `recent_requests` responses)."""
        with self._lock:
            record = self._recent.get(request_id)
        if record is None or image_id not in record.items:
            self._count("clicks_unknown_request")
            raise UnknownRequest(request_id if record is None else f"{request_id} did not show {image_id}")
        if dwell_ms is not None and not 0 <= dwell_ms <= MAX_DWELL_MS:
            raise ValueError(f"dwell_ms must be a whole number of milliseconds from 0 to {MAX_DWELL_MS}")
        self._append([_row(self.clock(), record, image_id, request_id, "click", True, dwell_ms)])
        self._count("clicks_logged")

    def flush(self) -> None:
        """Write the waiting rows, one file per date partition; a failed write drops its rows."""
        with self._write_lock:
            with self._lock:
                rows, self._rows = self._rows, []
            if not rows:
                return
            by_day: dict[date, list[dict]] = {}
            for row in rows:
                by_day.setdefault(request_date(row["request_id"]), []).append(row)
            for day, day_rows in sorted(by_day.items()):
                try:
                    self._write(day, day_rows)
                except Exception as exc:  # noqa: BLE001 - a full disk or anything else: say, count, serve on
                    reason = (exc.strerror if isinstance(exc, OSError) else None) or f"{type(exc).__name__}: {exc}"
                    if self.stopped is None:
                        log.error("impression logging stopped: cannot write to %s (%s); search keeps answering "
                                  "and the dropped rows are counted on /metrics", self.folder, reason)
                    self.stopped = f"{reason} writing to {self.folder}"  # before the counts: whoever sees them sees it
                    self._count("rows_dropped", len(day_rows))
                    self._count("write_failures")
                    continue
                if self.stopped is not None:
                    log.warning("impression logging resumed: writing to %s again", self.folder)
                    self.stopped = None
                self._count("files_written")
                self._count("rows_written", len(day_rows))

    def _write(self, day: date, rows: list[dict]) -> None:
        partition = self.folder / f"date={day.isoformat()}"
        partition.mkdir(parents=True, exist_ok=True)
        self._sequence += 1
        name = f"part-{self.clock():%H%M%S%f}-{os.getpid()}-{self._sequence:08d}.parquet"
        temporary = partition / f".{name}.tmp"  # not *.parquet: extract never reads a file being written
        try:
            pq.write_table(pa.Table.from_pylist(rows, schema=SCHEMA), temporary)
            with open(temporary, "rb") as handle:
                os.fsync(handle.fileno())
            os.replace(temporary, partition / name)
        except BaseException:
            temporary.unlink(missing_ok=True)
            raise

    def metrics(self) -> dict:
        with self._lock:
            buffered = len(self._rows)
        return {**self.counters, "buffered_rows": buffered, "logging": "stopped" if self.stopped else "on",
                "stopped_because": self.stopped, "folder": str(self.folder)}


def _row(ts: datetime, record: Shown, image_id: str, request_id: str, event: str, clicked: bool,
         dwell_ms: int | None) -> dict:
    position, team, propensity, ranked = record.items[image_id]
    return {"event_ts": ts, "session_id": record.session_id, "query": record.query, "image_id": image_id,
            "position": position, "clicked": clicked, "dwell_ms": dwell_ms, "request_id": request_id,
            "event": event, "served_version": record.version, "team": team, "ranked_position": ranked,
            "swap_propensity": propensity}


def interleaved_searches(folder: Path, champion: str, challenger: str) -> list[list[str]]:
    """Per interleaved search of this champion and challenger in the log: the teams of the images
    clicked (each image once, however often it was clicked), [] for a search without a click."""
    import duckdb

    files = sorted(str(p) for p in folder.rglob("*.parquet"))
    if not files:
        return []
    con = duckdb.connect()
    rows = con.execute("""
        WITH log AS (SELECT request_id, image_id, event, team, served_version
                     FROM read_parquet(?, hive_partitioning = false, union_by_name = true)
                     WHERE served_version = ? AND team IS NOT NULL),
        searches AS (SELECT DISTINCT request_id FROM log WHERE event = 'impression'),
        clicks AS (SELECT DISTINCT request_id, image_id, team FROM log WHERE event = 'click')
        SELECT s.request_id, coalesce(list(c.team ORDER BY c.image_id) FILTER (WHERE c.team IS NOT NULL), [])
        FROM searches s LEFT JOIN clicks c USING (request_id) GROUP BY s.request_id ORDER BY s.request_id
    """, [files, f"{champion}|{challenger}"]).fetchall()
    return [list(teams) for _, teams in rows]
