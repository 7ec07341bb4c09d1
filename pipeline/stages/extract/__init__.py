"""Extract: click logs -> debiased (query, image) pairs, with every unusable row quarantined.

Outputs in `runs/<id>/extract/`: `pairs.parquet` (query, image_id, product_id, clicks,
impressions, weight, first_seen, last_seen), `quarantine.parquet` (the input row, its source file
and 1-based row, and a reason code), `propensity.json` and `propensity.png` (the examination
curve estimated by EM). kept + quarantined + outside the window = read, always. Rows of a source
read whole (CSV, a DuckDB table, one Parquet file) that fall outside the window are counted
apart: not bad data, not in the quarantine file, not in the quarantine rate.
"""

from __future__ import annotations

import json
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import date, datetime, time, timedelta
from importlib import resources
from pathlib import Path
from time import perf_counter

import duckdb
import numpy as np
import pyarrow as pa

from pipeline.config import ExtractConfig, RunConfig, SourceConfig
from pipeline.data.contract import EVENTS, IMAGES, connect, open_source
from pipeline.data.partitions import source_files, window_files
from pipeline.data.propensity import Propensities, examination_propensities, swap_propensities
from pipeline.data.queries import normalise_queries, too_long_for_text_encoder
from pipeline.errors import DataContractError, StageError
from pipeline.stages import StageInputs, StageOutput
from pipeline.stages.extract import incremental
from pipeline.stages.extract.engines import DuckDBEngine, SparkEngine, spark_events, spark_session, stop_spark

REASONS = ("empty_query", "missing_value", "bad_position", "unknown_image", "duplicate", "query_too_long", "bot")
# serve's log (pipeline/serving/impressions.py): click rows are joined onto their impressions
SERVE_LOG_COLUMNS = {"request_id", "event"}
OUTSIDE = "outside_window"  # the classifier's mark for rows outside the window: counted, not quarantined


@dataclass(frozen=True)
class ExtractResult:
    pairs: Path
    quarantine: Path
    propensity: Path
    summary: dict


def _sql(name: str) -> str:
    return resources.files(__package__).joinpath("sql", name).read_text()


def _open_events(con: duckdb.DuckDBPyConnection, source: SourceConfig, files: list[Path] | None) -> None:
    """events_raw: the contract columns plus the source file and the 1-based row within it.

    An empty `files` list (an incremental run with nothing new) gives the same columns and no rows."""
    nothing = files is not None and not files
    open_source(con, source, "events_source", EVENTS, source_files(source)[:1] if nothing else files)
    columns = {name for name, *_ in con.execute('DESCRIBE "events_source"').fetchall()}
    # every timestamp precision (pandas writes nanoseconds) and zone becomes one TIMESTAMP, with zoned
    # times in the connection's configured zone
    timestamps = "SELECT * REPLACE (CAST(event_ts AS TIMESTAMP) AS event_ts) FROM events_source"
    if "file_row_number" in columns:  # Parquet: the reader numbers each file's rows
        numbered = f"SELECT *, file_row_number + 1 AS source_row FROM ({timestamps})"
    else:  # CSV and tables: rows arrive file by file in order, so each file's first row is row 1
        numbered = ("SELECT * EXCLUDE (scan_row), scan_row - min(scan_row) OVER (PARTITION BY filename) + 1 "
                    f"AS source_row FROM (SELECT *, row_number() OVER () AS scan_row FROM ({timestamps}))")
    if SERVE_LOG_COLUMNS <= columns:  # serve's impression log: each click row joins its impression
        con.execute(f"CREATE OR REPLACE TEMP VIEW events_numbered AS {numbered}")
        numbered = _sql("extract_join_clicks.sql")
    con.execute(f"CREATE OR REPLACE TEMP VIEW events_raw AS SELECT * FROM ({numbered})"
                + (" WHERE false" if nothing else ""))


def click_rows_joined(con: duckdb.DuckDBPyConnection) -> int:
    """Rows of serve's log that were clicks joined onto their impressions (0 for any other log):
    the rows in the files are the rows read plus these."""
    if not con.execute("SELECT count(*) FROM duckdb_views() WHERE view_name = 'events_numbered'").fetchone()[0]:
        return 0
    return int(con.execute("SELECT (SELECT count(*) FROM events_numbered) - (SELECT count(*) FROM events_raw)")
               .fetchone()[0])


