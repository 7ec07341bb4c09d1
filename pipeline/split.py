"""Split: perceptual hashes, near-duplicate + same-product groups, leak-free train/val/test.

Outputs in `runs/<id>/split/`: `images.parquet` (usable catalog rows with hash, group and split),
`image_quarantine.parquet` (catalog rows that cannot be used, with a reason), `pairs.parquet`
(extract's pairs with the split of their image), `pairs_excluded.parquet` (pairs whose image was
quarantined) and `leak_audit.json`.
"""

from __future__ import annotations

import hashlib
import json
import os
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import faiss
import imagehash
import numpy as np
import polars as pl
from rich.progress import Progress
from scipy.sparse import coo_matrix
from scipy.sparse.csgraph import connected_components

from pipeline.config import RunConfig, SplitConfig, SplitFractions
from pipeline.contract import IMAGES, open_source
from pipeline.errors import LeakError
from pipeline.extract import connect
from pipeline.images import UnusableImage, load_rgb, resolve_image_path

HASHERS = {"phash": imagehash.phash, "dhash": imagehash.dhash, "whash": imagehash.whash,
           "average_hash": imagehash.average_hash}


@dataclass(frozen=True)
class SplitResult:
    images: Path
    image_quarantine: Path
    pairs: Path
    pairs_excluded: Path
    leak_audit: Path
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


def _hash_one(args: tuple[str, str, str, int]) -> tuple[str | None, str | None]:
    """(hex hash, None) or (None, reason) for one image; runs in a worker process."""
    root, relative, method, size = args
    try:
        image = load_rgb(resolve_image_path(Path(root), relative))
    except UnusableImage as exc:
        return None, exc.reason
    return str(HASHERS[method](image, hash_size=size)), None


def hash_images(paths: list[str], root: Path, cfg: SplitConfig) -> list[tuple[str | None, str | None]]:
    jobs = [(str(root), p, cfg.hash, cfg.hash_size) for p in paths]
    workers = max(1, min(os.cpu_count() or 1, 8))
    results = []
    with Progress(transient=False) as progress, ProcessPoolExecutor(workers) as pool:
        task = progress.add_task("hashing images", total=len(jobs))
        for result in pool.map(_hash_one, jobs, chunksize=64):
            results.append(result)
            progress.advance(task)
    return results


def near_duplicate_pairs(hex_hashes: list[str], max_distance: int) -> np.ndarray:
    """All index pairs (i < j) whose hashes differ in at most `max_distance` bits, shape (P, 2).

    FAISS's binary flat index does the Hamming range search exactly."""
    if not hex_hashes:
        return np.zeros((0, 2), dtype=np.int64)
    codes = np.stack([np.frombuffer(bytes.fromhex(h), dtype=np.uint8) for h in hex_hashes])
    index = faiss.IndexBinaryFlat(codes.shape[1] * 8)
    index.add(codes)
    lims, _, neighbours = index.range_search(codes, max_distance + 1)  # radius is exclusive
    rows = np.repeat(np.arange(len(codes)), np.diff(lims.astype(np.int64)))
    keep = rows < neighbours
    return np.stack([rows[keep], neighbours[keep]], axis=1).astype(np.int64)


def same_product_pairs(product_ids: list[str | None]) -> np.ndarray:
    """Edges that chain every image of a product to the first image of that product, shape (P, 2)."""
    first: dict[str, int] = {}
    edges = []
    for i, product in enumerate(product_ids):
        if product is None:
            continue
        if product in first:
            edges.append((first[product], i))
        else:
            first[product] = i
    return np.array(edges, dtype=np.int64).reshape(-1, 2)


def connected_groups(n: int, edges: np.ndarray) -> np.ndarray:
    """Component label per node; scipy's union of all edges."""
    graph = coo_matrix((np.ones(len(edges)), (edges[:, 0], edges[:, 1])), shape=(n, n))
    return connected_components(graph, directed=False)[1]


def stable_split(group_key: str, salt: str, fractions: SplitFractions) -> str:
    """train/val/test from a salted sha256 of the group key: the same group always lands alike."""
    digest = hashlib.sha256(f"{salt}:{group_key}".encode()).digest()
    u = int.from_bytes(digest[:8], "big") / 2**64
    if u < fractions.train:
        return "train"
    return "val" if u < fractions.train + fractions.val else "test"


