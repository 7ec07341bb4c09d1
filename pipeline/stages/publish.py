"""Publish: build the index search will serve from the candidate, before promote moves the alias.

When the gates pass (decided here as promote decides), the candidate's vectors of every kept
catalog image (image + title with the title weight evaluate tuned; evaluate's saved vectors where
weights, content digest and title still match, the rest embedded here) go to a new table with an
HNSW index (cosine): pgvector, or a FAISS file with `publish.backend: faiss`. The index must hold
the whole kept catalog and reach
`publish.min_recall` recall@10 against exact search on up to `publish.check_queries` held-out
queries (topped up with catalog titles) at `publish.ef_search`; otherwise the stage fails and
nothing is promoted. Promote then moves the alias and flips the serving pointer to this table.
Rebuilding is idempotent: the table is named by the run and rewritten in one transaction.
Writes `runs/<id>/publish/index.json`.
"""

from __future__ import annotations

import json
import time
from functools import partial
from pathlib import Path

import numpy as np
import polars as pl
from rich.progress import track

from pipeline.config import RunConfig
from pipeline.errors import StageError
from pipeline.retrieval.catalog_vectors import CatalogVectors
from pipeline.retrieval.gates import GateInputs, decide
from pipeline.retrieval.search import product_vectors
from pipeline.serving.index import HnswSettings, run_key, table_name
from pipeline.serving.stores import open_store
from pipeline.stages import StageInputs, StageOutput
from pipeline.training.model import (
    ClipBundle,
    embed_image_files_on_devices,
    embed_texts,
    embed_titles,
    load_checkpoint,
    titled,
    to_best_device,
    weights_digest,
)


def check_queries(pairs: pl.DataFrame, titles: list[str], count: int, seed: int = 0) -> list[str]:
    """Up to `count` held-out test queries, topped up with catalog titles: what the index is checked on."""
    queries = sorted(set(pairs.filter((pl.col("split") == "test") & (pl.col("clicks") > 0))["query"].to_list()))
    rng = np.random.default_rng(seed)
    if len(queries) > count:
        queries = [queries[i] for i in sorted(rng.choice(len(queries), count, replace=False))]
    extra = sorted({t for t in titles if t} - set(queries))
    if len(queries) < count and extra:
        queries += [extra[i] for i in sorted(rng.choice(len(extra), min(count - len(queries), len(extra)),
                                                     replace=False))]
    return queries


def catalog_vectors(cfg: RunConfig, bundle: ClipBundle, model_dir: Path, images: pl.DataFrame, titles: list[str],
                    saved: Path | None) -> tuple[np.ndarray, np.ndarray, np.ndarray, int]:
    """Image vectors, title vectors (zeros where no title) and the has-title mask of every kept
    image: evaluate's candidate vectors where the weights, image, content digest and title still
    match (`saved`), the rest embedded now. Also returns how many rows were reused."""
    ids, digests = images["image_id"].to_list(), images["digest"].to_list()
    has_title = titled(titles)
    stored = CatalogVectors.load(saved) if saved is not None and saved.exists() else CatalogVectors.empty()
    reused, vectors, title_vectors = stored.reusable(weights_digest(model_dir), ids, digests, titles,
                                                     bundle.model_cfg["embed_dim"])
    todo = np.flatnonzero(~reused)
    if len(todo):
        to_best_device(bundle)
        paths = images["path"].to_list()
        vectors[todo] = embed_image_files_on_devices(bundle, cfg.data.image_root, [paths[j] for j in todo],
                                                     cfg.evaluate.batch_size, cfg.evaluate.decode_workers,
                                                     cfg.evaluate.devices,
                                                     partial(track, description="embedding catalog (publish)"))
        title_vectors[todo] = embed_titles(bundle, [titles[j] for j in todo], cfg.evaluate.batch_size)[0]
    return vectors, title_vectors, has_title, int(reused.sum())