def last_days_from_events(con: duckdb.DuckDBPyConnection, days: int, until: date | None,
                           source: SourceConfig) -> tuple[date, date]:
    """(since, until) of a `last_days` window counted back from `until`, or from the newest event_ts."""
    if until is None:
        with _unconvertible_values(source):
            newest = con.execute("SELECT max(event_ts)::DATE FROM events_raw").fetchall()[0][0]
        if newest is None:
            raise DataContractError(f"events source {source.path}: extract.window.last_days is set but no event "
                                    "has an event_ts to count back from")
        until = newest
    return until - timedelta(days=days - 1), until


def _register_query_norms(engine, cfg: RunConfig) -> tuple[int, pa.Table]:
    """query_norms(raw_query, query, too_long) in the engine; returns the text context the queries
    were checked against, and the table."""
    from pipeline.training.model import text_encoder_limits  # open_clip and torch load slowly: only here

    count_tokens, context, _ = text_encoder_limits(cfg.train)
    # each distinct query once, outside the engine (neither has NFKC): in Arrow, Python only for non-ASCII
    raw = engine.arrow("SELECT DISTINCT query FROM events_raw WHERE query IS NOT NULL")["query"]
    raw = (raw.combine_chunks() if raw.num_chunks else pa.array([], pa.string())).cast(pa.string())
    normalised = normalise_queries(raw, cfg.extract.strip_punctuation)
    too_long = too_long_for_text_encoder(normalised, count_tokens, context)
    norms = pa.table({"raw_query": raw, "query": normalised, "too_long": pa.array(too_long, pa.bool_())})
    engine.register("query_norms", norms)
    return context, norms


def _bounds(since: date | None, until: date | None) -> dict:
    """Timestamp bounds for SQL, as text (cast in SQL: no driver's own time zone applies); until is
    inclusive as a date, so the bound is the next midnight."""
    low = datetime.combine(since, time.min) if since else datetime.min
    high = datetime.combine(until + timedelta(days=1), time.min) if until else datetime.max
    return {"since": low.isoformat(sep=" "), "until": high.isoformat(sep=" ")}


@contextmanager
def _unconvertible_values(source: SourceConfig):
    """A value DuckDB cannot convert while reading the log is bad input: name the source."""
    try:
        yield
    except duckdb.ConversionException as exc:
        raise DataContractError(f"events source {source.path}: {str(exc).splitlines()[0]}") from None


def _classify(engine, ecfg: ExtractConfig, since, until, source: SourceConfig, timings: _Timings) -> None:
    """session_flags (bots, sessions that repeat a row: a small table), then the view `classified`."""
    bots = ecfg.bots
    with _unconvertible_values(source), timings.step("sessions"):
        engine.table("session_flags", _sql("extract_sessions.sql"), {
            "enabled": bots.enabled, "max_per_session": bots.max_impressions_per_session,
            "max_per_minute": bots.max_impressions_per_minute, "min_for_ctr": bots.min_impressions_for_ctr,
            "max_ctr": bots.max_click_through_rate})
    engine.table("classify_params", "SELECT $since::TIMESTAMP AS since, $until::TIMESTAMP AS until, "
                 "$quarantine_long AS quarantine_long",
                 {**_bounds(since, until), "quarantine_long": ecfg.long_queries == "quarantine"})
    engine.view("classified", _sql("extract_classify.sql"))


def _scan(engine, ecfg: ExtractConfig, by_day: bool, source: SourceConfig, timings: _Timings) -> None:
    """Two passes over the log: `stats` (usable rows summed, extract_scan.sql) and `flagged` (the
    other rows whole, each with its final reason, extract_flagged.sql). The first copies of
    duplicated rows come back usable from the second pass and are appended to `stats`, whose
    consumers all sum by key (a key may so appear twice: regrouping tens of millions of
    statistics rows to merge a few would cost more than the sums downstream)."""
    scan = _sql("extract_scan.sql")
    params = {"satisfied_dwell_ms": ecfg.satisfied_dwell_ms, "by_day": by_day}
    with _unconvertible_values(source), timings.step("scan"):
        engine.table("stats", scan, params)
    with _unconvertible_values(source), timings.step("resolve_duplicates"):
        engine.table("flagged", _sql("extract_flagged.sql"))
        # first copies of duplicated rows are usable: summed like the rest of the scan
        engine.append("stats", scan.replace("FROM classified", "FROM flagged"), params)


