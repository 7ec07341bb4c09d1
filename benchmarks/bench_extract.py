"""Extract at scale: a synthetic log of N impressions through the extract stage, vs Polars.

    python benchmarks/bench_extract.py --impressions 100000000

The log is generated once by DuckDB into benchmarks/.cache/extract-<N>/ (hive-partitioned
Parquet, 30 days) and reused. The extraction runs in a child process so its peak RSS is its own.
Last line: one JSON object with the figures.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import duckdb

CACHE = Path(__file__).resolve().parent / ".cache"
IMAGES = 200_000
QUERIES = 50_000

# The log of a search engine: a query's results come from its own ranked list of candidates (with a
# little churn between sessions, so most pairs are seen at two or three positions), relevance
# belongs to the (query, image) pair, and clicks fall off with position as 1 / (1 + 0.35 (p - 1)).
# About 0.1% of sessions are exported twice (exact duplicates), and a few rows have an empty query
# or an image the catalog lacks; a few bot sessions show 200 results in a minute.
GENERATE_SEARCH = """
WITH sessions AS (
    SELECT s, {query_rank} AS q, hash(s, 7) % 3 AS churn
    FROM range(0, $sessions) AS t(s)
),
impressions AS (
    SELECT
        TIMESTAMP '2026-10-01' + to_seconds((s % 30) * 86400 + (hash(s, 1) % 86000)::BIGINT)
            + to_milliseconds(p * 150) AS event_ts,
        'S' || s::VARCHAR AS session_id,
        CASE WHEN hash(s, 10) % 20000 = 0 THEN '' ELSE 'q' || q::VARCHAR END AS query,
        CASE WHEN hash(s, p, 9) % 20000 = 0 THEN 'X' || s::VARCHAR
             ELSE 'I' || (hash(q, p + churn) % $images)::VARCHAR END AS image_id,
        p::INTEGER AS position,
        (hash(s, p, 3) % 1000) < 400 / (1 + 0.35 * (p - 1)) * ((hash(q, p + churn, 4) % 100) / 100.0) AS clicked,
        CASE WHEN hash(s, p, 5) % 3 = 0 THEN (hash(s, p, 6) % 60000)::INTEGER END AS dwell_ms,
        s
    FROM sessions, range(1, 11) AS u(p)
),
bots AS (
    SELECT
        TIMESTAMP '2026-10-01' + to_seconds((b % 30) * 86400 + 3600) + to_milliseconds(i * 250) AS event_ts,
        'B' || b::VARCHAR AS session_id,
        'q' || (i % 50)::VARCHAR AS query,
        'I' || (hash(b, i) % $images)::VARCHAR AS image_id,
        (i % 10 + 1)::INTEGER AS position,
        false AS clicked,
        NULL::INTEGER AS dwell_ms
    FROM range(0, $bots) AS t(b), range(0, 200) AS u(i)
)
SELECT * EXCLUDE (s) FROM impressions
UNION ALL SELECT * EXCLUDE (s) FROM impressions WHERE hash(s, 8) % 1000 = 0
UNION ALL SELECT * FROM bots
"""

# search: 50,000 queries, a session's query drawn as floor(50,000 u^3) (about 50,000 distinct)
SEARCH_RANK = "floor($queries * pow((hash(s, 2) % 1000003) / 1000003.0, 3))::BIGINT"
# longtail: ranks from a bounded power law with exponent 0.9 over 200M possible queries (Zipf-like:
# at 100M impressions about 5.3M distinct queries, the most frequent in 1.2% of sessions, most once)
LONGTAIL_RANK = ("floor(pow(1 + (hash(s, 2) / 18446744073709551616.0) * (pow($queries, 0.1) - 1), 10))::BIGINT")
SHAPES = {"search": (SEARCH_RANK, QUERIES, IMAGES), "longtail": (LONGTAIL_RANK, 200_000_000, 2_000_000)}

# The first generator of this benchmark: every impression shows a uniformly random image, so nearly
# every impression is a (query, image) pair of its own (9.8M pairs from 10M impressions). No search
# log looks like that; kept with --shape uniform to compare with the first measurements.
GENERATE_UNIFORM = """
SELECT
    TIMESTAMP '2026-10-01' + to_seconds((s % 30) * 86400 + (hash(s, 1) % 86000)::BIGINT)
        + to_milliseconds(p * 150) AS event_ts,
    'S' || s::VARCHAR AS session_id,
    'q' || floor($queries * pow((hash(s, 2) % 1000003) / 1000003.0, 3))::BIGINT::VARCHAR AS query,
    'I' || (hash(s, p) % $images)::VARCHAR AS image_id,
    p::INTEGER AS position,
    (hash(s, p, 3) % 1000) < 400 / (1 + 0.35 * (p - 1)) * ((hash(s, p, 4) % 100) / 100.0) AS clicked,
    CASE WHEN hash(s, p, 5) % 3 = 0 THEN (hash(s, p, 6) % 60000)::INTEGER END AS dwell_ms
