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
from collections import Counter
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

import numpy as np
import polars as pl
from rich.progress import track

from pipeline import registry
from pipeline.config import EvaluateConfig, RunConfig
from pipeline.data.images import UnusableImage, resolve_image_path
from pipeline.errors import StageError
from pipeline.report.html import write_html_report
from pipeline.report.markdown import render_report
from pipeline.report.sections import SliceRule
from pipeline.retrieval.bm25 import bm25_rankings
from pipeline.retrieval.gates import GateInputs, decide
from pipeline.retrieval.metrics import mean_metrics, paired_bootstrap, per_query_metrics
from pipeline.retrieval.search import approximate_recall, exact_search
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
HUB_SHARE = 0.3  # warn when the 10 most frequent results fill more than this share of all top-10 slots


@dataclass(frozen=True)
class EvaluateResult:
    metrics: Path
    report: Path
    summary: dict


@dataclass(frozen=True)
class TestSet:
    queries: list[str]
    relevant: list[dict[str, float]]  # relevant item (image or product) -> graded gain (its click weight)
    # held-out queries' clicks on train-split images: the "new query / seen image" slice, searched
    # over the whole catalog (its relevant images are not test images)
    seen_queries: list[str]
    seen_relevant: list[dict[str, float]]
    catalog_ids: list[str]  # every kept image
    catalog_paths: list[str]
    catalog_titles: list[str]
    in_gallery: np.ndarray  # bool per catalog image: part of the headline gallery
    gallery_kind: str
    # filtered ranking: per query, the images removed from its ranked list before scoring (its other
    # known right answers: clicks outside the scored split, other photos of a relevant product or group)
    known: list[set[str]] = field(default_factory=list)
    seen_known: list[set[str]] = field(default_factory=list)
    item_of: dict[str, str] = field(default_factory=dict)  # image -> what relevance counts (image or product)
    clicked: list[list[str]] = field(default_factory=list)  # per query, its held-out clicked images, best first
    missing: list[str] = field(default_factory=list)  # catalog images whose file disappeared after split

    @property
    def gallery_ids(self) -> list[str]:
        return [i for i, keep in zip(self.catalog_ids, self.in_gallery, strict=True) if keep]

    def ranked_items(self, images: list[str], known: set[str], k: int) -> list[str]:
        """A ranked image list as scored: known right answers removed, images mapped to the relevance
        unit (each product once, at its best rank, under product relevance), cut at k."""
        items: list[str] = []
        for image in images:
            if image in known:
                continue
            item = self.item_of.get(image, image)
            if item not in items:
                items.append(item)
                if len(items) == k:
                    break
        return items


def _grouped(pairs: pl.DataFrame, item_of: dict[str, str]) -> tuple[list[str], list[dict[str, float]], list[list[str]]]:
    """Queries; per query, relevant item -> gain (the largest click weight among its images); and
    per query its clicked images, heaviest first."""
    grouped = pairs.group_by("query").agg(pl.col("image_id"), pl.col("weight")).sort("query")
    relevant, clicked = [], []
    for ids, weights in zip(grouped["image_id"].to_list(), grouped["weight"].to_list(), strict=True):
        gains: dict[str, float] = {}
        for image, weight in zip(ids, weights, strict=True):
            item = item_of.get(image, image)
            gains[item] = max(gains.get(item, weight), weight)
        relevant.append(gains)
        clicked.append([image for _, image in sorted(zip(weights, ids, strict=True), key=lambda wi: (-wi[0], wi[1]))])
    return grouped["query"].to_list(), relevant, clicked


def known_positives(queries: list[str], scored: pl.DataFrame, clicked: pl.DataFrame, images: pl.DataFrame,
                    item_of: dict[str, str]) -> list[set[str]]:
    """Per query, the images that are right answers but not the ones scored (filtered ranking, as in
    knowledge-graph evaluation): its clicks on images outside `scored`, and the other photos of a
    scored image's product or near-duplicate group. Removed from the ranked list, neither hit nor miss."""
    scored_by_query = scored.group_by("query").agg(pl.col("image_id"))
    scored_images = dict(zip(scored_by_query["query"], scored_by_query["image_id"].to_list(), strict=True))
    clicked_by_query = clicked.group_by("query").agg(pl.col("image_id"))
    clicked_images = dict(zip(clicked_by_query["query"], clicked_by_query["image_id"].to_list(), strict=True))
    members: dict[str, list[str]] = {}
    for image, product, group in zip(images["image_id"], images["product_id"], images["group_id"], strict=True):
        members.setdefault(f"group:{group}", []).append(image)
        if product is not None:
            members.setdefault(f"product:{product}", []).append(image)
    keys = {image: [f"group:{group}"] + ([f"product:{product}"] if product is not None else [])
            for image, product, group in zip(images["image_id"], images["product_id"], images["group_id"],
                                             strict=True)}
    known = []
    for query in queries:
        relevant = set(scored_images.get(query, []))
        same = {other for image in relevant for key in keys.get(image, []) for other in members[key]}
        candidates = set(clicked_images.get(query, [])) | same
        relevant_items = {item_of.get(image, image) for image in relevant}
        known.append({image for image in candidates - relevant if item_of.get(image, image) not in relevant_items})
    return known


