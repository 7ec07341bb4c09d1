"""A demo shop over several weeks, for exercising the weekly loop (`clickclip demo-data --weeks N`).

`generate_season` writes every week's material under `<out>/season/week-KK/`: that week's click
log (`events/date=*/`, Monday to Sunday), the catalog as it stands at the week's end
(`images.parquet`), the image files that are new or replaced that week (`images/`) and the ids of
images whose files leave (`retired.json`); `season.json` says what was planted. The shop itself
(`<out>/events`, `<out>/images.parquet`, `<out>/images/`, the input data contract as
`generate` writes it) starts at week 1; `advance(out, week)` brings it to a later week, as the
shop would look on the Monday after that week: the log grown by the weeks in between, the
catalog and its folder as they stand then.

Week to week: ~5% new products, a few retired products (rows and files gone), a few hero images
replaced under the same image id and path (new bytes: split must re-hash them, publish re-embed
them), seasonal words on some queries from week 3 on, and one bad week whose Wednesday is mostly
scraper traffic: the quarantine-rate gate must refuse it.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from datetime import date, datetime, timedelta
from pathlib import Path

import numpy as np
import polars as pl

from pipeline.demo.images import draw_look, render_photo
from pipeline.demo.shop import _bad_rows, _bot_session, _click_log, draw_catalog
from pipeline.errors import ClickclipError

SEASON_START = datetime(2026, 9, 7)  # a Monday: week k is the 7 days from SEASON_START + 7 (k - 1) days
NEW_PRODUCTS = 0.05  # of the catalog's products, each week after the first
RETIRED_PRODUCTS = 0.02
REPLACED_HEROES = 0.02  # products whose first photo is re-shot under the same image id
SEASONAL_WORDS = ("gift", "christmas", "holiday")
SEASONAL_FROM = 3
BOT_SHARE = 0.5  # the bad week's scraper impressions, as a share of its ordinary ones


@dataclass(frozen=True)
class SeasonSummary:
    out: Path
    weeks: int
    bad_week: int | None
    per_week: list[dict]


def week_start(week: int) -> date:
    """The Monday week `week` (1-based) begins on."""
    return (SEASON_START + timedelta(days=7 * (week - 1))).date()


def run_date(week: int) -> datetime:
    """When the weekly DAG runs for `week`: the Monday after it, 03:00 UTC (its logical date)."""
    return SEASON_START + timedelta(days=7 * week, hours=3)


def _bot_partition(rng: np.random.Generator, events: pl.DataFrame, start: datetime, week: int) -> pl.DataFrame:
    """Scrapers on one day: sessions of 200 impressions in 50 seconds, BOT_SHARE of the week's impressions."""
    sessions = max(1, int(np.ceil(BOT_SHARE * events.height / 200)))
    return pl.concat([_bot_session(rng, events, start=start + timedelta(hours=1, minutes=2 * i),
                                   session_id=f"W{week:02d}BOT{i:05d}") for i in range(sessions)])


def _reshoot(rng: np.random.Generator, catalog: pl.DataFrame, image_ids: list[str], folder: Path) -> None:
    """New photos of the same products, saved under the same file names."""
    folder.mkdir(parents=True, exist_ok=True)
    rows = catalog.filter(pl.col("image_id").is_in(image_ids))
    for path, category, colour, pattern in rows.select("path", "category", "colour", "pattern").iter_rows():
        render_photo(draw_look(rng, category, colour, pattern), rng).save(folder / path)


