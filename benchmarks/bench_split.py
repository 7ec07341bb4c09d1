"""Split at scale, as shipped (SplitConfig's defaults: 16x16 pHash = 256 bits, distance 24, draft
decoding): hashing throughput on 800x800 JPEG photos, exact near-duplicate search and the leak audit
over 1M hashes, and the quality of near-duplicate grouping on the demo catalog.

    python benchmarks/bench_split.py                      # 1M hashes, 2,000 JPEGs, 600-product demo
    python benchmarks/bench_split.py --products 180000    # grouping quality on the mid-size-shop catalog

Hashing: `--jpegs` demo product photos drawn at 64 px, upscaled to 800x800 with sensor-like noise
and saved as JPEG quality 90 (a tenth also as re-uploaded near-duplicates), hashed by split's own
hash_catalog with empty caches: draft decoding (shipped) and full decoding, then a rerun over the
unchanged files (digests keyed by path, size, mtime). Search: 1M random 256-bit codes of which 5%
are copies with 0 to 24 bits flipped, through near_duplicate_pairs as split calls it, checked equal
to a brute-force flat scan on a sample of rows. Leak audit: the same codes, split 80/10/10.
Last line: one JSON object with the figures and the settings.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import time
from pathlib import Path

import faiss
import numpy as np
import polars as pl
from PIL import Image

from pipeline.config import SplitConfig
from pipeline.data.groups import connected_groups
from pipeline.data.leak_audit import leak_audit
from pipeline.data.near_duplicates import hash_catalog, hash_input_px, near_duplicate_pairs
from pipeline.demo.images import draw_look, near_duplicate, render_photo
from pipeline.demo.shop import CATEGORIES, COLOUR_NAMES, PATTERN_NAMES, generate

CACHE = Path(__file__).resolve().parent / ".cache"


def demo_catalog(products: int) -> Path:
    out = CACHE / f"split-demo-{products}"
    if not (out / "images.parquet").is_file():
        generate(out, products=products, sessions=1000, seed=0)
    return out


def hashing(shop: Path, cfg: SplitConfig) -> pl.DataFrame:
    """The demo catalog's hashes (for grouping quality)."""
    catalog = pl.read_parquet(shop / "images.parquet")
    cache = CACHE / "bench-hash-cache.parquet"
    cache.unlink(missing_ok=True)
    hashed, _ = hash_catalog(catalog["path"].to_list(), shop / "images", cfg, cache)
    cache.unlink(missing_ok=True)
    return pl.concat([catalog, hashed.drop("path")], how="horizontal")


def jpeg_photos(count: int, px: int, quality: int) -> tuple[Path, list[str], list[tuple[str, str]]]:
    """`count` product photos as px x px JPEGs, a tenth of them also re-uploaded as near-duplicates."""
    out = CACHE / f"jpeg-{count}-{px}-q{quality}"
    names = [f"p{i:06d}.jpg" for i in range(count)]
    planted = [(f"d{i:06d}.jpg", names[i]) for i in range(0, count, 10)]
    if (out / "done").exists():
        return out, names + [d for d, _ in planted], planted
    out.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for i, name in enumerate(names):
        look = draw_look(rng, CATEGORIES[i % len(CATEGORIES)], COLOUR_NAMES[i % len(COLOUR_NAMES)],
                         PATTERN_NAMES[i % len(PATTERN_NAMES)])
        small = render_photo(look, rng)
        for version, image in ((name, small), *((d, near_duplicate(small, rng)) for d, o in planted if o == name)):
            big = np.asarray(image.resize((px, px), Image.BICUBIC), dtype=np.float32)
            big += rng.normal(0, 6, big.shape)  # sensor-like grain: photo-sized files, not flat colour
            Image.fromarray(np.clip(big, 0, 255).astype(np.uint8)).save(out / version, quality=quality)
    (out / "done").touch()
    return out, names + [d for d, _ in planted], planted


