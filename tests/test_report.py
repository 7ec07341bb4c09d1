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


def _manifest(run_id: str, until: str, candidate: float, baseline: float, promoted: bool, name: str = "shop") -> dict:
    served = {"as": "hybrid", "candidate": "hybrid(candidate)", "baseline": "hybrid(champion)"}
    return {"run_id": run_id, "config": {"name": name}, "stages": {
        "extract": {"summary": {"window": {"until": until}}},
        "evaluate": {"finished_at": until, "summary": {
            "served": served, "baseline": "champion", "champion_version": "1",
            "models": {"hybrid(candidate)": {"recall@10": candidate}, "hybrid(champion)": {"recall@10": baseline}}}},
        "promote": {"summary": {"version": run_id[-1], "promoted": promoted}}}}


def test_history_reads_earlier_weeks_and_says_where_quality_is_going(tmp_path):
    import json

    from pipeline.report.history import earlier_weeks, history
    from pipeline.report.markdown import render_markdown
    from pipeline.report.sections import weeks

    weeks_in = [("w2", "2026-09-20", 0.30, 0.28, True), ("w1", "2026-09-13", 0.28, 0.10, True),
                ("w3", "2026-09-27", 0.25, 0.30, False)]
    for run_id, until, candidate, baseline, promoted in weeks_in:
        (tmp_path / run_id).mkdir()
        (tmp_path / run_id / "manifest.json").write_text(json.dumps(_manifest(run_id, until, candidate, baseline,
                                                                              promoted)))
    (tmp_path / "other").mkdir()  # another shop's run is not this shop's history
    (tmp_path / "other" / "manifest.json").write_text(json.dumps(_manifest("other", "2026-09-27", 0.9, 0.1, True,
                                                                           name="another")))
    earlier = earlier_weeks(tmp_path, "shop", "w4", "recall@10")
    assert [w["run_id"] for w in earlier] == ["w1", "w2", "w3"]  # by window, not by folder name
    this = {"run_id": "w4", "until": "2026-10-04", "candidate": 0.36, "baseline": 0.30, "baseline_name": "champion",
            "champion_version": "2", "version": None, "promoted": True}
    record = history(earlier, this, "recall@10")
    # served after each week: 0.28 (w1 promoted), 0.30 (w2), 0.30 (w3 refused: the champion), 0.36 (w4)
    assert record["trend"] == "rising" and "0.2800 → 0.3000 → 0.3000 → 0.3600" in record["sentence"]
    falling = history(earlier, this | {"candidate": 0.2, "baseline": 0.2, "promoted": True}, "recall@10")
    assert falling["trend"] == "falling"
    assert history([], this, "recall@10")["trend"] == "too few weeks to tell"
    text = render_markdown([weeks({"history": record})])
    assert "| 2026-09-27 | w3 | refused (version 3) | 0.2500 | champion 1 | 0.3000 | 0.3000 |" in text
    assert "w4 (this run)" in text and "![served recall@10 week by week](history.png)" in text

    # a redone or backfilled week sees only the weeks before it; a week run twice counts once (its
    # last evaluation); a version rolled back since served its baseline after (the registry says which)
    (tmp_path / "w2-again").mkdir()
    again = _manifest("w2-again", "2026-09-20", 0.31, 0.28, True)
    again["stages"]["evaluate"]["finished_at"] = "2026-09-21"
    (tmp_path / "w2-again" / "manifest.json").write_text(json.dumps(again))
    before_w3 = earlier_weeks(tmp_path, "shop", "w3", "recall@10", until="2026-09-27", rolled_back={"n"})
    assert [w["run_id"] for w in before_w3] == ["w1", "w2-again"]
    rolled = earlier_weeks(tmp_path, "shop", "w4", "recall@10", until="2026-10-04", rolled_back={"n"})
    assert [w["rolled_back"] for w in rolled] == [False, True, False]  # w2-again registered version "n"
    record = history(rolled, this, "recall@10")
    assert "0.2800 → 0.2800 → 0.3000 → 0.3600" in record["sentence"]  # w2-again: its baseline served after
    assert "refused" not in render_markdown([weeks({"history": record})]).split("w2-again")[1].split("\n")[0]
    assert "promoted (version n), rolled back" in render_markdown([weeks({"history": record})])


