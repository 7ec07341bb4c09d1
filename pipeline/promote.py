"""Promote: log the run to MLflow, register the model, and move `champion` only if it wins.

Idempotent per run: a second promote of the same run finds its registered version (by the
MLflow run id) and registers nothing new. Writes `runs/<id>/promote/promotion.json`.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pipeline.config import PromoteConfig, RunConfig
from pipeline.evaluate import CHECKPOINT_ARTIFACT
from pipeline.onnx_export import export_onnx
from pipeline.tracking import ensure_experiment, public_config, redact_uri, tracking_uri

SERVING_CODE = Path(__file__).with_name("serving.py")
PIP_REQUIREMENTS = ["torch", "open_clip_torch", "pillow", "pandas", "numpy", "safetensors"]


@dataclass(frozen=True)
class PromoteResult:
    decision: Path
    summary: dict


@dataclass(frozen=True)
class GateInputs:
    """What the gates need from the earlier stages, besides the evaluation."""

    quarantine_rate: float
    leak_audit_passed: bool
    finished_without_nan: bool


def evaluate_gates(evaluation: dict, cfg: PromoteConfig, inputs: GateInputs) -> list[dict]:
    """Each gate with pass/fail and the numbers behind it."""
    models, baseline = evaluation["models"], evaluation["baseline"]
    if cfg.metric not in models["candidate"]:
        raise KeyError(f"promote.metric {cfg.metric!r} is not one of {sorted(models['candidate'])}")
    candidate = models["candidate"][cfg.metric]
    delta = evaluation["delta_vs_baseline"][cfg.metric]
    statistic = delta["low"] if cfg.gates.use_lower_bound else delta["mean"]
    label = "95% CI lower bound" if cfg.gates.use_lower_bound else "mean"
    return [
        {"gate": "min_candidate", "passed": candidate >= cfg.gates.min_candidate,
         "detail": f"candidate {cfg.metric} {candidate:.4f} >= {cfg.gates.min_candidate}"},
        {"gate": "beats_baseline", "passed": statistic > cfg.margin,
         "detail": f"{label} of candidate − {baseline} {cfg.metric} {statistic:+.4f} > margin {cfg.margin} "
                   f"(mean {delta['mean']:+.4f}, CI [{delta['low']:+.4f}, {delta['high']:+.4f}])"},
        {"gate": "no_slice_regression", "passed": not evaluation.get("flagged_slices"),
         "detail": "flagged slices: " + (", ".join(evaluation.get("flagged_slices") or []) or "none")},
        {"gate": "leak_audit", "passed": inputs.leak_audit_passed, "detail": "no group straddles splits"},
        {"gate": "quarantine_rate", "passed": inputs.quarantine_rate <= cfg.gates.max_quarantine_rate,
         "detail": f"{inputs.quarantine_rate:.4f} of event rows quarantined <= {cfg.gates.max_quarantine_rate}"},
        {"gate": "no_nan", "passed": inputs.finished_without_nan, "detail": "training finished without NaN"},
    ]


def decide(evaluation: dict, cfg: PromoteConfig, inputs: GateInputs) -> tuple[bool, str, list[dict]]:
    """Promote only when every gate passes; the reason lists the failed gates, or the decisive one."""
    gates = evaluate_gates(evaluation, cfg, inputs)
    failed = [g for g in gates if not g["passed"]]
    if failed:
        return False, "failed: " + "; ".join(f"{g['gate']} ({g['detail']})" for g in failed), gates
    return True, "all gates passed; " + gates[1]["detail"], gates


def flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(flatten(value, f"{name}."))
        else:
            flat[name] = value
    return flat


def _log_run(cfg: RunConfig, evaluation: dict, artifacts: list[Path], model_dir: Path, onnx: dict,
             onnx_dir: Path) -> str:
    """Log params, metrics, artifacts and the pyfunc model into the training's MLflow run."""
    import mlflow
    import numpy as np
    import pandas as pd
    from mlflow.models import ModelSignature
    from mlflow.types import ColSpec, Schema, TensorSpec

    dim = json.loads((model_dir / "open_clip_config.json").read_text())["model_cfg"]["embed_dim"]
    signature = ModelSignature(
        inputs=Schema([ColSpec("string", "text", required=False), ColSpec("binary", "image", required=False)]),
        outputs=Schema([TensorSpec(np.dtype("float32"), (-1, dim))]))
    mlflow.log_params(flatten(public_config(cfg)))
    for model, values in evaluation["models"].items():
        mlflow.log_metrics({f"eval.{model}.{k.replace('@', '_at_')}": v for k, v in values.items()})
    mlflow.log_metrics({f"onnx.{tower}_max_abs_diff": diff for tower, diff in onnx["parity_max_abs_diff"].items()})
    for path in artifacts:
        if path.is_dir():
            mlflow.log_artifacts(str(path), artifact_path=path.name)
        elif path.is_file():
            mlflow.log_artifact(str(path))
    info = mlflow.pyfunc.log_model(
        name="model", python_model=str(SERVING_CODE),
        artifacts={CHECKPOINT_ARTIFACT: str(model_dir), "onnx": str(onnx_dir)},
        signature=signature, input_example=pd.DataFrame({"text": ["navy striped trainers"]}),
        pip_requirements=PIP_REQUIREMENTS)
    return info.model_uri


