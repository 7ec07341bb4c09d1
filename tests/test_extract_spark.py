"""extract.engine: spark (local PySpark, the same SQL transpiled by SQLGlot) against the embedded
DuckDB default: the same pairs (weights to float tolerance), the same quarantined rows with the
same reasons, the same counts, on the tiny demo shop and on every case of the fault corpus."""

import math
import re

import polars as pl
import pytest

from pipeline.errors import ClickclipError
from pipeline.stages.extract import extract
from tests.conftest import shop_config
from tests.fault_corpus import CASES, base_shop, write

pytest.importorskip("pyspark")
pytestmark = pytest.mark.e2e

SUMMARY_KEYS = ("rows_read", "rows_kept", "rows_quarantined", "quarantined_by_reason", "pairs", "queries", "images",
                "clicks", "impressions_in_pairs", "bot_sessions", "long_queries_truncated", "query_bands", "window",
                "text_context", "weighting")


def _same_outputs(duck, spark) -> None:
    for key in SUMMARY_KEYS:
        assert spark.summary[key] == duck.summary[key], key
    assert spark.summary["propensity"]["examination"] == pytest.approx(duck.summary["propensity"]["examination"],
                                                                       rel=1e-9, abs=1e-12)
    pairs, expected = pl.read_parquet(spark.pairs), pl.read_parquet(duck.pairs)
    assert pairs.columns == expected.columns
    assert pairs.drop("weight").equals(expected.drop("weight"))  # row for row, in order
    assert all(math.isclose(a, b, rel_tol=1e-9, abs_tol=1e-12) for a, b in zip(pairs["weight"], expected["weight"],
                                                                                 strict=True))
    quarantine, expected = pl.read_parquet(spark.quarantine), pl.read_parquet(duck.quarantine)
    assert quarantine.columns == expected.columns
    assert quarantine.to_dicts() == expected.to_dicts()


def test_spark_extract_equals_duckdb_on_the_demo_shop(tiny_shop, tmp_path):
    results = {}
    for engine in ("duckdb", "spark"):
        out = tmp_path / engine
        out.mkdir()
        results[engine] = extract(shop_config(tiny_shop, tmp_path, extract={"engine": engine}), out)
    assert results["spark"].summary["rows_quarantined"] > 0  # the demo plants bots, duplicates and bad rows
    assert set(results["spark"].summary["timings_s"]) >= {"scan", "pairs", "collect"}
    _same_outputs(results["duckdb"], results["spark"])


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_spark_extract_equals_duckdb_on_the_fault_corpus(case, tmp_path):
    shop = base_shop(tmp_path)
    case.mutate(shop)
    write(shop)
    outcomes = {}
    for engine in ("duckdb", "spark"):
        out = tmp_path / f"out-{engine}"
        out.mkdir()
        try:
            outcomes[engine] = extract(shop.config(engine=engine, **case.extract_settings), out)
        except ClickclipError as exc:
            outcomes[engine] = exc
    duck, spark = outcomes["duckdb"], outcomes["spark"]
    if isinstance(duck, Exception):
        assert type(spark) is type(duck) and str(spark) == str(duck)
        assert case.outcome == "error" and re.search(case.expect, str(duck))
    else:
        assert not isinstance(spark, Exception), spark
        _same_outputs(duck, spark)


def test_spark_engine_refuses_what_it_cannot_read(tiny_shop, tmp_path):
    with pytest.raises(ValueError, match="extract.engine 'spark' reads Parquet events"):
        shop_config(tiny_shop, tmp_path, data={"events": {"path": "x.csv", "format": "csv"}},
                    extract={"engine": "spark"})
    with pytest.raises(ValueError, match="incremental works with extract.engine 'duckdb' only"):
        shop_config(tiny_shop, tmp_path, extract={"engine": "spark", "incremental": True})