def estimate_propensities(engine, ecfg: ExtractConfig) -> Propensities:
    """The examination curve from `per_position` (extract_per_position.sql) by EM."""
    settings = ecfg.propensity
    table = engine.arrow(_sql("extract_position_counts.sql"), {"min_pair_impressions": settings.min_pair_impressions})
    counts = {name: table[name].to_numpy(zero_copy_only=False) for name in table.column_names}
    counts["pair"] = np.cumsum(counts["starts_pair"]) - 1
    if len(counts["pair"]) == 0:
        flat = np.ones(settings.max_position)  # nothing to learn from: no position is discounted
        return Propensities(np.arange(1, settings.max_position + 1), flat, 0, 0.0)
    return examination_propensities(counts["pair"], counts["position"], counts["clicks"], counts["impressions"],
                                    settings.max_position, settings.iterations)


def propensity_estimate(engine, con: duckdb.DuckDBPyConnection, em: Propensities, ecfg: ExtractConfig, since,
                        until) -> dict:
    """Which examination curve weights the pairs: from serve's randomised swaps (a `ranked_position`
    column, intervention harvesting) when the usable rows read hold at least
    extract.propensity.min_swapped_impressions swapped impressions, else the EM's. Both are reported.
    With incremental extract the swaps are those of the partitions read this run (the kept
    statistics do not hold ranked positions)."""
    settings = ecfg.propensity
    columns = {name for name, *_ in con.execute('DESCRIBE "events_raw"').fetchall()}
    if "ranked_position" not in columns:
        return {"used": "em", "why": "no ranked_position column: the log holds no randomised swaps",
                "used_propensities": em}
    if engine.name != "duckdb":
        return {"used": "em", "why": "the swap estimate runs with extract.engine duckdb only", "used_propensities": em}
    counts = con.execute("""
        SELECT e.ranked_position, e.position, sum(e.clicked::INTEGER)::DOUBLE, count(*)::DOUBLE
        FROM events_raw AS e
        ANTI JOIN (SELECT source_file, source_row FROM flagged WHERE reason IS NOT NULL) AS q
            ON q.source_file = e.filename AND q.source_row = e.source_row
        WHERE e.ranked_position BETWEEN 1 AND $max AND e.position BETWEEN 1 AND $max
            AND e.event_ts >= $since::TIMESTAMP AND e.event_ts < $until::TIMESTAMP
        GROUP BY ALL""", {"max": settings.max_position, **_bounds(since, until)}).fetchnumpy()
    ranked, shown, clicks, impressions = (np.asarray(v, dtype=np.float64) for v in counts.values())
    swapped = int(impressions[ranked != shown].sum())
    swaps = swap_propensities(ranked.astype(int), shown.astype(int), clicks, impressions, settings.max_position) \
        if swapped >= settings.min_swapped_impressions else None
    report = {"swapped_impressions": swapped, "em": em.as_dict()}
    if swaps is None:
        why = (f"{swapped} swapped impressions, fewer than extract.propensity.min_swapped_impressions "
               f"{settings.min_swapped_impressions}" if swapped < settings.min_swapped_impressions else
               "a pair of adjacent positions has no swapped clicks")
        return {"used": "em", "why": why, **report, "used_propensities": em}
    return {"used": "swaps", "why": f"{swapped} swapped impressions: examination from randomised swaps, "
                                    "unconfounded by the ranker's order", **report,
            "swaps": swaps.propensities.as_dict(), "used_propensities": swaps.propensities}


def effective_weighting(configured: str, learned: bool) -> dict:
    """The pair weighting that really applied: with nothing to learn position bias from (no pair was
    shown at two positions), propensities are flat and `ips` weights are raw clicks; say so."""
    if configured == "raw" or learned:
        return {"configured": configured, "effective": configured, "warning": None}
    effective = "raw" if configured == "ips" else "raw satisfied clicks"
    return {"configured": configured, "effective": effective,
            "warning": f"extract.weighting is {configured!r}, but no (query, image) pair was shown at two positions, "
                       f"so position bias cannot be estimated: propensities are flat and the weights are {effective} "
                       f"(not debiased). Log more positions per pair or set extract.weighting: raw to silence this."}


