from datetime import datetime

import duckdb
import polars as pl
import pytest

from pipeline.config import RunConfig
from pipeline.errors import DataContractError
from pipeline.extract import extract, normalise_query

T0 = datetime(2026, 11, 1, 12, 0, 0)


def _events(rows):
    return pl.DataFrame(rows, orient="row", schema={
        "event_ts": pl.Datetime("us"), "session_id": pl.Utf8, "query": pl.Utf8, "image_id": pl.Utf8,
        "position": pl.Int32, "clicked": pl.Boolean, "dwell_ms": pl.Int32})


def _catalog():
    return pl.DataFrame({"image_id": ["a", "b", "c"], "path": ["a.png", "b.png", "c.png"],
                         "product_id": ["p1", "p1", None], "title": ["A", None, "C"]})


def _config(tmp_path, events: pl.DataFrame, fmt: str = "parquet") -> RunConfig:
    images = tmp_path / "images.parquet"
    _catalog().write_parquet(images)
    if fmt == "parquet":
        events_path = tmp_path / "events.parquet"
        events.write_parquet(events_path)
    else:
        events_path = tmp_path / "events.csv"
        events.write_csv(events_path)
    return RunConfig.model_validate({"data": {
        "events": {"format": fmt, "path": str(events_path)}, "images": {"path": str(images)},
        "image_root": str(tmp_path)}})


GOOD = (T0, "s1", "Navy  Trainers", "a", 1, True, 5000)
BAD_ROWS = {
    "empty_query": [(T0, "s2", None, "a", 1, False, None), (T0, "s2", "   ", "b", 2, False, None)],
    "missing_value": [(None, "s3", "mug", "a", 1, False, None), (T0, None, "mug", "a", 1, False, None)],
    "bad_position": [(T0, "s4", "mug", "a", 0, False, None), (T0, "s4", "mug", "b", None, True, 10)],
    "unknown_image": [(T0, "s5", "mug", "zzz", 1, True, 10)],
    "duplicate": [GOOD],
}


def test_each_bad_row_gets_its_reason_and_counts_add_up(tmp_path):
    rows = [GOOD, (T0, "s1", "navy trainers", "b", 2, False, None)]
    for bad in BAD_ROWS.values():
        rows += bad
    cfg = _config(tmp_path, _events(rows))
    result = extract(cfg, tmp_path)
    quarantine = pl.read_parquet(result.quarantine)
    got = quarantine.group_by("reason").len().sort("reason")
    expected = {reason: len(bad) for reason, bad in BAD_ROWS.items()}
    assert dict(got.iter_rows()) == expected
    summary = result.summary
    assert summary["rows_read"] == len(rows)
    assert summary["rows_kept"] + summary["rows_quarantined"] == summary["rows_read"]
    pairs = pl.read_parquet(result.pairs)
    assert pairs["impressions"].sum() == summary["rows_kept"] == 2
    assert quarantine["source_row"].min() >= 1


def test_pairs_aggregate_normalised_queries(tmp_path):
    rows = [GOOD, (T0, "s9", "NAVY trainers ", "a", 3, True, 100), (T0, "s9", "navy trainers", "c", 1, False, None)]
    result = extract(_config(tmp_path, _events(rows)), tmp_path)
    pairs = pl.read_parquet(result.pairs).sort("image_id")
    assert pairs["query"].to_list() == ["navy trainers", "navy trainers"]
    assert pairs["clicks"].to_list() == [2, 0]
    assert pairs["impressions"].to_list() == [2, 1]
    assert pairs["product_id"].to_list() == ["p1", None]
    assert set(pairs.columns) >= {"query", "image_id", "product_id", "clicks", "impressions", "weight",
                                  "first_seen", "last_seen"}


def test_csv_source(tmp_path):
    result = extract(_config(tmp_path, _events([GOOD]), fmt="csv"), tmp_path)
    assert result.summary["rows_kept"] == 1


def test_duckdb_table_source(tmp_path):
    db = tmp_path / "shop.duckdb"
    events = _events([GOOD, GOOD])
    with duckdb.connect(str(db)) as con:
        con.register("frame", events.to_arrow())
        con.execute("CREATE TABLE clicks AS SELECT * FROM frame")
    _catalog().write_parquet(tmp_path / "images.parquet")
    cfg = RunConfig.model_validate({"data": {
        "events": {"format": "duckdb", "path": str(db), "table": "clicks"},
        "images": {"path": str(tmp_path / "images.parquet")}, "image_root": str(tmp_path)}})
    result = extract(cfg, tmp_path)
    assert result.summary["rows_kept"] == 1
    assert result.summary["quarantined_by_reason"]["duplicate"] == 1


def test_missing_column_names_source_and_column(tmp_path):
    events = _events([GOOD]).drop("clicked")
    with pytest.raises(DataContractError, match=r"events\.parquet.*'clicked'.*missing"):
        extract(_config(tmp_path, events), tmp_path)


def test_mistyped_column_names_expected_and_found_type(tmp_path):
    events = _events([GOOD]).with_columns(pl.col("position").cast(pl.Utf8))
    with pytest.raises(DataContractError, match=r"'position' should be INTEGER but is VARCHAR"):
        extract(_config(tmp_path, events), tmp_path)


def test_missing_source_is_a_clear_error(tmp_path):
    cfg = _config(tmp_path, _events([GOOD]))
    cfg = cfg.model_copy(update={"data": cfg.data.model_copy(update={
        "events": cfg.data.events.model_copy(update={"path": tmp_path / "nope"})})})
    with pytest.raises(DataContractError, match="no such file"):
        extract(cfg, tmp_path)


@pytest.mark.parametrize("raw, expected", [
    ("  Navy   Trainers ", "navy trainers"),
    ("ＮＡＶＹ trainers", "navy trainers"),  # full-width letters fold under NFKC
    ("Straße", "strasse"),
    ("tab\tand\nnewline", "tab and newline"),
])
def test_normalise_query(raw, expected):
    assert normalise_query(raw) == expected


def test_normalise_query_strips_punctuation_when_asked():
    assert normalise_query("t-shirt, red!", strip_punctuation=True) == "t shirt red"
    assert normalise_query("t-shirt, red!") == "t-shirt, red!"


def test_demo_log_counts_add_up(tiny_config, tmp_path):
    result = extract(tiny_config, tmp_path)
    s = result.summary
    assert s["rows_kept"] + s["rows_quarantined"] == s["rows_read"]
    assert s["impressions_in_pairs"] == s["rows_kept"]
    # the generator plants 2 empty queries, 2 bad positions, 1 unknown image and 1 duplicate
    assert s["quarantined_by_reason"] == {"empty_query": 2, "missing_value": 0, "bad_position": 2,
                                          "unknown_image": 1, "duplicate": 1}
