"""Promote: log the run to MLflow, register the model, and make it champion only if it wins.

The state changes (flip the serving pointer, tag the version, move the alias) go through
`registry.promotion`, whose docstring lists the states and the order. Idempotent per run: a second
promote of the same run finds its registered version (by its `clickclip.run_id` tag), registers
nothing new and completes whatever a kill interrupted. Writes `runs/<id>/promote/promotion.json`.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

from pipeline import registry
from pipeline.config import RunConfig
from pipeline.registry import promotion
from pipeline.report.verdict import rewrite_verdict
from pipeline.retrieval.gates import GateInputs, decide
from pipeline.retrieval.served import RECORD_TAG, gated
from pipeline.stages import StageInputs, StageOutput
from pipeline.training.onnx_export import export_onnx


@dataclass(frozen=True)
class PromoteResult:
    decision: Path
    summary: dict


def decision_tags(promoted: bool, reason: str, gates: list[dict], challenger: bool = False) -> dict[str, str]:
    """The decision as registry tags on the version: verdict, reason, and every gate with its numbers."""
    verdict = "challenger" if challenger else "promoted" if promoted else "rejected"
    return {"clickclip.decision": verdict, "clickclip.reason": reason,
            **{f"clickclip.gate.{g['gate']}": f"{'pass' if g['passed'] else 'FAIL'}: {g['detail']}" for g in gates}}


def served_record(evaluation: dict) -> str:
    """The served configuration the gate decided on, as stored with the registered version: next
    week's evaluate scores this version exactly as it serves, from this record."""
    return gated(evaluation).to_json()


def published_table(index: dict | None) -> str | None:
    """The run's validated index table, or None when publish built none (publishing off, gates failed)."""
    return index["table"] if index and index.get("published") else None


