from datetime import datetime, timedelta
from pathlib import Path

import duckdb
import numpy as np
import polars as pl
import pytest

from pipeline.config import RunConfig
from pipeline.data.queries import normalise_query
from pipeline.errors import DataContractError
from pipeline.retrieval.gates import GateInputs
from pipeline.stages.extract import extract

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


def test_duplicates_are_confirmed_on_all_seven_columns(tmp_path):
    """Sessions where two rows share (event_ts, position) are only candidates: a different row at
    the same time and position is kept; every later copy of a row is a duplicate; a first copy
    still gets its own next reason."""
    long_query = " ".join(["word"] * 80)
    same_slot = (T0, "s1", "mug", "b", 1, False, None)  # GOOD's time and position, another row
    long_row = (T0, "s7", long_query, "a", 2, False, None)
    rows = [GOOD, same_slot, GOOD, GOOD, long_row, long_row]
    cfg = _config(tmp_path, _events(rows))
    cfg = cfg.model_copy(update={"extract": cfg.extract.model_copy(update={"long_queries": "quarantine"})})
    result = extract(cfg, tmp_path)
    quarantine = pl.read_parquet(result.quarantine).sort("source_row")
    assert quarantine.select("source_row", "reason").rows() == [
        (3, "duplicate"), (4, "duplicate"), (5, "query_too_long"), (6, "duplicate")]
    assert result.summary["rows_kept"] == 2
    assert pl.read_parquet(result.pairs).sort("image_id")["image_id"].to_list() == ["a", "b"]


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


def test_csv_rows_are_numbered_within_each_file(tmp_path):
    folder = tmp_path / "events"
    folder.mkdir()
    bad = (T0, "s9", "mug", "zzz", 1, True, 900)  # unknown image
    _events([GOOD, bad, (T0, "s2", "hat", "a", 1, True, 900)]).write_csv(folder / "a.csv")
    _events([(T0, f"s{i}", "cap", "b", 1, True, 900) for i in range(4)] + [bad]).write_csv(folder / "b.csv")
    cfg = _config(tmp_path, _events([GOOD]), fmt="csv")
    cfg = cfg.model_copy(update={"data": cfg.data.model_copy(update={
        "events": cfg.data.events.model_copy(update={"path": folder})})})
    result = extract(cfg, tmp_path)
    quarantine = pl.read_parquet(result.quarantine)
    rows = [(Path(f).name, r) for f, r in zip(quarantine["source_file"], quarantine["source_row"], strict=True)]
    assert rows == [("a.csv", 2), ("b.csv", 5)]  # 1-based data rows, per file, in file order


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


@pytest.mark.parametrize(("column", "dtype", "accepted"), [
    ("position", pl.Decimal(10, 0), True),  # a whole-number DECIMAL is an integer
    ("dwell_ms", pl.Decimal(12, 0), True),
    ("position", pl.Decimal(10, 2), False),  # fractional positions are not positions
    ("query", pl.Decimal(10, 0), False),  # a text column is never a number
    ("session_id", pl.Decimal(18, 0), False),
])
def test_decimal_columns_only_stand_for_integers(tmp_path, column, dtype, accepted):
    events = _events([GOOD]).with_columns(pl.col(column).cast(pl.Int64).cast(dtype) if column != "query"
                                          and column != "session_id" else pl.lit(7).cast(dtype).alias(column))
    if accepted:
        assert extract(_config(tmp_path, events), tmp_path).summary["rows_kept"] == 1
    else:
        with pytest.raises(DataContractError, match=rf"'{column}' should be .* but is DECIMAL"):
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


@pytest.mark.parametrize("strip_punctuation", [False, True])
def test_vectorised_normalisation_equals_the_python_one_on_random_queries(strip_punctuation):
    """Property: normalise_queries (Arrow, for millions of distinct queries) == normalise_query."""
    import pyarrow as pa

    from pipeline.data.queries import normalise_queries

    alphabet = list("abcXYZ019 -_!?.,'\t\n") + ["\x00", "\x1f", "\x7f", "\x85", "\xa0", "ß", "ﬁ", "Ｎ", "É", "ǅ",
                                                "\u2003", "\ufeff", "İ", "ς", "😀", "\u0301"]
    rng = np.random.default_rng(0)
    queries = ["".join(rng.choice(alphabet, int(rng.integers(0, 12)))) for _ in range(5000)]
    queries += ["plain ascii query"] * 3 + [None]
    got = normalise_queries(pa.array(queries, pa.string()), strip_punctuation).to_pylist()
    assert got == [None if q is None else normalise_query(q, strip_punctuation) for q in queries]
    ascii_only = ["  Navy  RAIN shell!! ", "t-shirt,red"]
    assert normalise_queries(pa.array(ascii_only), strip_punctuation).to_pylist() == [
        normalise_query(q, strip_punctuation) for q in ascii_only]


