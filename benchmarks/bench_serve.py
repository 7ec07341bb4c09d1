"""Serving latency: the text tower alone, and the whole query path over a published index.

    python benchmarks/bench_serve.py                 # text tower: ONNX encode latency per model
    python benchmarks/bench_serve.py --end-to-end    # publish 180,000 demo images, then 1,000 requests

--end-to-end takes a trained model (default: the newest `make demo` run's, runs/*/train/model, with
the title and fusion weights its evaluate tuned), draws a catalog of demo photos (the demo shop's
generator, cached under --workdir), embeds it as publish does (image + title vectors), writes it to
the configured backend (the embedded PostgreSQL with pgvector, or FAISS files) with the shipped
HNSW settings, and times requests exactly as `clickclip search` answers them (the version's ONNX
text tower, HNSW top-k, BM25 over titles, weighted fusion), plus each part alone. Queries: the demo
run's click-log queries. Recall@10 of the HNSW index against exact search on those queries.
Last line: one JSON object of the figures and settings.

For the tiny model and ViT-B-32 (random weights: timing does not depend on them), the text tower
is exported as the promote stage exports it (`pipeline.training.onnx_export`), checked against PyTorch, and
timed on single queries, the tokens trimmed to the query's length as the exported graph expects.
ViT-B-32 is also timed at the full 77-token context, the plain export this replaces.
onnxruntime runs with 2 intra-op threads (the CI-class machine's cores). Tokenising is timed apart.
Last line: one JSON object {"models": [{model, context, p50_ms, p95_ms, parity_max_abs_diff}, ...]}.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import polars as pl
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from pipeline.config import TrainConfig  # noqa: E402
from pipeline.training.model import save_checkpoint, starting_model, trim_tokens  # noqa: E402
from pipeline.training.onnx_export import cpu_session, export_onnx  # noqa: E402

WORDS = ("navy", "red", "striped", "linen", "summer", "dress", "trainers", "mug", "ceramic", "lamp", "wool",
         "coat", "oak", "desk", "kids", "running", "shoes", "leather", "bag", "vintage")


def queries(n: int) -> list[str]:
    rng = np.random.default_rng(0)
    return [" ".join(rng.choice(WORDS, int(rng.integers(1, 6)))) for _ in range(n)]


def time_model(name: str, runs: int, full_context: bool) -> dict:
    bundle = starting_model(TrainConfig(model=name))
    with tempfile.TemporaryDirectory() as folder:
        checkpoint = save_checkpoint(bundle, Path(folder) / "ckpt")
        parity = export_onnx(checkpoint, Path(folder) / "onnx")["parity_max_abs_diff"]["text"]
        session = cpu_session(Path(folder) / "onnx" / "text.onnx", threads=2)
        texts = queries(runs)
        started = time.perf_counter()
        tokens = [bundle.tokenizer([t]) for t in texts]
        tokenize_ms = (time.perf_counter() - started) * 1000 / runs
        tokens = [t if full_context else trim_tokens(t) for t in tokens]
        for t in tokens[:20]:  # warm-up
            session.run(None, {"tokens": t.numpy()})
        latencies = []
        for t in tokens:
            started = time.perf_counter()
            session.run(None, {"tokens": t.numpy()})
            latencies.append((time.perf_counter() - started) * 1000)
    context = tokens[0].shape[1] if full_context else "trimmed"
    p50, p95 = statistics.median(latencies), float(np.percentile(latencies, 95))
    print(f"{name} (context {context}): p50 {p50:.2f} ms, p95 {p95:.2f} ms, tokenising {tokenize_ms:.3f} ms/query, "
          f"ONNX vs PyTorch max abs diff {parity:.1e}")
    return {"model": name, "context": context, "p50_ms": round(p50, 3), "p95_ms": round(p95, 3),
            "tokenize_ms": round(tokenize_ms, 3), "parity_max_abs_diff": parity}


def percentiles(values: list[float]) -> tuple[float, float, float]:
    p50, p95, p99 = np.percentile(values, [50, 95, 99])
    return round(float(p50), 3), round(float(p95), 3), round(float(p99), 3)


def _draw(job: tuple[int, int, int, str]) -> pl.DataFrame:
    from pipeline.demo.shop import draw_catalog

    seed, first, count, root = job
    return draw_catalog(np.random.default_rng(seed), count, Path(root), first=first)[0]


def demo_catalog(workdir: Path, images: int, processes: int = 2) -> pl.DataFrame:
    """At least `images` demo photos with titles (drawn once, in `processes` processes, then reused)."""
    from concurrent.futures import ProcessPoolExecutor

    table = workdir / f"catalog-{images}.parquet"
    if table.exists():
        return pl.read_parquet(table)
    products = images // 2 + 1000  # the demo shop averages ~2.3 photos per product
    share = products // processes + 1
    jobs = [(seed, seed * share, share, str(workdir / "images")) for seed in range(processes)]
    with ProcessPoolExecutor(processes) as pool:
        catalog = pl.concat(list(pool.map(_draw, jobs))).head(images)
    if catalog.height < images:
        raise SystemExit(f"drew only {catalog.height} images; raise the product count")
    catalog.write_parquet(table)
    return catalog


def newest_demo_run() -> Path:
    runs = sorted((ROOT / "runs").glob("*/train/model"), key=lambda p: p.stat().st_mtime)
    if not runs:
        raise SystemExit("no trained model under runs/: run `make demo` first, or pass --run")
    return runs[-1].parents[1]


def end_to_end(args: argparse.Namespace) -> dict:
    from pipeline.config import PublishConfig
    from pipeline.retrieval.search import product_vectors
    from pipeline.retrieval.served import ServedConfig, fuse, query_text
    from pipeline.serving.index import HnswSettings, answer
    from pipeline.serving.stores import open_store
    from pipeline.training.model import embed_image_files, embed_titles, load_checkpoint
    from pipeline.training.onnx_export import OnnxTextEncoder

    torch.set_num_threads(args.threads)
    run = Path(args.run) if args.run else newest_demo_run()
    model_dir = Path(args.model) if args.model else run / "train" / "model"
    metrics = run / "evaluate" / "metrics.json"
    recorded = (json.loads(metrics.read_text()).get("served_config") or {}).get("candidate") if metrics.exists() \
        else None
    publish = PublishConfig(backend=args.backend)
    # the run's gated configuration, as publish records it (the demo's: hybrid); else the demo's weights
    served_config = (ServedConfig.from_dict(recorded) if recorded else
                     ServedConfig(mode="hybrid", title_weight=0.5, fusion_weight=0.3)).with_(backend=args.backend)
    title_weight, fusion_weight = served_config.title_weight, served_config.fusion_weight
    hnsw = HnswSettings(served_config.hnsw_m, served_config.hnsw_ef_construction, served_config.ef_search)
    workdir = Path(args.workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    catalog = demo_catalog(workdir, args.catalog)
    print(f"catalog: {catalog.height} demo photos ({time.perf_counter() - started:.0f} s to draw or load)")
    bundle = load_checkpoint(model_dir)
    titles = catalog["title"].fill_null("").to_list()
    started = time.perf_counter()
    vectors = embed_image_files(bundle, workdir / "images", catalog["path"].to_list(), 256, args.threads)
    title_vectors, has_title = embed_titles(bundle, titles, 256)  # as publish does
    embed_seconds = time.perf_counter() - started
    served = product_vectors(vectors, title_vectors, has_title, title_weight)
    print(f"embedded {catalog.height} images and {int(has_title.sum())} titles in {embed_seconds:.1f} s "
          f"({catalog.height / embed_seconds:.0f} images/s, {args.threads} threads)")
    queries = sorted(set(pl.read_parquet(run / "split" / "pairs.parquet")["query"].to_list()))
    rng = np.random.default_rng(0)
    queries = [queries[i] for i in rng.choice(len(queries), min(args.queries, len(queries)), replace=False)]
    with tempfile.TemporaryDirectory(prefix="bs") as folder:
        store = open_store(publish, Path(folder))
        export = Path(folder) / "onnx"
        from pipeline.training.onnx_export import export_onnx

        export_onnx(model_dir, export)
        encoder = OnnxTextEncoder(export, model_dir, threads=args.threads)
        try:
            table, ids = "vectors_bench_r1", catalog["image_id"].to_list()
            started = time.perf_counter()
            store.write(table, ids, catalog["product_id"].to_list(), [t or None for t in titles],
                        ["-"] * len(ids), catalog["path"].to_list(), served, hnsw, "bench", "bench", served_config)
            publish_seconds = time.perf_counter() - started
            print(f"published {len(ids)} vectors ({served.shape[1]} dims) to {args.backend} in {publish_seconds:.1f} s")
            store.flip("bench", "1", table)
            query_vectors = encoder(queries)
            recall = store.recall_against_exact(table, ids, served, query_vectors, 10, hnsw.ef_search)
            store.bm25_search(table, "warm up", 10, served_config)  # the BM25 index is built once per process
            for q in queries[:20]:
                answer(store, "bench", "1", encoder, q, args.k)
            request = []
            for q in queries:
                begun = time.perf_counter()
                answer(store, "bench", "1", encoder, q, args.k)
                request.append((time.perf_counter() - begun) * 1000)
            parts: dict[str, list[float]] = {"encode": [], "ann": [], "keyword": [], "fusion": []}
            depth = served_config.fusion_depth if served_config.mode == "hybrid" else args.k
            for q in queries:
                text = query_text(q, served_config)
                begun = time.perf_counter()
                vector = encoder([text])[0]
                parts["encode"].append(time.perf_counter() - begun)
                begun = time.perf_counter()
                dense = store.search(table, vector, depth, hnsw.ef_search)
                parts["ann"].append(time.perf_counter() - begun)
                begun = time.perf_counter()
                hits = store.bm25_search(table, text, depth, served_config)
                parts["keyword"].append(time.perf_counter() - begun)
                begun = time.perf_counter()
                fuse(dense, hits, served_config)
                parts["fusion"].append(time.perf_counter() - begun)
        finally:
            store.close()
    figures = {name: percentiles([v * 1000 for v in values]) for name, values in parts.items()}
    request_p = percentiles(request)
    print(f"{len(queries)} requests ({served_config.describe()}, k={args.k}): p50 {request_p[0]} ms, "
          f"p95 {request_p[1]} ms, "
          f"p99 {request_p[2]} ms; parts p95: " + ", ".join(f"{n} {v[1]} ms" for n, v in figures.items()))
    print(f"HNSW recall@10 against exact search: {recall:.4f}")
    return {"mode": "end_to_end", "backend": args.backend, "keyword": "bm25", "served_as": served_config.mode,
            "fusion_depth": served_config.fusion_depth,
            "catalog_vectors": len(ids), "dims": int(served.shape[1]), "queries": len(queries), "k": args.k,
            "m": hnsw.m, "ef_construction": hnsw.ef_construction, "ef_search": hnsw.ef_search,
            "threads": args.threads, "model_dir": str(model_dir), "title_weight": title_weight,
            "fusion_weight": fusion_weight,
            "request_p50_ms": request_p[0], "request_p95_ms": request_p[1], "request_p99_ms": request_p[2],
            **{f"{name}_p{p}_ms": value for name, values in figures.items()
               for p, value in zip((50, 95, 99), values, strict=True)},
            "ann_recall_at_10": round(recall, 4), "publish_seconds": round(publish_seconds, 1),
            "publish_seconds_with_embedding": round(publish_seconds + embed_seconds, 1),
            "embed_images_per_s": round(catalog.height / embed_seconds, 1)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=500)
    parser.add_argument("--models", default="ClickCLIP-Tiny,ViT-B-32")
    parser.add_argument("--end-to-end", action="store_true", help="publish a catalog and time whole requests")
    parser.add_argument("--run", help="a finished run folder (default: the newest under runs/)")
    parser.add_argument("--model", help="a checkpoint folder (default: the run's train/model)")
    parser.add_argument("--catalog", type=int, default=180_000)
    parser.add_argument("--queries", type=int, default=1000)
    parser.add_argument("--k", type=int, default=20)
    parser.add_argument("--backend", choices=("pgvector", "faiss"), default="pgvector")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--workdir", default=str(ROOT / "benchmarks" / ".cache" / "serve"))
    args = parser.parse_args()
    if args.end_to_end:
        print(json.dumps(end_to_end(args)))
        return
    results = [time_model(name, args.runs, full_context=False) for name in args.models.split(",")]
    if "ViT-B-32" in args.models:
        results.append(time_model("ViT-B-32", args.runs, full_context=True))
    print(json.dumps({"device": "cpu", "runtime": "onnxruntime CPUExecutionProvider", "intra_op_threads": 2,
                      "runs": args.runs, "models": results}))


if __name__ == "__main__":
    main()