def load_test_set(pairs_path: Path, images_path: Path, cfg: EvaluateConfig, root: Path | None = None) -> TestSet:
    """The held-out queries, their relevant items and the catalog. With `root`, catalog images whose
    file is gone since split (deleted, moved) are left out of the catalog and of every query's
    relevant set, and listed in `missing`."""
    images = pl.read_parquet(images_path).sort("image_id")
    missing: list[str] = []
    if root is not None:
        gone = [not _still_there(root, path) for path in images["path"].to_list()]
        missing = images.filter(pl.Series(gone))["image_id"].to_list()
        images = images.filter(~pl.Series(gone))
    pairs = pl.read_parquet(pairs_path).filter((pl.col("clicks") > 0) & ~pl.col("image_id").is_in(missing))
    test_pairs = pairs.filter(pl.col("split") == "test")
    if test_pairs.is_empty():
        raise StageError(f"{pairs_path} has no clicked test pairs to evaluate on")
    # product relevance: an image counts as its product (its near-duplicate group when it has none)
    item_of = {} if cfg.relevance == "image" else {
        image: f"product:{product}" if product is not None else f"group:{group}"
        for image, product, group in zip(images["image_id"], images["product_id"], images["group_id"], strict=True)}
    queries, relevant, clicked = _grouped(test_pairs, item_of)
    seen_pairs = pairs.filter((pl.col("split") == "train") & pl.col("query_heldout"))
    seen_queries, seen_relevant, _ = _grouped(seen_pairs, item_of)
    titles = images["title"].fill_null("").to_list() if "title" in images.columns else [""] * images.height
    in_gallery = (images["split"] == "test").to_numpy() if cfg.gallery == "test" else np.ones(images.height, bool)
    known, seen_known = [set() for _ in queries], [set() for _ in seen_queries]
    if cfg.filtered:
        known = known_positives(queries, test_pairs, pairs, images, item_of)
        seen_known = known_positives(seen_queries, seen_pairs, pairs, images, item_of)
    return TestSet(queries, relevant, seen_queries, seen_relevant, images["image_id"].to_list(),
                   images["path"].to_list(), titles, in_gallery, cfg.gallery, known, seen_known, item_of, clicked,
                   missing)


def _still_there(root: Path, relative: str) -> bool:
    try:
        return resolve_image_path(root, relative).is_file()
    except (UnusableImage, OSError):
        return False


@dataclass
class ModelScores:
    per_query: dict[str, np.ndarray]  # headline metrics per held-out query
    per_query_seen: dict[str, np.ndarray]  # the new query / seen image queries
    ranked: list[list[str]]  # headline top-k items per query, as scored
    search: dict
    images_per_s: float | None = None
    shown: list[list[str]] = field(default_factory=list)  # top 5 images per query after filtering, for the report


def search_depth(test: TestSet, k: int, known: list[set[str]]) -> int:
    """How many images to retrieve so that k items remain after filtering and per-product dedup."""
    per_item = max(Counter(test.item_of.values()).values(), default=1)
    return k * per_item + max((len(drop) for drop in known), default=0)


def _scored(test: TestSet, top: np.ndarray, ids: list[str], known: list[set[str]], k: int) -> list[list[str]]:
    return [test.ranked_items([ids[j] for j in row if j >= 0], drop, k) for row, drop in zip(top, known, strict=True)]


def _shown(top: list[list[str]], known: list[set[str]]) -> list[list[str]]:
    return [[image for image in images if image not in drop][:5] for images, drop in zip(top, known, strict=True)]


