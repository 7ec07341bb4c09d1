"""Evaluate: text-to-image retrieval over the catalog for candidate, champion and starting model.

Held-out queries are the queries of test-split pairs with at least one click; a query's relevant
images are the test images clicked for it. Writes `runs/<id>/evaluate/metrics.json` and the
human report `reports/<run_id>/recall.md`.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import faiss
import numpy as np
import polars as pl
from rich.progress import track

from pipeline.config import EvaluateConfig, RunConfig
from pipeline.errors import StageError
from pipeline.images import load_rgb, resolve_image_path
from pipeline.metrics import mean_metrics, paired_bootstrap, per_query_metrics
from pipeline.model import ClipBundle, embed_images, embed_texts, load_checkpoint, starting_model
from pipeline.slices import query_slices, render_slices, slice_table
from pipeline.tracking import tracking_uri

CHECKPOINT_ARTIFACT = "checkpoint"  # name of the checkpoint folder inside a registered pyfunc model


@dataclass(frozen=True)
class EvaluateResult:
    metrics: Path
    report: Path
    summary: dict


@dataclass(frozen=True)
class TestSet:
    queries: list[str]
    relevant: list[dict[str, float]]  # relevant image -> graded gain (its click weight)
    gallery_ids: list[str]
    gallery_paths: list[str]
    gallery_kind: str


def load_test_set(pairs_path: Path, images_path: Path, cfg: EvaluateConfig) -> TestSet:
    pairs = pl.read_parquet(pairs_path).filter((pl.col("split") == "test") & (pl.col("clicks") > 0))
    if pairs.is_empty():
        raise StageError(f"{pairs_path} has no clicked test pairs to evaluate on")
    grouped = pairs.group_by("query").agg(pl.col("image_id"), pl.col("weight")).sort("query")
    images = pl.read_parquet(images_path)
    if cfg.gallery == "test":
        images = images.filter(pl.col("split") == "test")
    images = images.sort("image_id")
    relevant = [dict(zip(ids, weights, strict=True))
                for ids, weights in zip(grouped["image_id"].to_list(), grouped["weight"].to_list(), strict=True)]
    return TestSet(grouped["query"].to_list(), relevant,
                   images["image_id"].to_list(), images["path"].to_list(), cfg.gallery)


def exact_search(queries: np.ndarray, gallery: np.ndarray, k: int) -> np.ndarray:
    """Indices of the top-k gallery items per query by inner product, shape (n_queries, k)."""
    index = faiss.IndexFlatIP(gallery.shape[1])
    index.add(np.ascontiguousarray(gallery, dtype=np.float32))
    _, neighbours = index.search(np.ascontiguousarray(queries, dtype=np.float32), min(k, gallery.shape[0]))
    return neighbours


def score_model(bundle: ClipBundle, test: TestSet, root: Path, cfg: EvaluateConfig, label: str) -> dict:
    images = (load_rgb(resolve_image_path(root, p)) for p in
              track(test.gallery_paths, description=f"embedding catalog ({label})"))
    gallery = embed_images(bundle, images, cfg.batch_size)
    queries = embed_texts(bundle, test.queries, cfg.batch_size)
    top = exact_search(queries, gallery, max(cfg.ks))
    ranked = [[test.gallery_ids[j] for j in row if j >= 0] for row in top]
    return per_query_metrics(ranked, test.relevant, cfg.ks)


def champion_model(cfg: RunConfig, workdir: Path) -> tuple[ClipBundle, str] | None:
    """The registry's current champion and its version, or None when there is none yet."""
    import mlflow
    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient

    uri = tracking_uri(cfg.promote)
    client = MlflowClient(tracking_uri=uri)
    try:
        version = client.get_model_version_by_alias(cfg.promote.model_name, "champion")
    except MlflowException:
        return None
    mlflow.set_tracking_uri(uri)
    local = mlflow.artifacts.download_artifacts(
        artifact_uri=f"models:/{cfg.promote.model_name}/{version.version}", dst_path=str(workdir))
    return load_checkpoint(Path(local) / "artifacts" / CHECKPOINT_ARTIFACT), version.version


def evaluate(cfg: RunConfig, pairs_path: Path, images_path: Path, model_dir: Path, out_dir: Path,
             report_dir: Path, run_id: str, data: dict | None = None) -> EvaluateResult:
    """Score candidate, champion and starting model; `data` (extract and split summaries and the
    propensity plot) adds the input-data section to the report."""
    test = load_test_set(pairs_path, images_path, cfg.evaluate)
    root = cfg.data.image_root
    per_query = {"candidate": score_model(load_checkpoint(model_dir), test, root, cfg.evaluate, "candidate")}
    with tempfile.TemporaryDirectory() as workdir:
        champion = champion_model(cfg, Path(workdir))
        if champion is not None:
            per_query["champion"] = score_model(champion[0], test, root, cfg.evaluate, "champion")
    per_query["start"] = score_model(starting_model(cfg.train), test, root, cfg.evaluate, "start")
    baseline = "champion" if champion else "start"
    families = query_slices(test.queries, test.relevant, pl.read_parquet(pairs_path), pl.read_parquet(images_path))
    slices = slice_table(per_query, baseline, families, cfg.promote.metric, cfg.evaluate.slice_tolerance)
    summary = {
        "run_id": run_id, "queries": len(test.queries), "gallery": len(test.gallery_ids),
        "gallery_kind": test.gallery_kind, "ks": list(cfg.evaluate.ks),
        "champion_version": champion[1] if champion else None, "baseline": baseline,
        "models": {name: mean_metrics(values) for name, values in per_query.items()},
        "delta_vs_baseline": {
            metric: dict(zip(("mean", "low", "high"), paired_bootstrap(values, per_query[baseline][metric]),
                             strict=True))
            for metric, values in per_query["candidate"].items()},
        "slices": slices,
        "flagged_slices": [f"{row['family']}={row['slice']}" for row in slices if row["flagged"]],
    }
    metrics_path = out_dir / "metrics.json"
    metrics_path.write_text(json.dumps(summary, indent=2))
    shutil.copyfile(metrics_path, report_dir / "metrics.json")  # the report folder stands on its own
    report_path = report_dir / "recall.md"
    text = render_report(summary) + render_slices(slices, cfg.promote.metric, baseline, cfg.evaluate.slice_tolerance)
    if data is not None:
        for figure in data["figures"]:
            shutil.copyfile(figure, report_dir / figure.name)
        text += render_data_section(data["extract"], data["split"])
    report_path.write_text(text)
    return EvaluateResult(metrics_path, report_path, summary)


