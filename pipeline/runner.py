"""Drive the stages over one run folder: reuse what is intact, run what is not, record it all."""

from __future__ import annotations

import contextlib
import importlib
import io
import logging
import signal
import sys
import time
from collections.abc import Iterator

from rich.console import Console

from pipeline import registry
from pipeline.config import RunConfig
from pipeline.errors import StageError, Stopped
from pipeline.report.sections import headline_names
from pipeline.report.sentences import leak_audit_sentence
from pipeline.report.verdict import rewrite_verdict
from pipeline.retrieval.served import ServedConfig
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


class RedactingStream(io.TextIOBase):
    """stdout/stderr with credentials in URIs masked: libraries print tracking URLs (MLflow's "View
    run at" lines, connection errors) with whatever user:password the URI holds."""

    def __init__(self, stream):
        self.stream = stream

    def write(self, text: str) -> int:
        self.stream.write(registry.redact_text(text))
        return len(text)

    def flush(self) -> None:
        self.stream.flush()

    def isatty(self) -> bool:
        return self.stream.isatty()

    def fileno(self) -> int:
        return self.stream.fileno()

    @property
    def encoding(self) -> str:
        return getattr(self.stream, "encoding", "utf-8")


@contextlib.contextmanager
def redacted_output() -> Iterator[None]:
    """Mask credentials in everything written to stdout and stderr while the block runs."""
    saved = sys.stdout, sys.stderr
    sys.stdout, sys.stderr = RedactingStream(sys.stdout), RedactingStream(sys.stderr)
    try:
        yield
    finally:
        sys.stdout, sys.stderr = saved


