"""Evaluation at scale: embedding throughput and search time, exact and approximate.

    python benchmarks/bench_eval.py                         # tiny model, 180,000-image gallery, 10,000 queries
    python benchmarks/bench_eval.py --model ViT-B-32        # the production-size towers (random weights)

Embedding throughput is measured on a sample of demo catalog photos and queries (decoding and
preprocessing included, as in the evaluate stage). Search runs over a gallery of the model's
embedding size: clustered synthetic vectors (products come in look-alike families, so a
structureless random gallery would flatter neither index), L2-normalised like real embeddings.
Exact = FAISS IndexFlatIP (GPU when FAISS has one and a GPU is visible); approximate = the HNSW
index evaluate switches to above `evaluate.ann_min_gallery`, with its recall of the exact top k.
Last line: one JSON object with the figures.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import polars as pl

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pipeline.config import TrainConfig  # noqa: E402
from pipeline.demo.shop import generate  # noqa: E402
from pipeline.retrieval.search import flat_index, gpu_available, normalise, search  # noqa: E402
from pipeline.training.model import (  # noqa: E402
    default_decode_workers,
    embed_image_files,
    embed_texts,
    starting_model,
    to_best_device,
)

CACHE = Path(__file__).resolve().parent / ".cache"


def clustered(n: int, dim: int, clusters: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((clusters, dim)).astype(np.float32)
    members = rng.integers(0, clusters, n)
    return normalise(centres[members] + 0.35 * rng.standard_normal((n, dim)).astype(np.float32))


def embedding_throughput(model: str, sample: int) -> tuple[float, float, int, str]:
    shop = CACHE / "eval-demo-600"
    if not (shop / "images.parquet").is_file():
        generate(shop, products=600, sessions=1000, seed=0)
    broken = set(json.loads((shop / "truth" / "planted.json").read_text())["broken_images"])
    catalog = pl.read_parquet(shop / "images.parquet").filter(~pl.col("image_id").is_in(broken))
    paths = catalog["path"].to_list()
    paths = (paths * (sample // len(paths) + 1))[:sample]
    queries = [f"{colour} {thing}" for colour in ("navy", "red", "olive", "striped", "linen")
               for thing in ("dress", "trainers", "mug", "lamp", "coat", "beanie cap")] * (sample // 30 + 1)
    bundle = starting_model(TrainConfig(model=model))
    embed_device = to_best_device(bundle)
    started = time.perf_counter()
    # as the evaluate stage does: decoding in worker processes (on a GPU machine), batches of 256
    gallery = embed_image_files(bundle, shop / "images", paths, 256, default_decode_workers())
    images_per_s = len(paths) / (time.perf_counter() - started)
    started = time.perf_counter()
    embed_texts(bundle, queries[:sample], 256)
    queries_per_s = sample / (time.perf_counter() - started)
    return images_per_s, queries_per_s, gallery.shape[1], embed_device


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="ClickCLIP-Tiny")
    parser.add_argument("--gallery", type=int, default=180_000)
    parser.add_argument("--queries", type=int, default=10_000)
    parser.add_argument("--embed-sample", type=int, default=512)
    parser.add_argument("--k", type=int, default=50)
    args = parser.parse_args()
    device = "gpu" if gpu_available() else "cpu"

    images_per_s, queries_per_s, dim, embed_device = embedding_throughput(args.model, args.embed_sample)
    print(f"embedding ({args.model} on {embed_device}): "
          f"{images_per_s:,.1f} images/s, {queries_per_s:,.0f} queries/s")
    gallery = clustered(args.gallery, dim, clusters=max(10, args.gallery // 50), seed=0)
    queries = clustered(args.queries, dim, clusters=max(10, args.gallery // 50), seed=0)[: args.queries]
    queries = normalise(queries + 0.2 * np.random.default_rng(1).standard_normal(queries.shape).astype(np.float32))

    started = time.perf_counter()
    _, exact = flat_index(gallery, device == "gpu").search(queries, args.k)
    exact_seconds = time.perf_counter() - started
    print(f"exact search ({device}): {args.queries:,} queries x {args.gallery:,} images in {exact_seconds:.2f} s")
    _, info = search(queries, gallery, args.k, ann_min_gallery=1, use_gpu=device == "gpu")
    print(f"HNSW (cpu): built in {info.build_seconds:.2f} s, searched in {info.seconds:.2f} s; recall of the "
          f"exact top {args.k}: {info.ann_recall_vs_exact:.4f}")
    print(json.dumps({
        "device": device, "embed_device": embed_device, "model": args.model, "gallery": args.gallery,
        "queries": args.queries,
        "embed_images_per_s": round(images_per_s, 1), "embed_queries_per_s": round(queries_per_s, 1),
        "exact_search_seconds": round(exact_seconds, 2), "ann_search_seconds": round(info.seconds, 2),
        "ann_build_seconds": round(info.build_seconds, 2),
        "ann_recall_vs_exact": info.ann_recall_vs_exact,
    }))


if __name__ == "__main__":
    main()