def test_demo_log_counts_add_up(tiny_config, tmp_path):
    result = extract(tiny_config, tmp_path)
    s = result.summary
    assert s["rows_kept"] + s["rows_quarantined"] == s["rows_read"] and s["rows_outside_window"] == 0
    assert s["impressions_in_pairs"] == s["rows_kept"]
    # the generator plants 2 empty queries, 2 bad positions, 1 unknown image, 1 duplicate,
    # one 90-word query (kept and counted under the default "truncate" policy) and a 200-row bot
    assert s["quarantined_by_reason"] == {"empty_query": 2, "missing_value": 0, "bad_position": 2,
                                          "unknown_image": 1, "duplicate": 1,
                                          "query_too_long": 0, "bot": 200}
    assert s["long_queries_truncated"] == 1
    assert s["bot_sessions"] == 1
    assert sum(band["impressions"] for band in s["query_bands"].values()) == s["rows_kept"]


def _partitioned(tmp_path, rows) -> RunConfig:
    events = _events(rows).with_columns(pl.col("event_ts").dt.date().alias("date"))
    events.write_parquet(tmp_path / "events", partition_by="date")
    _catalog().write_parquet(tmp_path / "images.parquet")
    return RunConfig.model_validate({"data": {
        "events": {"path": str(tmp_path / "events")}, "images": {"path": str(tmp_path / "images.parquet")},
        "image_root": str(tmp_path)}})


def _with_extract(cfg: RunConfig, **values) -> RunConfig:
    return RunConfig.model_validate({**cfg.model_dump(), "extract": {**cfg.extract.model_dump(), **values}})


def test_window_reads_only_its_partitions(tmp_path):
    day = [(datetime(2026, 11, d, 10), f"s{d}", "mug", "a", 1, True, None) for d in (1, 2, 3, 4)]
    cfg = _with_extract(_partitioned(tmp_path, day), window={"since": "2026-11-02", "until": "2026-11-03"})
    result = extract(cfg, tmp_path)
    assert result.summary["rows_read"] == 2  # the 1st and 4th are never read
    assert result.summary["window"]["files_read"] == 2
    last = extract(_with_extract(cfg, window={"last_days": 3}), tmp_path)
    assert last.summary["rows_read"] == 3
    assert last.summary["window"] == {"since": "2026-11-02", "until": "2026-11-04", "files_read": 3}


def test_rows_outside_the_window_in_a_read_file_are_counted_apart_not_quarantined(tmp_path):
    """70 days of CSV with last_days 28: the 42 older days are neither kept nor quarantined (before,
    they were quarantined `outside_window`, a quarantine rate of 0.60 that no run could promote
    past); a bad row outside the window is outside it, not bad data of this window."""
    start = datetime(2026, 9, 1, 10)
    rows = [(start + timedelta(days=d), f"s{d}", "mug", "a", 1, True, 900) for d in range(70)]
    rows.append((start + timedelta(days=3), "s-bad", None, "a", 1, True, 900))  # an empty query, long ago
    cfg = _with_extract(_config(tmp_path, _events(rows), fmt="csv"), window={"last_days": 28})
    s = extract(cfg, tmp_path).summary
    assert (s["rows_read"], s["rows_outside_window"], s["rows_in_window"], s["rows_kept"], s["rows_quarantined"]) == (
        71, 43, 28, 28, 0)
    assert "outside_window" not in s["quarantined_by_reason"]
    assert pl.read_parquet(tmp_path / "quarantine.parquet").height == 0
    gate = GateInputs.from_summaries(s, {"passed": True}, {"finished_without_nan": True})
    assert gate.quarantine_rate == 0.0
    bad = extract(_with_extract(cfg, window={"last_days": 70}), tmp_path).summary
    assert (bad["rows_outside_window"], bad["rows_quarantined"], bad["quarantined_by_reason"]["empty_query"]) == (
        0, 1, 1)


