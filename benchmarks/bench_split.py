"""Split at scale: hashing throughput, exact near-duplicate search over 1M hashes, and the
quality of near-duplicate grouping on the demo catalog (planted recall, cross-product merges).

    python benchmarks/bench_split.py --products 180000   # the mid-size-shop catalog

Last line: one JSON object with the figures.
"""

from __future__ import annotations

import argparse
import json
import shutil
import time
from pathlib import Path

import faiss
import numpy as np
import polars as pl

from pipeline.config import SplitConfig
from pipeline.data.groups import connected_groups
from pipeline.data.near_duplicates import hash_catalog, near_duplicate_pairs
from pipeline.demo.shop import generate

CACHE = Path(__file__).resolve().parent / ".cache"


def demo_catalog(products: int) -> Path:
    out = CACHE / f"split-demo-{products}"
    if not (out / "images.parquet").is_file():
        generate(out, products=products, sessions=1000, seed=0)
    return out


def hashing(shop: Path, cfg: SplitConfig) -> tuple[float, pl.DataFrame]:
    catalog = pl.read_parquet(shop / "images.parquet")
    cache = CACHE / "bench-hash-cache.parquet"
    cache.unlink(missing_ok=True)  # measure hashing, not the cache
    started = time.perf_counter()
    hashed, _ = hash_catalog(catalog["path"].to_list(), shop / "images", cfg, cache)
    seconds = time.perf_counter() - started
    cache.unlink(missing_ok=True)
    return catalog.height / seconds, pl.concat([catalog, hashed.drop("path")], how="horizontal")


def grouping_quality(shop: Path, hashed: pl.DataFrame, max_distance: int) -> tuple[float, float]:
    """Planted-duplicate recall and the share of hash-only groups that mix true products."""
    good = hashed.filter(pl.col("hash").is_not_null())
    labels = connected_groups(good.height, near_duplicate_pairs(good["hash"].to_list(), max_distance))
    group = dict(zip(good["image_id"], labels, strict=True))
    dups = pl.read_parquet(shop / "truth" / "duplicates.parquet")
    found = [group[a] == group[b] for a, b in dups.iter_rows() if a in group and b in group]
    original_of = dict(dups.iter_rows())
    product_of = dict(zip(good["image_id"], good["product_id"], strict=True))
    true_product = [product_of[original_of.get(i, i)] for i in good["image_id"]]
    frame = pl.DataFrame({"group": labels, "product": true_product})
    per_group = frame.group_by("group").agg(pl.col("product").n_unique().alias("products"))
    return sum(found) / max(1, len(found)), float((per_group["products"] > 1).mean())


def planted_hashes(n: int, seed: int = 0) -> np.ndarray:
    """n 64-bit codes: 95% random, 5% copies of them with 0 to 8 bits flipped."""
    rng = np.random.default_rng(seed)
    codes = rng.integers(0, 256, size=(n - n // 20, 8), dtype=np.uint8)
    planted = codes[rng.integers(0, len(codes), n // 20)].copy()
    for row in planted:
        for bit in rng.choice(64, int(rng.integers(0, 9)), replace=False):
            row[bit // 8] ^= np.uint8(1 << (bit % 8))
    return np.concatenate([codes, planted])


def search(n: int, t: int, sample: int) -> tuple[float, float, int]:
    codes = planted_hashes(n)
    hexes = [c.tobytes().hex() for c in codes]
    started = time.perf_counter()
    pairs = near_duplicate_pairs(hexes, t, method="multihash")
    seconds = time.perf_counter() - started
    flat = faiss.IndexBinaryFlat(64)
    flat.add(codes)
    started = time.perf_counter()
    flat.range_search(codes[:sample], t + 1)
    brute = (time.perf_counter() - started) * n / sample
    return seconds, brute, len(pairs)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--products", type=int, default=600)
    parser.add_argument("--hashes", type=int, default=1_000_000)
    parser.add_argument("--distance", type=int, default=8)
    parser.add_argument("--brute-sample", type=int, default=20_000)
    parser.add_argument("--fresh", action="store_true", help="regenerate the demo catalog")
    parser.add_argument("--sweep", default="", help="also report grouping quality at these distances, e.g. 24,32")
    args = parser.parse_args()
    cfg = SplitConfig()
    if args.fresh:
        shutil.rmtree(CACHE / f"split-demo-{args.products}", ignore_errors=True)
    shop = demo_catalog(args.products)
    per_s, hashed = hashing(shop, cfg)
    print(f"hashing: {hashed.height:,} images at {per_s:,.0f} images/s ({cfg.hash}, {cfg.hash_size}x{cfg.hash_size})")
    recall, merge_rate = grouping_quality(shop, hashed, cfg.max_distance)
    print(f"grouping at max_distance {cfg.max_distance}: planted recall {recall:.3f}, "
          f"groups mixing products by hash alone {merge_rate:.2%}")
    for distance in (int(d) for d in args.sweep.split(",") if d):
        r, m = grouping_quality(shop, hashed, distance)
        print(f"  at max_distance {distance}: planted recall {r:.3f}, mixing {m:.2%}")
    seconds, brute, pairs = search(args.hashes, args.distance, args.brute_sample)
    print(f"near-duplicate search: {args.hashes:,} hashes at t={args.distance} in {seconds:.1f} s "
          f"({pairs:,} pairs); brute force extrapolated {brute:.1f} s (x{brute / seconds:.1f})")
    print(json.dumps({
        "hash_images_per_s": round(per_s, 1), "hash_images": hashed.height, "search_hashes": args.hashes,
        "search_seconds": round(seconds, 2), "brute_force_seconds_extrapolated": round(brute, 1),
        "planted_recall": round(recall, 4), "cross_product_merge_rate": round(merge_rate, 4),
    }))


if __name__ == "__main__":
    main()