def jpeg_hashing(count: int, px: int, quality: int, cfg: SplitConfig) -> dict:
    root, paths, planted = jpeg_photos(count, px, quality)
    figures = {"hash_images": len(paths), "hash_image_px": px, "hash_image_format": f"JPEG q{quality}",
               "hash_image_kb": round(sum((root / p).stat().st_size for p in paths) / len(paths) / 1024, 1)}
    hashes = {}
    for decode in ("draft", "full"):
        caches = (CACHE / "bench-jpeg-hashes.parquet", CACHE / "bench-jpeg-digests.parquet")
        for cache in caches:
            cache.unlink(missing_ok=True)
        run_cfg = cfg.model_copy(update={"decode": decode})
        started = time.perf_counter()
        hashed, _ = hash_catalog(paths, root, run_cfg, *caches)
        seconds = time.perf_counter() - started
        hashes[decode] = dict(zip(paths, hashed["hash"].to_list(), strict=True))
        key = "hash_images_per_s" if decode == cfg.decode else f"hash_images_per_s_{decode}_decode"
        figures[key] = round(len(paths) / seconds, 1)
        if decode == cfg.decode:  # the nightly rerun over an unchanged catalog: stat only
            started = time.perf_counter()
            _, stats = hash_catalog(paths, root, run_cfg, *caches)
            figures["rerun_seconds"] = round(time.perf_counter() - started, 2)
            figures["rerun_files_read"] = stats["read"]
        for cache in caches:
            cache.unlink(missing_ok=True)
        distance = [bin(int(hashes[decode][d], 16) ^ int(hashes[decode][o], 16)).count("1") for d, o in planted]
        figures[f"planted_recall_{decode}_decode"] = round(float(np.mean([x <= cfg.max_distance
                                                                          for x in distance])), 4)
    gaps = [bin(int(hashes["draft"][p], 16) ^ int(hashes["full"][p], 16)).count("1") for p in paths]
    figures["draft_vs_full_mean_bits"] = round(float(np.mean(gaps)), 2)
    figures["draft_vs_full_max_bits"] = int(max(gaps))
    return figures


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