@pytest.mark.parametrize("fmt", ["parquet", "csv"])  # a single unpartitioned file: no date= folder to count from
def test_last_days_counts_back_from_the_newest_event_without_date_partitions(tmp_path, fmt):
    days = [datetime(2026, 11, d, 9) for d in (1, 2, 3)]
    rows = [(ts, f"s{i}", "mug", "a", 1, True, 900) for i, ts in enumerate(days)]
    cfg = _with_extract(_config(tmp_path, _events(rows), fmt=fmt), window={"last_days": 2})
    result = extract(cfg, tmp_path)
    assert result.summary["rows_outside_window"] == 1 and result.summary["rows_quarantined"] == 0  # 1 November
    assert result.summary["rows_kept"] == 2
    assert (result.summary["window"]["since"], result.summary["window"]["until"]) == ("2026-11-02", "2026-11-03")


def test_flat_propensities_are_a_warning_and_the_applied_weighting_is_recorded(tmp_path):
    # every pair is shown at one position only: nothing to learn position bias from
    rows = [(T0, "s1", "mug", "a", 1, True, 900), (T0, "s2", "mug", "b", 3, True, 900),
            (T0, "s3", "hat", "c", 2, False, 900)]
    result = extract(_config(tmp_path, _events(rows)), tmp_path)  # weighting defaults to ips
    weighting = result.summary["weighting"]
    assert weighting["configured"] == "ips" and weighting["effective"] == "raw"
    assert len(result.summary["warnings"]) == 1 and "cannot be estimated" in result.summary["warnings"][0]
    pairs = pl.read_parquet(result.pairs)
    assert pairs["weight"].to_list() == pairs["clicks"].cast(pl.Float64).to_list()


def test_bot_thresholds(tmp_path):
    burst = [(T0.replace(second=i % 60), "bot", "mug", "a", 1 + i % 10, True, None) for i in range(30)]
    clicky = [(T0.replace(minute=i), "clicky", "mug", "b", 1, True, None) for i in range(25)]
    human = [(T0.replace(minute=i), "human", "mug", "c", 1, i % 5 == 0, None) for i in range(25)]
    cfg = _with_extract(_config(tmp_path, _events(burst + clicky + human)), bots={
        "max_impressions_per_minute": 20, "max_impressions_per_session": 1000,
        "max_click_through_rate": 0.8, "min_impressions_for_ctr": 20})
    result = extract(cfg, tmp_path)
    quarantine = pl.read_parquet(result.quarantine)
    assert set(quarantine.filter(pl.col("reason") == "bot")["session_id"]) == {"bot", "clicky"}
    assert result.summary["bot_sessions"] == 2 and result.summary["rows_kept"] == 25
    off = extract(_with_extract(cfg, bots={"enabled": False}), tmp_path)
    assert off.summary["rows_kept"] == 80


def test_long_query_policy(tmp_path):
    long_query = " ".join(["word"] * 100)
    rows = [GOOD, (T0, "s7", long_query, "a", 1, True, None)]
    kept = extract(_config(tmp_path, _events(rows)), tmp_path)
    assert kept.summary["long_queries_truncated"] == 1 and kept.summary["rows_kept"] == 2
    cfg = _with_extract(_config(tmp_path, _events(rows)), long_queries="quarantine")
    dropped = extract(cfg, tmp_path)
    assert dropped.summary["quarantined_by_reason"]["query_too_long"] == 1


@pytest.mark.parametrize(("model", "context", "long"), [("ClickCLIP-Tiny", 16, True), ("ViT-B-32", 77, False)])
def test_long_queries_are_judged_by_the_configured_models_tokenizer_and_context(tmp_path, model, context, long):
    query = "navy blue waterproof rain jacket with hood for men in size large with zip pockets and a warm lining"
    rows = [(T0, "s1", query, "a", 1, True, 900)]
    cfg = _config(tmp_path, _events(rows))
    cfg = cfg.model_copy(update={"train": cfg.train.model_copy(update={"model": model})})
    summary = extract(cfg, tmp_path).summary
    assert summary["text_context"] == context
    assert summary["long_queries_truncated"] == int(long)


