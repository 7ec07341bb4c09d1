"""recall.md and report.html come from one list of sections: what one says, the other says."""

import html
import re

from pipeline.config import RunConfig
from pipeline.report.html import write_html_report
from pipeline.report.sections import SliceRule, report_sections

SUMMARY = {
    "run_id": "r", "queries": 3, "gallery": 10, "catalog": 10, "gallery_kind": "catalog", "ks": [1, 10],
    "relevance": "image", "filtered": True, "filtered_per_query": 1.5,
    "warnings": ["keyword search (BM25 over titles) beats the candidate on recall@10"],
    "champion_version": None, "baseline": "start",
    "models": {"candidate": {"recall@1": 0.1, "recall@10": 0.5}, "start": {"recall@1": 0.0, "recall@10": 0.4},
               "bm25": {"recall@1": 0.2, "recall@10": 0.6}},
    "delta_vs_baseline": {"recall@1": {"mean": 0.1, "low": -0.1, "high": 0.2},
                          "recall@10": {"mean": 0.1, "low": 0.05, "high": 0.2}},
    "slices": [{"family": "frequency", "slice": "head", "queries": 40, "candidate": 0.5, "baseline": 0.4,
                "keyword": 0.6, "delta": 0.1, "low": 0.0, "high": 0.2, "gated": True, "p_value": 0.9,
                "flagged": False},
               {"family": "category", "slice": "lamp", "queries": 1, "candidate": 0.0, "baseline": 1.0,
                "keyword": 1.0, "delta": -1.0, "low": -1.0, "high": -1.0, "gated": False, "p_value": 0.0,
                "flagged": False}],
    "flagged_slices": [], "search": {"index": "exact", "device": "cpu"},
    "reindex": {"images": 10, "images_per_s": 100.0, "estimated_seconds": 0.1},
    "worst_queries": [{"query": "navy mug", "candidate": 0.0, "baseline": 1.0, "click_weight": 2.0,
                       "candidate_top": [], "baseline_top": [], "relevant": []}],
    "decision": {"promoted": False, "reason": "failed", "gates": [
        {"gate": "beats_baseline", "passed": False, "detail": "95% CI lower bound -0.0100 ≤ margin 0.0"}]},
}


def test_markdown_and_html_say_the_same_things(tmp_path):
    from pipeline.report.markdown import render_report

    cfg = RunConfig.model_validate({"data": {"events": {"path": "e"}, "images": {"path": "i"}, "image_root": "r"}})
    rule = SliceRule(cfg.evaluate.slice_tolerance, cfg.evaluate.slice_min_queries, cfg.evaluate.slice_alpha)
    markdown = render_report(SUMMARY, rule, "recall@10")
    page = html.unescape(re.sub(r"<[^>]+>", " ", write_html_report(tmp_path / "r.html", SUMMARY, cfg, None, tmp_path,
                                                                   {}).read_text()))
    page = " ".join(page.split())
    for section in report_sections(SUMMARY, rule, "recall@10"):
        assert section.title.replace("`", "") in page and section.title in markdown
        for line in [*section.warnings, *section.text, *section.bullets]:
            plain = " ".join(line.replace("**", "").replace("`", "").split())
            assert plain in page, plain
        for table in section.tables:
            for row in table.rows:
                for cell in row:
                    assert cell.replace("**", "") in page
                assert "| " + " | ".join(row) + " |" in markdown
    assert "not gated (< 30 queries)" in markdown and "keyword (bm25)" in page
