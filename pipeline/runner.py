"""Drive the stages over one run folder: reuse what is intact, run what is not, record it all."""

from __future__ import annotations

import importlib
import time

from rich.console import Console

from pipeline.config import RunConfig
from pipeline.errors import StageError
from pipeline.report.sentences import leak_audit_sentence
from pipeline.runs import Run, run_lock
from pipeline.stages import STAGE_NAMES, StageOutput, stage_spec

console = Console(stderr=True)


def stage_function(name: str):
    """The stage's `run(cfg, inputs, out_dir)`, imported on first use (stages import torch or mlflow)."""
    module, function = stage_spec(name).function.split(":")
    return getattr(importlib.import_module(module), function)


def needed_before(name: str) -> list[str]:
    """Every stage `name` reads from, directly or through another, in pipeline order."""
    needed: set[str] = set()
    todo = list(stage_spec(name).upstream)
    while todo:
        upstream = todo.pop()
        if upstream not in needed:
            needed.add(upstream)
            todo += stage_spec(upstream).upstream
    return [s for s in STAGE_NAMES if s in needed]


def run_stage(run: Run, stage: str) -> dict:
    """Run one stage (holding the run folder's lock) unless it can be reused; return its summary."""
    with run_lock(run.root):
        return _run_stage(run, stage)


def _run_stage(run: Run, stage: str) -> dict:
    """Run one stage unless its recorded outputs are intact for the same fingerprint; return its summary."""
    missing = [s for s in needed_before(stage) if run.reusable(s) is None]
    if missing:
        raise StageError(f"stage {stage} needs {', '.join(missing)} to have run first for run "
                         f"{run.run_id} with this config (clickclip run does them in order)")
    if (entry := run.reusable(stage)) is not None:
        console.print(f"[green]✓ {stage}[/] reused from {run.root / stage} (inputs and config unchanged)")
        return entry["summary"]
    console.rule(f"{stage} · run {run.run_id}")
    started = time.perf_counter()
    function = stage_function(stage)
    run.begin(stage)
    try:
        result: StageOutput = function(run.config, run.stage_inputs(stage), run.stage_dir(stage))
    finally:
        run.running.discard(stage)
    seconds = time.perf_counter() - started
    run.record(stage, run.publish(stage, result.outputs), result.summary, seconds)
    for warning in result.summary.get("warnings", []):
        console.print(f"[bold yellow]⚠ {stage}:[/] {warning}")
    console.print(f"[green]✓ {stage}[/] finished in {seconds:.1f} s")
    return result.summary


def run_all(run: Run) -> dict[str, dict]:
    with run_lock(run.root):
        return {stage: _run_stage(run, stage) for stage in STAGE_NAMES}


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
        f"images kept {summaries['split']['images_kept']}, quarantined {summaries['split']['images_quarantined']}; "
        + leak_audit_sentence(summaries["split"].get("leak_audit")).replace("Leak audit", "leak audit", 1),
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
