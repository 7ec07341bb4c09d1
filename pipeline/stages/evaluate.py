"""Evaluate: text-to-image retrieval over the catalog for candidate, champion and starting model.

Held-out queries are the queries of test-split pairs with at least one click; a query's relevant
images are the test images clicked for it. Writes `runs/<id>/evaluate/metrics.json` and the
human report `reports/<run_id>/recall.md`.
"""

from __future__ import annotations

import json
import shutil
import tempfile
import time
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import numpy as np
import polars as pl
from rich.progress import track

from pipeline import registry
from pipeline.config import EvaluateConfig, RunConfig
from pipeline.errors import StageError
from pipeline.report.html import write_html_report
from pipeline.report.markdown import render_data_section, render_report, render_slices
from pipeline.retrieval.bm25 import bm25_rankings
from pipeline.retrieval.metrics import mean_metrics, paired_bootstrap, per_query_metrics
from pipeline.retrieval.search import search
from pipeline.retrieval.slices import query_slices, slice_table
from pipeline.stages import StageInputs, StageOutput
from pipeline.training.model import (
    ClipBundle,
    embed_image_files,
    embed_texts,
    load_checkpoint,
    starting_model,
    to_best_device,
)

WORST_QUERIES = 20


@dataclass(frozen=True)
class EvaluateResult:
    metrics: Path
    report: Path
    summary: dict


@dataclass(frozen=True)
class TestSet:
    queries: list[str]
    relevant: list[dict[str, float]]  # relevant image -> graded gain (its click weight)
    # held-out queries' clicks on train-split images: the "new query / seen image" slice, searched
    # over the whole catalog (its relevant images are not test images)
    seen_queries: list[str]
    seen_relevant: list[dict[str, float]]
    catalog_ids: list[str]  # every kept image
    catalog_paths: list[str]
    catalog_titles: list[str]
    in_gallery: np.ndarray  # bool per catalog image: part of the headline gallery
    gallery_kind: str

    @property
    def gallery_ids(self) -> list[str]:
        return [i for i, keep in zip(self.catalog_ids, self.in_gallery, strict=True) if keep]


def _grouped(pairs: pl.DataFrame) -> tuple[list[str], list[dict[str, float]]]:
    grouped = pairs.group_by("query").agg(pl.col("image_id"), pl.col("weight")).sort("query")
    relevant = [dict(zip(ids, weights, strict=True))
                for ids, weights in zip(grouped["image_id"].to_list(), grouped["weight"].to_list(), strict=True)]
    return grouped["query"].to_list(), relevant


def load_test_set(pairs_path: Path, images_path: Path, cfg: EvaluateConfig) -> TestSet:
    pairs = pl.read_parquet(pairs_path).filter(pl.col("clicks") > 0)
    test_pairs = pairs.filter(pl.col("split") == "test")
    if test_pairs.is_empty():
        raise StageError(f"{pairs_path} has no clicked test pairs to evaluate on")
    queries, relevant = _grouped(test_pairs)
    seen_queries, seen_relevant = _grouped(pairs.filter((pl.col("split") == "train") & pl.col("query_heldout")))
    images = pl.read_parquet(images_path).sort("image_id")
    titles = images["title"].fill_null("").to_list() if "title" in images.columns else [""] * images.height
    in_gallery = (images["split"] == "test").to_numpy() if cfg.gallery == "test" else np.ones(images.height, bool)
    return TestSet(queries, relevant, seen_queries, seen_relevant, images["image_id"].to_list(),
                   images["path"].to_list(), titles, in_gallery, cfg.gallery)


@dataclass
class ModelScores:
    per_query: dict[str, np.ndarray]  # headline metrics per held-out query
    per_query_seen: dict[str, np.ndarray]  # the new query / seen image queries
    ranked: list[list[str]]  # headline top-k image ids per query
    search: dict
    images_per_s: float | None = None


def _ranked(top: np.ndarray, ids: list[str]) -> list[list[str]]:
    return [[ids[j] for j in row if j >= 0] for row in top]


def score_model(bundle: ClipBundle, test: TestSet, root: Path, cfg: EvaluateConfig, label: str) -> ModelScores:
    """Embed the catalog and the queries with one model and score its retrieval."""
    to_best_device(bundle)
    started = time.perf_counter()
    catalog = embed_image_files(bundle, root, test.catalog_paths, cfg.batch_size, cfg.decode_workers,
                                partial(track, description=f"embedding catalog ({label})"))
    images_per_s = len(test.catalog_paths) / max(time.perf_counter() - started, 1e-9)
    k = max(cfg.ks)
    top, info = search(embed_texts(bundle, test.queries, cfg.batch_size), catalog[test.in_gallery], k,
                       cfg.ann_min_gallery)
    ranked = _ranked(top, test.gallery_ids)
    seen = {}
    if test.seen_queries:
        seen_top, _ = search(embed_texts(bundle, test.seen_queries, cfg.batch_size), catalog, k, cfg.ann_min_gallery)
        seen = per_query_metrics(_ranked(seen_top, test.catalog_ids), test.seen_relevant, cfg.ks)
    return ModelScores(per_query_metrics(ranked, test.relevant, cfg.ks), seen, ranked, info.as_dict(), images_per_s)


def score_bm25(test: TestSet, cfg: EvaluateConfig) -> ModelScores:
    """The text-only baseline: queries matched to catalog titles by BM25."""
    k = max(cfg.ks)
    gallery_titles = [t for t, keep in zip(test.catalog_titles, test.in_gallery, strict=True) if keep]
    ranked = bm25_rankings(test.queries, gallery_titles, test.gallery_ids, k)
    seen = {}
    if test.seen_queries:
        seen = per_query_metrics(bm25_rankings(test.seen_queries, test.catalog_titles, test.catalog_ids, k),
                                 test.seen_relevant, cfg.ks)
    return ModelScores(per_query_metrics(ranked, test.relevant, cfg.ks), seen, ranked, {"index": "bm25"})


