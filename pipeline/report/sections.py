"""The report's content, built once from evaluate's summary and the data summaries: every section's
title, sentences and tables. `recall.md` and `report.html` both render this list, so the two
cannot say different things; the HTML adds only pictures (charts, thumbnails, contact sheets).

Sentences may hold `**bold**` and `` `code` `` (Markdown); the HTML renderer converts both.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from pipeline.report.history import served_after
from pipeline.report.sentences import leak_audit_sentence, reindex_sentence, relevance_sentences, search_sentence
from pipeline.retrieval.served import ServedConfig


@dataclass
class Table:
    header: list[str]
    rows: list[list[str]]
    tones: list[str] = field(default_factory=list)  # per row: "", "good" or "bad" (HTML colours)


@dataclass
class Section:
    key: str  # where the HTML puts its pictures
    title: str
    level: int = 2
    warnings: list[str] = field(default_factory=list)
    text: list[str] = field(default_factory=list)
    tables: list[Table] = field(default_factory=list)
    bullets: list[str] = field(default_factory=list)
    figures: list[tuple[str, str]] = field(default_factory=list)  # (file in the report folder, alt text)


@dataclass(frozen=True)
class SliceRule:
    tolerance: float
    min_queries: int
    alpha: float

    def sentence(self) -> str:
        return (f"Slices of at least {self.min_queries} queries gate promotion: one is flagged **regressed** when a "
                f"one-sided paired t-test finds the candidate worse than the baseline by more than {self.tolerance}, "
                f"at family-wise error {self.alpha} over all gated slices (Holm's correction). Smaller slices are "
                "shown, never gated. Intervals: 95% paired BCa bootstrap.")


def four(value: float | None) -> str:
    """A figure as the report prints every one: four decimals, or a dash when there is none."""
    return "–" if value is None else f"{value:.4f}"


def headline_names(summary: dict) -> list[str]:
    """The headline table's columns: each model dense and hybrid, and keyword search; every other
    configuration is in the served-configurations table."""
    gated = served(summary)
    names = [n for base in ("candidate", "champion", "start") for n in (base, f"{base}+title", f"hybrid({base})")
             if n in (base, f"hybrid({base})") or n in (gated["candidate"], gated["baseline"])] + ["bm25"]
    return [n for n in names if n in summary["models"]]


def served(summary: dict) -> dict:
    return summary.get("served", {"as": "dense", "candidate": "candidate", "baseline": summary["baseline"]})


def report_sections(summary: dict, rule: SliceRule, metric: str, data: dict | None = None) -> list[Section]:
    sections = [headline(summary), decision(summary), online(summary), weeks(summary),
                configurations(summary, metric, (data or {}).get("train")), slices(summary, rule, metric),
                worst(summary, metric)]
    if data is not None:
        if "train" in data:
            sections.append(training(data["train"], summary))
        sections += [input_data(data["extract"], data["split"]), groups(data["extract"], data["split"]),
                     position_bias(data["extract"])]
    sections.append(definitions(summary))
    return [section for section in sections if section is not None]


def headline(summary: dict) -> Section:
    models = summary["models"]
    names = headline_names(summary)
    gate = served(summary)
    gallery = ("the whole catalog, quarantined images excluded" if summary["gallery_kind"] == "catalog"
               else "test-split images only")
    baseline = (f" (registry version {summary['champion_version']})" if summary["champion_version"] else
                " (no champion registered yet, so the untrained starting model)")
    rows, tones = [], []
    for name in models[gate["candidate"]]:
        delta = summary["delta_vs_baseline"][name]
        rows.append([name, *(f"{models[n][name]:.4f}" for n in names), f"{delta['mean']:+.4f}",
                     f"[{delta['low']:+.4f}, {delta['high']:+.4f}]"])
        tones.append("bad" if delta["high"] < 0 else "good" if delta["low"] > 0 else "")
    return Section(
        "headline", f"Recall report — run `{summary['run_id']}`", level=1, warnings=list(summary.get("warnings", [])),
        text=[f"{summary['queries']} held-out queries searched over {summary['gallery']} images ({gallery}). "
              f"Baseline for promotion: **{summary['baseline']}**{baseline}. Served as **{gate['as']}** "
              f"(promote.serve_as), so the gate compares **{gate['candidate']}** with **{gate['baseline']}** "
              "on promote.metric.",
              *served_sentences(summary),
              reindex_sentence(summary)],
        tables=[Table(["metric", *names, f"{gate['candidate']} − {gate['baseline']}",
                       "95% CI (paired BCa bootstrap)"],
                      rows, tones)])


def weeks(summary: dict) -> Section | None:
    """Earlier weeks of this shop beside this one: what each measured, decided and served after."""
    record = summary.get("history")
    if not record or len(record["weeks"]) < 2:
        return None
    metric = record["metric"]

    def decided(week: dict) -> str:
        if week["promoted"] is None:
            return "not decided"
        return (("promoted" if week["promoted"] else "refused") + (f" (version {week['version']})"
                                                                  if week["version"] else "")
                + (", rolled back" if week.get("rolled_back") else ""))

    rows = [[str(w["until"] or "–"), w["run_id"] + (" (this run)" if i == len(record["weeks"]) - 1 else ""),
             decided(w), four(w["candidate"]),
             f"{w['baseline_name']}{' ' + str(w['champion_version']) if w['champion_version'] else ''}",
             four(w["baseline"]), four(served_after(w) if w["promoted"] is not None else None)]
            for i, w in enumerate(record["weeks"])]
    return Section(
        "history", "Week by week", level=3,
        text=[f"**{record['sentence'][0].upper() + record['sentence'][1:]}.** Each week is measured on its own "
              "test queries (the sticky test split grows with the catalog), read from the earlier runs' manifests "
              "under runs_dir; rollbacks from the registry (a rolled-back week served its baseline after)."],
        tables=[Table(["window ends", "run", "decision", f"candidate {metric}", "baseline", f"baseline {metric}",
                       f"served after {metric}"], rows,
                      tones=["good" if w["promoted"] else "" for w in record["weeks"]])],
        figures=[("history.png", f"served {metric} week by week")])


def served_sentences(summary: dict) -> list[str]:
    """How each gated side ranks: what publish builds for the candidate, and what the baseline is."""
    configs = summary.get("served_config")
    if not configs:
        return []
    candidate, baseline = (ServedConfig.from_dict(configs[side]) for side in ("candidate", "baseline"))
    how = {"recorded": "as it serves (its recorded configuration, not re-tuned)",
           "validation": "with weights tuned on this run's validation queries",
           "untuned": "with untuned default weights (no validation queries)"}
    return [f"Served configuration the gate decides on, and the one publish builds: **{candidate.describe()}**, "
            f"queries normalised as extract does ({candidate.query_normalisation}), {candidate.keyword} over "
            f"titles, {candidate.backend} HNSW (m {candidate.hnsw_m}, ef_search {candidate.ef_search}).",
            f"Baseline scored {how[baseline.tuned]}: **{baseline.describe()}**."]


def decision(summary: dict) -> Section | None:
    decided = summary.get("decision")
    if decided is None:
        return None
    verdict = "**promote**: every gate passes" if decided["promoted"] else "**do not promote**"
    return Section(
        "decision", "Promotion decision",
        text=[f"{verdict} (promote moves `champion` only if the registry's champion is still the one compared "
              "against)."],
        tables=[Table(["gate", "result", "numbers"],
                      [[g["gate"], "pass" if g["passed"] else "**FAIL**", g["detail"]] for g in decided["gates"]],
                      ["good" if g["passed"] else "bad" for g in decided["gates"]])])


CONFIGURATION_METRICS = ("recall@10", "ndcg@10", "snips_recall@10", "snips_ndcg@10")


def configurations(summary: dict, metric: str, train: dict | None) -> Section | None:
    """Every served configuration on the held-out queries, and the weights tuned on validation."""
    tuning = summary.get("tuning")
    if not tuning:
        return None
    models = summary["models"]
    shown = [m for m in CONFIGURATION_METRICS if m in models["candidate"]]
    versus = summary.get("vs_keyword", {})

    def keyword_delta(name: str) -> str:
        d = versus.get(name)
        return "–" if d is None else f"{d['mean']:+.4f} [{d['low']:+.4f}, {d['high']:+.4f}]"

    rows = [[name, *(f"{models[name][m]:.4f}" for m in shown), keyword_delta(name)] for name in models]
    best = max(models, key=lambda name: models[name].get(metric, 0.0))
    text = [f"Weights tuned on {next(iter(tuning.values()))['tuned_on_queries']} validation queries "
            f"({next(iter(tuning.values()))['metric']}), never on the test queries. X+title: catalog vectors "
            "normalise((1 − β) image + β title); hybrid(X): weighted fusion of min-max normalised scores, weight "
            "w on the dense list (X's vectors with its tuned β) and 1 − w on BM25; hybrid_rrf(X): reciprocal rank "
            "fusion of the same two lists.",
            f"Best configuration on the test queries by {metric}: **{best}** ({models[best].get(metric, 0.0):.4f}; "
            f"bm25 {models.get('bm25', {}).get(metric, 0.0):.4f})."]
    debiased = summary.get("debiased")
    if debiased:
        text.append(f"snips_ metrics: clicks weighted by 1 / examination probability of the position they were "
                    f"logged at (extract's weights, {debiased['weighting']}), self-normalised; effective sample "
                    f"size {debiased['effective_sample_size']} of {debiased['pairs']} held-out clicked pairs.")
    wise = (train or {}).get("wise_ft")
    if wise:
        text.append(f"Weight interpolation (WiSE-FT): θ(α) = (1 − α) θ_start + α θ_trained, best α = "
                    f"**{wise['alpha']}** by validation recall@10 ("
                    + ", ".join(f"α {a}: {v:.4f}" for a, v in wise["curve"]) + ").")
    tuned = [[label, f"{t['title_weight']}", f"{t['hybrid_weight']}"] for label, t in tuning.items()]
    return Section("configurations", "Served configurations", text=text, tables=[
        Table(["configuration", *shown, f"{metric} − bm25 [95% CI]"], rows,
              ["good" if name == best else "" for name in models]),
        Table(["model", "title weight β", "fusion weight w (dense)"], tuned)])


def slices(summary: dict, rule: SliceRule, metric: str) -> Section:
    rows, tones = [], []
    for row in summary["slices"]:
        small = f"not gated (< {rule.min_queries} queries)"
        flag = "**regressed**" if row["flagged"] else "" if row["gated"] else small
        keyword = "–" if row.get("keyword") is None else f"{row['keyword']:.4f}"
        rows.append([row["family"], str(row["slice"]), str(row["queries"]), f"{row['candidate']:.4f}",
                     f"{row['baseline']:.4f}", keyword,
                     f"{row['delta']:+.4f} [{row['low']:+.4f}, {row['high']:+.4f}]", f"{row['p_value']:.3g}", flag])
        tones.append("bad" if row["flagged"] else "")
    flagged = ", ".join(summary["flagged_slices"]) or "none"
    return Section("slices", "Slices",
                   text=[f"{metric} per slice, {served(summary)['candidate']} vs {served(summary)['baseline']}; "
                         f"flagged slices: {flagged}. "
                         + rule.sentence()],
                   tables=[Table(["family", "slice", "queries", "candidate", "baseline", "keyword (bm25)",
                                  "difference [95% CI]", "p (one-sided)", "flag"], rows, tones)])


def worst(summary: dict, metric: str) -> Section:
    items = summary["worst_queries"]
    text = ("Ranked by the loss times the query's held-out click weight, so a query with a single click the "
            "baseline found by luck does not lead the list.")
    if not items:
        text = f"The candidate lost on no held-out query ({metric}) against the {summary['baseline']}."
    return Section("worst", f"Where the candidate lost most ({metric})", text=[text], tables=[Table(
        ["query", "candidate", summary["baseline"], "held-out click weight"],
        [[item["query"], f"{item['candidate']:.3f}", f"{item['baseline']:.3f}", f"{item.get('click_weight', 0):.2f}"]
         for item in items])] if items else [])


def training(train: dict, summary: dict) -> Section:
    """How training went, and what its validation score measured next to the test figures: the two
    are over different galleries and queries, so they are not comparable numbers."""
    history = train.get("history", [])

    best = train.get("best_val_recall@10")
    validation = train.get("validation", {})
    gallery = (f"the whole catalog ({summary['gallery']} images)" if summary["gallery_kind"] == "catalog"
               else f"the test split's {summary['gallery']} images")
    filtered = ", filtered" if summary.get("filtered") else ""
    gate = served(summary)
    models = summary["models"]
    side_by_side = [
        ["validation (the epochs' score; best epoch kept)", "candidate (image vectors)",
         str(validation.get("queries", "–")),
         f"the {validation.get('gallery', '?')} images of the validation pairs", four(best)],
        ["test (this report)", "candidate (image vectors)", str(summary["queries"]), gallery + filtered,
         four(models.get("candidate", {}).get("recall@10"))]]
    if gate["candidate"] != "candidate":
        side_by_side.append(["test (this report)", f"{gate['candidate']} (served)", str(summary["queries"]),
                             gallery + filtered, four(models.get(gate["candidate"], {}).get("recall@10"))])
    steps = train["steps"]
    attempt = train.get("steps_this_attempt", steps)
    resumed = (f", {attempt} of them in this attempt (resumed from {train['resumed_from']})"
               if train.get("resumed_from") else "")
    return Section(
        "training", "Training", warnings=list(train.get("warnings", [])),
        text=[f"{train['epochs']} epochs, {steps} steps{resumed} in {train['seconds']} s "
              f"({train['samples_per_s']} samples/s over this attempt's steps); started from "
              f"{train['start_weights']}.",
              "Validation recall@10 ranks only the images of the validation pairs for the validation queries, "
              "unfiltered: a much smaller gallery than the test figures', so it runs far higher and only "
              "compares epochs with each other."],
        tables=[Table(["measured on", "model", "queries", "gallery", "recall@10"], side_by_side),
                *([Table(["epoch", "train loss", "validation loss", "validation recall@10"],
                         [[str(h["epoch"]), four(h.get("train_loss")), four(h.get("val_loss")),
                           four(h.get("val_recall_at_10"))] for h in history])] if history else [])])


def outside_sentence(extract: dict) -> str:
    """Rows outside the window, when a source read whole had some: counted apart, never bad data."""
    outside = extract.get("rows_outside_window", 0)
    return (f" + outside the window {outside} (rows of the files read whose time falls outside it: not bad data, "
            "not in the quarantine rate)") if outside else ""


def input_data(extract: dict, split: dict) -> Section:
    weighting = extract.get("weighting", {})
    bands = ", ".join(f"{name} {band['queries']} queries / {band['impressions']} impressions"
                      for name, band in extract["query_bands"].items())
    images = [[reason, str(n)] for reason, n in split["images_quarantined_by_reason"].items()] or [["(none)", "0"]]
    return Section(
        "input", "Input data", warnings=list(extract.get("warnings", [])),
        text=[f"Pair weighting: configured `{weighting.get('configured', '?')}`, applied "
              f"`{weighting.get('effective', '?')}`.",
              f"Impressions read: **{extract['rows_read']}** = kept {extract['rows_kept']} + quarantined "
              f"{extract['rows_quarantined']}{outside_sentence(extract)}. Bot sessions: {extract['bot_sessions']}; "
              f"queries over the model's {extract.get('text_context', 77)}-token text context (kept, truncated): "
              f"{extract['long_queries_truncated']}.",
              f"Pairs: {extract['pairs']} over {extract['queries']} queries and {extract['images']} images ({bands}).",
              f"Catalog: {split['catalog_rows']} rows = kept {split['images_kept']} + quarantined "
              f"{split['images_quarantined']}; {split['pairs_excluded']} pairs excluded because their image was "
              "quarantined.",
              f"**{leak_audit_sentence(split.get('leak_audit'))}**"],
        tables=[Table(["event quarantine reason", "rows"],
                      [[reason, str(n)] for reason, n in extract["quarantined_by_reason"].items()]),
                Table(["image quarantine reason", "images"], images)])


def groups(extract: dict, split: dict) -> Section:
    sticky = split["sticky"]
    giant = split["giant_groups"]
    return Section(
        "groups", "Groups", level=3,
        warnings=[f"giant groups above the configured size: {', '.join(giant)}"] if giant else [],
        text=[f"Near-duplicate pairs by hash: {split['near_duplicate_pairs']}; {split['groups']} groups, the largest "
              f"{split['largest_group']} images. Group sizes (size: groups): "
              + ", ".join(f"{size}: {n}" for size, n in split["group_size_histogram"].items()) + ".",
              f"Sticky splits: {sticky['new_groups']} new groups, {sticky['grown_groups']} grown, "
              f"{sticky['linked_groups']} linked across splits ({sticky['images_excluded']} images excluded); "
              f"{sticky.get('cross_product_links_cut', 0)} near-duplicate links between different products cut in "
              f"giant groups ({sticky.get('images_excluded_by_cut_links', 0)} images on the later split's side "
              f"excluded); split registry version {split['registry_version']}. Pairs with held-out queries: "
              f"{split['pairs_heldout_queries']}."],
        figures=[("groups.png", "the largest groups, one per row")])


def position_bias(extract: dict) -> Section:
    estimate = extract.get("propensity_estimate") or {"used": "em"}
    how = ("from serve's randomised swaps of adjacent results (intervention harvesting), unconfounded by the "
           f"ranker's order: {estimate['why']}" if estimate["used"] == "swaps" else
           "by EM under the position-based model" + (f" ({estimate['why']})" if estimate.get("why") else ""))
    return Section("position", "Position bias", level=3,
                   text=[f"Examination probability per position, estimated from the log {how}; training weights are "
                         "clicks divided by it (clipped)."],
                   figures=[("propensity.png", "propensity curve")])


def online(summary: dict) -> Section | None:
    """The latest interleaving readout of champion and challenger, when there is one."""
    read = summary.get("interleaving")
    if not read or read.get("challenger") is None:
        return None
    interval = ("–" if read["low"] is None else f"{read['preference']:+.3f} [{read['low']:+.3f}, {read['high']:+.3f}]")
    return Section(
        "online", "Online: champion against challenger (interleaving)", level=3,
        text=[f"Challenger version {read['challenger']} against champion {read['champion']}, read "
              f"{read.get('read_at', '')} from serve's impression log: {read['sentence']}."],
        tables=[Table(["searches", "with a click", "challenger won", "lost", "tied", "preference [95%]", "gate"],
                      [[str(read["searches"]), str(read["with_clicks"]), str(read["wins"]), str(read["losses"]),
                        str(read["ties"]), interval, read["decision"]]])])


def definitions(summary: dict) -> Section:
    return Section("definitions", "Definitions", bullets=[
        "Held-out queries: normalised queries with at least one click on a test-split image.",
        *relevance_sentences(summary),
        "recall@k: share of a query's relevant images among its top k results, averaged over queries.",
        "hit@k: share of queries with at least one relevant image in the top k.",
        "MRR: mean of 1 / rank of the first relevant image (0 when none is retrieved).",
        "nDCG@10: DCG@10 / ideal DCG@10 with DCG@10 = Σ gain / log2(rank + 1) over the top 10, the gain of an "
        "image being its held-out click weight (position-debiased clicks).",
        "Search: " + search_sentence(summary["search"]),
        "bm25: the text-only baseline, queries matched to catalog titles by BM25 (no image model).",
        "hybrid(X): model X's dense list fused with the BM25 list (weighted sum of min-max normalised scores, the "
        "weight tuned on validation queries; weight 0 is keyword search's own order). X+title: catalog vectors "
        "from image and title together.",
        "snips_recall@k / snips_ndcg@10: the same metrics over held-out clicks weighted by inverse examination "
        "propensity and self-normalised (Σ weight of found clicks / Σ weight of all), so the logging ranker's "
        "position bias does not favour what it showed on top.",
        "query kind = identifier: queries with a SKU or model number (a token of 3+ characters holding a digit) or "
        "a brand from the catalog's optional brand column.",
        "new query / seen image: held-out queries (never trained on) with their clicks on training images, "
        "searched over the whole catalog; reported as a slice, not in the headline table.",
        "CI: 95% bias-corrected and accelerated (BCa) bootstrap interval from 2,000 paired resamples of the "
        "held-out queries; both models scored on the same queries.",
        "Models: candidate = this run's best checkpoint; champion = the registry's `champion` alias; start = the "
        "model training started from."])
