"""The self-contained HTML recall report: one file, every figure and thumbnail inlined.

Everything a reviewer needs to decide on promotion without opening another tool: the metrics of
every model with intervals, recall@k curves, slice bars, the queries the candidate lost most
on with the top results of both models as thumbnails, and the input-data summaries.
"""

from __future__ import annotations

import base64
import html
import io
from pathlib import Path

from pipeline.config import RunConfig
from pipeline.data.images import UnusableImage, load_rgb, resolve_image_path
from pipeline.report.markdown import slice_rule
from pipeline.report.sentences import (
    leak_audit_sentence,
    reindex_sentence,
    relevance_sentences,
    search_sentence,
)

THUMB = 96
COLOURS = {"candidate": "#1f77b4", "champion": "#d62728", "start": "#7f7f7f", "bm25": "#2ca02c"}
STYLE = """
body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:2rem auto;max-width:1100px;
color:#222;line-height:1.45}
table{border-collapse:collapse;margin:.8rem 0}td,th{border:1px solid #ccc;padding:.25rem .55rem;text-align:right}
td:first-child,th:first-child{text-align:left}th{background:#f3f3f3}.bad{color:#b00020;font-weight:600}
.good{color:#0a7a2f}.query{margin:1.2rem 0;padding:.6rem .8rem;border:1px solid #ddd;border-radius:6px}
.row{display:flex;gap:6px;align-items:center;margin:.25rem 0}.row span.label{width:8.5rem;font-size:.85rem;color:#555}
.row figure{margin:0;text-align:center;font-size:.7rem;color:#555;display:flex;flex-direction:column}
.row img{width:96px;height:96px;object-fit:cover;border:3px solid transparent;border-radius:4px}
.row img.hit{border-color:#2ca02c}.note{background:#fff8e1;border-left:4px solid #f0b400;padding:.6rem .9rem}
.missing{width:96px;height:96px;display:flex;align-items:center;justify-content:center;background:#eee;
font-size:.7rem;border-radius:4px}
"""


def _png(fig) -> str:
    import matplotlib.pyplot as plt

    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=110, bbox_inches="tight")
    plt.close(fig)
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


def _file_png(path: Path) -> str | None:
    return "data:image/png;base64," + base64.b64encode(path.read_bytes()).decode() if path.is_file() else None


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def recall_curves(summary: dict) -> str:
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6, 3.6))
    ks = summary["ks"]
    for name, values in summary["models"].items():
        ax.plot(ks, [values[f"recall@{k}"] for k in ks], marker="o", label=name, color=COLOURS.get(name))
    ax.set(xscale="log", xticks=ks, xticklabels=[str(k) for k in ks], xlabel="k", ylabel="recall@k",
           title="recall@k on the held-out queries", ylim=(0, 1))
    ax.grid(alpha=0.3)
    ax.legend()
    return _png(fig)


def slice_bars(summary: dict, tolerance: float) -> str:
    plt = _plt()
    rows = summary["slices"]
    fig, ax = plt.subplots(figsize=(7, 0.42 * len(rows) + 1.2))
    labels = [f"{r['family']}: {r['slice']} (n={r['queries']})" for r in rows]
    deltas = [r["delta"] for r in rows]
    errors = [[r["delta"] - r["low"] for r in rows], [r["high"] - r["delta"] for r in rows]]
    colours = ["#b00020" if r["flagged"] else "#1f77b4" if r["gated"] else "#bbbbbb" for r in rows]
    ax.barh(range(len(rows)), deltas, xerr=errors, color=colours, alpha=0.8, capsize=3)
    ax.axvline(0, color="black", lw=0.8)
    ax.axvline(-tolerance, color="#b00020", lw=0.8, ls="--", label=f"-tolerance ({tolerance})")
    ax.set_yticks(range(len(rows)), labels)
    ax.invert_yaxis()
    ax.set(xlabel=f"candidate − {summary['baseline']} (95% CI)", title="Slices")
    ax.legend(loc="lower right", fontsize=8)
    return _png(fig)