def leak_audit(images: pl.DataFrame, max_distance: int) -> dict:
    """Independent check: recompute hash and product links and count those that cross splits."""
    splits = images["split"].to_numpy()
    crossing_hash = [
        (images["image_id"][int(i)], images["image_id"][int(j)])
        for i, j in near_duplicate_pairs(images["hash"].to_list(), max_distance)
        if splits[i] != splits[j]
    ]
    per_product = (images.filter(pl.col("product_id").is_not_null())
                   .group_by("product_id").agg(pl.col("split").n_unique().alias("splits")))
    crossing_products = per_product.filter(pl.col("splits") > 1)["product_id"].to_list()
    return {
        "passed": not crossing_hash and not crossing_products,
        "images": images.height,
        "max_distance": max_distance,
        "near_duplicate_links_crossing": len(crossing_hash),
        "products_crossing": len(crossing_products),
        "examples": {"hash": crossing_hash[:10], "products": crossing_products[:10]},
    }


def split(cfg: RunConfig, pairs_path: Path, out_dir: Path) -> SplitResult:
    """Hash, group and split the catalog, then tag extract's pairs with their image's split."""
    catalog = read_catalog(cfg)
    catalog = catalog.with_columns(catalog_problems(catalog, cfg.data.image_root))
    todo = catalog.filter(pl.col("reason").is_null())
    hashed = hash_images(todo["path"].to_list(), cfg.data.image_root, cfg.split)
    todo = todo.with_columns(pl.Series("hash", [h for h, _ in hashed], dtype=pl.Utf8),
                             pl.Series("reason", [r for _, r in hashed], dtype=pl.Utf8))
    quarantine = pl.concat([catalog.filter(pl.col("reason").is_not_null()),
                            todo.filter(pl.col("reason").is_not_null()).drop("hash")])
    good = todo.filter(pl.col("reason").is_null()).drop("reason")

    hash_edges = near_duplicate_pairs(good["hash"].to_list(), cfg.split.max_distance)
    edges = np.concatenate([hash_edges, same_product_pairs(good["product_id"].to_list())])
    labels = connected_groups(good.height, edges)
    group_keys = good.select(pl.Series("label", labels), "image_id").group_by("label").agg(
        pl.col("image_id").min().alias("group_id"))
    good = good.with_columns(pl.Series("label", labels)).join(group_keys, on="label").drop("label")
    good = good.with_columns(pl.col("group_id").map_elements(
        lambda g: stable_split(g, cfg.split.salt, cfg.split.fractions), return_dtype=pl.Utf8).alias("split"))
    good = good.sort("image_id")

    audit = leak_audit(good, cfg.split.max_distance)
    paths = {name: out_dir / f"{name}.parquet" for name in ("images", "image_quarantine", "pairs", "pairs_excluded")}
    audit_path = out_dir / "leak_audit.json"
    audit_path.write_text(json.dumps(audit, indent=2))
    if not audit["passed"]:
        raise LeakError(f"leak audit failed: {audit['near_duplicate_links_crossing']} near-duplicate links and "
                        f"{audit['products_crossing']} products cross splits; see {audit_path}")

    pairs = pl.read_parquet(pairs_path)
    tagged = pairs.join(good.select("image_id", "split", "group_id"), on="image_id", how="left")
    excluded = tagged.filter(pl.col("split").is_null()).drop("split", "group_id").join(
        quarantine.select("image_id", pl.col("reason").alias("image_reason")).unique("image_id"),
        on="image_id", how="left").with_columns(pl.lit("image_quarantined").alias("reason"))
    good.write_parquet(paths["images"])
    quarantine.sort("source_row").write_parquet(paths["image_quarantine"])
    tagged.filter(pl.col("split").is_not_null()).write_parquet(paths["pairs"])
    excluded.write_parquet(paths["pairs_excluded"])
    summary = _summary(catalog, good, quarantine, hash_edges, tagged, excluded)
    return SplitResult(paths["images"], paths["image_quarantine"], paths["pairs"], paths["pairs_excluded"],
                       audit_path, summary)


def _summary(catalog, good, quarantine, hash_edges, tagged, excluded) -> dict:
    group_sizes = good.group_by("group_id").len()["len"]
    return {
        "catalog_rows": catalog.height,
        "images_kept": good.height,
        "images_quarantined": quarantine.height,
        "images_quarantined_by_reason": dict(quarantine.group_by("reason").len().iter_rows()),
        "near_duplicate_pairs": int(len(hash_edges)),
        "groups": int(group_sizes.len()),
        "largest_group": int(group_sizes.max() or 0),
        "images_by_split": dict(good.group_by("split").len().sort("split").iter_rows()),
        "pairs_by_split": dict(tagged.filter(pl.col("split").is_not_null())
                               .group_by("split").len().sort("split").iter_rows()),
        "pairs_excluded": excluded.height,
    }