def render_report(summary: dict) -> str:
    models = summary["models"]
    names = list(models)
    metric_names = list(models["candidate"])
    gallery = ("the whole catalog, quarantined images excluded" if summary["gallery_kind"] == "catalog"
               else "test-split images only")
    lines = [
        f"# Recall report — run `{summary['run_id']}`",
        "",
        f"{summary['queries']} held-out queries searched over {summary['gallery']} images ({gallery}).",
        f"Baseline for promotion: **{summary['baseline']}**"
        + (f" (registry version {summary['champion_version']})" if summary["champion_version"] else
           " (no champion registered yet, so the untrained starting model)") + ".",
        "",
        "| metric | " + " | ".join(names) + " | candidate − baseline | 95% CI (paired bootstrap) |",
        "|---|" + "---|" * (len(names) + 2),
    ]
    for metric in metric_names:
        cells = " | ".join(f"{models[n][metric]:.4f}" for n in names)
        delta = summary["delta_vs_baseline"][metric]
        lines.append(f"| {metric} | {cells} | {delta['mean']:+.4f} | [{delta['low']:+.4f}, {delta['high']:+.4f}] |")
    lines += [
        "",
        "## Definitions",
        "- Held-out queries: normalised queries with at least one click on a test-split image.",
        "- Relevant images of a query: the test-split images it clicked (click pairs from the test split only).",
        "- recall@k: share of a query's relevant images among its top k results, averaged over queries.",
        "- hit@k: share of queries with at least one relevant image in the top k.",
        "- MRR: mean of 1 / rank of the first relevant image (0 when none is retrieved).",
        "- nDCG@10: DCG@10 / ideal DCG@10 with DCG@10 = Σ gain / log2(rank + 1) over the top 10, the gain of an "
        "image being its held-out click weight (position-debiased clicks).",
        "- Search: exact inner product (FAISS IndexFlatIP) over L2-normalised embeddings.",
        "- CI: 2,000 paired bootstrap resamples of the held-out queries; both models scored on the same queries.",
        "- Models: candidate = this run's best checkpoint; champion = the registry's `champion` alias; "
        "start = the model training started from.",
        "",
    ]
    return "\n".join(lines)


def render_data_section(extract: dict, split: dict) -> str:
    """Where the training data came from: counts that add up, quarantine reasons, position bias."""
    reasons = "\n".join(f"| {reason} | {count} |" for reason, count in extract["quarantined_by_reason"].items())
    images = "\n".join(f"| {reason} | {count} |" for reason, count in split["images_quarantined_by_reason"].items())
    bands = ", ".join(f"{name} {band['queries']} queries / {band['impressions']} impressions"
                      for name, band in extract["query_bands"].items())
    return "\n".join([
        "## Input data",
        f"Impressions read: **{extract['rows_read']}** = kept {extract['rows_kept']} "
        f"+ quarantined {extract['rows_quarantined']}. Bot sessions: {extract['bot_sessions']}; "
        f"queries over the 77-token text context (kept, truncated): {extract['long_queries_truncated']}.",
        f"Pairs: {extract['pairs']} over {extract['queries']} queries and {extract['images']} images "
        f"({bands}).",
        "",
        "| event quarantine reason | rows |", "|---|---|", reasons,
        "",
        f"Catalog: {split['catalog_rows']} rows = kept {split['images_kept']} + quarantined "
        f"{split['images_quarantined']}; {split['groups']} groups (largest {split['largest_group']}); "
        f"{split['pairs_excluded']} pairs excluded because their image was quarantined. Leak audit: passed.",
        "",
        "| image quarantine reason | images |", "|---|---|", images or "| (none) | 0 |",
        "",
        "### Groups",
        f"Near-duplicate pairs by hash: {split['near_duplicate_pairs']}. Group sizes (size: groups): "
        + ", ".join(f"{size}: {n}" for size, n in split["group_size_histogram"].items()) + ".",
        (f"**Giant groups** above the configured size: {', '.join(split['giant_groups'])}."
         if split["giant_groups"] else "No giant groups."),
        f"Sticky splits: {split['sticky']['new_groups']} new groups, {split['sticky']['grown_groups']} grown, "
        f"{split['sticky']['linked_groups']} linked across splits ({split['sticky']['images_excluded']} new images "
        f"excluded); split registry version {split['registry_version']}. Pairs with held-out queries: "
        f"{split['pairs_heldout_queries']}.",
        "",
        "The largest groups, one per row:",
        "",
        "![largest groups](groups.png)",
        "",
        "### Position bias",
        "Examination probability per position, estimated from the log by EM under the position-based "
        "model; training weights are clicks divided by it (clipped).",
        "",
        "![propensity curve](propensity.png)",
        "",
    ])