def test_weighting_modes(tmp_path):
    rows = [(T0, "s1", "mug", "a", 1, True, 50_000), (T0, "s2", "mug", "a", 3, True, 100),
            (T0, "s3", "mug", "a", 2, False, None)]
    cfg = _config(tmp_path, _events(rows))
    weights = {}
    for mode in ("raw", "ips", "ips_dwell"):
        result = extract(_with_extract(cfg, weighting=mode, propensity={"min_pair_impressions": 100}), tmp_path)
        weights[mode] = pl.read_parquet(result.pairs)["weight"][0]
    # too little data to estimate bias: propensities stay flat, so ips = raw; the short dwell drops out
    assert weights == {"raw": 2.0, "ips": 2.0, "ips_dwell": 1.0}


def _pairs(path):
    return pl.read_parquet(path).sort("query", "image_id")


def test_incremental_extract_reads_only_new_partitions_and_matches_a_full_extract(tiny_shop, tmp_path):
    import shutil

    from tests.conftest import shop_config

    days = sorted(p.name for p in (tiny_shop / "events").iterdir())
    assert len(days) >= 4
    events = tmp_path / "events"
    events.mkdir()
    for day in days[:-2]:
        shutil.copytree(tiny_shop / "events" / day, events / day)
    cfg = shop_config(tiny_shop, tmp_path, extract={"incremental": True})
    cfg = cfg.model_copy(update={"data": cfg.data.model_copy(update={"events": cfg.data.events.model_copy(
        update={"path": events})})})
    (tmp_path / "r1").mkdir()
    first = extract(cfg, tmp_path / "r1", "r1").summary
    assert first["incremental"]["status"] == "first run"
    assert len(first["incremental"]["partitions_read"]) == len(days) - 2

    for day in days[-2:]:
        shutil.copytree(tiny_shop / "events" / day, events / day)
    (tmp_path / "r2").mkdir()
    second = extract(cfg, tmp_path / "r2", "r2")
    assert second.summary["incremental"]["status"] == "resumed"
    assert second.summary["incremental"]["partitions_read"] == [d.removeprefix("date=") for d in days[-2:]]
    assert second.summary["rows_read"] == second.summary["rows_kept"] + second.summary["rows_quarantined"]

    full_cfg = cfg.model_copy(update={"extract": cfg.extract.model_copy(update={"incremental": False})})
    (tmp_path / "full").mkdir()
    full = _pairs(extract(full_cfg, tmp_path / "full").pairs)
    merged = _pairs(second.pairs)
    assert merged.drop("weight").equals(full.drop("weight"))
    assert merged["weight"].to_numpy() == pytest.approx(full["weight"].to_numpy(), rel=1e-6)  # EM sums in another order

    # a redone run plans against the state before it: it reads the same partitions again
    (tmp_path / "r2b").mkdir()
    again = extract(cfg, tmp_path / "r2b", "r2")
    assert again.summary["incremental"]["partitions_read"] == second.summary["incremental"]["partitions_read"]
    assert _pairs(again.pairs).drop("weight").equals(merged.drop("weight"))

    # nothing new: nothing read, same pairs
    (tmp_path / "r3").mkdir()
    idle = extract(cfg, tmp_path / "r3", "r3")
    assert idle.summary["rows_read"] == 0 and idle.summary["incremental"]["partitions_read"] == []
    assert _pairs(idle.pairs).drop("weight").equals(merged.drop("weight"))

    # a rewritten partition is read again; changed settings rebuild everything
    changed = next((events / days[0]).glob("*.parquet"))
    pl.read_parquet(changed).head(10).write_parquet(changed)
    (tmp_path / "r4").mkdir()
    assert extract(cfg, tmp_path / "r4", "r4").summary["incremental"]["partitions_read"] == [
        days[0].removeprefix("date=")]
    strict = cfg.model_copy(update={"extract": cfg.extract.model_copy(update={"strip_punctuation": True})})
    (tmp_path / "r5").mkdir()
    rebuilt = extract(strict, tmp_path / "r5", "r5").summary["incremental"]
    assert rebuilt["status"].startswith("rebuilt") and len(rebuilt["partitions_read"]) == len(days)
    assert "strip_punctuation False -> True" in rebuilt["status"]