FROM range(0, $sessions) AS t(s), range(1, 11) AS u(p)
"""


def generate(impressions: int, shape: str = "search", cache: Path = CACHE) -> Path:
    out = cache / (f"extract-{impressions}" if shape == "uniform" else f"extract-{shape}-{impressions}")
    if (out / "done").is_file():
        print(f"reusing cached log in {out}")
        return out
    out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    con = duckdb.connect()
    con.execute("SET preserve_insertion_order = false")
    images = IMAGES
    if shape == "uniform":
        log = con.sql(GENERATE_UNIFORM, params={"sessions": impressions // 10, "queries": QUERIES, "images": IMAGES})
    else:
        rank, queries, images = SHAPES[shape]
        bots = impressions // 100_000
        sessions = (impressions - 200 * bots) * 1000 // 10010  # the duplicated 0.1% included
        log = con.sql(GENERATE_SEARCH.format(query_rank=rank), params={"sessions": sessions, "queries": queries,
                                                                        "images": images, "bots": bots})
    log.select("*, CAST(event_ts AS DATE) AS date").write_parquet(str(out / "events"), partition_by=["date"],
                                                                  overwrite=True)
    con.sql("SELECT 'I' || i::VARCHAR AS image_id, 'I' || i::VARCHAR || '.png' AS path, "
            "'P' || (i // 2)::VARCHAR AS product_id, NULL::VARCHAR AS title FROM range(0, $n) t(i)",
            params={"n": images}).write_parquet(str(out / "images.parquet"))
    (out / "done").write_text("ok")
    print(f"generated {impressions:,} impressions ({shape}) in {time.perf_counter() - started:.1f} s into {out}")
    return out


CHILD = """
import json, sys, time
from pathlib import Path
from pipeline.config import RunConfig
from pipeline.stages.extract import extract
data, out = Path(sys.argv[1]), Path(sys.argv[2])
extra = json.loads(sys.argv[5])
cfg = RunConfig.model_validate({"data": {"events": {"path": str(data / "events")},
    "images": {"path": str(data / "images.parquet")}, "image_root": str(data)},
    "state_dir": str(out / "state"),
    "extract": {"duckdb": {"memory_limit": sys.argv[3], "threads": int(sys.argv[4]),
                            "temp_directory": str(out / "spill")}, **extra}})
started = time.perf_counter()
result = extract(cfg, out, run_id=extra.get("window", {}).get("until", "full"))
seconds = time.perf_counter() - started
# this process's own peak: VmHWM restarts at exec, while getrusage's maxrss would carry over
# whatever the parent held when it forked
status = Path("/proc/self/status").read_text()
peak_kb = int(next(line.split()[1] for line in status.splitlines() if line.startswith("VmHWM")))
print(json.dumps({"seconds": seconds, "peak_mb": peak_kb / 1024, "summary": result.summary}))
"""


def run_extract(data: Path, memory_limit: str, threads: int, extra: dict | None = None) -> tuple[float, float, dict]:
    """One extract in a child process: its wall seconds, its own peak RSS (MB) and its summary."""
    out = data / "out"
    out.mkdir(exist_ok=True)
    proc = subprocess.run([sys.executable, "-c", CHILD, str(data), str(out), memory_limit, str(threads),
                           json.dumps(extra or {})], capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(proc.stderr[-3000:])
    # DuckDB's progress bar (queries over 2 s) shares stdout, without a newline before the JSON
    result = json.loads(proc.stdout[proc.stdout.rindex('{"seconds"'):])
    return result["seconds"], result["peak_mb"], result["summary"]


def run_incremental(data: Path, memory_limit: str, threads: int) -> dict:
    """Incremental mode as a nightly job sees it: a first run over days 1-29 (statistics per day,
    a watermark), then the next night's run, which reads only day 30 and merges."""
    shutil.rmtree(data / "out" / "state", ignore_errors=True)
    first = run_extract(data, memory_limit, threads, {"incremental": True, "window": {"until": "2026-10-29"}})
    nightly = run_extract(data, memory_limit, threads, {"incremental": True, "window": {"until": "2026-10-30"}})
    files_read = nightly[2]["window"]["files_read"]
    print(f"incremental: first run (29 days) {first[0]:.1f} s, peak {first[1]:,.0f} MB; nightly run "
          f"({files_read} new partition file(s)) {nightly[0]:.1f} s, peak {nightly[1]:,.0f} MB")
    for name, run in (("first", first), ("nightly", nightly)):
        print(f"incremental {name} run steps (s): " + ", ".join(f"{k} {v}" for k, v in run[2]["timings_s"].items()))
    return {"incremental_first_seconds": round(first[0], 2), "incremental_first_peak_rss_mb": round(first[1]),
            "incremental_nightly_seconds": round(nightly[0], 2), "incremental_nightly_peak_rss_mb": round(nightly[1])}


