"""Perceptual hashes of catalog images and every pair of hashes within a Hamming distance.

Hashes are cached by the file's content digest (sha256), so a nightly run decodes and hashes
only new or changed files.
"""

from __future__ import annotations

import hashlib
import os
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import faiss
import imagehash
import numpy as np
import polars as pl
from rich.progress import Progress

from pipeline.config import SplitConfig
from pipeline.images import UnusableImage, load_rgb, resolve_image_path

HASHERS = {"phash": imagehash.phash, "dhash": imagehash.dhash, "whash": imagehash.whash,
           "average_hash": imagehash.average_hash}
FLAT_SEARCH_LIMIT = 50_000  # below this many hashes the brute-force flat index is faster
# a file that failed to decode is cached with its reason too: the same bytes fail the same way
CACHE_SCHEMA = {"digest": pl.Utf8, "method": pl.Utf8, "hash_size": pl.Int32, "hash": pl.Utf8, "reason": pl.Utf8}


def _digest_one(args: tuple[str, str]) -> tuple[str | None, str | None]:
    """(sha256 of the file, None) or (None, reason) for one catalog path; runs in a worker."""
    root, relative = args
    try:
        path = resolve_image_path(Path(root), relative)
    except UnusableImage as exc:
        return None, exc.reason
    if not path.is_file():
        return None, "missing_file"
    if path.stat().st_size == 0:
        return None, "empty_file"
    return hashlib.sha256(path.read_bytes()).hexdigest(), None


def _hash_one(args: tuple[str, str, str, int]) -> tuple[str | None, str | None]:
    """(hex hash, None) or (None, reason) for one image; runs in a worker process."""
    root, relative, method, size = args
    try:
        image = load_rgb(resolve_image_path(Path(root), relative))
    except UnusableImage as exc:
        return None, exc.reason
    return str(HASHERS[method](image, hash_size=size)), None


def _parallel(function, jobs: list, description: str) -> list:
    workers = max(1, min(os.cpu_count() or 1, 8))
    results = []
    with Progress(transient=False) as progress, ProcessPoolExecutor(workers) as pool:
        task = progress.add_task(description, total=len(jobs))
        for result in pool.map(function, jobs, chunksize=64):
            results.append(result)
            progress.advance(task)
    return results


def read_hash_cache(path: Path) -> pl.DataFrame:
    return pl.read_parquet(path) if path.is_file() else pl.DataFrame(schema=CACHE_SCHEMA)


def hash_catalog(paths: list[str], root: Path, cfg: SplitConfig, cache_path: Path) -> tuple[pl.DataFrame, dict]:
    """Digest, hash and reason per catalog path (in order), hashing only files the cache lacks.

    Returns a frame (path, digest, hash, reason) and counts {hashed, from_cache}."""
    digests = _parallel(_digest_one, [(str(root), p) for p in paths], "reading images")
    cache = read_hash_cache(cache_path).filter(
        (pl.col("method") == cfg.hash) & (pl.col("hash_size") == cfg.hash_size))
    known = {d: (h, r) for d, h, r in zip(cache["digest"], cache["hash"], cache["reason"], strict=True)}
    todo = sorted({i for i, (digest, _) in enumerate(digests) if digest and digest not in known},
                  key=lambda i: paths[i])
    hashed = _parallel(_hash_one, [(str(root), paths[i], cfg.hash, cfg.hash_size) for i in todo], "hashing images")
    fresh = dict(zip(todo, hashed, strict=True))
    rows = []
    for i, (digest, reason) in enumerate(digests):
        if reason is not None:
            rows.append((paths[i], None, None, reason))
        else:
            rows.append((paths[i], digest, *(fresh[i] if i in fresh else known[digest])))
    result = pl.DataFrame(rows, schema={"path": pl.Utf8, "digest": pl.Utf8, "hash": pl.Utf8, "reason": pl.Utf8},
                          orient="row")
    if todo:
        _add_to_cache(cache_path, result[todo], cfg)
    return result, {"hashed": len(todo), "from_cache": sum(1 for d, _ in digests if d and d in known)}


def _add_to_cache(cache_path: Path, fresh: pl.DataFrame, cfg: SplitConfig) -> None:
    entries = fresh.select("digest", pl.lit(cfg.hash).alias("method"),
                           pl.lit(cfg.hash_size, pl.Int32).alias("hash_size"), "hash", "reason")
    merged = pl.concat([read_hash_cache(cache_path), entries]).unique(["digest", "method", "hash_size"],
                                                                      keep="first", maintain_order=True)
    cache_path.parent.mkdir(parents=True, exist_ok=True)
    tmp = cache_path.with_suffix(".tmp")
    merged.write_parquet(tmp)
    os.replace(tmp, cache_path)


def near_duplicate_pairs(hex_hashes: list[str], max_distance: int, method: str = "auto") -> np.ndarray:
    """Every index pair (i < j) whose hashes differ in at most `max_distance` bits, shape (P, 2).

    Exact either way: a brute-force flat index for small inputs; above that, multi-index hashing
    (FAISS IndexBinaryMultiHash): with m chunks of b bits cut from the code, two codes within
    distance t differ in at most t // m bits on some chunk (pigeonhole), and every such flip is
    probed, so no pair is missed and far fewer than all pairs are compared. b ~ log2(N) keeps the
    buckets small.
    `method` forces "flat" or "multihash"; "auto" picks by size."""
    if not hex_hashes:
        return np.zeros((0, 2), dtype=np.int64)
    codes = np.stack([np.frombuffer(bytes.fromhex(h), dtype=np.uint8) for h in hex_hashes])
    bits = codes.shape[1] * 8
    chunk_bits = int(min(24, max(16, np.ceil(np.log2(len(codes))))))
    chunks = bits // chunk_bits
    if method == "auto":
        # probing 3+ flips per chunk costs more than the brute force it avoids
        cheap = max_distance // max(chunks, 1) <= 2
        method = "multihash" if len(codes) > FLAT_SEARCH_LIMIT and chunks and cheap else "flat"
    if method == "flat":
        index = faiss.IndexBinaryFlat(bits)
    else:
        index = faiss.IndexBinaryMultiHash(bits, chunks, chunk_bits)
        index.nflip = max_distance // chunks
    index.add(codes)
    lims, _, neighbours = index.range_search(codes, max_distance + 1)  # radius is exclusive
    rows = np.repeat(np.arange(len(codes)), np.diff(lims.astype(np.int64)))
    keep = rows < neighbours
    return np.stack([rows[keep], neighbours[keep]], axis=1).astype(np.int64)