@pytest.mark.parametrize("change", [{"extract": {"time_zone": "Pacific/Kiritimati"}},
                                    {"train": {"model": "ClickCLIP-TinyRN"}},
                                    {"extract": {"long_queries": "quarantine"}},
                                    {"extract": {"satisfied_dwell_ms": 1}},
                                    {"extract": {"bots": {"max_impressions_per_minute": 3}}}])
def test_every_setting_the_kept_statistics_depend_on_rebuilds_them(tiny_config, tmp_path, change):
    """Before, the time zone and the tokenizer (its text context) were left out of the state's key:
    a changed zone merged statistics bucketed on other days. Each one rebuilds and is named."""
    cfg = tiny_config.model_copy(update={"extract": tiny_config.extract.model_copy(update={"incremental": True})})
    (tmp_path / "r1").mkdir()
    extract(cfg, tmp_path / "r1", "r1")
    tree = cfg.model_dump()
    for section, values in change.items():
        for key, value in values.items():
            tree[section][key] = {**tree[section][key], **value} if isinstance(value, dict) else value
    (tmp_path / "r2").mkdir()
    status = extract(RunConfig.model_validate(tree), tmp_path / "r2", "r2").summary["incremental"]["status"]
    key = next(iter(next(iter(change.values()))))
    named = {"model": "tokenizer"}.get(key, key)
    assert status.startswith("rebuilt") and f"{named} " in status, status


def _incremental_shop(tmp_path, by_day: dict[str, list[tuple]], catalog: pl.DataFrame, **extract_settings) -> RunConfig:
    events = tmp_path / "events"
    for day, rows in by_day.items():
        (events / f"date={day}").mkdir(parents=True, exist_ok=True)
        _events(rows).write_parquet(events / f"date={day}" / "part.parquet")
    catalog.write_parquet(tmp_path / "images.parquet")
    return RunConfig.model_validate({
        "state_dir": str(tmp_path / "state"), "extract": {"incremental": True, **extract_settings},
        "data": {"events": {"path": str(events)}, "images": {"path": str(tmp_path / "images.parquet")},
                 "image_root": str(tmp_path)}})


def _full(cfg: RunConfig) -> RunConfig:
    return cfg.model_copy(update={"extract": cfg.extract.model_copy(update={"incremental": False})})


def test_an_image_that_leaves_the_catalog_leaves_the_propensities_as_in_a_full_extract(tmp_path):
    """Regression (season replay, week 2): kept statistics of a retired image were left out of the
    pairs but still fed the propensity estimate, so every weight differed from a full extract's
    (which quarantines those rows as unknown_image), by up to 0.07."""
    rng = np.random.default_rng(0)

    def day(d: int) -> list[tuple]:
        return [(datetime(2026, 11, d, 9, 0, i % 60), f"s{d}-{i // 5}", "mug", str(rng.choice(["a", "b"])),
                 1 + i % 5, bool(rng.random() < 0.6 / (1 + i % 5)), 900) for i in range(200)]
    by_day = {"2026-11-01": day(1), "2026-11-02": day(2)}
    cfg = _incremental_shop(tmp_path, {"2026-11-01": by_day["2026-11-01"]}, _catalog())
    (tmp_path / "r1").mkdir()
    extract(cfg, tmp_path / "r1", "r1")
    _incremental_shop(tmp_path, {"2026-11-02": by_day["2026-11-02"]}, _catalog().filter(pl.col("image_id") != "b"))
    (tmp_path / "r2").mkdir()
    nightly = extract(cfg, tmp_path / "r2", "r2")
    assert nightly.summary["pairs_dropped_image_left_catalog"] == 1
    (tmp_path / "full").mkdir()
    full = extract(_full(cfg), tmp_path / "full")
    assert _pairs(nightly.pairs).equals(_pairs(full.pairs))
    assert nightly.summary["propensity"] == full.summary["propensity"]


