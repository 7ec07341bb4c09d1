"""`recall.md`: the report as Markdown, rendered from evaluate's summary and the data summaries."""

from __future__ import annotations

from pipeline.report.sentences import leak_audit_sentence, reindex_sentence, relevance_sentences, search_sentence


def render_report(summary: dict) -> str:
    models = summary["models"]
    names = list(models)
    metric_names = list(models["candidate"])
    gallery = ("the whole catalog, quarantined images excluded" if summary["gallery_kind"] == "catalog"
               else "test-split images only")
    lines = [
        f"# Recall report — run `{summary['run_id']}`",
        "",
        *[f"**Warning:** {warning}" for warning in summary.get("warnings", [])],
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
        *[f"- {line}" for line in relevance_sentences(summary)],
        "- recall@k: share of a query's relevant images among its top k results, averaged over queries.",
        "- hit@k: share of queries with at least one relevant image in the top k.",
        "- MRR: mean of 1 / rank of the first relevant image (0 when none is retrieved).",
        "- nDCG@10: DCG@10 / ideal DCG@10 with DCG@10 = Σ gain / log2(rank + 1) over the top 10, the gain of an "
        "image being its held-out click weight (position-debiased clicks).",
        "- Search: " + search_sentence(summary["search"]),
        "- bm25: the text-only baseline, queries matched to catalog titles by BM25 (no image model).",
        "- new query / seen image: held-out queries (never trained on) with their clicks on training images, "
        "searched over the whole catalog; reported as a slice, not in the headline table.",
        "- CI: 95% bias-corrected and accelerated (BCa) bootstrap interval from 2,000 paired resamples of the "
        "held-out queries; both models scored on the same queries.",
        "- Models: candidate = this run's best checkpoint; champion = the registry's `champion` alias; "
        "start = the model training started from.",
        "",
        reindex_sentence(summary),
        "",
    ]
    return "\n".join(lines)


def render_data_section(extract: dict, split: dict) -> str:
    """Where the training data came from: counts that add up, quarantine reasons, position bias."""
    reasons = "\n".join(f"| {reason} | {count} |" for reason, count in extract["quarantined_by_reason"].items())
    images = "\n".join(f"| {reason} | {count} |" for reason, count in split["images_quarantined_by_reason"].items())
    bands = ", ".join(f"{name} {band['queries']} queries / {band['impressions']} impressions"
                      for name, band in extract["query_bands"].items())
    weighting = extract.get("weighting", {})
    warnings = [f"**Warning:** {w}" for w in extract.get("warnings", [])]
    return "\n".join([
        "## Input data",
        *warnings,
        f"Pair weighting: configured `{weighting.get('configured', '?')}`, "
        f"applied `{weighting.get('effective', '?')}`.",
        f"Impressions read: **{extract['rows_read']}** = kept {extract['rows_kept']} "
        f"+ quarantined {extract['rows_quarantined']}. Bot sessions: {extract['bot_sessions']}; "
        f"queries over the model's {extract.get('text_context', 77)}-token text context (kept, truncated): "
        f"{extract['long_queries_truncated']}.",
        f"Pairs: {extract['pairs']} over {extract['queries']} queries and {extract['images']} images "
        f"({bands}).",
        "",
        "| event quarantine reason | rows |", "|---|---|", reasons,
        "",
        f"Catalog: {split['catalog_rows']} rows = kept {split['images_kept']} + quarantined "
        f"{split['images_quarantined']}; {split['groups']} groups (largest {split['largest_group']}); "
        f"{split['pairs_excluded']} pairs excluded because their image was quarantined. "
        + leak_audit_sentence(split.get("leak_audit")),
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
        f"excluded); split registry version {split['registry_version']}. "
        f"Giant groups spanning several products were regrouped by product: "
        f"{split['sticky'].get('cross_product_links_cut', 0)} near-duplicate links between different products cut, "
        f"{split['sticky'].get('images_excluded_by_cut_links', 0)} images on the later split's side of a cut link "
        f"excluded from training and evaluation. Pairs with held-out queries: "
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


def render_decision(summary: dict) -> str:
    """The promotion decision as promote will take it, gate by gate with its numbers."""
    decision = summary.get("decision")
    if decision is None:
        return ""
    verdict = "**promote**: every gate passes" if decision["promoted"] else "**do not promote**"
    lines = ["## Promotion decision", f"{verdict} (promote moves `champion` only if the registry's champion is still "
             f"the one compared against).", "", "| gate | result | numbers |", "|---|---|---|"]
    lines += [f"| {g['gate']} | {'pass' if g['passed'] else '**FAIL**'} | {g['detail']} |" for g in decision["gates"]]
    return "\n".join(lines + [""])


def render_training(train: dict) -> str:
    """How the candidate was trained: epochs, steps, time, and the validation curve."""
    history = train.get("history", [])
    lines = ["## Training",
             f"{train['epochs']} epochs, {train['steps']} steps, {train['seconds']} s ({train['samples_per_s']} "
             f"samples/s); best validation recall@10 {train['best_val_recall@10']}; start: {train['start_weights']}.",
             ""]
    if history:
        lines += ["| epoch | train loss | validation loss | validation recall@10 |", "|---|---|---|---|"]
        lines += [f"| {h['epoch']} | {h.get('train_loss', '–')} | {h.get('val_loss', '–')} | "
                  f"{h.get('val_recall_at_10', '–')} |" for h in history]
    return "\n".join(lines + [""])


def slice_rule(tolerance: float, min_queries: int, alpha: float) -> str:
    """How slices gate promotion, in one sentence (both reports print it)."""
    return (f"Slices of at least {min_queries} queries gate promotion: one is flagged **regressed** when a "
            f"one-sided paired t-test finds the candidate worse than the baseline by more than {tolerance}, at "
            f"family-wise error {alpha} over all gated slices (Holm's correction). Smaller slices are shown, never "
            f"gated. Intervals: 95% paired BCa bootstrap.")


def render_slices(rows: list[dict], metric: str, baseline: str, tolerance: float, min_queries: int = 30,
                  alpha: float = 0.05) -> str:
    lines = [
        "## Slices",
        f"{metric} per slice, candidate vs {baseline}. " + slice_rule(tolerance, min_queries, alpha),
        "",
        "| family | slice | queries | candidate | baseline | keyword (bm25) | difference [95% CI] | p (one-sided) "
        "| flag |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        flag = "**regressed**" if row["flagged"] else "" if row["gated"] else f"not gated (< {min_queries} queries)"
        keyword = f"{row['keyword']:.4f}" if row.get("keyword") is not None else "–"
        lines.append(f"| {row['family']} | {row['slice']} | {row['queries']} | {row['candidate']:.4f} | "
                     f"{row['baseline']:.4f} | {keyword} | {row['delta']:+.4f} [{row['low']:+.4f}, "
                     f"{row['high']:+.4f}] | {row['p_value']:.3g} | {flag} |")
    return "\n".join(lines + [""])
