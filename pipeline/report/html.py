"""The self-contained HTML recall report: one file, every figure and thumbnail inlined.

Everything a reviewer needs to decide on promotion without opening another tool: the metrics of
every model with intervals, recall@k curves, slice bars, the queries the candidate lost most
on with the top results of both models as thumbnails, and the input-data summaries.
"""

from __future__ import annotations

import base64
import html
import io
import re
from pathlib import Path

from pipeline.config import RunConfig
from pipeline.data.images import UnusableImage, load_rgb, resolve_image_path
from pipeline.report.sections import Section, SliceRule, Table, headline_names, report_sections, served

THUMB = 96
COLOURS = {"candidate": "#1f77b4", "champion": "#d62728", "start": "#7f7f7f", "bm25": "#2ca02c",
           "hybrid(candidate)": "#17becf", "hybrid(champion)": "#ff7f0e", "hybrid(start)": "#bcbd22"}
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
    for name in headline_names(summary):
        values = summary["models"][name]
        ax.plot(ks, [values[f"recall@{k}"] for k in ks], marker="o", label=name, color=COLOURS.get(name),
                ls="--" if name.startswith("hybrid") else "-")
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
    ax.set(xlabel=f"{served(summary)['candidate']} − {served(summary)['baseline']} (95% CI)", title="Slices")
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


def _worst(summary: dict, thumbs: Thumbnails, metric: str) -> str:
    """The lost queries as pictures: clicked images and both models' top 5."""
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
    if blocks:
        blocks.insert(0, "<p>Green frames mark held-out clicked images.</p>")
    return "".join(blocks)


def tuning_curves(summary: dict, wise: dict | None) -> str:
    """Validation score against each tuned weight: fusion weight and title weight per model, and
    the WiSE-FT interpolation α of the candidate."""
    plt = _plt()
    panels = 3 if wise else 2
    fig, axes = plt.subplots(1, panels, figsize=(4.2 * panels, 3.2), sharey=False)
    metric = next(iter(summary["tuning"].values()))["metric"]
    for label, tuning in summary["tuning"].items():
        for ax, key, weight in ((axes[0], "hybrid_curve", "hybrid_weight"), (axes[1], "title_curve", "title_weight")):
            if tuning[key]:
                xs, ys = zip(*tuning[key], strict=True)
                ax.plot(xs, ys, marker="o", label=f"{label} (chosen {tuning[weight]})", color=COLOURS.get(label))
    axes[0].set(xlabel="fusion weight on the dense list (0 = BM25 order)", ylabel=f"validation {metric}",
                title="Hybrid fusion")
    axes[1].set(xlabel="title weight β (0 = image only)", ylabel=f"validation {metric}", title="Image + title")
    if wise:
        xs, ys = zip(*wise["curve"], strict=True)
        axes[2].plot(xs, ys, marker="o", color=COLOURS["candidate"])
        axes[2].axvline(wise["alpha"], color="black", lw=0.8, ls="--", label=f"chosen α {wise['alpha']}")
        axes[2].set(xlabel="α (0 = start, 1 = fine-tuned)", ylabel="validation recall@10",
                    title="WiSE-FT interpolation")
    for ax in axes:
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    return _png(fig)


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


def group_sizes(split: dict) -> str:
    plt = _plt()
    sizes = sorted(split["group_size_histogram"].items(), key=lambda kv: int(kv[0]))
    fig, ax = plt.subplots(figsize=(6, 2.8))
    ax.bar([int(k) for k, _ in sizes], [n for _, n in sizes], color="#1f77b4")
    ax.set(xlabel="images per group", ylabel="groups", yscale="log", title="Group sizes")
    return _png(fig)


def inline(text: str) -> str:
    """A report sentence as HTML: escaped, with its **bold** and `code` kept."""
    escaped = html.escape(text)
    escaped = re.sub(r"\*\*(.+?)\*\*", r"<b>\1</b>", escaped)
    return re.sub(r"`(.+?)`", r"<code>\1</code>", escaped)


def _table(table: Table) -> str:
    head = "".join(f"<th>{inline(h)}</th>" for h in table.header)
    tones = table.tones or [""] * len(table.rows)
    rows = "".join(f"<tr class='{tone}'>" + "".join(f"<td>{inline(cell)}</td>" for cell in row) + "</tr>"
                   for row, tone in zip(table.rows, tones, strict=True))
    return f"<table><tr>{head}</tr>{rows}</table>"


def _section(section: Section, pictures: dict[str, list[str]], files: dict[str, str | None]) -> str:
    level = min(section.level, 3)
    parts = [f"<h{level}>{inline(section.title)}</h{level}>"]
    parts += [f'<p class="note"><b>Warning:</b> {inline(w)}</p>' for w in section.warnings]
    parts += [f"<p>{inline(t)}</p>" for t in section.text]
    parts += pictures.get(f"{section.key}:before", [])
    parts += [_table(t) for t in section.tables]
    parts += pictures.get(section.key, [])
    if section.bullets:
        parts.append("<ul>" + "".join(f"<li>{inline(b)}</li>" for b in section.bullets) + "</ul>")
    for name, alt in section.figures:
        if files.get(name):
            parts.append(f'<img src="{files[name]}" alt="{html.escape(alt)}" style="max-width:100%">')
    return "".join(parts)


def write_html_report(path: Path, summary: dict, cfg: RunConfig, data: dict | None, root: Path,
                      image_paths: dict[str, str], verdict: str = "") -> Path:
    """report.html: the same sections as recall.md, with the pictures only a page can show."""
    metric = cfg.promote.metric
    ecfg = cfg.evaluate
    sections = report_sections(summary, SliceRule(ecfg.slice_tolerance, ecfg.slice_min_queries, ecfg.slice_alpha),
                               metric, data)
    pictures = {
        "headline": [f'<img src="{recall_curves(summary)}" alt="recall at k curves">'],
        "slices:before": [f'<img src="{slice_bars(summary, ecfg.slice_tolerance)}" alt="slice differences">'],
        "worst": [_worst(summary, Thumbnails(root, image_paths), metric)],
    }
    if summary.get("tuning"):
        wise = (data or {}).get("train", {}).get("wise_ft")
        pictures["configurations"] = [f'<img src="{tuning_curves(summary, wise)}" alt="tuning curves">']
    if data is not None and data.get("train", {}).get("history"):
        pictures["training"] = [f'<img src="{training_curves(data["train"]["history"])}" alt="training curves">']
    if data is not None:
        pictures["groups:before"] = [f'<img src="{group_sizes(data["split"])}" alt="group size histogram">']
    files = {Path(f).name: _file_png(Path(f)) for f in (data or {}).get("figures", [])}
    files["history.png"] = _file_png(path.parent / "history.png")  # evaluate draws it beside the report
    body = "".join(_section(section, pictures, files) for section in sections)
    page = (f"<!doctype html><html lang='en'><head><meta charset='utf-8'><title>clickclip recall report "
            f"{html.escape(summary['run_id'])}</title><style>{STYLE}</style></head><body>{verdict}{body}</body></html>")
    path.write_text(page)
    return path