def plot_propensities(propensities: Propensities, path: Path, method: str = "PBM, EM") -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 3.2), dpi=110)
    ax.plot(propensities.positions, propensities.examination, marker="o")
    ax.set(xlabel="position", ylabel="examination probability (θ / θ₁)", ylim=(0, 1.05),
           title=f"Position bias estimated from the log ({method})")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def extract(cfg: RunConfig, out_dir: Path, run_id: str | None = None) -> ExtractResult:
    """Read the events and catalog sources, classify every impression, write pairs and quarantine.

    With `extract.incremental`, only partitions the watermark lacks are read, and their statistics
    are merged with those kept from earlier runs (see pipeline.stages.extract.incremental).
    Running out of memory and spill space is a clear StageError, not a crash."""
    settings = cfg.extract.duckdb
    try:
        return _extract(cfg, out_dir, run_id)
    except duckdb.OutOfMemoryException as exc:
        raise StageError(
            f"extract ran out of memory: DuckDB's memory_limit is {settings.memory_limit} and spilling to "
            f"{settings.temp_directory or 'its default temp directory'} failed "
            f"(max_temp_directory_size {settings.max_temp_directory_size or 'unset'}). Raise "
            f"extract.duckdb.memory_limit, free disk space, or shorten the window. DuckDB said: "
            f"{str(exc).splitlines()[0]}") from None
    except duckdb.InvalidInputException as exc:
        if "utf8" not in str(exc).lower().replace("-", ""):
            raise
        # DuckDB's message names the file and the value
        raise DataContractError(f"events source {cfg.data.events.path}: {str(exc).splitlines()[0]} Re-export it with "
                                "text columns in UTF-8") from None
    except duckdb.IOException as exc:
        if "space" not in str(exc).lower():
            raise
        raise StageError(f"extract could not write: the disk under {settings.temp_directory or out_dir} is full "
                         f"({str(exc).splitlines()[0]})") from None
    finally:
        if cfg.extract.engine == "spark":
            stop_spark()  # the stages after extract need the machine's memory, not an idle JVM's


class _Timings(dict):
    """Seconds per step of the stage, for the manifest: where a slow extract spends its time."""

    @contextmanager
    def step(self, name: str):
        started = perf_counter()
        try:
            yield
        finally:
            self[name] = round(perf_counter() - started, 2)


def _kept(con: duckdb.DuckDBPyConnection) -> tuple[int, int]:
    """Impressions summed into this run's statistics, and those of queries too long for the text encoder."""
    return con.execute(
        "SELECT coalesce(sum(impressions), 0)::BIGINT, coalesce(sum(impressions) FILTER (WHERE query IN "
        "(SELECT query FROM query_norms WHERE too_long)), 0)::BIGINT FROM stats").fetchall()[0]


def _spark_engine(cfg: RunConfig, con: duckdb.DuckDBPyConnection, files: list[Path] | None) -> SparkEngine:
    """A Spark engine holding events_raw (read by Spark from the window's Parquet files, already
    checked against the contract by DuckDB) and catalog_ids (from DuckDB's)."""
    source = cfg.data.events
    if SERVE_LOG_COLUMNS <= {name for name, *_ in con.execute('DESCRIBE "events_source"').fetchall()}:
        raise StageError(f"events source {source.path} is serve's impression log (columns request_id and event), "
                         "whose click rows extract joins onto their impressions with the DuckDB engine only; "
                         "set extract.engine: duckdb")
    engine = SparkEngine(spark_session(cfg))
    if files is None:
        files = sorted(source.path.rglob("*.parquet")) if source.path.is_dir() else [source.path]
    if files:
        spark_events(engine, files, [column.name for column in EVENTS])
    else:  # an empty window: no file for Spark to read, and no rows
        engine.register("events_raw", con.sql("SELECT * FROM events_raw").to_arrow_table())
    engine.register("catalog_ids", con.sql("SELECT * FROM catalog_ids").to_arrow_table())
    return engine