class Thumbnails:
    """Inline PNG thumbnails of catalog images, each decoded once."""

    def __init__(self, root: Path, paths: dict[str, str]):
        self.root, self.paths, self.cache = root, paths, {}

    def html(self, image_id: str, hit: bool) -> str:
        if image_id not in self.cache:
            self.cache[image_id] = self._encode(image_id)
        uri = self.cache[image_id]
        caption = html.escape(image_id)
        if uri is None:
            return f'<figure><div class="missing">unreadable</div>{caption}</figure>'
        return f'<figure><img src="{uri}" alt="{caption}" class="{"hit" if hit else ""}">{caption}</figure>'

    def _encode(self, image_id: str) -> str | None:
        path = self.paths.get(image_id)
        if path is None:
            return None
        try:
            image = load_rgb(resolve_image_path(self.root, path))
        except UnusableImage:
            return None
        image.thumbnail((THUMB, THUMB))
        buffer = io.BytesIO()
        image.save(buffer, format="PNG")
        return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


def _metrics_table(summary: dict) -> str:
    names = list(summary["models"])
    head = "".join(f"<th>{html.escape(n)}</th>" for n in names)
    rows = []
    for metric in summary["models"]["candidate"]:
        cells = "".join(f"<td>{summary['models'][n][metric]:.4f}</td>" for n in names)
        d = summary["delta_vs_baseline"][metric]
        tone = "bad" if d["high"] < 0 else "good" if d["low"] > 0 else ""
        rows.append(f"<tr><td>{metric}</td>{cells}<td class='{tone}'>{d['mean']:+.4f}</td>"
                    f"<td>[{d['low']:+.4f}, {d['high']:+.4f}]</td></tr>")
    return (f"<table><tr><th>metric</th>{head}<th>candidate − {summary['baseline']}</th><th>95% CI</th></tr>"
            + "".join(rows) + "</table>")


def _slices_table(summary: dict) -> str:
    rows = "".join(
        f"<tr><td>{html.escape(r['family'])}</td><td>{html.escape(str(r['slice']))}</td><td>{r['queries']}</td>"
        f"<td>{r['candidate']:.4f}</td><td>{r['baseline']:.4f}</td>"
        f"<td>{'–' if r.get('keyword') is None else format(r['keyword'], '.4f')}</td><td>{r['delta']:+.4f} "
        f"[{r['low']:+.4f}, {r['high']:+.4f}]</td><td>{r['p_value']:.3g}</td><td class='bad'>"
        f"{'regressed' if r['flagged'] else '' if r['gated'] else 'not gated (too few queries)'}</td></tr>"
        for r in summary["slices"])
    return ("<table><tr><th>family</th><th>slice</th><th>queries</th><th>candidate</th><th>baseline</th>"
            "<th>keyword (bm25)</th><th>difference [95% CI]</th><th>p (one-sided)</th><th>flag</th></tr>"
            f"{rows}</table>")


def _worst(summary: dict, thumbs: Thumbnails, metric: str) -> str:
    if not summary["worst_queries"]:
        return f"<p>The candidate lost on no held-out query ({metric}) against the {summary['baseline']}.</p>"
    blocks = []
    for item in summary["worst_queries"]:
        relevant = set(item["relevant"])

        def row(label: str, ids: list[str], relevant: set[str] = relevant) -> str:
            figures = "".join(thumbs.html(i, i in relevant) for i in ids) or "<em>nothing retrieved</em>"
            return f'<div class="row"><span class="label">{label}</span>{figures}</div>'

        blocks.append(
            f'<div class="query"><b>“{html.escape(item["query"])}”</b> — {metric}: candidate '
            f'{item["candidate"]:.3f}, {summary["baseline"]} {item["baseline"]:.3f} '
            f'(held-out click weight {item.get("click_weight", 0):.2f})'
            + row("clicked (held out)", item["relevant"]) + row("candidate top 5", item["candidate_top"])
            + row(f"{summary['baseline']} top 5", item["baseline_top"]) + "</div>")
    return "".join(blocks)


def _decision(summary: dict) -> str:
    decision = summary.get("decision")
    if decision is None:
        return ""
    verdict = ("<b class='good'>promote</b>: every gate passes" if decision["promoted"]
               else "<b class='bad'>do not promote</b>")
    rows = "".join(f"<tr><td>{html.escape(g['gate'])}</td><td class='{'good' if g['passed'] else 'bad'}'>"
                   f"{'pass' if g['passed'] else 'FAIL'}</td><td>{html.escape(g['detail'])}</td></tr>"
                   for g in decision["gates"])
    return ("<h2>Promotion decision</h2>"
            f"<p>{verdict} (promote moves <code>champion</code> only if the registry's champion is still the one "
            "compared against).</p>"
            f"<table><tr><th>gate</th><th>result</th><th>numbers</th></tr>{rows}</table>")


