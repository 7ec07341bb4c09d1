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
from pipeline.data.groups import look_alikes
from pipeline.data.images import still_there
from pipeline.data.split_registry import registered_before
from pipeline.errors import StageError
from pipeline.report.history import earlier_weeks, history, plot_history
from pipeline.report.html import write_html_report
from pipeline.report.markdown import render_report
from pipeline.report.sections import SliceRule
from pipeline.report.verdict import html_block, markdown_block
from pipeline.retrieval.catalog_vectors import CatalogVectors
from pipeline.retrieval.debiased import effective_sample_size, snips_per_query
from pipeline.retrieval.fusion import Ranked, reciprocal_rank_fusion, tune
from pipeline.retrieval.gates import GateInputs, decide
from pipeline.retrieval.metrics import mean_metrics, paired_bootstrap, per_query_metrics
from pipeline.retrieval.search import approximate_recall, exact_search_scored, product_vectors
from pipeline.retrieval.served import (
    FUSION_DEPTH,
    RECORD_TAG,
    KeywordSearch,
    ServedConfig,
    keyword_index,
    query_text,
    rank,
)
from pipeline.retrieval.slices import query_slices, slice_table
from pipeline.stages import StageInputs, StageOutput
from pipeline.training.model import (
    ClipBundle,
    embed_image_files_on_devices,
    embed_texts,
    embed_titles,
    load_checkpoint,
    starting_model,
    to_best_device,
    weights_digest,
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
    weights: list[dict[str, float]]  # relevant item -> summed click weight of its held-out pairs (SNIPS)
    # held-out queries' clicks on train-split images: the "new query / seen image" slice, searched
    # over the whole catalog (its relevant images are not test images)
    seen_queries: list[str]
    seen_relevant: list[dict[str, float]]
    seen_weights: list[dict[str, float]]
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


def latest_readout(folder: Path) -> dict | None:
    """The newest interleaving readout (`clickclip interleave-readout` writes one per reading), or None."""
    readouts = sorted(folder.glob("readout-*.json")) if folder.is_dir() else []
    if not readouts:
        return None
    read = json.loads(readouts[-1].read_text())
    return read | {"read_at": readouts[-1].stem.removeprefix("readout-")}


def _grouped(pairs: pl.DataFrame, item_of: dict[str, str]
             ) -> tuple[list[str], list[dict[str, float]], list[dict[str, float]], list[list[str]]]:
    """Queries; per query, relevant item -> gain (the largest click weight among its images) and
    relevant item -> summed click weight; and per query its clicked images, heaviest first."""
    grouped = pairs.group_by("query").agg(pl.col("image_id"), pl.col("weight")).sort("query")
    relevant, summed, clicked = [], [], []
    for ids, weights in zip(grouped["image_id"].to_list(), grouped["weight"].to_list(), strict=True):
        gains: dict[str, float] = {}
        total: dict[str, float] = {}
        for image, weight in zip(ids, weights, strict=True):
            item = item_of.get(image, image)
            gains[item] = max(gains.get(item, weight), weight)
            total[item] = total.get(item, 0.0) + weight
        relevant.append(gains)
        summed.append(total)
        clicked.append([image for _, image in sorted(zip(weights, ids, strict=True), key=lambda wi: (-wi[0], wi[1]))])
    return grouped["query"].to_list(), relevant, summed, clicked


def known_positives(queries: list[str], scored: pl.DataFrame, clicked: pl.DataFrame, images: pl.DataFrame,
                    item_of: dict[str, str]) -> list[set[str]]:
    """Per query, the images that are right answers but not the ones scored (filtered ranking, as in
    knowledge-graph evaluation): its clicks on images outside `scored`, and the other photos of a
    scored image's product or near-duplicate group. Removed from the ranked list, neither hit nor miss."""
    scored_by_query = scored.group_by("query").agg(pl.col("image_id"))
    scored_images = dict(zip(scored_by_query["query"], scored_by_query["image_id"].to_list(), strict=True))
    clicked_by_query = clicked.group_by("query").agg(pl.col("image_id"))
    clicked_images = dict(zip(clicked_by_query["query"], clicked_by_query["image_id"].to_list(), strict=True))
    alikes = look_alikes(images["image_id"].to_list(), images["product_id"].to_list(), images["group_id"].to_list())
    known = []
    for query in queries:
        relevant = set(scored_images.get(query, []))
        same = set().union(*(alikes.get(image, set()) for image in relevant))
        candidates = set(clicked_images.get(query, [])) | same
        relevant_items = {item_of.get(image, image) for image in relevant}
        known.append({image for image in candidates - relevant if item_of.get(image, image) not in relevant_items})
    return known


def load_test_set(pairs_path: Path, images_path: Path, cfg: EvaluateConfig, root: Path | None = None,
                  split: str = "test") -> TestSet:
    """The held-out queries, their relevant items and the catalog. With `root`, catalog images whose
    file is gone since split (deleted, moved) are left out of the catalog and of every query's
    relevant set, and listed in `missing`. `split="val"` gives the validation queries that tune
    fusion and title weights (without the new query / seen image set); an empty set is allowed
    there, never for test."""
    images = pl.read_parquet(images_path).sort("image_id")
    missing: list[str] = []
    if root is not None:
        gone = [not still_there(root, path) for path in images["path"].to_list()]
        missing = images.filter(pl.Series(gone))["image_id"].to_list()
        images = images.filter(~pl.Series(gone))
    pairs = pl.read_parquet(pairs_path).filter((pl.col("clicks") > 0) & ~pl.col("image_id").is_in(missing))
    test_pairs = pairs.filter(pl.col("split") == split)
    if test_pairs.is_empty() and split == "test":
        raise StageError(f"{pairs_path} has no clicked test pairs to evaluate on")
    # product relevance: an image counts as its product (its near-duplicate group when it has none)
    item_of = {} if cfg.relevance == "image" else {
        image: f"product:{product}" if product is not None else f"group:{group}"
        for image, product, group in zip(images["image_id"], images["product_id"], images["group_id"], strict=True)}
    queries, relevant, weights, clicked = _grouped(test_pairs, item_of)
    seen_pairs = pairs.filter((pl.col("split") == "train") & pl.col("query_heldout")) if split == "test" else \
        pairs.clear()
    seen_queries, seen_relevant, seen_weights, _ = _grouped(seen_pairs, item_of)
    titles = images["title"].fill_null("").to_list() if "title" in images.columns else [""] * images.height
    in_gallery = (images["split"] == split).to_numpy() if cfg.gallery == "test" else np.ones(images.height, bool)
    known, seen_known = [set() for _ in queries], [set() for _ in seen_queries]
    if cfg.filtered:
        known = known_positives(queries, test_pairs, pairs, images, item_of)
        seen_known = known_positives(seen_queries, seen_pairs, pairs, images, item_of)
    return TestSet(queries, relevant, weights, seen_queries, seen_relevant, seen_weights, images["image_id"].to_list(),
                   images["path"].to_list(), titles, in_gallery, cfg.gallery, known, seen_known, item_of, clicked,
                   missing)


@dataclass
class ModelScores:
    """One served configuration's results on the held-out queries."""

    per_query: dict[str, np.ndarray]  # headline metrics per held-out query
    per_query_seen: dict[str, np.ndarray]  # the new query / seen image queries
    ranked: list[list[str]]  # headline top-k items per query, as scored
    search: dict
    images_per_s: float | None = None
    shown: list[list[str]] = field(default_factory=list)  # top 5 images per query after filtering, for the report


@dataclass(frozen=True)
class Side:
    """One set of queries searched over one part of the catalog."""

    queries: list[str]
    relevant: list[dict[str, float]]
    weights: list[dict[str, float]]
    known: list[set[str]]
    mask: np.ndarray  # bool per catalog image: searched

    @classmethod
    def headline(cls, test: TestSet) -> Side:
        return cls(test.queries, test.relevant, test.weights, test.known, test.in_gallery)

    @classmethod
    def seen(cls, test: TestSet) -> Side:
        return cls(test.seen_queries, test.seen_relevant, test.seen_weights, test.seen_known,
                   np.ones(len(test.catalog_ids), bool))


@dataclass
class Embedded:
    """One model's embeddings of the catalog (images and titles) and of every query set."""

    catalog: np.ndarray
    titles: np.ndarray  # text embedding of each catalog image's title (zeros where it has none)
    has_title: np.ndarray
    queries: dict[str, np.ndarray]  # "test", "seen", "val"
    images_per_s: float


def embed_model(bundle: ClipBundle, test: TestSet, val: TestSet, root: Path, cfg: EvaluateConfig,
                label: str) -> Embedded:
    to_best_device(bundle)
    started = time.perf_counter()
    catalog = embed_image_files_on_devices(bundle, root, test.catalog_paths, cfg.batch_size, cfg.decode_workers,
                                           cfg.devices, partial(track, description=f"embedding catalog ({label})"))
    images_per_s = len(test.catalog_paths) / max(time.perf_counter() - started, 1e-9)
    titles, has_title = embed_titles(bundle, test.catalog_titles, cfg.batch_size)
    queries = {"test": embed_texts(bundle, test.queries, cfg.batch_size),
               "seen": embed_texts(bundle, test.seen_queries, cfg.batch_size),
               "val": embed_texts(bundle, val.queries, cfg.batch_size)}
    return Embedded(catalog, titles, has_title, queries, images_per_s)


def save_candidate_vectors(path: Path, model_dir: Path, images_path: Path, test: TestSet, embedded: Embedded) -> None:
    digest_of = dict(pl.read_parquet(images_path, columns=["image_id", "digest"]).iter_rows())
    CatalogVectors(weights_digest(model_dir), test.catalog_ids, [digest_of[i] for i in test.catalog_ids],
                   test.catalog_titles, embedded.catalog, embedded.titles).save(path)


def item_vectors(embedded: Embedded, title_weight: float) -> np.ndarray:
    """Catalog vectors with title weight β (see search.product_vectors)."""
    return product_vectors(embedded.catalog, embedded.titles, embedded.has_title, title_weight)


def dense_lists(queries: np.ndarray, items: np.ndarray, side: Side, ids: list[str],
                depth: int) -> tuple[list[Ranked], dict]:
    """Exact top-`depth` (image, cosine) per query over the side's part of the catalog."""
    if not len(queries):
        return [], {}
    scores, top, info = exact_search_scored(queries, items[side.mask], depth)
    searched = [ids[i] for i in np.flatnonzero(side.mask)]
    return [[(searched[j], float(v)) for j, v in zip(row, values, strict=True) if j >= 0]
            for row, values in zip(top.tolist(), scores.tolist(), strict=True)], info.as_dict()


def side_metrics(test: TestSet, side: Side, lists: list[Ranked], ks: tuple[int, ...]
                 ) -> tuple[dict[str, np.ndarray], list[list[str]]]:
    """Per-query metrics (click-weighted and SNIPS) of ranked lists, as scored: filtered, mapped to
    the relevance unit, cut at max(ks)."""
    ranked = [test.ranked_items([item for item, _ in row], drop, max(ks)) for row, drop in
              zip(lists, side.known, strict=True)]
    if not ranked:
        return {}, []
    return per_query_metrics(ranked, side.relevant, ks) | snips_per_query(ranked, side.weights, ks), ranked


def _shown(lists: list[Ranked], known: list[set[str]]) -> list[list[str]]:
    return [[image for image, _ in row if image not in drop][:5] for row, drop in zip(lists, known, strict=True)]


def search_depth(test: TestSet, k: int, known: list[set[str]]) -> int:
    """How many images to retrieve so that k items remain after filtering and per-product dedup."""
    per_item = max(Counter(test.item_of.values()).values(), default=1)
    return k * per_item + max((len(drop) for drop in known), default=0)


def tuning_metric(metric: str) -> str:
    """The metric the fusion and title weights are tuned on: the promotion metric, on plain clicks."""
    return metric.removeprefix("snips_")


def base_served(cfg: RunConfig, mode: str, bundle: ClipBundle) -> ServedConfig:
    """The served configuration's fixed parts from this run's config: query normalisation (extract's),
    keyword ranker, index backend and search parameters; the weights are tuned (or recorded) per model."""
    return ServedConfig(mode=mode, title_weight=0.0, strip_punctuation=cfg.extract.strip_punctuation,
                        text_context=int(bundle.model_cfg.get("text_cfg", {}).get("context_length", 77)),
                        backend=cfg.publish.backend, hnsw_m=cfg.publish.hnsw_m,
                        hnsw_ef_construction=cfg.publish.hnsw_ef_construction, ef_search=cfg.publish.ef_search)


@dataclass(frozen=True)
class Scored:
    """A model's configurations: their scores, the served configuration of each servable one, and
    how its weights were chosen."""

    scores: dict[str, ModelScores]
    served: dict[str, ServedConfig]  # configuration name -> how it ranks (dense: `x+title`; hybrid: `hybrid(x)`)
    tuning: dict


class KeywordLists:
    """BM25 over titles for every query set, per keyword setting (computed once each): the keyword
    half of `served.rank`, over the same part of the catalog as the dense lists."""

    def __init__(self, test: TestSet, val: TestSet, depth: int):
        self.test, self.val, self.depth = test, val, depth
        self._lists: dict[tuple, dict[str, list[Ranked]]] = {}

    def lists(self, served: ServedConfig) -> dict[str, list[Ranked]]:
        key = (served.strip_punctuation, served.bm25_k1, served.bm25_b, served.bm25_method)
        if key not in self._lists:
            head, seen, tune_on = Side.headline(self.test), Side.seen(self.test), Side.headline(self.val)
            out = {}
            for which, source, side in (("test", self.test, head), ("seen", self.test, seen),
                                        ("val", self.val, tune_on)):
                titles = [t for t, keep in zip(source.catalog_titles, side.mask, strict=True) if keep]
                ids = [i for i, keep in zip(source.catalog_ids, side.mask, strict=True) if keep]
                index = keyword_index(titles, ids, served)
                out[which] = index.search([query_text(q, served) for q in side.queries], self.depth)
            self._lists[key] = out
        return self._lists[key]

    def lookup(self, served: ServedConfig, which: str) -> KeywordSearch:
        """The keyword search `served.rank` calls, answered from the lists computed for `which`."""
        rows = self.lists(served)[which]

        def keyword(texts: list[str], depth: int) -> list[Ranked]:
            if depth > self.depth:
                raise ValueError(f"keyword lists were computed to depth {self.depth}, not {depth}")
            return [row[:depth] for row in rows]

        return keyword


def keyword_depth(test: TestSet, val: TestSet, k: int, recorded: list[ServedConfig]) -> int:
    """The deepest list any configuration fuses or scores: every served ranking's keyword half is cut from it."""
    need = [search_depth(source, k, side.known) for source, side in
            ((test, Side.headline(test)), (test, Side.seen(test)), (val, Side.headline(val)))]
    return max(FUSION_DEPTH, *need, *(r.fusion_depth for r in recorded))


def score_configurations(label: str, embedded: Embedded, test: TestSet, val: TestSet, keyword: KeywordLists,
                         cfg: EvaluateConfig, metric: str, base: ServedConfig,
                         recorded: ServedConfig | None = None) -> Scored:
    """A model's configurations, each ranked by `served.rank`: dense (image vectors), `+title`
    (image + title vectors), `hybrid` (the `+title` vectors fused with BM25) and `hybrid_rrf` (the
    same lists by reciprocal rank fusion, reported, never served). The weights (β, w) are tuned on
    validation, or with `recorded` (the champion's served configuration) taken as they serve."""
    k = max(cfg.ks)
    head, seen, tune_on = Side.headline(test), Side.seen(test), Side.headline(val)
    sides = {"test": (test, head), "seen": (test, seen), "val": (val, tune_on)}
    need = {which: search_depth(source, k, side.known) for which, (source, side) in sides.items()}
    depth = recorded.fusion_depth if recorded else keyword_depth(test, val, k, [])
    infos: dict[str, dict] = {}

    def ranked(served: ServedConfig, which: str) -> list[Ranked]:
        side = sides[which][1]
        items = item_vectors(embedded, served.title_weight)

        def dense(vectors: np.ndarray, at: int) -> list[Ranked]:
            found, infos[which] = dense_lists(vectors, items, side, test.catalog_ids, at)
            return found

        return rank(side.queries, embedded.queries[which], served, dense, keyword.lookup(served, which),
                    max(need[which], depth) if served.mode == "dense" else depth)

    def on_val(served: ServedConfig) -> float:
        return float(side_metrics(val, tune_on, ranked(served, "val"), cfg.ks)[0][metric].mean())

    dense_base = base.with_(mode="dense", fusion_depth=depth)
    tuned = bool(val.queries) and recorded is None
    if recorded is not None:
        title_weight, hybrid_weight, title_curve, hybrid_curve = recorded.title_weight, recorded.fusion_weight, [], []
        dense_base = recorded.with_(mode="dense")
    elif tuned:
        title_weight, title_curve = tune(cfg.title_weights, lambda b: on_val(dense_base.with_(title_weight=b)))
        hybrid_weight, hybrid_curve = tune(cfg.hybrid_weights, lambda w: on_val(
            dense_base.with_(mode="hybrid", title_weight=title_weight, fusion_weight=w)))
    else:
        title_weight, hybrid_weight, title_curve, hybrid_curve = 0.0, 0.5, [], []
    how = "recorded" if recorded is not None else "validation" if tuned else "untuned"
    title = f"{label}+title"
    configs = {label: dense_base.with_(title_weight=0.0, fusion_weight=1.0, tuned=how),
               title: dense_base.with_(title_weight=title_weight, fusion_weight=1.0, tuned=how),
               f"hybrid({label})": dense_base.with_(mode="hybrid", title_weight=title_weight,
                                                   fusion_weight=hybrid_weight, tuned=how)}

    def scores(test_lists: list[Ranked], seen_lists: list[Ranked], search: dict) -> ModelScores:
        per_query, ranked_items = side_metrics(test, head, test_lists, cfg.ks)
        return ModelScores(per_query, side_metrics(test, seen, seen_lists, cfg.ks)[0], ranked_items, search,
                           embedded.images_per_s, _shown(test_lists, head.known))

    out: dict[str, ModelScores] = {}
    lists: dict[str, dict[str, list[Ranked]]] = {}
    for name, served in configs.items():
        lists[name] = {which: ranked(served, which) for which in ("test", "seen")}
        search = dict(infos.get("test", {})) if served.mode == "dense" else {"index": "fusion"}
        if served.mode == "dense" and len(head.queries) and int(head.mask.sum()) >= cfg.ann_min_gallery:
            vectors = item_vectors(embedded, served.title_weight)  # what serving from HNSW would lose
            position = {image: n for n, image in enumerate(np.asarray(test.catalog_ids)[head.mask])}
            exact = np.array([[position[i] for i, _ in row[:k]] for row in lists[name]["test"]])
            search["hnsw"] = approximate_recall(embedded.queries["test"], vectors[head.mask], k, exact).as_dict()
        out[name] = scores(lists[name]["test"], lists[name]["seen"], search)
    rrf = {which: [reciprocal_rank_fusion(d[:depth], kw, k=cfg.rrf_k) for d, kw in
                   zip(lists[title][which], keyword.lookup(configs[title], which)([], depth), strict=True)]
           for which in ("test", "seen")}
    out[f"hybrid_rrf({label})"] = scores(rrf["test"], rrf["seen"], {"index": "fusion"})
    tuning = {"tuned_on_queries": len(val.queries) if tuned else 0, "metric": metric, "how": how,
              "keyword_on_val": float(side_metrics(val, tune_on, keyword.lookup(base, "val")([], depth), cfg.ks)[0]
                                      [metric].mean()) if tuned else None,
              "title_weight": title_weight, "title_curve": title_curve, "hybrid_weight": hybrid_weight,
              "hybrid_curve": hybrid_curve, "fusion_depth": depth}
    return Scored(out, {title: configs[title], f"hybrid({label})": configs[f"hybrid({label})"]}, tuning)


def score_bm25(test: TestSet, keyword: dict[str, list[Ranked]], cfg: EvaluateConfig) -> ModelScores:
    """The text-only baseline: queries matched to catalog titles by BM25."""
    head, seen = Side.headline(test), Side.seen(test)
    per_query, ranked = side_metrics(test, head, keyword["test"], cfg.ks)
    return ModelScores(per_query, side_metrics(test, seen, keyword["seen"], cfg.ks)[0], ranked, {"index": "bm25"},
                       shown=_shown(keyword["test"], head.known))


@dataclass(frozen=True)
class Champion:
    bundle: ClipBundle
    version: str
    served: ServedConfig | None  # as recorded with the version; None: registered before served configurations


def champion_model(cfg: RunConfig, workdir: Path, run_id: str | None = None) -> Champion | None:
    """The registry's current champion, its version and its served configuration, or None when
    there is none yet. With `run_id`, the champion that run compares against (not the run's own
    version, once promoted)."""
    version = registry.champion_version(cfg.promote) if run_id is None else \
        registry.baseline_champion(cfg.promote, run_id)
    if version is None:
        return None
    recorded = registry.version_tags(cfg.promote, version).get(RECORD_TAG)
    return Champion(load_checkpoint(registry.download_checkpoint(cfg.promote, version, workdir)), version,
                    ServedConfig.from_json(recorded).with_(model_version=version, tuned="recorded") if recorded
                    else None)


REPLAY_DEPTH = 20  # reference rankings are kept this deep: parity compares the top 10, ties at the cut need more


def replay_reference(test: TestSet, embedded: Embedded, served: ServedConfig) -> dict:
    """The served configuration's ranking of every test query over the whole catalog (what the
    index will hold), by the same `served.rank`: what publish's replay through the query path must
    return. With `gallery: catalog` these are the lists the headline metrics scored."""
    everything = np.ones(len(test.catalog_ids), bool)
    side = Side(test.queries, test.relevant, test.weights, test.known, everything)
    items = item_vectors(embedded, served.title_weight)
    index = keyword_index(test.catalog_titles, test.catalog_ids, served) if served.mode == "hybrid" else None

    def dense(vectors: np.ndarray, depth: int) -> list[Ranked]:
        return dense_lists(vectors, items, side, test.catalog_ids, depth)[0]

    def keyword(texts: list[str], depth: int) -> list[Ranked]:
        return index.search(texts, depth)

    rankings = rank(test.queries, embedded.queries["test"], served, dense, keyword, REPLAY_DEPTH)
    return {"served_config": served.to_dict(), "queries": test.queries,
            "rankings": [[[image, score] for image, score in row] for row in rankings]}


def worst_queries(test: TestSet, scores: dict[str, ModelScores], baseline: str, metric: str,
                  count: int = WORST_QUERIES, candidate: str = "candidate") -> list[dict]:
    """The queries where the candidate lost most against the baseline, with both top-5 lists.

    Ranked by the loss weighted by the query's held-out click weight: a query with one click where
    the baseline scored 1.0 by luck weighs less than a query many clicks stand behind."""
    delta = scores[candidate].per_query[metric] - scores[baseline].per_query[metric]
    support = np.array([sum(gains.values()) for gains in test.relevant])
    order = [int(i) for i in np.argsort(delta * support, kind="stable") if delta[i] < 0][:count]
    return [{"query": test.queries[i], "candidate": float(scores[candidate].per_query[metric][i]),
             "baseline": float(scores[baseline].per_query[metric][i]), "click_weight": round(float(support[i]), 3),
             "candidate_top": scores[candidate].shown[i], "baseline_top": scores[baseline].shown[i],
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


def earlier_heldout(test: TestSet, earlier: set[str], candidate: np.ndarray, baseline: np.ndarray) -> dict:
    """candidate − baseline over the held-out queries whose clicked test images were all registered
    by earlier runs (`earlier`, this run's own view: split_registry.registered_before): the queries
    the champion was judged on. Counts say how many were compared, of how many."""
    mask = np.array([bool(clicked) and set(clicked) <= earlier for clicked in test.clicked])
    counts = {"queries": int(mask.sum()), "of_queries": len(test.queries),
              "earlier_images": len(earlier & set(test.catalog_ids))}
    if not mask.any():
        return counts
    mean, low, high = paired_bootstrap(candidate[mask], baseline[mask])
    return counts | {"delta": mean, "low": low, "high": high}


def served_names(serve_as: str, baseline: str, baseline_mode: str | None = None) -> tuple[str, str]:
    """The configurations the gate compares: the candidate as `promote.serve_as` would publish it,
    the baseline as it serves (a champion's recorded mode; the start's, as the candidate's)."""
    def name(label: str, mode: str) -> str:
        return f"hybrid({label})" if mode == "hybrid" else f"{label}+title"

    return name("candidate", serve_as), name(baseline, baseline_mode or serve_as)


def evaluate(cfg: RunConfig, pairs_path: Path, images_path: Path, model_dir: Path, out_dir: Path,
             report_dir: Path, run_id: str, data: dict | None = None) -> EvaluateResult:
    """Score candidate, champion and starting model (each dense, image + title, and hybrid with
    keyword search) and the BM25 baseline on the same held-out queries; `data` (extract and split
    summaries and their figures) adds the input-data section."""
    root = cfg.data.image_root
    ecfg = cfg.evaluate
    test = load_test_set(pairs_path, images_path, ecfg, root)
    val = load_test_set(pairs_path, images_path, ecfg, root, split="val")
    k = max(ecfg.ks)
    metric = cfg.promote.metric
    bundles = {"candidate": load_checkpoint(model_dir)}
    base = base_served(cfg, cfg.promote.serve_as, bundles["candidate"])
    with tempfile.TemporaryDirectory() as workdir:
        champion = champion_model(cfg, Path(workdir), run_id)
        if champion is not None:
            bundles["champion"] = champion.bundle
        bundles["start"] = starting_model(cfg.train)
        recorded = {"champion": champion.served} if champion and champion.served else {}
        keyword = KeywordLists(test, val, keyword_depth(test, val, k, list(recorded.values())))
        scores: dict[str, ModelScores] = {}
        served_configs: dict[str, ServedConfig] = {}
        tuning: dict[str, dict] = {}
        images_per_s = {}
        for label, bundle in bundles.items():
            embedded = embed_model(bundle, test, val, root, ecfg, label)
            images_per_s[label] = embedded.images_per_s
            scored = score_configurations(label, embedded, test, val, keyword, ecfg, tuning_metric(metric), base,
                                          recorded.get(label))
            if label == "candidate":  # publish indexes these rather than embedding the catalog again
                save_candidate_vectors(out_dir / "candidate_vectors.npz", model_dir, images_path, test, embedded)
                candidate_served = scored.served[served_names(cfg.promote.serve_as, "start")[0]]
                (out_dir / "served_rankings.json").write_text(json.dumps(
                    replay_reference(test, embedded, candidate_served)))
            scores.update(scored.scores)
            served_configs.update(scored.served)
            tuning[label] = scored.tuning
    scores["bm25"] = score_bm25(test, keyword.lists(base), ecfg)
    per_query = {name: s.per_query for name, s in scores.items()}
    baseline = "champion" if champion else "start"
    served, served_baseline = served_names(cfg.promote.serve_as, baseline,
                                           champion.served.mode if champion and champion.served else None)
    families = query_slices(test.queries, test.relevant, pl.read_parquet(pairs_path), pl.read_parquet(images_path))
    gated = {"candidate": scores[served], "baseline": scores[served_baseline], "bm25": scores["bm25"]}
    if test.seen_queries:  # one family of slices over both query sets, so Holm's correction spans them all
        per_query_all = {name: {m: np.concatenate([s.per_query[m], s.per_query_seen[m]]) for m in s.per_query}
                         for name, s in gated.items()}
        seen = [None] * len(test.seen_queries)
        families = {family: values + seen for family, values in families.items()}
        families["query"][len(test.queries):] = ["new query / seen image"] * len(test.seen_queries)
    else:
        per_query_all = {name: s.per_query for name, s in gated.items()}
    earlier = earlier_heldout(test, registered_before(cfg.state_dir / cfg.name / "split_registry.parquet", run_id),
                              per_query[served][metric], per_query[served_baseline][metric]) if champion else None
    slices = slice_table(per_query_all, "baseline", families, metric, ecfg.slice_tolerance, ecfg.slice_min_queries,
                         ecfg.slice_alpha)
    weighting = ((data or {}).get("extract") or {}).get("weighting", {}).get("effective")
    summary = {
        "run_id": run_id, "queries": len(test.queries), "gallery": int(test.in_gallery.sum()),
        "catalog": len(test.catalog_ids), "gallery_kind": test.gallery_kind, "ks": list(ecfg.ks),
        "relevance": ecfg.relevance, "filtered": ecfg.filtered,
        "images_missing": test.missing[:100], "images_missing_count": len(test.missing),
        "warnings": [f"{len(test.missing)} catalog images kept by split are gone from {root} (deleted or moved "
                     f"since): left out of the catalog and of every query's relevant images, e.g. "
                     f"{', '.join(test.missing[:5])}"] if test.missing else [],
        "filtered_per_query": round(float(np.mean([len(drop) for drop in test.known])), 2) if test.known else 0.0,
        "champion_version": champion.version if champion else None, "baseline": baseline,
        "served": {"as": cfg.promote.serve_as, "candidate": served, "baseline": served_baseline},
        # how each gated side ranks: the candidate's is what publish builds, the baseline's what serves
        # now (a champion's recorded configuration) or the start's, tuned like the candidate
        "served_config": {"candidate": served_configs[served].to_dict(),
                          "baseline": served_configs[served_baseline].to_dict()},
        "models": {name: mean_metrics(values) for name, values in per_query.items()},
        "delta_vs_baseline": {
            name: dict(zip(("mean", "low", "high"), paired_bootstrap(values, per_query[served_baseline][name]),
                           strict=True))
            for name, values in per_query[served].items()},
        "tuning": tuning,
        # does what we would serve beat plain keyword search? every configuration against bm25, paired
        "vs_keyword": {name: dict(zip(("mean", "low", "high"),
                                      paired_bootstrap(values[metric], per_query["bm25"][metric]), strict=True))
                       for name, values in per_query.items() if name != "bm25"},
        "earlier_heldout": earlier,
        "debiased": {"weighting": weighting, "pairs": sum(len(w) for w in test.weights),
                     "effective_sample_size": round(effective_sample_size(test.weights), 1)},
        "slices": slices,
        "flagged_slices": [f"{row['family']}={row['slice']}" for row in slices if row["flagged"]],
        "search": scores["candidate"].search,
        # re-embedding the catalog is the price of promoting: measured here, on this machine
        "reindex": {"images": len(test.catalog_ids), "images_per_s": round(images_per_s["candidate"], 1),
                    "estimated_seconds": round(len(test.catalog_ids) / max(images_per_s["candidate"], 1e-9), 1)},
        "worst_queries": worst_queries(test, scores, served_baseline, metric, candidate=served),
        "hubness": hubness(scores[served].ranked, k=10),
    }
    needed = keyword_depth(test, val, k, [])
    if champion is not None and champion.served is not None and champion.served.mode == "hybrid" \
            and champion.served.fusion_depth < needed:
        summary["warnings"].append(
            f"the champion's recorded fusion depth {champion.served.fusion_depth} is below the {needed} results "
            "filtered scoring needs this week: after its known right answers are removed, some of its lists run "
            "short of the cut-off, which counts against the champion (it serves that depth)")
    if champion is not None and champion.served is None:
        summary["warnings"].append(
            f"champion version {champion.version} has no recorded served configuration (registered before "
            "clickclip recorded one): it was scored with weights re-tuned on this run's validation queries, "
            "which is not necessarily how it serves")
    if not val.queries:
        summary["warnings"].append(
            "no clicked validation pairs: the title and fusion weights could not be tuned (title weight 0, "
            "fusion weight 0.5 used untuned)")
    if weighting == "raw" and metric.startswith("snips_"):
        summary["warnings"].append(
            f"promote.metric {metric} is a debiased metric, but extract applied raw click weights (no usable "
            "propensities), so it equals the raw click metric")
    models = summary["models"]
    if metric in models.get("bm25", {}) and models["bm25"][metric] > models[served][metric]:
        summary["warnings"].append(
            f"keyword search (BM25 over titles) beats the served candidate ({served}) on {metric}: "
            f"{models['bm25'][metric]:.4f} against {models[served][metric]:.4f}")
    if summary["hubness"]["top_share"] > HUB_SHARE:
        summary["warnings"].append(
            f"hubness: the candidate's {summary['hubness']['images']} most frequent results fill "
            f"{summary['hubness']['top_share']:.0%} of all top-10 slots (the same few images for many queries)")
    if data is not None and "gate_inputs" in data:
        promoted, reason, gates = decide(summary, cfg.promote, data["gate_inputs"])
        summary["decision"] = {"promoted": promoted, "reason": reason, "gates": gates}
    this_week = {"run_id": run_id, "until": (((data or {}).get("extract") or {}).get("window") or {}).get("until"),
                 "candidate": models[served][metric], "baseline": models[served_baseline][metric],
                 "baseline_name": baseline, "champion_version": summary["champion_version"], "version": None,
                 "promoted": summary.get("decision", {}).get("promoted")}
    past_weeks = earlier_weeks(cfg.runs_dir, cfg.name, run_id, metric, this_week["until"],
                               registry.rolled_back_versions(cfg.promote))
    summary["history"] = history(past_weeks, this_week, metric)
    summary["interleaving"] = latest_readout(cfg.state_dir / cfg.name / "interleaving")
    if len(summary["history"]["weeks"]) > 1:
        plot_history(summary["history"], report_dir / "history.png")
    metrics_path = out_dir / "metrics.json"
    metrics_path.write_text(json.dumps(summary, indent=2))
    shutil.copyfile(metrics_path, report_dir / "metrics.json")  # the report folder stands on its own
    report_path = report_dir / "recall.md"
    if data is not None:
        for figure in data["figures"]:
            shutil.copyfile(figure, report_dir / figure.name)
    rule = SliceRule(ecfg.slice_tolerance, ecfg.slice_min_queries, ecfg.slice_alpha)
    verdict = {"by": "evaluate", **{key: summary["decision"][key] for key in ("promoted", "reason")}} \
        if "decision" in summary else {"by": "evaluate", "promoted": None, "reason": "no gate inputs: not decided"}
    report_path.write_text(markdown_block(verdict) + render_report(summary, rule, metric, data))
    # the run folder keeps the report as evaluate wrote it (its recorded output, so reuse checks it); the
    # published copy's verdict line is promote's to rewrite
    shutil.copyfile(report_path, out_dir / "recall.md")
    write_html_report(report_dir / "report.html", summary, cfg, data, root,
                      dict(zip(test.catalog_ids, test.catalog_paths, strict=True)), html_block(verdict))
    return EvaluateResult(metrics_path, out_dir / "recall.md", summary)


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
    return StageOutput({"metrics": result.metrics, "report": result.report,
                        "catalog_vectors": out_dir / "candidate_vectors.npz",
                        "served_rankings": out_dir / "served_rankings.json"}, result.summary)