def generate_season(out: Path, weeks: int, products: int = 600, sessions: int = 20000, seed: int = 0,
                    bad_week: int | None = 4, lifestyle_share: float = 0.0) -> SeasonSummary:
    """Write `weeks` weeks of a changing shop under `<out>/season/` and the shop at week 1 to `out`.
    `sessions` is per week; `bad_week` (None: none) gets the scraper day."""
    if weeks < 1:
        raise ClickclipError(f"--weeks {weeks}: a season has at least one week")
    if bad_week is not None and not 1 <= bad_week <= weeks:
        bad_week = None
    rng = np.random.default_rng(seed)
    season = out / "season"
    shutil.rmtree(season, ignore_errors=True)
    catalog, _ = draw_catalog(rng, products, season / "week-01" / "images", lifestyle_share)
    next_product, per_week = products, []
    for week in range(1, weeks + 1):
        folder = season / f"week-{week:02d}"
        retired: list[str] = []
        replaced: list[str] = []
        new = 0
        if week > 1:
            product_ids = catalog["product_id"].unique().sort().to_list()
            gone = rng.choice(product_ids, max(1, round(RETIRED_PRODUCTS * len(product_ids))), replace=False)
            retired = catalog.filter(pl.col("product_id").is_in(gone.tolist()))["image_id"].to_list()
            catalog = catalog.filter(~pl.col("image_id").is_in(retired))
            heroes = catalog.filter(pl.col("image_id").str.ends_with("0") & pl.col("image_id").str.starts_with("I"))
            replaced = sorted(rng.choice(heroes["image_id"].to_list(),
                                         max(1, round(REPLACED_HEROES * len(product_ids))), replace=False).tolist())
            _reshoot(rng, catalog, replaced, folder / "images")
            new = max(1, round(NEW_PRODUCTS * len(product_ids)))
            added, _ = draw_catalog(rng, new, folder / "images", lifestyle_share, first=next_product)
            next_product += new
            catalog = pl.concat([catalog, added])
        start = SEASON_START + timedelta(days=7 * (week - 1))
        events, _ = _click_log(rng, catalog, sessions, start=start, session_prefix=f"W{week:02d}S",
                               seasonal=SEASONAL_WORDS if week >= SEASONAL_FROM else ())
        bad = [_bad_rows(rng, events, start=start, bot_id=f"W{week:02d}BOT_SCRAPER")]
        if week == bad_week:
            bad.append(_bot_partition(rng, events, start + timedelta(days=2), week))
        events = pl.concat([events, *bad]).sort("event_ts", "session_id", "position")
        events = events.drop("relevance").with_columns(pl.col("event_ts").dt.date().alias("date"))
        events.write_parquet(folder / "events", partition_by="date")
        catalog.select("image_id", "path", "product_id", "title", "category").write_parquet(folder / "images.parquet")
        (folder / "retired.json").write_text(json.dumps(retired))
        per_week.append({"week": week, "first_day": str(week_start(week)), "run_date": run_date(week).isoformat(),
                         "events": events.height, "images": catalog.height, "new_products": new,
                         "retired_images": len(retired), "replaced_images": replaced, "bad": week == bad_week})
    (season / "season.json").write_text(json.dumps(
        {"weeks": weeks, "bad_week": bad_week, "bad_week_kind": "a Wednesday of scraper sessions",
         "per_week": per_week}, indent=2))
    _reset(out)
    advance(out, 1)
    return SeasonSummary(out, weeks, bad_week, per_week)


def _reset(out: Path) -> None:
    for name in ("events", "images"):
        shutil.rmtree(out / name, ignore_errors=True)
    (out / "images.parquet").unlink(missing_ok=True)
    (out / "season" / "live.json").unlink(missing_ok=True)


def live_week(out: Path) -> int:
    """The week the shop at `out` stands at (0: none yet)."""
    live = out / "season" / "live.json"
    return json.loads(live.read_text())["week"] if live.is_file() else 0


def advance(out: Path, week: int) -> int:
    """Bring the shop at `out` to the end of `week`: each week's log partitions added, replaced and
    new image files copied in, retired ones deleted, the catalog table replaced. Returns the week."""
    season = out / "season"
    if not (season / "season.json").is_file():
        raise ClickclipError(f"{out} holds no season (season/season.json): write one with "
                             "`clickclip demo-data --weeks N --out {out}`")
    weeks = json.loads((season / "season.json").read_text())["weeks"]
    now = live_week(out)
    if not now <= week <= weeks:
        raise ClickclipError(f"the shop at {out} stands at week {now} of {weeks}: it can move forward to a week up "
                             f"to {weeks}, not to week {week}")
    for step in range(now + 1, week + 1):
        folder = season / f"week-{step:02d}"
        shutil.copytree(folder / "events", out / "events", dirs_exist_ok=True)
        (out / "images").mkdir(parents=True, exist_ok=True)
        for image_id in json.loads((folder / "retired.json").read_text()):
            for old in (out / "images").glob(f"{image_id}.*"):
                old.unlink()
        if (folder / "images").is_dir():
            shutil.copytree(folder / "images", out / "images", dirs_exist_ok=True)
        shutil.copyfile(folder / "images.parquet", out / "images.parquet")
        (season / "live.json").write_text(json.dumps({"week": step}))
    return week
