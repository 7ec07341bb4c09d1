"""Publish: build the index search will serve from the candidate, before promote moves the alias.

When the gates pass (decided here as promote decides), the candidate's served configuration (the
one evaluate scored and the gate decided on) is built: the vectors of every kept catalog image
(image + title with its title weight; evaluate's saved vectors where weights, content digest and
title still match, the rest embedded here) go to a new table with an HNSW index (cosine):
pgvector, or a FAISS file with `publish.backend: faiss`, and the served configuration is recorded
with the table. The index must hold the whole kept catalog and reach `publish.min_recall` recall@10
against exact search on up to `publish.check_queries` held-out queries (topped up with catalog
titles); and the replay must pass: the run's test queries through the query path, with exact
search, return evaluate's rankings identically, and through HNSW overlap them by at least
`publish.min_recall`. Otherwise the stage fails and nothing is promoted. Promote then moves the
alias and flips the serving pointer to this table.
Catalog images whose file is gone since split are left out, counted and warned about, as
evaluate leaves them out. Rebuilding is idempotent: the table is named by the run and rewritten in one transaction.
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
from pipeline.data.images import still_there
from pipeline.errors import StageError
from pipeline.retrieval.catalog_vectors import CatalogVectors
from pipeline.retrieval.gates import GateInputs, decide
from pipeline.retrieval.search import product_vectors
from pipeline.retrieval.served import gated
from pipeline.serving.index import HnswSettings, Serving, replay, run_key, table_name
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
            promoted: bool, out_dir: Path, saved: Path | None = None, reference: Path | None = None) -> dict:
    """`saved`: evaluate's candidate vectors (reused where they still match); `reference`: evaluate's
    rankings of the served configuration (served_rankings.json), which the replay must reproduce."""
    pcfg = cfg.publish
    if not pcfg.enabled:
        return {"published": False, "reason": "publish.enabled is false: search keeps its index"}
    if not promoted:
        return {"published": False, "reason": "the gates did not pass: the serving index stays as it is"}
    if reference is None or not reference.is_file():
        raise StageError(f"evaluate's served rankings ({reference or 'served_rankings.json'}) are missing: the "
                         "replay that proves serving ranks as evaluate scored cannot run; rerun evaluate")
    started = time.perf_counter()
    served = gated(evaluation)
    if served.backend != pcfg.backend:
        raise StageError(f"publish.backend is {pcfg.backend}, but evaluate scored it for backend {served.backend}: "
                         "rerun evaluate with this config (the served configuration names its backend)")
    images = pl.read_parquet(images_path).sort("image_id")
    # as evaluate does: an image whose file is gone since split is left out, counted and warned about
    gone = pl.Series([not still_there(cfg.data.image_root, p) for p in images["path"].to_list()], dtype=pl.Boolean)
    missing = images.filter(gone)["image_id"].to_list()
    images = images.filter(~gone)
    titles = images["title"].fill_null("").to_list() if "title" in images.columns else [""] * images.height
    bundle = load_checkpoint(model_dir)
    vectors, title_vectors, has_title, reused = catalog_vectors(cfg, bundle, model_dir, images, titles, saved)
    vectors = product_vectors(vectors, title_vectors, has_title, served.title_weight)
    table = table_name(cfg.promote.model_name, run_key(run_id))
    store = open_store(pcfg, cfg.state_dir / cfg.name)
    try:
        ids = images["image_id"].to_list()
        products = images["product_id"].to_list() if "product_id" in images.columns else [None] * len(ids)
        rows = store.write(table, ids, products, [t or None for t in titles], images["digest"].to_list(),
                           images["path"].to_list(), vectors,
                           HnswSettings(served.hnsw_m, served.hnsw_ef_construction, served.ef_search),
                           cfg.promote.model_name, run_id, served)
        if rows != len(ids):
            raise StageError(f"index table {table} holds {rows} rows, the kept catalog {len(ids)}: not served")
        queries = check_queries(pl.read_parquet(pairs_path), titles, pcfg.check_queries)
        recall = store.recall_against_exact(table, ids, vectors, embed_texts(bundle, queries), 10, served.ef_search)
        parity = replay(store, Serving(cfg.promote.model_name, "candidate", table, served, run_id),
                        partial(embed_texts, bundle), json.loads(reference.read_text()), pcfg.check_queries)
    finally:
        store.close()
    if recall < pcfg.min_recall:
        raise StageError(f"index {table}: HNSW recall@10 against exact search {recall:.4f} on {len(queries)} queries "
                         f"is below publish.min_recall {pcfg.min_recall} at ef_search {served.ef_search}; raise "
                         "publish.ef_search (or hnsw_m, hnsw_ef_construction) and rerun. Nothing was promoted")
    if parity.identical < parity.queries:
        raise StageError(f"index {table}: {parity.sentence()} — {parity.queries - parity.identical} queries came back "
                         f"differently from evaluate's ranking of the gated configuration (first: "
                         f"{parity.first_mismatch!r}); serving would not be what was gated. Nothing was promoted")
    if parity.overlap < pcfg.min_recall:
        raise StageError(f"index {table}: {parity.sentence()}, below publish.min_recall {pcfg.min_recall}; raise "
                         "publish.ef_search and rerun. Nothing was promoted")
    return {"published": True, "table": table, "rows": rows, "recall_at_10_vs_exact": round(recall, 4),
            "check_queries": len(queries), "ef_search": served.ef_search, "hnsw_m": served.hnsw_m,
            "hnsw_ef_construction": served.hnsw_ef_construction, "title_weight": served.title_weight,
            "fusion_weight": served.fusion_weight, "serve_as": served.mode, "served_config": served.to_dict(),
            "parity": parity.as_dict(), "parity_sentence": parity.sentence(),
            "backend": pcfg.backend, "keyword": served.keyword,
            "database": "files" if pcfg.backend == "faiss" else "embedded" if pcfg.dsn is None else "publish.dsn",
            "reused_vectors": reused, "embedded_now": len(ids) - reused,
            "images_missing": missing[:100], "images_missing_count": len(missing),
            "warnings": [f"{len(missing)} catalog images kept by split are gone from {cfg.data.image_root} (deleted or "
                         f"moved since): left out of the index, as evaluate left them out, e.g. "
                         f"{', '.join(missing[:5])}"] if missing else [],
            "seconds": round(time.perf_counter() - started, 1)}


def run(cfg: RunConfig, inputs: StageInputs, out_dir: Path) -> StageOutput:
    extract, train, evaluation = (inputs.summary(s) for s in ("extract", "train", "evaluate"))
    gate_inputs = GateInputs.from_summaries(
        extract, json.loads(inputs.output("split", "leak_audit").read_text()), train)
    promoted, _, _ = decide(evaluation, cfg.promote, gate_inputs)
    summary = publish(cfg, inputs.run_id, inputs.output("split", "images"), inputs.output("split", "pairs"),
                      inputs.output("train", "weights").parent, evaluation, promoted, out_dir,
                      inputs.outputs["evaluate"].get("catalog_vectors"),
                      inputs.outputs["evaluate"].get("served_rankings"))
    index = out_dir / "index.json"
    index.write_text(json.dumps(summary, indent=2))
    return StageOutput({"index": index}, summary)