def training_curves(history: list[dict]) -> str:
    plt = _plt()
    fig, left = plt.subplots(figsize=(6, 3.2))
    epochs = [h["epoch"] for h in history]
    for key, label in (("train_loss", "train loss"), ("val_loss", "validation loss")):
        if any(key in h for h in history):
            left.plot(epochs, [h.get(key) for h in history], marker="o", label=label)
    left.set(xlabel="epoch", ylabel="loss")
    right = left.twinx()
    right.plot(epochs, [h.get("val_recall_at_10") for h in history], marker="s", color="#2ca02c",
               label="validation recall@10")
    right.set(ylabel="validation recall@10", ylim=(0, 1))
    fig.legend(loc="upper center", ncol=3, fontsize=8)
    return _png(fig)


def _training(train: dict) -> str:
    history = train.get("history", [])
    text = (f"<h2>Training</h2><p>{train['epochs']} epochs, {train['steps']} steps in {train['seconds']} s "
            f"({train['samples_per_s']} samples/s); best validation recall@10 {train['best_val_recall@10']}; "
            f"started from {html.escape(str(train['start_weights']))}.</p>")
    return text + (f'<img src="{training_curves(history)}" alt="training curves">' if history else "")


def group_sizes(split: dict) -> str:
    plt = _plt()
    sizes = sorted(split["group_size_histogram"].items(), key=lambda kv: int(kv[0]))
    fig, ax = plt.subplots(figsize=(6, 2.8))
    ax.bar([int(k) for k, _ in sizes], [n for _, n in sizes], color="#1f77b4")
    ax.set(xlabel="images per group", ylabel="groups", yscale="log", title="Group sizes")
    return _png(fig)


def _groups(extract: dict, split: dict) -> str:
    sticky = split["sticky"]
    giant = split["giant_groups"]
    bands = ", ".join(f"{name}: {band['queries']} queries, {band['impressions']} impressions"
                      for name, band in extract["query_bands"].items())
    return "".join([
        "<h3>Groups</h3>",
        f"<p>Near-duplicate pairs by hash: {split['near_duplicate_pairs']}; {split['groups']} groups, the largest "
        f"{split['largest_group']} images.</p>",
        f'<img src="{group_sizes(split)}" alt="group size histogram">',
        (f"<p class='note'><b>Giant groups</b> above the configured size: {html.escape(', '.join(giant))}.</p>"
         if giant else "<p>No giant groups.</p>"),
        f"<p>Sticky splits: {sticky['new_groups']} new groups, {sticky['grown_groups']} grown, "
        f"{sticky['linked_groups']} linked across splits ({sticky['images_excluded']} images excluded); "
        f"{sticky.get('cross_product_links_cut', 0)} near-duplicate links between different products cut in giant "
        f"groups ({sticky.get('images_excluded_by_cut_links', 0)} images excluded); split registry version "
        f"{html.escape(str(split['registry_version']))}.</p>",
        f"<p>Queries by traffic band: {html.escape(bands)}.</p>",
    ])