def score_model(bundle: ClipBundle, test: TestSet, root: Path, cfg: EvaluateConfig, label: str) -> ModelScores:
    """Embed the catalog and the queries with one model and score its retrieval."""
    to_best_device(bundle)
    started = time.perf_counter()
    catalog = embed_image_files(bundle, root, test.catalog_paths, cfg.batch_size, cfg.decode_workers,
                                partial(track, description=f"embedding catalog ({label})"))
    images_per_s = len(test.catalog_paths) / max(time.perf_counter() - started, 1e-9)
    k = max(cfg.ks)
    queries = embed_texts(bundle, test.queries, cfg.batch_size)
    gallery = catalog[test.in_gallery]
    top, info = exact_search(queries, gallery, search_depth(test, k, test.known))  # gates: exact search only
    info = info.as_dict()
    if len(gallery) >= cfg.ann_min_gallery:  # what an approximate serving index would lose, measured here
        info["hnsw"] = approximate_recall(queries, gallery, k, top).as_dict()
    ranked = _scored(test, top, test.gallery_ids, test.known, k)
    shown = _shown([[test.gallery_ids[j] for j in row[:5 + len(drop)] if j >= 0] for row, drop in
                    zip(top, test.known, strict=True)], test.known)
    seen = {}
    if test.seen_queries:
        seen_top, _ = exact_search(embed_texts(bundle, test.seen_queries, cfg.batch_size), catalog,
                                   search_depth(test, k, test.seen_known))
        seen = per_query_metrics(_scored(test, seen_top, test.catalog_ids, test.seen_known, k), test.seen_relevant,
                                 cfg.ks)
    return ModelScores(per_query_metrics(ranked, test.relevant, cfg.ks), seen, ranked, info, images_per_s, shown)


def score_bm25(test: TestSet, cfg: EvaluateConfig) -> ModelScores:
    """The text-only baseline: queries matched to catalog titles by BM25."""
    k = max(cfg.ks)
    gallery_titles = [t for t, keep in zip(test.catalog_titles, test.in_gallery, strict=True) if keep]
    depth = search_depth(test, k, test.known)
    top = bm25_rankings(test.queries, gallery_titles, test.gallery_ids, depth)
    ranked = [test.ranked_items(images, drop, k) for images, drop in zip(top, test.known, strict=True)]
    seen = {}
    if test.seen_queries:
        depth = search_depth(test, k, test.seen_known)
        seen_ranked = [test.ranked_items(images, drop, k) for images, drop in zip(
            bm25_rankings(test.seen_queries, test.catalog_titles, test.catalog_ids, depth), test.seen_known,
            strict=True)]
        seen = per_query_metrics(seen_ranked, test.seen_relevant, cfg.ks)
    return ModelScores(per_query_metrics(ranked, test.relevant, cfg.ks), seen, ranked, {"index": "bm25"},
                       shown=_shown(top, test.known))


def champion_model(cfg: RunConfig, workdir: Path, run_id: str | None = None) -> tuple[ClipBundle, str] | None:
    """The registry's current champion and its version, or None when there is none yet. With
    `run_id`, the champion that run compares against (not the run's own version, once promoted)."""
    version = registry.champion_version(cfg.promote) if run_id is None else \
        registry.baseline_champion(cfg.promote, run_id)
    if version is None:
        return None
    return load_checkpoint(registry.download_checkpoint(cfg.promote, version, workdir)), version


def worst_queries(test: TestSet, scores: dict[str, ModelScores], baseline: str, metric: str,
                  count: int = WORST_QUERIES) -> list[dict]:
    """The queries where the candidate lost most against the baseline, with both top-5 lists.

    Ranked by the loss weighted by the query's held-out click weight: a query with one click where
    the baseline scored 1.0 by luck weighs less than a query many clicks stand behind."""
    delta = scores["candidate"].per_query[metric] - scores[baseline].per_query[metric]
    support = np.array([sum(gains.values()) for gains in test.relevant])
    order = [int(i) for i in np.argsort(delta * support, kind="stable") if delta[i] < 0][:count]
    return [{"query": test.queries[i], "candidate": float(scores["candidate"].per_query[metric][i]),
             "baseline": float(scores[baseline].per_query[metric][i]), "click_weight": round(float(support[i]), 3),
             "candidate_top": scores["candidate"].shown[i], "baseline_top": scores[baseline].shown[i],
             "relevant": test.clicked[i][:5]}
            for i in order]


def hubness(ranked: list[list[str]], k: int, images: int = 10) -> dict:
    """How concentrated the top-k lists are: the share of all top-k slots the `images` most frequent
    results fill (a few "hub" images answering every query is a known failure of embedding search)."""
    counts = Counter(item for row in ranked for item in row[:k])
    slots = sum(counts.values())
    top = sum(n for _, n in counts.most_common(images))
    return {"images": images, "k": k, "top_share": round(top / slots, 4) if slots else 0.0,
            "most_frequent": [item for item, _ in counts.most_common(images)]}