def champion_model(cfg: RunConfig, workdir: Path) -> tuple[ClipBundle, str] | None:
    """The registry's current champion and its version, or None when there is none yet."""
    version = registry.champion_version(cfg.promote)
    if version is None:
        return None
    return load_checkpoint(registry.download_checkpoint(cfg.promote, version, workdir)), version


def worst_queries(test: TestSet, scores: dict[str, ModelScores], baseline: str, metric: str,
                  count: int = WORST_QUERIES) -> list[dict]:
    """The queries where the candidate lost most against the baseline, with both top-5 lists."""
    delta = scores["candidate"].per_query[metric] - scores[baseline].per_query[metric]
    order = [int(i) for i in np.argsort(delta, kind="stable") if delta[i] < 0][:count]
    return [{"query": test.queries[i], "candidate": float(scores["candidate"].per_query[metric][i]),
             "baseline": float(scores[baseline].per_query[metric][i]),
             "candidate_top": scores["candidate"].ranked[i][:5], "baseline_top": scores[baseline].ranked[i][:5],
             "relevant": sorted(test.relevant[i], key=lambda image: -test.relevant[i][image])[:5]}
            for i in order]


def evaluate(cfg: RunConfig, pairs_path: Path, images_path: Path, model_dir: Path, out_dir: Path,
             report_dir: Path, run_id: str, data: dict | None = None) -> EvaluateResult:
    """Score candidate, champion, starting model and the BM25 baseline on the same held-out
    queries; `data` (extract and split summaries and their figures) adds the input-data section."""
    test = load_test_set(pairs_path, images_path, cfg.evaluate)
    root = cfg.data.image_root
    scores = {"candidate": score_model(load_checkpoint(model_dir), test, root, cfg.evaluate, "candidate")}
    with tempfile.TemporaryDirectory() as workdir:
        champion = champion_model(cfg, Path(workdir))
        if champion is not None:
            scores["champion"] = score_model(champion[0], test, root, cfg.evaluate, "champion")
    scores["start"] = score_model(starting_model(cfg.train), test, root, cfg.evaluate, "start")
    scores["bm25"] = score_bm25(test, cfg.evaluate)
    per_query = {name: s.per_query for name, s in scores.items()}
    baseline = "champion" if champion else "start"
    metric = cfg.promote.metric
    families = query_slices(test.queries, test.relevant, pl.read_parquet(pairs_path), pl.read_parquet(images_path))
    slices = slice_table(per_query, baseline, families, metric, cfg.evaluate.slice_tolerance)
    if test.seen_queries:
        slices += slice_table({name: s.per_query_seen for name, s in scores.items()}, baseline,
                              {"query": ["new query / seen image"] * len(test.seen_queries)}, metric,
                              cfg.evaluate.slice_tolerance)
    candidate = scores["candidate"]
    summary = {
        "run_id": run_id, "queries": len(test.queries), "gallery": int(test.in_gallery.sum()),
        "catalog": len(test.catalog_ids), "gallery_kind": test.gallery_kind, "ks": list(cfg.evaluate.ks),
        "champion_version": champion[1] if champion else None, "baseline": baseline,
        "models": {name: mean_metrics(values) for name, values in per_query.items()},
        "delta_vs_baseline": {
            name: dict(zip(("mean", "low", "high"), paired_bootstrap(values, per_query[baseline][name]),
                           strict=True))
            for name, values in per_query["candidate"].items()},
        "slices": slices,
        "flagged_slices": [f"{row['family']}={row['slice']}" for row in slices if row["flagged"]],
        "search": candidate.search,
        # re-embedding the catalog is the price of promoting: measured here, on this machine
        "reindex": {"images": len(test.catalog_ids), "images_per_s": round(candidate.images_per_s or 0, 1),
                    "estimated_seconds": round(len(test.catalog_ids) / max(candidate.images_per_s or 1e-9, 1e-9), 1)},
        "worst_queries": worst_queries(test, scores, baseline, metric),
    }
    metrics_path = out_dir / "metrics.json"
    metrics_path.write_text(json.dumps(summary, indent=2))
    shutil.copyfile(metrics_path, report_dir / "metrics.json")  # the report folder stands on its own
    report_path = report_dir / "recall.md"
    text = render_report(summary) + render_slices(slices, metric, baseline, cfg.evaluate.slice_tolerance)
    if data is not None:
        for figure in data["figures"]:
            shutil.copyfile(figure, report_dir / figure.name)
        text += render_data_section(data["extract"], data["split"])
    report_path.write_text(text)
    write_html_report(report_dir / "report.html", summary, cfg, data, root,
                      dict(zip(test.catalog_ids, test.catalog_paths, strict=True)))
    return EvaluateResult(metrics_path, report_path, summary)


def run(cfg: RunConfig, inputs: StageInputs, out_dir: Path) -> StageOutput:
    inputs.report_dir.mkdir(parents=True, exist_ok=True)
    data = {"extract": inputs.summary("extract"), "split": inputs.summary("split"),
            "figures": [inputs.output("extract", "propensity").with_suffix(".png"),
                        inputs.output("split", "groups_sheet")]}
    result = evaluate(cfg, inputs.output("split", "pairs"), inputs.output("split", "images"),
                      inputs.output("train", "weights").parent, out_dir, inputs.report_dir, inputs.run_id, data)
    return StageOutput({"metrics": result.metrics, "report": result.report}, result.summary)