def _extract(cfg: RunConfig, out_dir: Path, run_id: str | None) -> ExtractResult:
    ecfg = cfg.extract
    con = connect(ecfg.duckdb, ecfg.time_zone)
    timings = _Timings()
    files, since, until = window_files(cfg.data.events, ecfg.window)
    plan = incremental.plan(cfg, files, since, until, run_id or out_dir.parent.name) if ecfg.incremental else None
    _open_events(con, cfg.data.events, plan.read_files if plan else files)
    if ecfg.window.last_days and since is None:
        # no date partitions to count back from (CSV, a DuckDB table, unpartitioned Parquet): the
        # window's last day is the log's newest event
        since, until = last_days_from_events(con, ecfg.window.last_days, ecfg.window.until, cfg.data.events)
    open_source(con, cfg.data.images, "catalog_raw", IMAGES)
    con.execute("CREATE TEMP TABLE catalog_ids AS SELECT image_id, any_value(product_id) AS product_id "
                "FROM catalog_raw WHERE image_id IS NOT NULL GROUP BY image_id")
    engine = DuckDBEngine(con) if ecfg.engine == "duckdb" else _spark_engine(cfg, con, files)
    with timings.step("normalise_queries"):
        context, norms = _register_query_norms(engine, cfg)
    _classify(engine, ecfg, since, until, cfg.data.events, timings)
    _scan(engine, ecfg, plan is not None, cfg.data.events, timings)
    if engine.name != "duckdb":  # what is written and counted comes back, to be done as for DuckDB
        with timings.step("collect"):
            for name in ("session_flags", "stats", "flagged"):
                con.register(name, engine.arrow(f"SELECT * FROM {name}"))
            con.register("query_norms", norms)
    kept, long_kept = _kept(con)
    dropped = 0
    if plan and plan.previous_stats and plan.reused_days:
        con.execute("INSERT INTO stats SELECT * FROM read_parquet(?) WHERE list_contains(?, day)",
                    [str(plan.previous_stats), plan.reused_days])
        # kept statistics of images the catalog has dropped since are counted, then left out of the
        # propensities and pairs alike, as a full extract quarantines their rows (unknown_image)
        dropped = con.execute("SELECT count(*) FROM (SELECT DISTINCT query, image_id FROM stats "
                              "ANTI JOIN catalog_ids USING (image_id))").fetchone()[0]
        con.execute("DELETE FROM stats WHERE image_id NOT IN (SELECT image_id FROM catalog_ids)")

    with timings.step("per_position"):
        engine.table("per_position", _sql("extract_per_position.sql"), {"max_position": ecfg.propensity.max_position})
    with timings.step("propensity_em"):
        propensities = estimate_propensities(engine, ecfg)
    with timings.step("propensity_swaps"):
        estimate = propensity_estimate(engine, con, propensities, ecfg, since, until)
        propensities = estimate.pop("used_propensities")
    engine.register("propensity", pa.table({"position": propensities.positions.tolist(),
                                            "examination": propensities.examination.tolist()}))
    with timings.step("pairs"):
        engine.table("pairs", _sql("extract_pairs.sql"), {"weighting": ecfg.weighting, "clip": ecfg.propensity.clip})
        if engine.name != "duckdb":
            con.register("pairs", engine.arrow("SELECT * FROM pairs"))
    pairs_path, quarantine_path = out_dir / "pairs.parquet", out_dir / "quarantine.parquet"
    with timings.step("write_pairs"):
        con.table("pairs").write_parquet(str(pairs_path))
    with timings.step("quarantine"):
        con.sql("SELECT * EXCLUDE (query_norm, query_too_long, bot_session) FROM flagged WHERE reason IS NOT NULL "
                "AND reason <> $outside ORDER BY source_file, source_row", params={"outside": OUTSIDE}
                ).write_parquet(str(quarantine_path))
    propensity_path = out_dir / "propensity.json"
    propensity_path.write_text(json.dumps(propensities.as_dict(), indent=2))
    plot_propensities(propensities, out_dir / "propensity.png",
                      "randomised swaps" if estimate["used"] == "swaps" else "PBM, EM")
    with timings.step("summary"):
        summary = _summary(con, plan.read_files if plan else files, since, until, quarantine_path, kept, long_kept,
                           dropped)
    summary["propensity"] = propensities.as_dict()
    summary["propensity_estimate"] = estimate
    summary["text_context"] = context
    summary["weighting"] = effective_weighting(ecfg.weighting,
                                               learned=propensities.iterations > 0 or estimate["used"] == "swaps")
    summary["warnings"] = [summary["weighting"]["warning"]] if summary["weighting"]["warning"] else []
    summary["timings_s"] = timings
    if plan:
        stats_path = out_dir / "stats.parquet"
        con.sql("SELECT * FROM stats ORDER BY day, query, image_id, position").write_parquet(str(stats_path))
        days = [d for (d,) in con.execute("SELECT DISTINCT day FROM stats ORDER BY day").fetchall()]
        incremental.commit(plan, stats_path, sorted({*days, *plan.read_days}))
        summary["incremental"] = plan.summary()
    return ExtractResult(pairs_path, quarantine_path, propensity_path, summary)


