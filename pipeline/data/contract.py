"""The input data contract (events and images) and the DuckDB views that read it.

Shops export these two tables to us; their schemas are a public interface. Extra columns
are allowed and ignored unless a stage knows them (e.g. an optional `category` in images).
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from pathlib import Path

import duckdb

from pipeline.config import DuckDBConfig, SourceConfig
from pipeline.errors import DataContractError

INTEGER_TYPES = {"TINYINT", "SMALLINT", "INTEGER", "BIGINT", "UTINYINT", "USMALLINT", "UINTEGER",
                 "UBIGINT", "HUGEINT"}
TIMESTAMP_TYPES = {"TIMESTAMP", "TIMESTAMP_S", "TIMESTAMP_MS", "TIMESTAMP_NS",
                   "TIMESTAMP WITH TIME ZONE", "DATE"}


@dataclass(frozen=True)
class Column:
    name: str
    type: str  # the contract's type, as documented
    nullable: bool
    accepts: frozenset[str]  # DuckDB types that satisfy it


def _column(name: str, type_: str, accepts: set[str], nullable: bool = False) -> Column:
    return Column(name, type_, nullable, frozenset(accepts))


EVENTS = (
    _column("event_ts", "TIMESTAMP", TIMESTAMP_TYPES),
    _column("session_id", "VARCHAR", {"VARCHAR"}),
    _column("query", "VARCHAR", {"VARCHAR"}),
    _column("image_id", "VARCHAR", {"VARCHAR"}),
    _column("position", "INTEGER", INTEGER_TYPES),
    _column("clicked", "BOOLEAN", {"BOOLEAN"}),
    _column("dwell_ms", "INTEGER", INTEGER_TYPES | {"NULL"}, nullable=True),
)
IMAGES = (
    _column("image_id", "VARCHAR", {"VARCHAR"}),
    _column("path", "VARCHAR", {"VARCHAR"}),
    _column("product_id", "VARCHAR", {"VARCHAR", "NULL"}, nullable=True),
    _column("title", "VARCHAR", {"VARCHAR", "NULL"}, nullable=True),
)


def connect(settings: DuckDBConfig, time_zone: str = "UTC") -> duckdb.DuckDBPyConnection:
    """An in-memory DuckDB connection with the configured memory, threads and spill folder; times
    with a zone are read in `time_zone`, never in the machine's own."""
    con = duckdb.connect()
    con.execute("SET TimeZone = ?", [time_zone])
    con.execute("SET memory_limit = ?", [settings.memory_limit])
    if settings.threads:
        con.execute("SET threads = ?", [settings.threads])
    if settings.temp_directory:
        settings.temp_directory.mkdir(parents=True, exist_ok=True)
        con.execute("SET temp_directory = ?", [str(settings.temp_directory)])
    if settings.max_temp_directory_size:
        con.execute("SET max_temp_directory_size = ?", [settings.max_temp_directory_size])
    return con


def _relation(con: duckdb.DuckDBPyConnection, source: SourceConfig,
              files: list[Path] | None) -> duckdb.DuckDBPyRelation:
    """A relation over the source; paths go in as values, never spliced into SQL text."""
    if source.format == "parquet":
        path = source.path
        pattern = str(path / "**" / "*.parquet") if path.is_dir() else str(path)
        target = [str(f) for f in files] if files is not None else pattern
        return con.read_parquet(target, hive_partitioning=True, filename=True, file_row_number=True,
                                union_by_name=True)
    if source.format == "csv":
        pattern = str(source.path / "*.csv") if source.path.is_dir() else str(source.path)
        return con.read_csv(pattern, header=True, filename=True, union_by_name=True)
    # table names cannot be bound; config validation restricted them to plain identifiers, and the
    # alias is derived from the file, so events and images may live in two database files
    alias = "source_" + hashlib.sha256(str(source.path.resolve()).encode()).hexdigest()[:12]
    con.execute(f"ATTACH IF NOT EXISTS ? AS {alias} (READ_ONLY)", [str(source.path)])
    table = con.table(f'{alias}."{source.table}"')
    return table.select(duckdb.StarExpression(), duckdb.ConstantExpression(str(source.path)).alias("filename"))


def _describe(con: duckdb.DuckDBPyConnection, view: str) -> dict[str, str]:
    return {name: type_ for name, type_, *_ in con.execute(f'DESCRIBE "{view}"').fetchall()}


def check_columns(found: dict[str, str], contract: tuple[Column, ...], source: str) -> None:
    """Raise naming the source, column, expected and found type for the first mismatch."""
    for column in contract:
        if column.name not in found:
            raise DataContractError(
                f"{source}: column '{column.name}' ({column.type}) is missing; "
                f"found columns {sorted(found)}")
        found_type = found[column.name]
        # a whole-number DECIMAL (scale 0) is an integer as exported by some warehouses; nothing else is
        integral_decimal = re.fullmatch(r"DECIMAL\(\d+,\s*0\)", found_type) is not None
        if found_type not in column.accepts and not (integral_decimal and column.accepts & INTEGER_TYPES):
            raise DataContractError(
                f"{source}: column '{column.name}' should be {column.type} but is {found_type}")


def open_source(con: duckdb.DuckDBPyConnection, source: SourceConfig, view: str,
                contract: tuple[Column, ...], files: list[Path] | None = None) -> None:
    """Create a DuckDB view `view` over the source after checking it against the contract.

    `files` restricts a Parquet source to those files (the partitions of a window)."""
    label = f"{source.format} source {source.path}"
    if source.format != "duckdb" and not source.path.exists() and "*" not in str(source.path):
        raise DataContractError(f"{label}: no such file or folder")
    if source.format == "duckdb":
        if not source.path.is_file():
            raise DataContractError(f"{label}: no such DuckDB database file")
        label = f"{label} table {source.table}"
    try:
        _relation(con, source, files).create_view(view, replace=True)
    except duckdb.Error as exc:
        raise DataContractError(f"{label}: cannot be read ({str(exc).splitlines()[0]})") from None
    check_columns(_describe(con, view), contract, label)
    if source.format == "parquet":
        check_every_file(con, source, files, contract)


def check_every_file(con: duckdb.DuckDBPyConnection, source: SourceConfig, files: list[Path] | None,
                     contract: tuple[Column, ...]) -> None:
    """Each Parquet file has every contract column: reading files by name fills a column one file
    lacks with NULLs, which would quarantine its rows for the wrong reason instead of naming it."""
    path = source.path
    target = [str(f) for f in files] if files is not None else (
        str(path / "**" / "*.parquet") if path.is_dir() else str(path))
    if files is not None and not files:
        return
    try:
        rows = con.execute("SELECT file_name, name FROM parquet_schema(?)", [target]).fetchall()
    except duckdb.Error as exc:
        raise DataContractError(f"parquet source {path}: cannot be read ({str(exc).splitlines()[0]})") from None
    columns: dict[str, set[str]] = {}
    for file_name, name in rows:
        columns.setdefault(file_name, set()).add(name)
    for file_name in sorted(columns):
        missing = [c.name for c in contract if c.name not in columns[file_name]]
        if missing:
            raise DataContractError(f"parquet file {file_name}: column '{missing[0]}' is missing (the other files of "
                                    f"{path} have it); add it to that file or remove the file")
