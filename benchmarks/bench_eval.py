"""Evaluation at scale: embedding throughput and search time, exact and approximate.

    python benchmarks/bench_eval.py                         # tiny model, 180,000-image gallery, 10,000 queries
    python benchmarks/bench_eval.py --model ViT-B-32        # the production-size towers (random weights)
    python benchmarks/bench_eval.py --photos 400 --model ViT-B-32   # + catalog re-embed on 800x800 JPEGs

`--photos N`: N generated 800x800 JPEG product photos (quality 90, bench_split's generator)
through embed_image_files as evaluate and publish call it, once with the PyTorch image tower and
once with the exported tower on onnxruntime (OnnxImageEncoder), on the same threads: the figure
behind "is a nightly CPU re-embed of the catalog enough?". Decoding alone is timed too.

Embedding throughput is measured on a sample of demo catalog photos and queries (decoding and
preprocessing included, as in the evaluate stage). Search runs over a gallery of the model's
embedding size: clustered synthetic vectors (products come in look-alike families, so a
structureless random gallery would flatter neither index), L2-normalised like real embeddings.
Exact = retrieval.search.exact_search as evaluate runs it (torch matmul + top-k on a visible GPU,
FAISS IndexFlatIP on CPU); approximate = the HNSW
index evaluate switches to above `evaluate.ann_min_gallery`, with its recall of the exact top k.
Last line: one JSON object with the figures.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import polars as pl

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pipeline.config import TrainConfig  # noqa: E402
from pipeline.demo.shop import generate  # noqa: E402
from pipeline.retrieval.search import exact_search, normalise, search  # noqa: E402
from pipeline.training.model import (  # noqa: E402
    _ImageFiles,
    default_decode_workers,
    embed_image_files,
    embed_texts,
    save_checkpoint,
    split_transform,
    starting_model,
    to_best_device,
)
from pipeline.training.onnx_export import OnnxImageEncoder, export_onnx  # noqa: E402

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


def photo_embedding(model: str, count: int, batch: int) -> dict:
    """Catalog re-embedding of 800x800 JPEG q90 photos on this machine's CPU: torch vs onnxruntime."""
    import torch
    from bench_split import jpeg_photos

    root, paths, _ = jpeg_photos(2000 if count > 200 else 200, 800, 90)  # a smoke run draws few
    paths = paths[:count]
    threads = torch.get_num_threads()
    bundle = starting_model(TrainConfig(model=model))
    workers = default_decode_workers()
    figures = {"photo_images": len(paths), "photo_px": 800, "photo_format": "JPEG q90", "photo_batch": batch,
               "photo_decode_workers": workers, "photo_threads": threads}
    host, _ = split_transform(bundle.preprocess_eval)
    started = time.perf_counter()
    for i in range(len(paths)):
        _ImageFiles(root, paths, host)[i]
    figures["photo_decode_only_per_s"] = round(len(paths) / (time.perf_counter() - started), 1)
    with tempfile.TemporaryDirectory() as tmp:
        export_onnx(save_checkpoint(bundle, Path(tmp) / "ckpt"), Path(tmp) / "onnx")
        encoders = {"torch": None, "onnxruntime": OnnxImageEncoder(Path(tmp) / "onnx", threads)}
        for name, encode in encoders.items():
            embed_image_files(bundle, root, paths[:batch], batch, workers, encode=encode)  # warm-up
            started = time.perf_counter()
            embed_image_files(bundle, root, paths, batch, workers, encode=encode)
            figures[f"photo_embed_per_s_{name}"] = round(len(paths) / (time.perf_counter() - started), 1)
    best = max(figures["photo_embed_per_s_torch"], figures["photo_embed_per_s_onnxruntime"])
    figures["hours_per_million_images_best"] = round(1e6 / best / 3600, 2)
    print(f"catalog re-embed ({model}, {len(paths)} 800x800 JPEGs, {threads} threads, {workers} decode workers): "
          f"decode+resize only {figures['photo_decode_only_per_s']:,.1f}/s; torch "
          f"{figures['photo_embed_per_s_torch']:,.1f} images/s; onnxruntime "
          f"{figures['photo_embed_per_s_onnxruntime']:,.1f} images/s; 1M images in "
          f"{figures['hours_per_million_images_best']} h at the better one")
    return figures


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="ClickCLIP-Tiny")
    parser.add_argument("--gallery", type=int, default=180_000)
    parser.add_argument("--queries", type=int, default=10_000)
    parser.add_argument("--embed-sample", type=int, default=512)
    parser.add_argument("--k", type=int, default=50)
    parser.add_argument("--photos", type=int, default=0, help="also time re-embedding this many 800x800 JPEGs")
    parser.add_argument("--photo-batch", type=int, default=64)
    args = parser.parse_args()

    images_per_s, queries_per_s, dim, embed_device = embedding_throughput(args.model, args.embed_sample)
    print(f"embedding ({args.model} on {embed_device}): "
          f"{images_per_s:,.1f} images/s, {queries_per_s:,.0f} queries/s")
    gallery = clustered(args.gallery, dim, clusters=max(10, args.gallery // 50), seed=0)
    queries = clustered(args.queries, dim, clusters=max(10, args.gallery // 50), seed=0)[: args.queries]
    queries = normalise(queries + 0.2 * np.random.default_rng(1).standard_normal(queries.shape).astype(np.float32))

    exact_search(queries[:16], gallery, args.k)  # warm-up (CUDA context, kernels)
    _, exact = exact_search(queries, gallery, args.k)  # (top k, SearchInfo)
    device, exact_seconds = exact.device, exact.seconds
    print(f"exact search ({device}): {args.queries:,} queries x {args.gallery:,} images in {exact_seconds:.2f} s")
    _, info = search(queries, gallery, args.k, ann_min_gallery=1, use_gpu=False)
    print(f"HNSW (cpu): built in {info.build_seconds:.2f} s, searched in {info.seconds:.2f} s; recall of the "
          f"exact top {args.k}: {info.ann_recall_vs_exact:.4f}")
    print(json.dumps({
        "device": device, "embed_device": embed_device, "model": args.model, "gallery": args.gallery,
        "queries": args.queries,
        "embed_images_per_s": round(images_per_s, 1), "embed_queries_per_s": round(queries_per_s, 1),
        "exact_search_seconds": round(exact_seconds, 2), "ann_search_seconds": round(info.seconds, 2),
        "ann_build_seconds": round(info.build_seconds, 2),
        "ann_recall_vs_exact": info.ann_recall_vs_exact, "k": args.k, "dim": dim,
        **(photo_embedding(args.model, args.photos, args.photo_batch) if args.photos else {}),
    }))


if __name__ == "__main__":
    main()