# pipeline.data.queries.frequency_bands in SQL: the queries covering the first 50% of impressions
# are head, the next 30% torso, the rest tail (most frequent first, ties by query). A long-tail log
# has millions of queries, too many to band one by one in Python (tests/test_extract.py checks the two agree).
QUERY_BANDS = """
WITH per_query AS (SELECT query, sum(impressions) AS n FROM pairs GROUP BY query),
ranked AS (
    SELECT n, coalesce(sum(n) OVER (ORDER BY n DESC, query ROWS BETWEEN UNBOUNDED PRECEDING AND 1 PRECEDING), 0)
              AS before, greatest(sum(n) OVER (), 1) AS total
    FROM per_query
)
SELECT CASE WHEN before < 0.5 * total THEN 'head' WHEN before < 0.8 * total THEN 'torso' ELSE 'tail' END AS band,
       count(*) AS queries, sum(n)::BIGINT AS impressions
FROM ranked
GROUP BY band
"""


def query_frequency_bands(con: duckdb.DuckDBPyConnection) -> dict:
    """Queries and impressions per frequency band of the `pairs` table."""
    bands = {name: {"queries": 0, "impressions": 0} for name in ("head", "torso", "tail")}
    for band, queries, impressions in con.execute(QUERY_BANDS).fetchall():
        bands[band] = {"queries": int(queries), "impressions": int(impressions)}
    return bands


def _summary(con: duckdb.DuckDBPyConnection, files, since, until, quarantine: Path, kept: int,
             long_kept: int, dropped: int) -> dict:
    """Counts from the outputs themselves: kept rows from the statistics of this run's rows,
    quarantined rows from the quarantine file; with the rows read they must add up."""
    read = con.execute("SELECT count(*) FROM events_raw").fetchone()[0]
    outside = con.execute("SELECT count(*) FROM flagged WHERE reason = ?", [OUTSIDE]).fetchone()[0]
    by_reason = dict.fromkeys(REASONS, 0)
    by_reason.update(dict(con.execute(
        "SELECT reason, count(*) FROM read_parquet(?) GROUP BY reason", [str(quarantine)]).fetchall()))
    quarantined = sum(by_reason.values())
    if kept + quarantined + outside != read:
        raise StageError(f"extract lost rows: read {read:,}, kept {kept:,} + quarantined {quarantined:,} + outside "
                         f"the window {outside:,}")
    pairs, queries, images, clicks, impressions = con.execute(
        "SELECT count(*), count(DISTINCT query), count(DISTINCT image_id), sum(clicks), sum(impressions) "
        "FROM pairs").fetchone()
    bots = con.execute("SELECT count(*) FROM session_flags WHERE bot").fetchone()[0]
    return {
        # the quarantine rate's denominator is the rows in the window (read − outside it)
        "rows_read": read, "rows_outside_window": int(outside), "rows_in_window": read - int(outside),
        "rows_kept": kept, "rows_quarantined": quarantined, "click_rows_joined": click_rows_joined(con),
        "quarantined_by_reason": by_reason, "pairs": pairs, "queries": queries, "images": images,
        "clicks": int(clicks or 0), "impressions_in_pairs": int(impressions or 0),
        "bot_sessions": int(bots), "long_queries_truncated": int(long_kept),
        "pairs_dropped_image_left_catalog": int(dropped),
        "window": {"since": str(since) if since else None, "until": str(until) if until else None,
                   "files_read": len(files) if files is not None else "all"},
        "query_bands": query_frequency_bands(con),
    }


def run(cfg: RunConfig, inputs: StageInputs, out_dir: Path) -> StageOutput:
    result = extract(cfg, out_dir, inputs.run_id)
    outputs = {"pairs": result.pairs, "quarantine": result.quarantine, "propensity": result.propensity}
    if cfg.extract.incremental:
        outputs["stats"] = result.pairs.with_name("stats.parquet")
    return StageOutput(outputs, result.summary)