def _data_section(data: dict) -> str:
    extract, split = data["extract"], data["split"]
    reasons = "".join(f"<tr><td>{html.escape(r)}</td><td>{n}</td></tr>"
                      for r, n in extract["quarantined_by_reason"].items())
    images = "".join(f"<tr><td>{html.escape(r)}</td><td>{n}</td></tr>"
                     for r, n in split["images_quarantined_by_reason"].items()) or "<tr><td>(none)</td><td>0</td></tr>"
    figures = {Path(f).name: _file_png(Path(f)) for f in data["figures"]}
    propensity, groups = figures.get("propensity.png"), figures.get("groups.png")
    weighting = extract.get("weighting", {})
    return "".join([
        "<h2>Input data</h2>",
        *[f'<p class="note"><b>Warning:</b> {html.escape(w)}</p>' for w in extract.get("warnings", [])],
        f"<p>Pair weighting: configured <code>{html.escape(str(weighting.get('configured', '?')))}</code>, applied "
        f"<code>{html.escape(str(weighting.get('effective', '?')))}</code>.</p>",
        f"<p>Impressions read: <b>{extract['rows_read']}</b> = kept {extract['rows_kept']} + quarantined "
        f"{extract['rows_quarantined']}. Bot sessions: {extract['bot_sessions']}. Pairs: {extract['pairs']} over "
        f"{extract['queries']} queries and {extract['images']} images.</p>",
        f"<table><tr><th>event quarantine reason</th><th>rows</th></tr>{reasons}</table>",
        f"<p>Catalog: {split['catalog_rows']} rows = kept {split['images_kept']} + quarantined "
        f"{split['images_quarantined']}; {split['groups']} groups (largest {split['largest_group']}).</p>",
        f"<table><tr><th>image quarantine reason</th><th>images</th></tr>{images}</table>",
        f"<p><b>{html.escape(leak_audit_sentence(split.get('leak_audit')))}</b></p>",
        "<h3>Position bias</h3>" + (f'<img src="{propensity}" alt="propensity curve">' if propensity else ""),
        _groups(extract, split),
        "<h3>Largest groups</h3>" + (f'<img src="{groups}" alt="largest groups" style="max-width:100%">'
                                     if groups else ""),
    ])


def write_html_report(path: Path, summary: dict, cfg: RunConfig, data: dict | None, root: Path,
                      image_paths: dict[str, str]) -> Path:
    metric = cfg.promote.metric
    thumbs = Thumbnails(root, image_paths)
    gallery = ("the whole catalog (quarantined images excluded)" if summary["gallery_kind"] == "catalog"
               else "test-split images only")
    flagged = summary["flagged_slices"]
    ecfg = cfg.evaluate
    rule = slice_rule(ecfg.slice_tolerance, ecfg.slice_min_queries, ecfg.slice_alpha)
    body = "".join([
        f"<h1>Recall report — run <code>{html.escape(summary['run_id'])}</code></h1>",
        *[f'<p class="note"><b>Warning:</b> {html.escape(w)}</p>' for w in summary.get("warnings", [])],
        f"<p>{summary['queries']} held-out queries searched over {summary['gallery']} images ({gallery}). "
        f"Baseline for promotion: <b>{summary['baseline']}</b>"
        + (f" (registry version {summary['champion_version']})" if summary["champion_version"] else
           " (no champion yet: the starting model)") + ".</p>",
        _metrics_table(summary),
        f'<img src="{recall_curves(summary)}" alt="recall at k curves">',
        _decision(summary),
        f'<p class="note">{html.escape(reindex_sentence(summary)).replace("**", "")}</p>',
        "<h2>Slices</h2>",
        f"<p>{metric} per slice. Flagged slices: {html.escape(', '.join(flagged)) if flagged else 'none'}. "
        f"{html.escape(rule).replace('**', '')}</p>",
        f'<img src="{slice_bars(summary, cfg.evaluate.slice_tolerance)}" alt="slice differences">',
        _slices_table(summary),
        f"<h2>Where the candidate lost most ({metric})</h2>",
        "<p>Ranked by the loss times the query's held-out click weight, so a query with a single click the "
        "baseline found by luck does not lead the list. Green frames mark held-out clicked images.</p>",
        _worst(summary, thumbs, metric),
        _training(data["train"]) if data and "train" in data else "",
        _data_section(data) if data else "",
        "<h2>Definitions</h2><ul>",
        *[f"<li>{html.escape(line)}</li>" for line in relevance_sentences(summary)],
        "<li>recall@k: share of a query's relevant (held-out clicked) images in its top k; hit@k: share of "
        "queries with one in the top k; MRR: mean 1/rank of the first; nDCG@10 with click weights as gains.</li>",
        f"<li>Search: {html.escape(search_sentence(summary['search']))}</li>",
        "<li>bm25: the text-only baseline, queries matched to catalog titles.</li>",
        "<li>CI: 95% bias-corrected and accelerated (BCa) bootstrap interval from 2,000 paired resamples of the "
        "held-out queries.</li></ul>",
    ])
    page = (f"<!doctype html><html lang='en'><head><meta charset='utf-8'><title>clickclip recall report "
            f"{html.escape(summary['run_id'])}</title><style>{STYLE}</style></head><body>{body}</body></html>")
    path.write_text(page)
    return path
