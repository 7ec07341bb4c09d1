"""A corpus of broken inputs, each with the outcome it must have.

Every case builds a small shop (a date-partitioned event log, a catalog and its images), breaks it
in one way, and runs extract and split on it. The outcome is either `complete` (the run finishes;
the named quarantine reasons hold the named number of rows; counts add up) or `error` (the run
stops at once with a DataContractError whose message matches a pattern naming the file or
column). A hang, a crash from deep inside a library or a silent drop fails the case.
Used by tests/test_faults.py and benchmarks/bench_faults.py.
"""

from __future__ import annotations

import os
import re
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

import numpy as np
import polars as pl
from PIL import Image

from pipeline.config import RunConfig
from pipeline.errors import ClickclipError
from pipeline.stages.extract import extract
from pipeline.stages.split import split

T0 = datetime(2026, 11, 1, 12, 0, 0)
SCHEMA = {"event_ts": pl.Datetime("us"), "session_id": pl.Utf8, "query": pl.Utf8, "image_id": pl.Utf8,
          "position": pl.Int32, "clicked": pl.Boolean, "dwell_ms": pl.Int32}
IMAGES = ("a", "b", "c", "d")


@dataclass
class Shop:
    root: Path
    events: list[tuple] = field(default_factory=list)
    catalog: list[dict] = field(default_factory=list)
    skip_events_write: bool = False

    @property
    def partition(self) -> Path:
        return self.root / "events" / "date=2026-11-01"

    def config(self, **extract) -> RunConfig:
        return RunConfig.model_validate({
            "data": {"events": {"path": str(self.root / "events")},
                     "images": {"path": str(self.root / "images.parquet")}, "image_root": str(self.root / "images")},
            "state_dir": str(self.root / "state"), "extract": {"duckdb": {"threads": 1}, **extract}})


def _photo(path: Path, seed: int, size: int = 48, mode: str = "RGB") -> None:
    rng = np.random.default_rng(seed)
    image = Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8))
    path.parent.mkdir(parents=True, exist_ok=True)
    (image if mode == "RGB" else image.convert(mode)).save(path)


def base_shop(root: Path) -> Shop:
    shop = Shop(root)
    for n, image_id in enumerate(IMAGES):
        _photo(root / "images" / f"{image_id}.png", n)
        shop.catalog.append({"image_id": image_id, "path": f"{image_id}.png", "product_id": f"p{n}",
                             "title": f"thing {image_id}"})
    for s in range(6):
        for p, image_id in enumerate(IMAGES):
            shop.events.append((T0.replace(minute=s), f"s{s}", f"query {s % 3}", image_id, p + 1, p == s % 4, 20000))
    return shop


def write(shop: Shop) -> None:
    if not shop.skip_events_write:
        shop.partition.mkdir(parents=True, exist_ok=True)
        pl.DataFrame(shop.events, schema=SCHEMA, orient="row").write_parquet(shop.partition / "part-0.parquet")
    pl.DataFrame(shop.catalog, schema={"image_id": pl.Utf8, "path": pl.Utf8, "product_id": pl.Utf8,
                                       "title": pl.Utf8}).write_parquet(shop.root / "images.parquet")


@dataclass(frozen=True)
class Case:
    name: str
    mutate: Callable[[Shop], None]
    outcome: str  # "complete" or "error"
    expect: dict[str, int] | str  # quarantine reason -> rows (events and images together), or an error pattern
    extract_settings: dict = field(default_factory=dict)


def _replace_events(rows: list[tuple]) -> Callable[[Shop], None]:
    def mutate(shop: Shop) -> None:
        shop.events += rows
    return mutate


def _typed_wrong(shop: Shop) -> None:
    shop.skip_events_write = True
    shop.partition.mkdir(parents=True, exist_ok=True)
    frame = pl.DataFrame(shop.events, schema=SCHEMA, orient="row").with_columns(pl.col("clicked").cast(pl.Utf8))
    frame.write_parquet(shop.partition / "part-0.parquet")