def promote(cfg: RunConfig, run_id: str, mlflow_run_id: str | None, evaluation: dict, gate_inputs: GateInputs,
            lineage: dict[str, str], model_dir: Path, artifacts: list[Path], out_dir: Path) -> PromoteResult:
    """Decide by the gates, log the run and its lineage tags, register, and move the alias."""
    import mlflow
    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient

    pcfg = cfg.promote
    uri = tracking_uri(pcfg)
    mlflow.set_tracking_uri(uri)
    client = MlflowClient(tracking_uri=uri)
    experiment_id = ensure_experiment(pcfg.experiment, uri)
    if mlflow_run_id is not None:
        try:
            client.get_run(mlflow_run_id)
        except MlflowException:
            mlflow_run_id = None  # the store was reset since training; log into a fresh run
    existing = []
    if mlflow_run_id is not None:
        existing = client.search_model_versions(f"name='{pcfg.model_name}' and run_id='{mlflow_run_id}'")

    promoted, reason, gates = decide(evaluation, pcfg, gate_inputs)
    onnx = None
    if existing:
        version = existing[0]
        promoted = version.tags.get("clickclip.decision") == "promoted"
        reason = version.tags.get("clickclip.reason", "") + " (already registered; nothing new)"
        current = client.get_registered_model(pcfg.model_name).aliases.get("champion")
        if promoted and str(current) != str(version.version):
            # an earlier attempt registered the version and stopped before moving the alias
            # (this stage never completed, or it would have been reused): finish the promotion
            _move_champion(client, pcfg.model_name, version.version)
            reason += "; the interrupted alias move was completed"
    else:
        onnx = export_onnx(model_dir, out_dir / "onnx")
        gate_tags = {f"clickclip.gate.{g['gate']}": f"{'pass' if g['passed'] else 'FAIL'}: {g['detail']}"
                     for g in gates}
        tags = {"clickclip.run_id": run_id, "clickclip.decision": "promoted" if promoted else "rejected",
                "clickclip.reason": reason, **{f"clickclip.{k}": v for k, v in lineage.items()}, **gate_tags}
        with mlflow.start_run(run_id=mlflow_run_id, experiment_id=experiment_id, run_name=run_id) as active:
            mlflow_run_id = active.info.run_id
            mlflow.set_tags(tags)
            model_uri = _log_run(cfg, evaluation, artifacts, model_dir, onnx, out_dir / "onnx")
        version = mlflow.register_model(model_uri, pcfg.model_name, tags=tags)
        if promoted:
            _move_champion(client, pcfg.model_name, version.version)

    summary = {
        "model_name": pcfg.model_name, "version": str(version.version), "promoted": promoted,
        "reason": reason, "gates": gates, "lineage": lineage, "mlflow_run_id": mlflow_run_id,
        "onnx_parity_max_abs_diff": onnx["parity_max_abs_diff"] if onnx else None,
        "tracking_uri": redact_uri(uri),
        "champion_uri": f"models:/{pcfg.model_name}@champion",
    }
    decision = out_dir / "promotion.json"
    decision.write_text(json.dumps(summary, indent=2))
    return PromoteResult(decision, summary)


def _move_champion(client, name: str, version: str) -> None:
    """Point `champion` at `version`; the former champion, if any, becomes `previous`."""
    current = client.get_registered_model(name).aliases.get("champion")
    if current is not None and str(current) != str(version):
        client.set_registered_model_alias(name, "previous", current)
    client.set_registered_model_alias(name, "champion", version)


def _who() -> str:
    import getpass

    try:
        return getpass.getuser()
    except (KeyError, OSError):
        return "unknown"


def force_promote(cfg: PromoteConfig, version: str, reason: str) -> dict:
    """Move `champion` to `version` past failed gates; records who and why on the version."""
    from mlflow.tracking import MlflowClient

    if not reason.strip():
        raise ValueError("a forced promotion needs --reason")
    client = MlflowClient(tracking_uri=tracking_uri(cfg))
    client.get_model_version(cfg.model_name, version)  # fails clearly if it does not exist
    _move_champion(client, cfg.model_name, version)
    tags = {"clickclip.decision": "forced", "clickclip.forced_by": _who(), "clickclip.force_reason": reason}
    for key, value in tags.items():
        client.set_model_version_tag(cfg.model_name, version, key, value)
    return {"model_name": cfg.model_name, "champion": version, **tags}


def rollback(cfg: PromoteConfig, reason: str = "") -> dict:
    """Point `champion` back at `previous`; the rolled-back version keeps a tag saying so."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=tracking_uri(cfg))
    aliases = client.get_registered_model(cfg.model_name).aliases
    if "previous" not in aliases:
        raise LookupError(f"model {cfg.model_name!r} has no 'previous' version to roll back to")
    current, previous = aliases.get("champion"), aliases["previous"]
    client.set_registered_model_alias(cfg.model_name, "champion", previous)
    client.delete_registered_model_alias(cfg.model_name, "previous")
    if current is not None:
        client.set_model_version_tag(cfg.model_name, current, "clickclip.rolled_back",
                                     f"by {_who()}: {reason or 'no reason given'}")
    return {"model_name": cfg.model_name, "champion": str(previous), "rolled_back": current}
