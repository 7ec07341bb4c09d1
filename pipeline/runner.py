"""Drive the stages over one run folder: reuse what is intact, run what is not, record it all."""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from typing import Any

from rich.console import Console

from pipeline.config import RunConfig
from pipeline.errors import StageError
from pipeline.runs import STAGES, Run, run_lock

console = Console(stderr=True)


def _extract(run: Run) -> tuple[dict[str, Any], dict]:
    from pipeline.extract import extract

    result = extract(run.config, run.stage_dir("extract"), run.run_id)
    outputs = {"pairs": result.pairs, "quarantine": result.quarantine, "propensity": result.propensity}
    if run.config.extract.incremental:
        outputs["stats"] = result.pairs.with_name("stats.parquet")
    return outputs, result.summary


def _split(run: Run) -> tuple[dict[str, Any], dict]:
    from pipeline.split import split

    result = split(run.config, run.output("extract", "pairs"), run.stage_dir("split"))
    outputs = {"images": result.images, "image_quarantine": result.image_quarantine, "pairs": result.pairs,
               "pairs_excluded": result.pairs_excluded, "leak_audit": result.leak_audit,
               "groups_sheet": result.groups_sheet}
    return outputs, result.summary


def _train(run: Run) -> tuple[dict[str, Any], dict]:
    from pipeline.train import train

    result = train(run.config, run.output("split", "pairs"), run.output("split", "images"),
                   run.stage_dir("train"), run.run_id)
    return {"weights": result.model_dir, "metrics": result.metrics}, result.summary


def _evaluate(run: Run) -> tuple[dict[str, Any], dict]:
    from pipeline.evaluate import evaluate

    data = {"extract": run.summary("extract"), "split": run.summary("split"),
            "figures": [run.output("extract", "propensity").with_suffix(".png"), run.output("split", "groups_sheet")]}
    result = evaluate(run.config, run.output("split", "pairs"), run.output("split", "images"),
                      run.output("train", "weights").parent, run.stage_dir("evaluate"), run.report_dir(),
                      run.run_id, data)
    return {"metrics": result.metrics, "report": result.report}, result.summary


def _promote(run: Run) -> tuple[dict[str, Any], dict]:
    from pipeline.promote import GateInputs, promote

    extract, split, train, evaluation = (run.summary(s) for s in ("extract", "split", "train", "evaluate"))
    gate_inputs = GateInputs(
        quarantine_rate=extract["rows_quarantined"] / max(1, extract["rows_read"]),
        leak_audit_passed=json.loads(run.output("split", "leak_audit").read_text())["passed"],
        finished_without_nan=train["finished_without_nan"])
    lineage = {"git_commit": run.manifest.get("git_commit", "unknown"), "input_events_sha256": run.inputs["events"],
               "input_images_sha256": run.inputs["images"], "split_registry_version": split["registry_version"],
               "parent_champion_version": str(evaluation["champion_version"] or "none")}
    artifacts = [run.report_dir(), run.manifest_path, run.output("split", "leak_audit"),
                 run.output("extract", "quarantine"), run.output("split", "image_quarantine")]
    result = promote(run.config, run.run_id, train.get("mlflow_run_id"), evaluation, gate_inputs, lineage,
                     run.output("train", "weights").parent, artifacts, run.stage_dir("promote"))
    return {"decision": result.decision}, result.summary


STAGE_FUNCTIONS: dict[str, Callable[[Run], tuple[dict[str, Any], dict]]] = {
    "extract": _extract, "split": _split, "train": _train, "evaluate": _evaluate, "promote": _promote,
}


def run_stage(run: Run, stage: str) -> dict:
    """Run one stage (holding the run folder's lock) unless it can be reused; return its summary."""
    with run_lock(run.root):
        return _run_stage(run, stage)


def _run_stage(run: Run, stage: str) -> dict:
    """Run one stage unless its recorded outputs are intact for the same fingerprint; return its summary."""
    upstream = STAGES[: STAGES.index(stage)]
    missing = [s for s in upstream if run.reusable(s) is None]
    if missing:
        raise StageError(f"stage {stage} needs {', '.join(missing)} to have run first for run "
                         f"{run.run_id} with this config (clickclip run does them in order)")
    if (entry := run.reusable(stage)) is not None:
        console.print(f"[green]✓ {stage}[/] reused from {run.root / stage} (inputs and config unchanged)")
        return entry["summary"]
    console.rule(f"{stage} · run {run.run_id}")
    started = time.perf_counter()
    run.begin(stage)
    try:
        outputs, summary = STAGE_FUNCTIONS[stage](run)
    finally:
        run.running.discard(stage)
    seconds = time.perf_counter() - started
    run.record(stage, run.publish(stage, outputs), summary, seconds)
    console.print(f"[green]✓ {stage}[/] finished in {seconds:.1f} s")
    return summary


def run_all(run: Run) -> dict[str, dict]:
    with run_lock(run.root):
        return {stage: _run_stage(run, stage) for stage in STAGES}


def format_summary(run: Run, summaries: dict[str, dict]) -> str:
    cfg: RunConfig = run.config
    metric = cfg.promote.metric
    evaluation, decision = summaries["evaluate"], summaries["promote"]
    models = evaluation["models"]
    extract = summaries["extract"]
    lines = [
        f"run {run.run_id}  ({run.root})",
        f"rows read {extract['rows_read']}: kept {extract['rows_kept']}, quarantined {extract['rows_quarantined']}"
        f" {extract['quarantined_by_reason']}",
        f"images kept {summaries['split']['images_kept']}, quarantined {summaries['split']['images_quarantined']};"
        f" leak audit passed",
    ]
    for k in cfg.evaluate.ks:
        row = "  ".join(f"{name} {values[f'recall@{k}']:.4f}" for name, values in models.items())
        lines.append(f"recall@{k}: {row}")
    verdict = "PROMOTED to champion" if decision["promoted"] else "not promoted"
    lines += [
        f"decision on {metric}: {verdict} — {decision['reason']}",
        f"registered: {decision['model_name']} version {decision['version']}",
        f"champion: {decision['champion_uri']}",
        f"report: {cfg.reports_dir / run.run_id / 'report.html'} (Markdown: recall.md beside it)",
    ]
    return "\n".join(lines)
