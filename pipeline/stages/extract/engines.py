"""Where extract's SQL runs: embedded DuckDB (default) or Spark through PySpark.

Both run the same SQL files: they are written in DuckDB's dialect and, for Spark, transpiled by
SQLGlot (`spark_sql`), with the one construct it leaves Spark cannot parse (a MATERIALIZED common
table expression) removed. An engine holds named tables and views and answers queries as Arrow:

- `table(name, sql, params)`: the result materialised under `name` (DuckDB: a temp table; Spark:
  an eager local checkpoint as a temp view, so step timings are the work's, not a lazy plan's);
- `view(name, sql)`, `append(name, sql, params)`, `arrow(sql, params)`, `register(name, arrow)`.

What is engine-specific: reading the log (pipeline.stages.extract's DuckDB reader numbers rows per
file; `spark_events` here reads them with `_metadata.file_path` and `_metadata.row_index`). The
checks of the contract are DuckDB's for both, from the files' schemas before either engine reads a
row. Written here because neither engine's client exposes this common surface.
"""

from __future__ import annotations

import os
from functools import cache
from pathlib import Path
from urllib.parse import unquote, urlparse

import duckdb
import pyarrow as pa

from pipeline.config import RunConfig
from pipeline.errors import ConfigError, StageError


class DuckDBEngine:
    name = "duckdb"

    def __init__(self, con: duckdb.DuckDBPyConnection):
        self.con = con

    def table(self, name: str, sql: str, params: dict | None = None) -> None:
        self.con.execute(f"CREATE OR REPLACE TEMP TABLE {name} AS {sql}", params)

    def view(self, name: str, sql: str) -> None:
        self.con.execute(f"CREATE OR REPLACE TEMP VIEW {name} AS {sql}")

    def append(self, name: str, sql: str, params: dict | None = None) -> None:
        self.con.execute(f"INSERT INTO {name} {sql}", params)

    def arrow(self, sql: str, params: dict | None = None) -> pa.Table:
        return self.con.sql(sql, params=params).to_arrow_table()

    def register(self, name: str, table: pa.Table) -> None:
        self.con.register(name, table)


@cache
def spark_sql(sql: str) -> str:
    """DuckDB-dialect SQL as Spark SQL ($name parameters become :name)."""
    import sqlglot
    from sqlglot import exp

    tree = sqlglot.parse_one(sql, read="duckdb")
    for cte in tree.find_all(exp.CTE):  # a planner hint for DuckDB; Spark has no syntax for it
        cte.set("materialized", None)
    return tree.sql(dialect="spark")


class SparkEngine:
    name = "spark"

    def __init__(self, spark):
        self.spark = spark

    def _frame(self, sql: str, params: dict | None):
        return self.spark.sql(spark_sql(sql), args=params or None)

    def table(self, name: str, sql: str, params: dict | None = None) -> None:
        # a local checkpoint cuts the lineage: later queries read these rows, where a cached plan
        # was not matched by the parameterised queries over it and the log was read again each time
        self._frame(sql, params).localCheckpoint(eager=True).createOrReplaceTempView(name)

    def view(self, name: str, sql: str) -> None:
        self._frame(sql, None).createOrReplaceTempView(name)

    def append(self, name: str, sql: str, params: dict | None = None) -> None:
        self.spark.table(name).unionByName(self._frame(sql, params)).localCheckpoint(eager=True) \
            .createOrReplaceTempView(name)

    def arrow(self, sql: str, params: dict | None = None) -> pa.Table:
        return self._frame(sql, params).toArrow()

    def register(self, name: str, table: pa.Table) -> None:
        self.spark.createDataFrame(table).createOrReplaceTempView(name)


def spark_session(cfg: RunConfig):
    """The Spark session extract.spark describes, its SQL time zone the extract's."""
    try:
        import sqlglot  # noqa: F401
        from pyspark.sql import SparkSession
    except ImportError:
        raise ConfigError("extract.engine 'spark' needs PySpark and SQLGlot: pip install 'clickclip[spark]' "
                          "(and Java 17 or later on the machine)") from None
    settings = cfg.extract.spark
    builder = (SparkSession.builder.appName("clickclip-extract").master(settings.master)
               .config("spark.driver.memory", settings.driver_memory)
               .config("spark.sql.session.timeZone", cfg.extract.time_zone)
               .config("spark.sql.ansi.enabled", "false")  # integer sums widen, as in DuckDB
               .config("spark.ui.enabled", "false")
               .config("spark.sql.shuffle.partitions", "8"))
    for key, value in settings.conf.items():
        builder = builder.config(key, value)
    return builder.getOrCreate()


def spark_events(engine: SparkEngine, files: list[Path], columns: list[str]) -> None:
    """events_raw in Spark: the contract columns of these Parquet files (event_ts as wall-clock
    time in the session's zone, as DuckDB reads it), `filename` as the path given (not Spark's URI)
    and `source_row`, the 1-based row within its file, as extract's DuckDB reader numbers them."""
    from pyspark.sql import functions as F

    spark = engine.spark
    names = [str(f) for f in files]
    frame = spark.read.option("mergeSchema", "true").parquet(*names)
    # Spark names each row's file by a URI (file:/a/b%20c); map those back to the paths as given
    given = {os.path.abspath(name): name for name in names}
    uris = [row[0] for row in frame.select("_metadata.file_path").distinct().collect()]
    mapping = [(uri, given.get(os.path.abspath(unquote(urlparse(uri).path)))) for uri in uris]
    if any(name is None for _, name in mapping):
        raise StageError(f"Spark read files extract did not ask for: {[u for u, n in mapping if n is None][:3]}")
    frame = frame.select(*[F.col(c) for c in columns], F.col("_metadata.file_path").alias("uri"),
                         (F.col("_metadata.row_index") + 1).alias("source_row"))
    frame = frame.withColumn("event_ts", F.col("event_ts").cast("timestamp_ntz"))
    files_read = spark.createDataFrame(mapping, "uri STRING, filename STRING")
    frame.join(F.broadcast(files_read), "uri").drop("uri").createOrReplaceTempView("events_raw")


def stop_spark() -> None:
    """Stop the Spark session extract started, if any."""
    import sys

    if "pyspark" in sys.modules:
        from pyspark.sql import SparkSession

        session = SparkSession.getActiveSession()
        if session is not None:
            session.stop()
