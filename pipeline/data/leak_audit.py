"""The leak audit: an independent re-check that no near-duplicate, identical file or product links
two splits. It shares no code with the grouping in groups.py or the near-duplicate search: its
hash links come from FAISS's own range search (flat, or multi-hash at catalog scale)."""

from __future__ import annotations

import faiss
import numpy as np
import polars as pl

# above this many images the audit probes a FAISS multi-hash index instead of a flat scan
FLAT_AUDIT_LIMIT = 50_000


def _index(codes: np.ndarray, max_distance: int):
    """A FAISS binary index whose range search is exact: flat for small catalogs; above that
    IndexBinaryMultiHash cut into `chunks` disjoint `b`-bit slices probed with every flip of up to
    max_distance // chunks bits (pigeonhole: two codes within the distance agree that closely on a
    slice), so it compares only codes that share a probed bucket."""
    bits = codes.shape[1] * 8
    if len(codes) <= FLAT_AUDIT_LIMIT:
        index = faiss.IndexBinaryFlat(bits)
    else:
        b = min(20, max(8, int(np.log2(len(codes)))))  # about one code per bucket
        chunks = bits // b
        index = faiss.IndexBinaryMultiHash(bits, chunks, b)
        index.nflip = max_distance // chunks
    index.add(codes)
    return index


def _crossing_hash_links(images: pl.DataFrame, max_distance: int) -> list[tuple[str, str]]:
    """Every pair of images in different splits whose hashes are within max_distance. A crossing
    pair has an image outside the largest split, so only those images are searched for."""
    codes = np.stack([np.frombuffer(bytes.fromhex(h), dtype=np.uint8) for h in images["hash"]])
    ids, splits = images["image_id"].to_list(), images["split"].to_list()
    largest = images["split"].value_counts(sort=True)["split"][0]
    queries = np.flatnonzero(images["split"].to_numpy() != largest)
    if not len(queries):
        return []
    lims, _, neighbours = _index(codes, max_distance).range_search(codes[queries], max_distance + 1)
    crossing = set()
    for q, i in enumerate(queries.tolist()):
        for j in neighbours[lims[q]:lims[q + 1]].tolist():
            if splits[i] != splits[j]:
                crossing.add((min(i, j), max(i, j)))
    return [(ids[i], ids[j]) for i, j in sorted(crossing)]


def _keys_in_several_splits(images: pl.DataFrame, key: str) -> list[str]:
    spread = images.filter(pl.col(key).is_not_null()).group_by(key).agg(pl.col("split").n_unique().alias("n"))
    return sorted(spread.filter(pl.col("n") > 1)[key].to_list())


def leak_audit(images: pl.DataFrame, max_distance: int) -> dict:
    """Check images (image_id, hash, digest, product_id, split); excluded images take no part."""
    used = images.filter(pl.col("split") != "excluded")
    hash_links = _crossing_hash_links(used, max_distance) if used.height else []
    files = _keys_in_several_splits(used, "digest")
    products = _keys_in_several_splits(used, "product_id")
    return {
        "passed": not hash_links and not files and not products,
        "images_checked": used.height,
        "images_excluded": images.height - used.height,
        "max_distance": max_distance,
        "near_duplicate_links_crossing": len(hash_links),
        "identical_files_crossing": len(files),
        "products_crossing": len(products),
        "examples": {"near_duplicates": hash_links[:10], "identical_files": files[:10], "products": products[:10]},
    }