def publish(cfg: RunConfig, run_id: str, images_path: Path, pairs_path: Path, model_dir: Path, evaluation: dict,
            promoted: bool, out_dir: Path, saved: Path | None = None) -> dict:
    """`saved`: evaluate's candidate vectors (reused where they still match)."""
    pcfg = cfg.publish
    if not pcfg.enabled:
        return {"published": False, "reason": "publish.enabled is false: search keeps its index"}
    if not promoted:
        return {"published": False, "reason": "the gates did not pass: the serving index stays as it is"}
    started = time.perf_counter()
    images = pl.read_parquet(images_path).sort("image_id")
    titles = images["title"].fill_null("").to_list() if "title" in images.columns else [""] * images.height
    bundle = load_checkpoint(model_dir)
    vectors, title_vectors, has_title, reused = catalog_vectors(cfg, bundle, model_dir, images, titles, saved)
    tuning = (evaluation.get("tuning") or {}).get("candidate", {})
    title_weight, fusion_weight = float(tuning.get("title_weight", 0.0)), float(tuning.get("hybrid_weight", 1.0))
    served = product_vectors(vectors, title_vectors, has_title, title_weight)
    table = table_name(cfg.promote.model_name, run_key(run_id))
    store = open_store(pcfg, cfg.state_dir / cfg.name)
    try:
        ids = images["image_id"].to_list()
        products = images["product_id"].to_list() if "product_id" in images.columns else [None] * len(ids)
        rows = store.write(table, ids, products, [t or None for t in titles], images["digest"].to_list(), served,
                           HnswSettings(pcfg.hnsw_m, pcfg.hnsw_ef_construction, pcfg.ef_search),
                           cfg.promote.model_name, run_id, title_weight, fusion_weight)
        if rows != len(ids):
            raise StageError(f"index table {table} holds {rows} rows, the kept catalog {len(ids)}: not served")
        queries = check_queries(pl.read_parquet(pairs_path), titles, pcfg.check_queries)
        recall = store.recall_against_exact(table, ids, served, embed_texts(bundle, queries), 10, pcfg.ef_search)
    finally:
        store.close()
    if recall < pcfg.min_recall:
        raise StageError(f"index {table}: HNSW recall@10 against exact search {recall:.4f} on {len(queries)} queries "
                         f"is below publish.min_recall {pcfg.min_recall} at ef_search {pcfg.ef_search}; raise "
                         "publish.ef_search (or hnsw_m, hnsw_ef_construction) and rerun. Nothing was promoted")
    return {"published": True, "table": table, "rows": rows, "recall_at_10_vs_exact": round(recall, 4),
            "check_queries": len(queries), "ef_search": pcfg.ef_search, "hnsw_m": pcfg.hnsw_m,
            "hnsw_ef_construction": pcfg.hnsw_ef_construction, "title_weight": title_weight,
            "fusion_weight": fusion_weight, "serve_as": cfg.promote.serve_as,
            "backend": pcfg.backend, "keyword": pcfg.keyword,
            "database": "files" if pcfg.backend == "faiss" else "embedded" if pcfg.dsn is None else "publish.dsn",
            "reused_vectors": reused, "embedded_now": len(ids) - reused,
            "seconds": round(time.perf_counter() - started, 1)}


def run(cfg: RunConfig, inputs: StageInputs, out_dir: Path) -> StageOutput:
    extract, train, evaluation = (inputs.summary(s) for s in ("extract", "train", "evaluate"))
    gate_inputs = GateInputs.from_summaries(
        extract, json.loads(inputs.output("split", "leak_audit").read_text()), train)
    promoted, _, _ = decide(evaluation, cfg.promote, gate_inputs)
    summary = publish(cfg, inputs.run_id, inputs.output("split", "images"), inputs.output("split", "pairs"),
                      inputs.output("train", "weights").parent, evaluation, promoted, out_dir,
                      inputs.outputs["evaluate"].get("catalog_vectors"))
    index = out_dir / "index.json"
    index.write_text(json.dumps(summary, indent=2))
    return StageOutput({"index": index}, summary)
