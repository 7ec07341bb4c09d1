"""Extract: click logs -> weighted (query, image) pairs, with every unusable row quarantined.

Outputs in `runs/<id>/extract/`: `pairs.parquet` (query, image_id, product_id, clicks,
impressions, weight, first_seen, last_seen) and `quarantine.parquet` (the input row, its source
file and 1-based row, and a reason code). kept + quarantined = read, always.
"""

from __future__ import annotations

import re
import unicodedata
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import duckdb
import pyarrow as pa

from pipeline.config import DuckDBConfig, RunConfig, SourceConfig
from pipeline.contract import EVENTS, IMAGES, open_source
from pipeline.errors import DataContractError

REASONS = ("empty_query", "missing_value", "bad_position", "unknown_image", "duplicate")
PUNCTUATION = re.compile(r"[^\w\s]", re.UNICODE)
WHITESPACE = re.compile(r"\s+")


@dataclass(frozen=True)
class ExtractResult:
    pairs: Path
    quarantine: Path
    summary: dict


def normalise_query(text: str, strip_punctuation: bool = False) -> str:
    """NFKC, case folding, optional punctuation stripping, whitespace collapse."""
    text = unicodedata.normalize("NFKC", text).casefold()
    if strip_punctuation:
        text = PUNCTUATION.sub(" ", text)
    return WHITESPACE.sub(" ", text).strip()


def _sql(name: str) -> str:
    return resources.files("pipeline").joinpath("sql", name).read_text()


def connect(settings: DuckDBConfig) -> duckdb.DuckDBPyConnection:
    con = duckdb.connect()
    con.execute("SET memory_limit = ?", [settings.memory_limit])
    if settings.threads:
        con.execute("SET threads = ?", [settings.threads])
    if settings.temp_directory:
        settings.temp_directory.mkdir(parents=True, exist_ok=True)
        con.execute("SET temp_directory = ?", [str(settings.temp_directory)])
    return con


def _open_events(con: duckdb.DuckDBPyConnection, source: SourceConfig) -> None:
    """events_raw: the contract columns plus the source file and the 1-based row within it."""
    open_source(con, source, "events_source", EVENTS)
    columns = {name for name, *_ in con.execute('DESCRIBE "events_source"').fetchall()}
    row = "file_row_number + 1" if "file_row_number" in columns else "row_number() OVER ()"
    con.execute(f"CREATE OR REPLACE TEMP VIEW events_raw AS SELECT *, {row} AS source_row FROM events_source")


def _register_query_norms(con: duckdb.DuckDBPyConnection, strip_punctuation: bool) -> None:
    # normalise each distinct query once in Python: DuckDB has no NFKC, and distinct queries are few
    raw = [r[0] for r in con.execute("SELECT DISTINCT query FROM events_raw WHERE query IS NOT NULL").fetchall()]
    table = pa.table({"raw_query": raw, "query": [normalise_query(q, strip_punctuation) for q in raw]})
    con.register("query_norms", table)


def extract(cfg: RunConfig, out_dir: Path) -> ExtractResult:
    """Read the events and catalog sources, classify every impression, write pairs and quarantine."""
    con = connect(cfg.extract.duckdb)
    _open_events(con, cfg.data.events)
    open_source(con, cfg.data.images, "catalog_raw", IMAGES)
    con.execute("CREATE TEMP TABLE catalog_ids AS SELECT image_id, any_value(product_id) AS product_id "
                "FROM catalog_raw WHERE image_id IS NOT NULL GROUP BY image_id")
    _register_query_norms(con, cfg.extract.strip_punctuation)
    try:
        con.execute("CREATE TEMP TABLE classified AS " + _sql("extract_classify.sql"))
    except duckdb.ConversionException as exc:
        raise DataContractError(f"events source {cfg.data.events.path}: {str(exc).splitlines()[0]}") from None

    pairs_path, quarantine_path = out_dir / "pairs.parquet", out_dir / "quarantine.parquet"
    con.sql(_sql("extract_pairs.sql")).write_parquet(str(pairs_path))
    con.sql("SELECT * EXCLUDE (query_norm) FROM classified WHERE reason IS NOT NULL "
            "ORDER BY source_file, source_row").write_parquet(str(quarantine_path))
    return ExtractResult(pairs_path, quarantine_path, _summary(con))


def _summary(con: duckdb.DuckDBPyConnection) -> dict:
    read, kept = con.execute(
        "SELECT count(*), count(*) FILTER (WHERE reason IS NULL) FROM classified").fetchone()
    by_reason = dict.fromkeys(REASONS, 0)
    by_reason.update(dict(con.execute(
        "SELECT reason, count(*) FROM classified WHERE reason IS NOT NULL GROUP BY reason").fetchall()))
    pairs, queries, images, clicks, impressions = con.execute(
        "SELECT count(*), count(DISTINCT query), count(DISTINCT image_id), sum(clicks), sum(impressions) "
        "FROM (" + _sql("extract_pairs.sql") + ")").fetchone()
    return {
        "rows_read": read, "rows_kept": kept, "rows_quarantined": read - kept,
        "quarantined_by_reason": by_reason, "pairs": pairs, "queries": queries, "images": images,
        "clicks": int(clicks or 0), "impressions_in_pairs": int(impressions or 0),
    }