def run_polars(data: Path) -> float:
    """The same core work in Polars' lazy engine: validate, drop bad rows, aggregate pairs."""
    import polars as pl

    started = time.perf_counter()
    images = pl.scan_parquet(data / "images.parquet").select("image_id", "product_id")
    events = pl.scan_parquet(data / "events" / "**" / "*.parquet", hive_partitioning=True)
    kept = (events.filter(pl.col("query").str.strip_chars().str.len_chars() > 0)
            .filter(pl.col("position") >= 1)
            .unique(subset=["event_ts", "session_id", "query", "image_id", "position", "clicked", "dwell_ms"])
            .join(images, on="image_id", how="inner")
            .with_columns(pl.col("query").str.to_lowercase().str.strip_chars()))
    pairs = kept.group_by("query", "image_id").agg(
        pl.col("product_id").first(), pl.col("clicked").sum().alias("clicks"), pl.len().alias("impressions"),
        pl.col("event_ts").min().alias("first_seen"), pl.col("event_ts").max().alias("last_seen"))
    pairs.sort("query", "image_id").sink_parquet(data / "polars_pairs.parquet")
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--impressions", type=int, default=1_000_000)
    parser.add_argument("--memory-limit", default="4GB")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--skip-polars", action="store_true")
    parser.add_argument("--cache", type=Path, default=CACHE, help="where generated logs are kept")
    parser.add_argument("--incremental", action="store_true",
                        help="also time incremental mode: a first run over 29 days, then a nightly run of one")
    parser.add_argument("--engine", choices=("duckdb", "spark"), default="duckdb",
                        help="extract.engine: spark runs the same SQL through local PySpark (master local[threads])")
    parser.add_argument("--shape", choices=("search", "longtail", "uniform"), default="search",
                        help="search: results come from each query's own ranked list, 50,000 queries, 200,000 "
                             "images (default); longtail: the same over a Zipf-like 200M-query space (millions "
                             "distinct) and 2M images; uniform: the first generator, a random image per impression")
    args = parser.parse_args()
    data = generate(args.impressions, args.shape, args.cache)
    counts = duckdb.sql(f"SELECT count(DISTINCT query) FROM read_parquet('{data}/events/**/*.parquet')").fetchall()[0]
    distinct_queries = int(counts[0])
    catalog_images = int(duckdb.sql(f"SELECT count(*) FROM read_parquet('{data}/images.parquet')").fetchall()[0][0])
    print(f"settings: shape {args.shape}, {args.impressions:,} impressions, {distinct_queries:,} distinct raw queries, "
          f"{catalog_images:,} catalog images, engine {args.engine}, {args.threads} threads, "
          f"memory limit {args.memory_limit}")
    engine = {} if args.engine == "duckdb" else {"engine": "spark", "spark": {"master": f"local[{args.threads}]"}}
    seconds, peak_mb, summary = run_extract(data, args.memory_limit, args.threads, engine)
    print(f"extract: {args.impressions:,} impressions in {seconds:.1f} s "
          f"({args.impressions / seconds:,.0f}/s), peak RSS {peak_mb:,.0f} MB, "
          f"kept {summary['rows_kept']:,}, quarantined {summary['rows_quarantined']:,}, pairs {summary['pairs']:,}")
    print("extract steps (s): " + ", ".join(f"{k} {v}" for k, v in summary.get("timings_s", {}).items()))
    # before Polars, which runs in this process and would leave it large when the children fork
    incremental = run_incremental(data, args.memory_limit, args.threads) if args.incremental else {}
    polars_seconds = None if args.skip_polars else run_polars(data)
    if polars_seconds is not None:
        print(f"polars lazy equivalent: {polars_seconds:.1f} s (ratio ours/polars {seconds / polars_seconds:.2f})")
    print(json.dumps({
        "shape": args.shape, "engine": args.engine, "distinct_queries": distinct_queries,
        "catalog_images": catalog_images,
        "threads": args.threads, "memory_limit": args.memory_limit,
        "impressions": args.impressions, "seconds": round(seconds, 2), "rows_read": summary["rows_read"],
        "rows_kept": summary["rows_kept"],
        "rows_quarantined": summary["rows_quarantined"], "pairs": summary["pairs"],
        "impressions_per_s": round(args.impressions / seconds), "peak_rss_mb": round(peak_mb),
        # with Spark the extract's Python process drives a JVM whose memory this does not count
        "peak_rss_scope": "extract process" if args.engine == "duckdb" else "extract's Python process, not Spark's JVM",
        "polars_seconds": round(polars_seconds, 2) if polars_seconds else None,
        "ratio_vs_polars": round(seconds / polars_seconds, 3) if polars_seconds else None,
        **incremental,
    }))


if __name__ == "__main__":
    main()