def _missing_column(shop: Shop) -> None:
    shop.skip_events_write = True
    shop.partition.mkdir(parents=True, exist_ok=True)
    pl.DataFrame(shop.events, schema=SCHEMA, orient="row").drop("position").write_parquet(
        shop.partition / "part-0.parquet")


def _empty_parquet_file(shop: Shop) -> None:
    shop.partition.mkdir(parents=True, exist_ok=True)
    (shop.partition / "part-1.parquet").write_bytes(b"")


def _garbage_parquet_file(shop: Shop) -> None:
    shop.partition.mkdir(parents=True, exist_ok=True)
    (shop.partition / "part-1.parquet").write_text("this is a CSV export someone renamed\n1,2,3\n")


def _stray_files(shop: Shop) -> None:
    shop.partition.mkdir(parents=True, exist_ok=True)
    (shop.partition / "_SUCCESS").write_text("")
    (shop.partition / "README.txt").write_text("exported by the shop")


def _image_file(name: str, writer: Callable[[Path], None]) -> Callable[[Shop], None]:
    def mutate(shop: Shop) -> None:
        path = shop.root / "images" / f"{name}.img"
        writer(path)
        shop.catalog.append({"image_id": name, "path": path.name, "product_id": f"p-{name}", "title": name})
    return mutate


