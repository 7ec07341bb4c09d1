"""The leak audit: an independent re-check that no near-duplicate, identical file or product links
two splits. It shares no code with the grouping in groups.py; it brute-forces the hash links."""

from __future__ import annotations

import faiss
import numpy as np
import polars as pl


def _crossing_hash_links(images: pl.DataFrame, max_distance: int) -> list[tuple[str, str]]:
    codes = np.stack([np.frombuffer(bytes.fromhex(h), dtype=np.uint8) for h in images["hash"]])
    index = faiss.IndexBinaryFlat(codes.shape[1] * 8)
    index.add(codes)
    lims, _, neighbours = index.range_search(codes, max_distance + 1)
    ids, splits = images["image_id"].to_list(), images["split"].to_list()
    crossing = []
    for i in range(len(ids)):
        for j in neighbours[lims[i]:lims[i + 1]]:
            if i < j and splits[i] != splits[j]:
                crossing.append((ids[i], ids[int(j)]))
    return crossing


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