@contextlib.contextmanager
def stop_on_signals() -> Iterator[None]:
    """SIGTERM and SIGINT raise Stopped wherever the stage is (Lightning runs this handler after its
    own notifier during fit), so a stopped stage ends as a failure with its partial folder kept."""
    def stop(signum, frame) -> None:
        raise Stopped(signum)

    previous = {sig: signal.signal(sig, stop) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def _no_tips(record: logging.LogRecord) -> bool:
    return "Tip:" not in record.getMessage()


def quiet_library_logs() -> None:
    """Library chatter off by default: Lightning's advertising tips, and each Lightning line once
    (its package logger has a handler of its own; passing lines on to the root's printed them twice).
    Safe to call once per stage: the same filter is added once."""
    logging.getLogger("lightning").propagate = False
    logging.getLogger("lightning.pytorch.utilities.rank_zero").addFilter(_no_tips)


def run_stage(run: Run, stage: str) -> dict:
    """Run one stage (holding the run folder's lock) unless it can be reused; return its summary."""
    quiet_library_logs()
    with run_lock(run.root), stop_on_signals(), redacted_output():
        return _run_stage(run, stage)


def _run_stage(run: Run, stage: str) -> dict:
    """Run one stage unless its recorded outputs are intact for the same fingerprint (in this run
    folder, or for shareable stages in another); return its summary."""
    for upstream in needed_before(stage):  # a standalone stage command takes shareable stages from other runs too
        if run.reusable(upstream) is None and stage_spec(upstream).shareable:
            refuse_rewriting_a_decision(run, upstream)
            run.adopt(upstream)
    missing = [s for s in needed_before(stage) if run.reusable(s) is None]
    if missing:
        raise StageError(f"stage {stage} needs {', '.join(missing)} to have run first for run {run.run_id} with "
                         "this config, inputs and code (a recorded stage whose config, inputs or clickclip's code "
                         "changed since is stale); clickclip run does them in order")
    if (entry := run.reusable(stage)) is not None:
        console.print(f"[green]✓ {stage}[/] reused from {run.root / stage} (inputs and config unchanged)")
        return entry["summary"]
    refuse_rewriting_a_decision(run, stage)
    spec = stage_spec(stage)
    with state_lock(run.config) if spec.writes_state else contextlib.nullcontext():
        if spec.shareable and (entry := run.adopt(stage)) is not None:
            console.print(f"[green]✓ {stage}[/] reused from run {entry['summary']['reused_from_run']} "
                          "(same inputs, settings and code)")
            return entry["summary"]
        console.rule(f"{stage} · run {run.run_id} · started {time.strftime('%H:%M:%S')}")
        started = time.perf_counter()
        function = stage_function(stage)
        try:
            run.begin(stage)  # inside: a stop that lands once the partial folder exists names the stage
            result: StageOutput = function(run.config, run.stage_inputs(stage), run.stage_dir(stage))
        except Stopped as stopped:
            stopped.stage = stage
            raise
        finally:
            run.running.discard(stage)
        seconds = time.perf_counter() - started
        run.record(stage, run.publish(stage, result.outputs), result.summary, seconds)
    for warning in result.summary.get("warnings", []):
        console.print(f"[bold yellow]⚠ {stage}:[/] {warning}")
    console.print(f"[green]✓ {stage}[/] finished at {time.strftime('%H:%M:%S')} in {seconds:.1f} s")
    return result.summary


def refuse_rewriting_a_decision(run: Run, stage: str) -> None:
    """A run folder whose promotion is recorded shows the figures that decision was made on: a stage
    before promote may not rerun there under other settings (promote itself may: it re-decides; so
    may publish, which decides as promote does and only builds the index those figures select)."""
    decided = run.manifest.get("stages", {}).get("promote")
    if decided is None or stage_spec(stage).decides:
        return
    raise StageError(
        f"run {run.run_id} already holds a promotion decision (version {decided['summary'].get('version')}, "
        f"made on the figures in {run.config.reports_dir / run.run_id}); rerunning {stage} with other settings "
        "there would leave the folder showing other figures than its decision. Run without --run-id (other "
        "settings get their own run folder, reusing what still matches) or pick a new --run-id")


@contextlib.contextmanager
def state_lock(cfg: RunConfig) -> Iterator[None]:
    """Hold <state_dir>/<name>/ (split registry, hash cache, extract watermark) for a stage writing it:
    two runs of one name (a scheduled one and a manual one) never write it at once."""
    with run_lock(cfg.state_dir / cfg.name, what="state folder"):
        yield


def run_all(run: Run) -> dict[str, dict]:
    quiet_library_logs()
    with run_lock(run.root), stop_on_signals(), redacted_output():
        return {stage: _run_stage(run, stage) for stage in STAGE_NAMES}


def force_promote(run: Run, decision: dict, reason: str) -> dict:
    """`promote --force`: the run's version champion past its gates, through `registry.promotion`:
    its index is built and validated (publish, with the replay) first when publish did not build
    one, then flip, tag, alias. Refuses, changing nothing, when the index cannot be built."""
    from pipeline.registry import promotion
    from pipeline.stages.publish import publish

    cfg = run.config
    index = run.summary("publish")
    if cfg.publish.enabled and not index.get("published"):
        evaluate = run.stage_inputs("publish").outputs["evaluate"]
        index = publish(cfg, run.run_id, run.output("split", "images"), run.output("split", "pairs"),
                        run.output("train", "weights").parent, run.summary("evaluate"), True,
                        run.stage_dir("publish"), evaluate.get("catalog_vectors"), evaluate.get("served_rankings"))
    table = index["table"] if index.get("published") else None
    forced = promotion.force(cfg, str(decision["version"]), table, reason)
    rewrite_verdict(run.config.reports_dir / run.run_id, {
        "by": "promote", "promoted": True, "version": str(decision["version"]),
        "reason": f"FORCED by {forced['clickclip.forced_by']} past the gates ({reason}); the gates said: "
                  f"{decision['reason']}", "parity": index.get("parity_sentence")})
    registry.log_report(cfg.promote, registry.version_run_id(cfg.promote, str(decision["version"])),
                        run.config.reports_dir / run.run_id)
    return {"model_name": cfg.promote.model_name, **forced}


def stage_report(run: Run, stage: str, summary: dict) -> str:
    """A few lines for a person after a standalone stage command; the whole summary is in the
    manifest (and on stdout with --json)."""
    lines = [f"{stage} · run {run.run_id}"]
    if stage == "extract":
        lines.append(f"rows read {summary['rows_read']}: kept {summary['rows_kept']}, quarantined "
                     f"{summary['rows_quarantined']}{_outside(summary)}; {summary['pairs']} pairs over "
                     f"{summary['queries']} queries")
    elif stage == "split":
        lines.append(f"images kept {summary['images_kept']}, quarantined {summary['images_quarantined']}; "
                     f"{summary['groups']} groups; " + leak_audit_sentence(summary.get("leak_audit")))
    elif stage == "train":
        gallery = summary.get("validation", {}).get("gallery")
        over = f" (over the {gallery} validation images only, not the test gallery)" if gallery else ""
        best = summary["best_val_recall@10"]
        attempt = summary.get("steps_this_attempt", summary["steps"])
        ran = f" ({attempt} in this attempt, resumed)" if summary.get("resumed_from") else ""
        lines.append(f"{summary['epochs']} epochs, {summary['steps']} steps{ran} in {summary['seconds']} s; best "
                     f"validation recall@10 {'–' if best is None else f'{best:.4f}'}{over}; finished without NaN: "
                     f"{summary['finished_without_nan']}")
    elif stage == "evaluate":
        metric = run.config.promote.metric
        scores = "  ".join(f"{name} {values[metric]:.4f}" for name, values in summary["models"].items())
        lines.append(f"{metric}: {scores}")
        lines.append(f"report: {run.config.reports_dir / run.run_id / 'report.html'}")
    elif stage == "promote":
        lines += [f"{'PROMOTED to champion' if summary['promoted'] else 'not promoted'} — {summary['reason']}",
                  f"registered: {summary['model_name']} version {summary['version']}", champion_line(summary)]
    lines += [f"warning: {w}" for w in summary.get("warnings", [])]
    return "\n".join([*lines, f"summary: {run.manifest_path} (or rerun with --json)"])


def _outside(extract: dict) -> str:
    outside = extract.get("rows_outside_window", 0)
    return f", outside the window {outside} (counted apart, not quarantined)" if outside else ""


def champion_line(decision: dict) -> str:
    """Which version serves now, without naming an alias that does not exist."""
    champion = decision.get("champion_version", decision["version"] if decision["promoted"] else None)
    if champion is None:
        return (f"champion: none yet — no version of {decision['model_name']} holds the `champion` alias "
                f"(version {decision['version']} was registered, not promoted)")
    return f"champion: {decision['champion_uri']} = version {champion}"


def format_summary(run: Run, summaries: dict[str, dict]) -> str:
    cfg: RunConfig = run.config
    metric = cfg.promote.metric
    evaluation, decision = summaries["evaluate"], summaries["promote"]
    models = evaluation["models"]
    extract = summaries["extract"]
    lines = [
        f"run {run.run_id}  ({run.root})",
        f"rows read {extract['rows_read']}: kept {extract['rows_kept']}, quarantined {extract['rows_quarantined']}"
        f" {extract['quarantined_by_reason']}{_outside(extract)}",
        f"images kept {summaries['split']['images_kept']}, quarantined {summaries['split']['images_quarantined']}; "
        + leak_audit_sentence(summaries["split"].get("leak_audit")).replace("Leak audit", "leak audit", 1),
    ]
    for k in cfg.evaluate.ks:  # each model dense and hybrid, and keyword search; the report has every configuration
        row = "  ".join(f"{name} {models[name][f'recall@{k}']:.4f}" for name in headline_names(evaluation))
        lines.append(f"recall@{k}: {row}")
    verdict = ("PROMOTED to champion" if decision["promoted"] else "made CHALLENGER (interleaved with the champion)"
               if decision.get("challenger") else "not promoted")
    lines += [
        f"decision on {metric}: {verdict} — {decision['reason']}",
        f"registered: {decision['model_name']} version {decision['version']}",
        champion_line(decision),
    ]
    index = summaries.get("publish") or {}
    if index.get("published"):
        lines.append(f"index: {index['table']} ({index['rows']} images, HNSW recall@10 against exact search "
                     f"{index['recall_at_10_vs_exact']}); `clickclip search` queries what serves")
        lines.append(f"{index['parity_sentence']} (served as {index['serve_as']}: "
                     f"{ServedConfig.from_dict(index['served_config']).describe()})")
    elif index:
        lines.append(f"index: not published ({index['reason']})")
    if evaluation.get("history") and len(evaluation["history"]["weeks"]) > 1:
        lines.append(evaluation["history"]["sentence"] + " (the report's \"Week by week\")")
    lines.append(f"report: {cfg.reports_dir / run.run_id / 'report.html'} (Markdown: recall.md beside it)")
    return "\n".join(lines)
