"""Split: near-duplicate + same-product groups, sticky leak-free train/val/test, held-out queries.

Outputs in `runs/<id>/split/`: `images.parquet` (usable catalog rows with digest, hash, group and
split), `image_quarantine.parquet` (catalog rows that cannot be used, with a reason),
`pairs.parquet` (extract's pairs with the split of their image and whether their query is held
out), `pairs_excluded.parquet` (pairs whose image was quarantined or excluded) and
`leak_audit.json`. Across runs, `<state_dir>/<name>/split_registry.parquet` remembers every
image's split so that it never moves, `hash_cache.parquet` its perceptual hash, and
`digest_cache.parquet` each file's content digest by path, size and modification time.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from dataclasses import dataclass
from pathlib import Path

import polars as pl

from pipeline.config import RunConfig, SplitConfig
from pipeline.data.contract import IMAGES, connect, open_source
from pipeline.data.groups import (
    EXCLUDED,
    assign_sticky_splits,
    catalog_groups,
    exclude_crossing_links,
    stable_fraction,
)
from pipeline.data.images import UnusableImage, load_rgb, resolve_image_path
from pipeline.data.leak_audit import leak_audit
from pipeline.data.near_duplicates import hash_catalog
from pipeline.data.split_registry import read_registered_by, registered_before
from pipeline.errors import DataContractError, LeakError, StageError
from pipeline.stages import StageInputs, StageOutput


@dataclass(frozen=True)
class SplitResult:
    images: Path
    image_quarantine: Path
    pairs: Path
    pairs_excluded: Path
    leak_audit: Path
    groups_sheet: Path
    summary: dict


def read_catalog(cfg: RunConfig) -> pl.DataFrame:
    """The images source, checked against the contract, with a 1-based source row."""
    con = connect(cfg.extract.duckdb)
    open_source(con, cfg.data.images, "catalog_raw", IMAGES)
    columns = {name for name, *_ in con.execute("DESCRIBE catalog_raw").fetchall()}
    extra = ", category" if "category" in columns else ", NULL::VARCHAR AS category"
    return con.sql(f"SELECT image_id, path, product_id, title{extra}, row_number() OVER () AS source_row "
                   "FROM catalog_raw").pl()


def catalog_problems(catalog: pl.DataFrame, root: Path) -> pl.Series:
    """Reason code per catalog row that fails before any file is opened (None when fine)."""
    duplicate = catalog.select(pl.col("image_id").is_duplicated() & ~pl.col("image_id").is_first_distinct())
    reasons = []
    for image_id, path, dup in zip(catalog["image_id"], catalog["path"], duplicate.to_series(), strict=True):
        if image_id is None or path is None or not path.strip():
            reasons.append("missing_value")
        elif dup:
            reasons.append("duplicate_image_id")
        else:
            try:
                resolve_image_path(root, path)
                reasons.append(None)
            except UnusableImage as exc:
                reasons.append(exc.reason)
    return pl.Series("reason", reasons, dtype=pl.Utf8)


REGISTRY_SETTINGS = ("hash", "hash_size", "max_distance")  # what decides which images are linked


def read_registry(path: Path) -> tuple[dict[str, str], dict[str, str]]:
    """(image -> split, image -> when it was registered) from the sticky split registry."""
    if not path.is_file():
        return {}, {}
    frame = pl.read_parquet(path)
    stamps = frame["registered_at"].to_list() if "registered_at" in frame.columns else [""] * frame.height
    return (dict(zip(frame["image_id"], frame["split"], strict=True)),
            dict(zip(frame["image_id"], [s or "" for s in stamps], strict=True)))


def write_registry(path: Path, registry: dict[str, str], registered_at: dict[str, str], images: pl.DataFrame,
                   stamp: str, run_id: str = "") -> str:
    """Add this run's assignments (never changing an old one); return the registry's version."""
    fresh = {k: v for k, v in zip(images["image_id"], images["split"], strict=True)
             if v != EXCLUDED and k not in registry}
    merged = registry | fresh
    stamps = registered_at | dict.fromkeys(fresh, stamp)
    by = read_registered_by(path) | dict.fromkeys(fresh, run_id)
    frame = pl.DataFrame({"image_id": list(merged), "split": list(merged.values()),
                          "registered_at": [stamps.get(k, "") for k in merged],
                          "registered_by": [by.get(k, "") for k in merged]}).sort("image_id")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    frame.write_parquet(tmp)
    os.replace(tmp, path)
    return hashlib.sha256(frame.select("image_id", "split").write_csv().encode()).hexdigest()[:12]


def registry_settings(scfg: SplitConfig) -> dict:
    return {key: getattr(scfg, key) for key in REGISTRY_SETTINGS}


def check_registry_settings(state: Path, scfg: SplitConfig) -> None:
    """The registry's links were made under its hash settings; other settings would reinterpret them
    silently, so changing them is the explicit `clickclip migrate-split-registry`."""
    recorded_path = state / "split_registry.json"
    if not recorded_path.is_file():
        return
    recorded, wanted = json.loads(recorded_path.read_text()), registry_settings(scfg)
    changed = {k: (recorded.get(k), v) for k, v in wanted.items() if recorded.get(k) != v}
    if changed:
        what = ", ".join(f"split.{k} {old!r} -> {new!r}" for k, (old, new) in changed.items())
        raise StageError(f"the split registry in {state} was built with other near-duplicate settings ({what}). "
                         "Changing them relinks groups across splits; if that is meant, run `clickclip "
                         "migrate-split-registry --config <file>` (every assignment is kept; groups that now link "
                         "splits follow split.link_policy), or restore the old settings")


def migrate_registry(cfg: RunConfig) -> dict:
    """Adopt the config's hash settings for the split registry, keeping every image's assignment."""
    state = cfg.state_dir / cfg.name
    recorded_path = state / "split_registry.json"
    before = json.loads(recorded_path.read_text()) if recorded_path.is_file() else None
    state.mkdir(parents=True, exist_ok=True)
    recorded_path.write_text(json.dumps(registry_settings(cfg.split), indent=2))
    assignments, _ = read_registry(state / "split_registry.parquet")
    return {"registry": str(state / "split_registry.parquet"), "images": len(assignments), "settings_before": before,
            "settings_now": registry_settings(cfg.split)}


def _hash_and_quarantine(cfg: RunConfig, catalog: pl.DataFrame, state: Path) -> tuple[pl.DataFrame, pl.DataFrame, dict]:
    catalog = catalog.with_columns(catalog_problems(catalog, cfg.data.image_root))
    todo = catalog.filter(pl.col("reason").is_null()).drop("reason")
    hashed, cache_stats = hash_catalog(todo["path"].to_list(), cfg.data.image_root, cfg.split,
                                       state / "hash_cache.parquet", state / "digest_cache.parquet")
    todo = pl.concat([todo, hashed.drop("path")], how="horizontal")
    quarantine = pl.concat([catalog.filter(pl.col("reason").is_not_null()),
                            todo.filter(pl.col("reason").is_not_null()).drop("digest", "hash")])
    good = todo.filter(pl.col("reason").is_null()).drop("reason").sort("image_id")
    return good, quarantine, cache_stats


def split(cfg: RunConfig, pairs_path: Path, out_dir: Path, run_id: str = "") -> SplitResult:
    """Hash, group and split the catalog, then tag extract's pairs with their image's split."""
    scfg = cfg.split
    state = cfg.state_dir / cfg.name
    root = cfg.data.image_root
    if not root.is_dir():
        raise DataContractError(f"data.image_root {root} is not a folder: the catalog's image paths are relative "
                                "to it; point data.image_root at the folder that holds the images")
    good, quarantine, cache_stats = _hash_and_quarantine(cfg, read_catalog(cfg), state)
    if good.is_empty() and quarantine.height and (quarantine["reason"] == "missing_file").all():
        raise DataContractError(f"none of the {quarantine.height} catalog paths exists under data.image_root {root} "
                                f"(e.g. {quarantine['path'][0]!r}): is data.image_root the folder they are "
                                "relative to?")

    check_registry_settings(state, scfg)
    labels, hash_edges, cut = catalog_groups(good["hash"].to_list(), good["digest"].to_list(),
                                             good["product_id"].to_list(), scfg.max_distance, scfg.giant_group_size)
    registry_path = state / "split_registry.parquet"
    registry, registered_at = read_registry(registry_path)
    # registered by an earlier run (not by an interrupted attempt of this one): the sticky held-out set
    earlier = registered_before(registry_path, run_id) & set(registry)
    splits, sticky = assign_sticky_splits(good["image_id"].to_list(), labels, registry, scfg, registered_at)
    sticky |= {"cross_product_links_cut": int(len(cut)),
               "images_excluded_by_cut_links": exclude_crossing_links(splits, cut)}
    group_ids = pl.DataFrame({"label": labels, "image_id": good["image_id"]}).group_by("label").agg(
        pl.col("image_id").min().alias("group_id"))
    good = good.with_columns(pl.Series("label", labels), pl.Series("split", splits),
                             # in the split registry before this run: the sticky held-out set of earlier runs
                             pl.col("image_id").is_in(earlier).alias("registered_earlier")).join(
        group_ids, on="label").drop("label").sort("image_id")

    audit = leak_audit(good, scfg.max_distance)
    audit_path = out_dir / "leak_audit.json"
    audit_path.write_text(json.dumps(audit, indent=2))
    if not audit["passed"]:
        raise LeakError(f"leak audit failed: {audit['near_duplicate_links_crossing']} near-duplicate links, "
                        f"{audit['identical_files_crossing']} identical files and {audit['products_crossing']} "
                        f"products cross splits; see {audit_path}")
    registry_version = write_registry(registry_path, registry, registered_at, good,
                                      time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), run_id)
    (state / "split_registry.json").write_text(json.dumps(registry_settings(scfg), indent=2))

    paths = {name: out_dir / f"{name}.parquet" for name in ("images", "image_quarantine", "pairs", "pairs_excluded")}
    tagged, excluded = _tag_pairs(pl.read_parquet(pairs_path), good, quarantine, scfg)
    good.write_parquet(paths["images"])
    quarantine.sort("source_row").write_parquet(paths["image_quarantine"])
    tagged.write_parquet(paths["pairs"])
    excluded.write_parquet(paths["pairs_excluded"])
    example_groups_sheet(good, cfg.data.image_root, out_dir / "groups.png")
    summary = _summary(good, quarantine, hash_edges, tagged, excluded, scfg) | {
        "sticky": sticky, "hash_cache": cache_stats, "registry_version": registry_version, "leak_audit": audit,
        "catalog_rows": good.height + quarantine.height}
    return SplitResult(paths["images"], paths["image_quarantine"], paths["pairs"], paths["pairs_excluded"],
                       audit_path, out_dir / "groups.png", summary)


def _tag_pairs(pairs: pl.DataFrame, good: pl.DataFrame, quarantine: pl.DataFrame,
               scfg: SplitConfig) -> tuple[pl.DataFrame, pl.DataFrame]:
    """Pairs with their image's split and a held-out-query flag; the rest with a reason."""
    heldout = pl.col("query").map_elements(lambda q: stable_fraction(q, scfg.salt + ":query") < scfg.query_holdout,
                                           return_dtype=pl.Boolean)
    tagged = pairs.join(good.select("image_id", "split", "group_id"), on="image_id", how="left").with_columns(
        heldout.alias("query_heldout"))
    reasons = quarantine.select("image_id", pl.lit("image_quarantined").alias("reason")).unique("image_id")
    excluded = tagged.filter(pl.col("split").is_null() | (pl.col("split") == EXCLUDED)).join(
        reasons, on="image_id", how="left").with_columns(pl.col("reason").fill_null("linked_across_splits"))
    kept = tagged.filter(pl.col("split").is_not_null() & (pl.col("split") != EXCLUDED))
    return kept, excluded.drop("split", "group_id")