def test_incremental_judges_a_session_that_crosses_midnight_per_day(tmp_path):
    """Documented exception: bots and duplicates are judged within the partitions one run reads."""
    late = [(datetime(2026, 11, 1, 23, 59, i), "night", "mug", "a", 1, False, 900) for i in range(15)]
    early = [(datetime(2026, 11, 2, 0, 0, i), "night", "mug", "a", 1, False, 900) for i in range(15)]
    cfg = _incremental_shop(tmp_path, {"2026-11-01": late}, _catalog(), bots={"max_impressions_per_session": 20})
    (tmp_path / "r1").mkdir()
    extract(cfg, tmp_path / "r1", "r1")
    _incremental_shop(tmp_path, {"2026-11-02": early}, _catalog())
    (tmp_path / "r2").mkdir()
    nightly = extract(cfg, tmp_path / "r2", "r2").summary
    assert nightly["quarantined_by_reason"]["bot"] == 0  # 15 impressions a day: under the threshold
    (tmp_path / "full").mkdir()
    full = extract(_full(cfg), tmp_path / "full").summary
    assert full["quarantined_by_reason"]["bot"] == 30  # 30 in one session


def test_incremental_does_not_reread_events_of_an_image_that_joins_the_catalog_later(tmp_path):
    """Documented exception: a day's quarantined rows stay quarantined until its state is rebuilt."""
    day1 = [(datetime(2026, 11, 1, 9), "s1", "red hat", "z", 1, True, 900)]
    day2 = [(datetime(2026, 11, 2, 9), "s2", "mug", "a", 1, True, 900)]
    cfg = _incremental_shop(tmp_path, {"2026-11-01": day1}, _catalog())
    (tmp_path / "r1").mkdir()
    assert extract(cfg, tmp_path / "r1", "r1").summary["quarantined_by_reason"]["unknown_image"] == 1
    later = pl.concat([_catalog(), pl.DataFrame({"image_id": ["z"], "path": ["z.png"], "product_id": ["p9"],
                                                 "title": ["Hat"]})])
    _incremental_shop(tmp_path, {"2026-11-02": day2}, later)
    (tmp_path / "r2").mkdir()
    nightly = pl.read_parquet(extract(cfg, tmp_path / "r2", "r2").pairs)
    (tmp_path / "full").mkdir()
    full = pl.read_parquet(extract(_full(cfg), tmp_path / "full").pairs)
    assert "z" not in nightly["image_id"].to_list() and "z" in full["image_id"].to_list()


def test_incremental_extract_needs_date_partitions(tmp_path):
    cfg = _config(tmp_path, _events([GOOD]))
    cfg = cfg.model_copy(update={"extract": cfg.extract.model_copy(update={"incremental": True})})
    with pytest.raises(DataContractError, match="date=YYYY-MM-DD"):
        extract(cfg, tmp_path)


def test_nanosecond_timestamps_as_pandas_writes_them(tmp_path):
    events = _events([GOOD]).with_columns(pl.col("event_ts").cast(pl.Datetime("ns")))
    assert extract(_config(tmp_path, events), tmp_path).summary["rows_kept"] == 1


def _zoned_events(tmp_path, window: dict, **settings) -> dict:
    # 23:30 UTC on 1 November is 08:30 on 2 November in Tokyo
    rows = [(datetime(2026, 11, 1, 23, 30), "s1", "mug", "a", 1, True, 900),
            (datetime(2026, 11, 1, 12, 0), "s2", "hat", "c", 1, True, 900)]
    events = _events(rows).with_columns(pl.col("event_ts").dt.replace_time_zone("UTC"))
    cfg = _with_extract(_config(tmp_path, events), window=window, **settings)
    return extract(cfg, tmp_path).summary


def test_window_dates_are_in_the_configured_zone_never_the_machines(tmp_path, monkeypatch):
    import time as clock

    window = {"since": "2026-11-01", "until": "2026-11-01"}
    in_utc = _zoned_events(tmp_path, window)["rows_kept"]
    monkeypatch.setenv("TZ", "Asia/Tokyo")
    clock.tzset()
    try:
        assert _zoned_events(tmp_path, window)["rows_kept"] == in_utc == 2  # the machine's zone changes nothing
        assert _zoned_events(tmp_path, window, time_zone="Asia/Tokyo")["rows_kept"] == 1  # the config's does
    finally:
        monkeypatch.delenv("TZ")
        clock.tzset()