def test_the_verdict_of_a_challenger_says_it_is_interleaved_and_the_champion_unchanged():
    from pipeline.report.verdict import verdict_sentence

    line = verdict_sentence({"by": "promote", "promoted": False, "challenger": True, "version": "7", "reason": "r"})
    assert line.startswith("CHALLENGER: version 7 passed the gates and is interleaved with the champion")
    assert verdict_sentence({"by": "promote", "promoted": False, "version": "7"}).startswith("NOT PROMOTED")


def test_the_report_shows_the_latest_interleaving_readout_and_which_position_bias_estimate_weighted(tmp_path):
    import json

    from pipeline.report.sections import online, position_bias
    from pipeline.retrieval.interleaving import readout
    from pipeline.stages.evaluate import latest_readout

    assert latest_readout(tmp_path / "none") is None
    folder = tmp_path / "interleaving"
    folder.mkdir()
    read = readout(["challenger"] * 30 + ["champion"] * 10, min_queries=20)
    for stamp, sentence in (("20261101T030000", "older"), ("20261108T030000", read.sentence())):
        (folder / f"readout-{stamp}.json").write_text(json.dumps(
            {"champion": "3", "challenger": "4", **read.as_dict(), "sentence": sentence}))
    latest = latest_readout(folder)
    assert latest["read_at"] == "20261108T030000"
    section = online({"interleaving": latest})
    assert "Challenger version 4 against champion 3" in section.text[0] and read.sentence() in section.text[0]
    assert section.tables[0].rows[0][2:5] == ["30", "10", "0"] and section.tables[0].rows[0][-1] == "promote"
    assert online({"interleaving": None}) is None
    swaps = {"propensity_estimate": {"used": "swaps", "why": "5000 swapped"}}
    assert "randomised swaps" in position_bias(swaps).text[0]
    assert "by EM" in position_bias({}).text[0]


def test_the_training_section_says_what_validation_measured_beside_the_test_figures():
    """Validation recall@10 is over the validation pairs' images only: the section says so, rounds
    it like every other figure and puts it beside the test figures, and says a resumed run's steps."""
    from pipeline.report.sections import training

    train = {"epochs": 10, "steps": 200, "steps_this_attempt": 100, "resumed_from": "last.ckpt", "seconds": 90.5,
             "samples_per_s": 70.7, "best_val_recall@10": 0.5947082042694092, "start_weights": "random init (seed 0)",
             "validation": {"queries": 374, "gallery": 146, "pairs": 420},
             "history": [{"epoch": 1, "train_loss": 4.123456, "val_loss": 4.0, "val_recall_at_10": 0.31234}]}
    summary = SUMMARY | {"queries": 367, "gallery": 1349,
                         "served": {"as": "hybrid", "candidate": "hybrid(candidate)", "baseline": "hybrid(start)"},
                         "models": SUMMARY["models"] | {"hybrid(candidate)": {"recall@10": 0.20816}}}
    section = training(train, summary)
    side = section.tables[0]
    assert side.header == ["measured on", "model", "queries", "gallery", "recall@10"]
    assert side.rows[0] == ["validation (the epochs' score; best epoch kept)", "candidate (image vectors)", "374",
                            "the 146 images of the validation pairs", "0.5947"]
    assert side.rows[1][2:] == ["367", "the whole catalog (1349 images), filtered", "0.5000"]
    assert side.rows[2][1:] == ["hybrid(candidate) (served)", "367", "the whole catalog (1349 images), filtered",
                                "0.2082"]
    assert section.tables[1].rows == [["1", "4.1235", "4.0000", "0.3123"]]
    text = " ".join(section.text)
    assert "200 steps, 100 of them in this attempt (resumed from last.ckpt)" in text
    assert "0.5947082042694092" not in text and "only compares epochs with each other" in text