def example_groups_sheet(images: pl.DataFrame, root: Path, path: Path, groups: int = 4, per_group: int = 8,
                         size: int = 64) -> Path:
    """A contact sheet of the largest groups, one row each, so a reviewer can see what was merged."""
    from PIL import Image, ImageDraw

    largest = images.group_by("group_id").len().sort(["len", "group_id"], descending=[True, False]).head(groups)
    sheet = Image.new("RGB", (per_group * size, max(1, largest.height) * (size + 14)), "white")
    draw = ImageDraw.Draw(sheet)
    for row, (group_id, count) in enumerate(largest.iter_rows()):
        members = images.filter(pl.col("group_id") == group_id).head(per_group)
        y = row * (size + 14)
        draw.text((2, y), f"group {group_id}: {count} images", fill="black")
        for col, relative in enumerate(members["path"]):
            thumb = load_rgb(resolve_image_path(root, relative)).resize((size, size))
            sheet.paste(thumb, (col * size, y + 14))
    sheet.save(path)
    return path


def _summary(good, quarantine, hash_edges, tagged, excluded, scfg: SplitConfig) -> dict:
    group_sizes = good.group_by("group_id").len()
    histogram = group_sizes.group_by("len").len("groups").sort("len")
    return {
        "images_kept": good.height,
        "images_quarantined": quarantine.height,
        "images_quarantined_by_reason": dict(quarantine.group_by("reason").len().sort("reason").iter_rows()),
        "near_duplicate_pairs": int(len(hash_edges)),
        "groups": group_sizes.height,
        "largest_group": int(group_sizes["len"].max() or 0),
        "group_size_histogram": {str(size): n for size, n in histogram.iter_rows()},
        "giant_groups": group_sizes.filter(pl.col("len") > scfg.giant_group_size)["group_id"].to_list(),
        "images_by_split": dict(good.group_by("split").len().sort("split").iter_rows()),
        "pairs_by_split": dict(tagged.group_by("split").len().sort("split").iter_rows()),
        "pairs_heldout_queries": int(tagged["query_heldout"].sum()),
        "pairs_excluded": excluded.height,
    }


def run(cfg: RunConfig, inputs: StageInputs, out_dir: Path) -> StageOutput:
    result = split(cfg, inputs.output("extract", "pairs"), out_dir, inputs.run_id)
    outputs = {"images": result.images, "image_quarantine": result.image_quarantine, "pairs": result.pairs,
               "pairs_excluded": result.pairs_excluded, "leak_audit": result.leak_audit,
               "groups_sheet": result.groups_sheet}
    return StageOutput(outputs, result.summary)