def promote(cfg: RunConfig, run_id: str, mlflow_run_id: str | None, evaluation: dict, gate_inputs: GateInputs,
            lineage: dict[str, str], model_dir: Path, artifacts: list[Path], out_dir: Path,
            index: dict | None = None, report_dir: Path | None = None) -> PromoteResult:
    """Decide by the gates, log the run and its lineage tags, register, and move the alias.

    The alias moves only while it still points at the champion evaluate compared against
    (`evaluation["champion_version"]`); if it moved since, nothing is registered and the stage fails
    with ChampionMoved. A rerun finds the run's version by its `clickclip.run_id` tag and registers
    nothing new; it completes an interrupted alias move, unless the version was rolled back since."""
    pcfg = cfg.promote
    baseline = evaluation["champion_version"]
    existing = registry.versions_of_run(pcfg, run_id)
    promoted, reason, gates = decide(evaluation, pcfg, gate_inputs)
    # interleave_first: a gated version with a champion to compare with becomes the challenger
    challenger = promoted and pcfg.policy == "interleave_first" and baseline is not None
    onnx = None
    if existing:
        # registered by an earlier attempt of this run: re-decide under the current gates (a changed
        # margin or gate decides again), never register twice
        version = existing[0]
        tags = registry.version_tags(pcfg, str(version.version))
        if RECORD_TAG not in tags:  # registered before configurations were recorded; never rewritten after
            registry.set_version_tags(pcfg, str(version.version), {RECORD_TAG: served_record(evaluation)})
        champion = registry.champion_version(pcfg)
        if "clickclip.rolled_back" in tags:
            promoted = challenger = False
            reason += f"; not promoted again: it was rolled back ({tags['clickclip.rolled_back']})"
        elif "clickclip.interleaving" in tags and champion != str(version.version):
            promoted = challenger = False
            reason += f"; interleaving decided on it already ({tags['clickclip.interleaving']})"
        elif challenger and champion != str(version.version):
            promoted = False
            reason += promotion.make_challenger(cfg, str(version.version), published_table(index))
        elif promoted and champion != str(version.version):
            note = promotion.make_champion(cfg, str(version.version), published_table(index), baseline)
            reason += ("; the interrupted alias move was completed" if tags.get("clickclip.decision") == "promoted"
                       else "; promoted now under the current gates") + note
        elif not promoted and champion == str(version.version):
            promoted = True  # it stays champion: an earlier decision promoted it
            reason += ("; it is champion by an earlier decision, which these gates would not make: roll back with "
                       "`clickclip rollback` if that is meant")
        elif promoted:  # champion already: a kill after the alias move is repaired here
            reason += promotion.ensure_serving(cfg, str(version.version), published_table(index))
        reason += f" (version {version.version} was already registered for this run; nothing new registered)"
        registry.set_version_tags(pcfg, str(version.version), decision_tags(promoted, reason, gates, challenger))
    else:
        current = registry.champion_version(pcfg)
        if current != baseline:
            raise registry.ChampionMoved(
                f"not registering run {run_id}: evaluate compared it against champion {baseline or '(none)'}, but "
                f"the registry's champion is now {current or '(none)'}. Rerun the pipeline (clickclip run) so "
                "evaluate compares against the new champion")
        onnx = export_onnx(model_dir, out_dir / "onnx")
        if challenger:
            reason += ("; promote.policy is interleave_first: it becomes the challenger, and the interleaving gate "
                       "decides")
        tags = {"clickclip.run_id": run_id, **decision_tags(promoted, reason, gates, challenger),
                **{f"clickclip.{k}": v for k, v in lineage.items()}, RECORD_TAG: served_record(evaluation)}
        metrics = {metric_key(model, k): v
                   for model, values in evaluation["models"].items() for k, v in values.items()}
        metrics |= {f"onnx.{tower}_max_abs_diff": diff for tower, diff in onnx["parity_max_abs_diff"].items()}
        mlflow_run_id = registry.existing_run(pcfg, mlflow_run_id)  # a reset store: log into a fresh run
        mlflow_run_id, version = registry.log_and_register(cfg, mlflow_run_id, run_id, tags, metrics, artifacts,
                                                           model_dir, out_dir / "onnx")
        promotion.reached("registered")
        if challenger:
            promoted = False
            reason += promotion.make_challenger(cfg, str(version.version), published_table(index))
        elif promoted:
            reason += promotion.make_champion(cfg, str(version.version), published_table(index), baseline)

    if report_dir is not None:  # the report's verdict line says what was decided now, locally and in MLflow
        rewrite_verdict(report_dir, {"by": "promote", "promoted": promoted, "challenger": challenger, "reason": reason,
                                     "version": str(version.version),
                                     "parity": (index or {}).get("parity_sentence")})
        registry.log_report(pcfg, version.run_id or mlflow_run_id, report_dir)
    summary = {
        "model_name": pcfg.model_name, "version": str(version.version), "promoted": promoted,
        "challenger": str(version.version) if challenger else None,
        "reason": reason, "gates": gates, "lineage": lineage, "mlflow_run_id": mlflow_run_id,
        "onnx_parity_max_abs_diff": onnx["parity_max_abs_diff"] if onnx else None,
        "tracking_uri": registry.redact_uri(registry.tracking_uri(pcfg)),
        "champion_uri": f"models:/{pcfg.model_name}@champion",
        "champion_version": registry.champion_version(pcfg),  # after this decision; None: no champion yet
        "index": index,
    }
    decision = out_dir / "promotion.json"
    decision.write_text(json.dumps(summary, indent=2))
    return PromoteResult(decision, summary)


def metric_key(model: str, metric: str) -> str:
    """An MLflow metric name for a configuration's metric: `hybrid(candidate)` and `candidate+title`
    hold characters MLflow refuses, so `eval.hybrid_candidate.recall_at_10`."""
    name = re.sub(r"[^A-Za-z0-9_]+", "_", model).strip("_")
    return f"eval.{name}.{metric.replace('@', '_at_')}"


def run(cfg: RunConfig, inputs: StageInputs, out_dir: Path) -> StageOutput:
    extract, split, train, evaluation = (inputs.summary(s) for s in ("extract", "split", "train", "evaluate"))
    gate_inputs = GateInputs.from_summaries(
        extract, json.loads(inputs.output("split", "leak_audit").read_text()), train)
    lineage = {"git_commit": train.get("git_commit", inputs.git_commit),
               "source_sha256": train.get("source_sha256", inputs.code_digest),
               "input_events_sha256": inputs.digests["events"], "input_images_sha256": inputs.digests["images"],
               "split_registry_version": split["registry_version"],
               "parent_champion_version": str(evaluation["champion_version"] or "none")}
    artifacts = [inputs.report_dir, inputs.manifest, inputs.output("split", "leak_audit"),
                 inputs.output("extract", "quarantine"), inputs.output("split", "image_quarantine")]
    result = promote(cfg, inputs.run_id, train.get("mlflow_run_id"), evaluation, gate_inputs, lineage,
                     inputs.output("train", "weights").parent, artifacts, out_dir, inputs.summary("publish"),
                     inputs.report_dir)
    return StageOutput({"decision": result.decision}, result.summary)