def test_a_column_missing_from_one_partition_names_the_file(tmp_path):
    events = tmp_path / "events"
    for day, frame in (("2026-11-01", _events([GOOD])), ("2026-11-02", _events([GOOD]).drop("position"))):
        (events / f"date={day}").mkdir(parents=True)
        frame.write_parquet(events / f"date={day}" / "part.parquet")
    cfg = _config(tmp_path, _events([GOOD]))
    cfg = cfg.model_copy(update={"data": cfg.data.model_copy(update={
        "events": cfg.data.events.model_copy(update={"path": events})})})
    with pytest.raises(DataContractError, match=r"date=2026-11-02/part.parquet: column 'position' is missing"):
        extract(cfg, tmp_path)


def test_a_partition_folder_that_is_not_a_date_names_the_folder(tmp_path):
    events = tmp_path / "events"
    for day in ("2026-11-01", "2026-13-45"):
        (events / f"date={day}").mkdir(parents=True)
        _events([GOOD]).write_parquet(events / f"date={day}" / "part.parquet")
    cfg = _with_extract(_config(tmp_path, _events([GOOD])), window={"since": "2026-11-01"})
    cfg = cfg.model_copy(update={"data": cfg.data.model_copy(update={
        "events": cfg.data.events.model_copy(update={"path": events})})})
    with pytest.raises(DataContractError, match=r"'date=2026-13-45' .* is not a date"):
        extract(cfg, tmp_path)


def test_events_and_images_in_two_duckdb_files(tmp_path):
    shop, catalog = tmp_path / "events.duckdb", tmp_path / "catalog.duckdb"
    with duckdb.connect(str(shop)) as con:
        con.register("frame", _events([GOOD]).to_arrow())
        con.execute("CREATE TABLE clicks AS SELECT * FROM frame")
    with duckdb.connect(str(catalog)) as con:
        con.register("frame", _catalog().to_arrow())
        con.execute("CREATE TABLE images AS SELECT * FROM frame")
    cfg = RunConfig.model_validate({"data": {
        "events": {"format": "duckdb", "path": str(shop), "table": "clicks"},
        "images": {"format": "duckdb", "path": str(catalog), "table": "images"}, "image_root": str(tmp_path)}})
    summary = extract(cfg, tmp_path).summary
    assert summary["rows_kept"] == 1 and summary["quarantined_by_reason"]["unknown_image"] == 0


def test_text_that_is_not_utf8_names_the_file(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    table = _events([GOOD]).to_arrow()
    broken = pa.array([b"navy \xff mug"], pa.binary()).view(pa.string())  # what a mis-encoded export holds
    table = table.set_column(table.schema.get_field_index("query"), "query", broken)
    cfg = _config(tmp_path, _events([GOOD]))
    pq.write_table(table, cfg.data.events.path)
    with pytest.raises(DataContractError, match=r"events.parquet.*not valid UTF8"):
        extract(cfg, tmp_path)


def test_a_wrong_events_path_with_a_window_says_the_path_does_not_exist(tmp_path):
    cfg = _with_extract(_config(tmp_path, _events([GOOD])), window={"last_days": 7})
    cfg = cfg.model_copy(update={"data": cfg.data.model_copy(update={
        "events": cfg.data.events.model_copy(update={"path": tmp_path / "evnets"})})})
    with pytest.raises(DataContractError, match="evnets: no such file or folder"):
        extract(cfg, tmp_path)


@pytest.mark.parametrize("seed", range(5))
def test_query_bands_in_sql_equal_the_python_banding(seed):
    """extract bands millions of queries in DuckDB; evaluate's slices band in Polars: same bands."""
    from pipeline.data.queries import frequency_bands
    from pipeline.stages.extract import query_frequency_bands

    rng = np.random.default_rng(seed)
    queries = [f"q{i}" for i in rng.integers(0, 60, 300)]  # repeats: a query's pairs are summed
    impressions = (rng.pareto(1.0, 300) * 3 + 1).astype(int).tolist()  # ties included
    pairs = pl.DataFrame({"query": queries, "impressions": impressions})
    con = duckdb.connect()
    con.register("pairs", pairs.to_arrow())
    expected = {name: {"queries": 0, "impressions": 0} for name in ("head", "torso", "tail")}
    per_query = pairs.group_by("query").agg(pl.col("impressions").sum())
    for query, band in frequency_bands(pairs).items():
        expected[band]["queries"] += 1
        expected[band]["impressions"] += int(per_query.filter(pl.col("query") == query)["impressions"][0])
    assert query_frequency_bands(con) == expected