def _truncated(path: Path) -> None:
    _photo(path.with_suffix(".png"), 9, size=256)
    data = path.with_suffix(".png").read_bytes()
    path.with_suffix(".png").unlink()
    path.write_bytes(data[: len(data) // 2])


def _animated(path: Path) -> None:
    frames = [Image.new("RGB", (40, 40), colour) for colour in ("red", "green", "blue")]
    frames[0].save(path, format="GIF", save_all=True, append_images=frames[1:], duration=100, loop=0)


def _huge(path: Path) -> None:
    Image.new("1", (20000, 20000)).save(path, format="PNG")  # 400 Mpx: beyond Pillow's bomb guard


def _sixteen_bit(path: Path) -> None:
    Image.fromarray(np.arange(48 * 48, dtype=np.uint16).reshape(48, 48) * 20).save(path, format="PNG")


def _cmyk(path: Path) -> None:
    Image.new("CMYK", (48, 48), (10, 200, 30, 0)).save(path, format="JPEG")


def _escaping_symlink(shop: Shop) -> None:
    outside = shop.root / "secret.png"
    _photo(outside, 11)
    (shop.root / "images" / "link.png").symlink_to(outside)
    shop.catalog.append({"image_id": "escape1", "path": "link.png", "product_id": "px", "title": "x"})
    shop.catalog.append({"image_id": "escape2", "path": "../secret.png", "product_id": "py", "title": "y"})


def _inner_symlink(shop: Shop) -> None:
    (shop.root / "images" / "alias.png").symlink_to(shop.root / "images" / "a.png")
    shop.catalog.append({"image_id": "alias", "path": "alias.png", "product_id": "p0", "title": "a again"})


def _duplicate_catalog_row(shop: Shop) -> None:
    shop.catalog.append(dict(shop.catalog[0]))


def _nulls_everywhere(shop: Shop) -> None:
    shop.events += [(None,) * 7] * 5
    shop.catalog.append({"image_id": None, "path": None, "product_id": None, "title": None})


CASES = [
    Case("wrong column type", _typed_wrong, "error", r"part-0\.parquet|events.*'clicked' should be BOOLEAN"),
    Case("missing column", _missing_column, "error", r"'position' .*missing"),
    Case("zero-byte parquet file in the partition", _empty_parquet_file, "error", r"part-1\.parquet"),
    Case("non-parquet file named .parquet", _garbage_parquet_file, "error", r"part-1\.parquet"),
    Case("stray non-parquet files beside the partitions", _stray_files, "complete", {}),
    Case("NULLs everywhere", _nulls_everywhere, "complete", {"empty_query": 5, "missing_value": 1}),
    Case("10,000-character query, truncate policy", _replace_events([(T0, "s9", "navy " * 2000, "a", 1, True, 1)]),
         "complete", {}),
    Case("10,000-character query, quarantine policy",
         _replace_events([(T0, "s9", "navy " * 2000, "a", 1, True, 1)]), "complete", {"query_too_long": 1},
         {"long_queries": "quarantine"}),
    Case("control characters and mixed scripts", _replace_events([
        (T0, "s9", "navy\x00\x07 trainers", "a", 1, True, 1), (T0, "s9", "кроссовки navy 靴 ﻿", "b", 2, False, 1),
        (T0, "s9", "\x01\x02\x1f", "c", 3, False, 1)]), "complete", {"empty_query": 1}),
    Case("truncated image", _image_file("truncated", _truncated), "complete", {"unreadable": 1}),
    Case("zero-byte image", _image_file("zero", lambda p: p.write_bytes(b"")), "complete", {"empty_file": 1}),
    Case("not an image", _image_file("text", lambda p: p.write_text("hello")), "complete", {"not_an_image": 1}),
    Case("CMYK JPEG is converted", _image_file("cmyk", _cmyk), "complete", {}),
    Case("16-bit PNG is converted", _image_file("deep", _sixteen_bit), "complete", {}),
    Case("animated GIF uses its first frame", _image_file("anim", _animated), "complete", {}),
    Case("20000x20000 image (decompression bomb)", _image_file("huge", _huge), "complete", {"oversized": 1}),
    Case("symlink and ../ path escaping the image root", _escaping_symlink, "complete", {"path_escapes_root": 2}),
    Case("symlink inside the image root", _inner_symlink, "complete", {}),
    Case("duplicate image_id rows in the catalog", _duplicate_catalog_row, "complete", {"duplicate_image_id": 1}),
]


def run_case(case: Case, root: Path) -> dict:
    """Run one case; the result says whether it ended as expected, with the row counts."""
    shop = base_shop(root)
    case.mutate(shop)
    write(shop)
    cfg = shop.config(**case.extract_settings)
    result = {"case": case.name, "passed": False, "rows_in": 0, "rows_out": 0, "rows_quarantined": 0, "detail": ""}
    try:
        (root / "extract").mkdir()
        (root / "split").mkdir()
        extracted = extract(cfg, root / "extract")
        split_result = split(cfg, extracted.pairs, root / "split")
    except ClickclipError as exc:
        message = str(exc)
        result["detail"] = message
        result["passed"] = case.outcome == "error" and re.search(case.expect, message) is not None
        return result
    except Exception:  # a crash from inside a library is a failed case, not a test error
        result["detail"] = traceback.format_exc(limit=3)
        return result
    summary, split_summary = extracted.summary, split_result.summary
    pairs = pl.read_parquet(extracted.pairs)
    result.update(rows_in=summary["rows_read"], rows_out=int(pairs["impressions"].sum()),
                  rows_quarantined=summary["rows_quarantined"])
    reasons = {r: n for r, n in summary["quarantined_by_reason"].items() if n}
    reasons.update(split_summary["images_quarantined_by_reason"])
    adds_up = result["rows_out"] + result["rows_quarantined"] == result["rows_in"] and \
        split_summary["images_kept"] + split_summary["images_quarantined"] == split_summary["catalog_rows"]
    result["detail"] = f"quarantined {reasons}"
    result["passed"] = case.outcome == "complete" and adds_up and reasons == case.expect
    return result


def run_all(root: Path) -> list[dict]:
    results = []
    for n, case in enumerate(CASES):
        folder = root / f"case-{n:02d}"
        folder.mkdir(parents=True)
        results.append(run_case(case, folder))
    return results


if __name__ == "__main__":  # pragma: no cover
    import tempfile

    with tempfile.TemporaryDirectory() as folder:
        for r in run_all(Path(folder)):
            print(("ok  " if r["passed"] else "FAIL") + f" {r['case']}: {r['detail']}")
    os._exit(0)