def planted_hashes(n: int, bits: int, t: int, seed: int = 0) -> np.ndarray:
    """n random `bits`-bit codes: 95% random, 5% copies of them with 0 to t bits flipped."""
    rng = np.random.default_rng(seed)
    codes = rng.integers(0, 256, size=(n - n // 20, bits // 8), dtype=np.uint8)
    planted = codes[rng.integers(0, len(codes), n // 20)].copy()
    for row in planted:
        for bit in rng.choice(bits, int(rng.integers(0, t + 1)), replace=False):
            row[bit // 8] ^= np.uint8(1 << (bit % 8))
    return np.concatenate([codes, planted])


def search(n: int, bits: int, t: int, sample: int) -> dict:
    codes = planted_hashes(n, bits, t)
    hexes = [c.tobytes().hex() for c in codes]
    near_duplicate_pairs(hexes[:60_000], t)  # compiles the kernel (numba caches it on disk after the first run)
    started = time.perf_counter()
    pairs = near_duplicate_pairs(hexes, t)
    seconds = time.perf_counter() - started
    flat = faiss.IndexBinaryFlat(bits)
    flat.add(codes)
    rows = np.random.default_rng(1).choice(n, sample, replace=False)
    started = time.perf_counter()
    lims, _, neighbours = flat.range_search(codes[rows], t + 1)
    brute = (time.perf_counter() - started) * n / sample
    expected = {(min(int(r), int(j)), max(int(r), int(j))) for q, r in enumerate(rows)
                for j in neighbours[lims[q]:lims[q + 1]] if j != r}
    chosen = set(rows.tolist())
    found = {(int(i), int(j)) for i, j in pairs if int(i) in chosen or int(j) in chosen}
    split = np.random.default_rng(2).choice(["train"] * 8 + ["val", "test"], n)
    images = pl.DataFrame({"image_id": [f"i{j}" for j in range(n)], "hash": hexes,
                           "digest": [f"d{j}" for j in range(n)], "product_id": [None] * n, "split": split})
    started = time.perf_counter()
    audit = leak_audit(images, t)
    audit_seconds = time.perf_counter() - started
    return {"search_hashes": n, "search_seconds": round(seconds, 2), "search_pairs": len(pairs),
            "exact_on_sample": found == expected, "sample_rows": sample, "sample_pairs": len(expected),
            "brute_force_seconds_extrapolated": round(brute, 1), "leak_audit_seconds": round(audit_seconds, 2),
            "leak_audit_links_crossing": audit["near_duplicate_links_crossing"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--products", type=int, default=600)
    parser.add_argument("--hashes", type=int, default=1_000_000)
    parser.add_argument("--jpegs", type=int, default=2000)
    parser.add_argument("--jpeg-px", type=int, default=800)
    parser.add_argument("--brute-sample", type=int, default=2_000)
    parser.add_argument("--fresh", action="store_true", help="regenerate the demo catalog")
    parser.add_argument("--sweep", default="", help="also report grouping quality at these distances, e.g. 24,32")
    args = parser.parse_args()
    cfg = SplitConfig()
    bits = cfg.hash_size**2
    settings = {"hash": cfg.hash, "hash_bits": bits, "max_distance": cfg.max_distance, "decode": cfg.decode,
                "hash_input_px": hash_input_px(cfg.hash, cfg.hash_size), "cores": os.cpu_count()}
    print("settings: " + ", ".join(f"{k} {v}" for k, v in settings.items()))
    figures = jpeg_hashing(args.jpegs, args.jpeg_px, 90, cfg)
    print(f"hashing {figures['hash_images']:,} {args.jpeg_px}x{args.jpeg_px} JPEGs ({figures['hash_image_kb']} KB): "
          f"{figures['hash_images_per_s']:,.0f} images/s with {cfg.decode} decoding, "
          f"{figures['hash_images_per_s_full_decode']:,.0f} with full decoding; rerun over the unchanged catalog "
          f"{figures['rerun_seconds']} s ({figures['rerun_files_read']} files read); draft vs full hash: mean "
          f"{figures['draft_vs_full_mean_bits']} bits, max {figures['draft_vs_full_max_bits']}; planted recall "
          f"draft {figures['planted_recall_draft_decode']}, full {figures['planted_recall_full_decode']}")
    figures.update(search(args.hashes, bits, cfg.max_distance, args.brute_sample))
    print(f"near-duplicate search: {args.hashes:,} {bits}-bit hashes at t={cfg.max_distance} in "
          f"{figures['search_seconds']} s ({figures['search_pairs']:,} pairs; equal to brute force on "
          f"{args.brute_sample} rows: {figures['exact_on_sample']}); brute force extrapolated "
          f"{figures['brute_force_seconds_extrapolated']} s; leak audit {figures['leak_audit_seconds']} s")
    if args.fresh:
        shutil.rmtree(CACHE / f"split-demo-{args.products}", ignore_errors=True)
    shop = demo_catalog(args.products)
    hashed = hashing(shop, cfg)
    recall, merge_rate = grouping_quality(shop, hashed, cfg.max_distance)
    print(f"grouping the {args.products}-product demo at max_distance {cfg.max_distance}: planted recall "
          f"{recall:.3f}, groups mixing products by hash alone {merge_rate:.2%}")
    for distance in (int(d) for d in args.sweep.split(",") if d):
        r, m = grouping_quality(shop, hashed, distance)
        print(f"  at max_distance {distance}: planted recall {r:.3f}, mixing {m:.2%}")
    print(json.dumps({**settings, **figures, "planted_recall": round(recall, 4),
                      "cross_product_merge_rate": round(merge_rate, 4), "demo_products": args.products}))


if __name__ == "__main__":
    main()