def evaluate(cfg: RunConfig, pairs_path: Path, images_path: Path, model_dir: Path, out_dir: Path,
             report_dir: Path, run_id: str, data: dict | None = None) -> EvaluateResult:
    """Score candidate, champion, starting model and the BM25 baseline on the same held-out
    queries; `data` (extract and split summaries and their figures) adds the input-data section."""
    root = cfg.data.image_root
    test = load_test_set(pairs_path, images_path, cfg.evaluate, root)
    scores = {"candidate": score_model(load_checkpoint(model_dir), test, root, cfg.evaluate, "candidate")}
    with tempfile.TemporaryDirectory() as workdir:
        champion = champion_model(cfg, Path(workdir), run_id)
        if champion is not None:
            scores["champion"] = score_model(champion[0], test, root, cfg.evaluate, "champion")
    scores["start"] = score_model(starting_model(cfg.train), test, root, cfg.evaluate, "start")
    scores["bm25"] = score_bm25(test, cfg.evaluate)
    per_query = {name: s.per_query for name, s in scores.items()}
    baseline = "champion" if champion else "start"
    metric = cfg.promote.metric
    families = query_slices(test.queries, test.relevant, pl.read_parquet(pairs_path), pl.read_parquet(images_path))
    if test.seen_queries:  # one family of slices over both query sets, so Holm's correction spans them all
        per_query_all = {name: {m: np.concatenate([s.per_query[m], s.per_query_seen[m]]) for m in s.per_query}
                         for name, s in scores.items()}
        seen = [None] * len(test.seen_queries)
        families = {family: values + seen for family, values in families.items()}
        families["query"][len(test.queries):] = ["new query / seen image"] * len(test.seen_queries)
    else:
        per_query_all = per_query
    ecfg = cfg.evaluate
    slices = slice_table(per_query_all, baseline, families, metric, ecfg.slice_tolerance, ecfg.slice_min_queries,
                         ecfg.slice_alpha)
    candidate = scores["candidate"]
    summary = {
        "run_id": run_id, "queries": len(test.queries), "gallery": int(test.in_gallery.sum()),
        "catalog": len(test.catalog_ids), "gallery_kind": test.gallery_kind, "ks": list(cfg.evaluate.ks),
        "relevance": cfg.evaluate.relevance, "filtered": cfg.evaluate.filtered,
        "images_missing": test.missing[:100], "images_missing_count": len(test.missing),
        "warnings": [f"{len(test.missing)} catalog images kept by split are gone from {root} (deleted or moved "
                     f"since): left out of the catalog and of every query's relevant images, e.g. "
                     f"{', '.join(test.missing[:5])}"] if test.missing else [],
        "filtered_per_query": round(float(np.mean([len(drop) for drop in test.known])), 2) if test.known else 0.0,
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
        "hubness": hubness(scores["candidate"].ranked, k=10),
    }
    if metric in summary["models"].get("bm25", {}) and summary["models"]["bm25"][metric] > \
            summary["models"]["candidate"][metric]:
        summary["warnings"].append(
            f"keyword search (BM25 over titles) beats the candidate on {metric}: "
            f"{summary['models']['bm25'][metric]:.4f} against {summary['models']['candidate'][metric]:.4f}")
    if summary["hubness"]["top_share"] > HUB_SHARE:
        summary["warnings"].append(
            f"hubness: the candidate's {summary['hubness']['images']} most frequent results fill "
            f"{summary['hubness']['top_share']:.0%} of all top-10 slots (the same few images for many queries)")
    if data is not None and "gate_inputs" in data:
        promoted, reason, gates = decide(summary, cfg.promote, data["gate_inputs"])
        summary["decision"] = {"promoted": promoted, "reason": reason, "gates": gates}
    metrics_path = out_dir / "metrics.json"
    metrics_path.write_text(json.dumps(summary, indent=2))
    shutil.copyfile(metrics_path, report_dir / "metrics.json")  # the report folder stands on its own
    report_path = report_dir / "recall.md"
    if data is not None:
        for figure in data["figures"]:
            shutil.copyfile(figure, report_dir / figure.name)
    rule = SliceRule(ecfg.slice_tolerance, ecfg.slice_min_queries, ecfg.slice_alpha)
    report_path.write_text(render_report(summary, rule, metric, data))
    write_html_report(report_dir / "report.html", summary, cfg, data, root,
                      dict(zip(test.catalog_ids, test.catalog_paths, strict=True)))
    return EvaluateResult(metrics_path, report_path, summary)


def run(cfg: RunConfig, inputs: StageInputs, out_dir: Path) -> StageOutput:
    inputs.report_dir.mkdir(parents=True, exist_ok=True)
    extract, split, train = inputs.summary("extract"), inputs.summary("split"), inputs.summary("train")
    data = {"extract": extract, "split": split, "train": train,
            "figures": [inputs.output("extract", "propensity").with_suffix(".png"),
                        inputs.output("split", "groups_sheet")],
            # what promote's gates need besides the figures: known now, so the report shows the decision
            "gate_inputs": GateInputs.from_summaries(
                extract, json.loads(inputs.output("split", "leak_audit").read_text()), train)}
    result = evaluate(cfg, inputs.output("split", "pairs"), inputs.output("split", "images"),
                      inputs.output("train", "weights").parent, out_dir, inputs.report_dir, inputs.run_id, data)
    return StageOutput({"metrics": result.metrics, "report": result.report}, result.summary)
