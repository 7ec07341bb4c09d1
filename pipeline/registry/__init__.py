"""The one door to MLflow: tracking store, training logger, champion lookup, logging a run,
registering its model, and moving the `champion` / `previous` aliases.

Every function takes the tracking URI (or the promote config that names it) explicitly and talks
through an `MlflowClient` bound to it; nothing here sets MLflow's process-wide tracking URI.
Where MLflow lives: `promote.tracking_uri`, then MLFLOW_TRACKING_URI, then a local SQLite store
in ./mlruns.
"""

from __future__ import annotations

import getpass
import json
import os
import tempfile
import time
from pathlib import Path
from typing import Any

from pipeline.config import PromoteConfig, RunConfig

DEFAULT_STORE = Path("mlruns")
CHECKPOINT_ARTIFACT = "checkpoint"  # name of the checkpoint folder inside a registered pyfunc model
MODEL_ARTIFACT = "model"  # where the pyfunc model is logged in the run
PYFUNC_CODE = Path(__file__).with_name("pyfunc_model.py")
PIP_REQUIREMENTS = ["torch", "open_clip_torch", "pillow", "pandas", "numpy", "safetensors"]


def tracking_uri(cfg: PromoteConfig) -> str:
    if cfg.tracking_uri:
        return cfg.tracking_uri
    if os.environ.get("MLFLOW_TRACKING_URI"):
        return os.environ["MLFLOW_TRACKING_URI"]
    DEFAULT_STORE.mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{(DEFAULT_STORE / 'mlflow.db').resolve()}"


def artifact_location(uri: str) -> str | None:
    """For a local SQLite store, keep artifacts beside the database instead of the working directory."""
    if uri.startswith("sqlite:///"):
        return (Path(uri.removeprefix("sqlite:///")).parent / "artifacts").resolve().as_uri()
    return None


def redact_uri(uri: str) -> str:
    """Hide credentials in a tracking URI before it is written anywhere."""
    if "@" in uri and "://" in uri:
        scheme, rest = uri.split("://", 1)
        return f"{scheme}://***@{rest.split('@', 1)[1]}"
    return uri


def public_config(cfg: RunConfig) -> dict:
    """The run config as JSON for manifests and MLflow params, with credentials redacted."""
    tree = cfg.model_dump(mode="json")
    if tree["promote"].get("tracking_uri"):
        tree["promote"]["tracking_uri"] = redact_uri(tree["promote"]["tracking_uri"])
    return tree


def client_for(cfg: PromoteConfig):
    """An MlflowClient bound to the configured store (mlflow imports slowly: only stages that use it pay)."""
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=tracking_uri(cfg))


def ensure_experiment(name: str, uri: str) -> str:
    """Experiment id for `name`, created with a sensible artifact location if missing."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=uri)
    experiment = client.get_experiment_by_name(name)
    if experiment is not None:
        return experiment.experiment_id
    return client.create_experiment(name, artifact_location=artifact_location(uri))


def training_logger(cfg: PromoteConfig, run_name: str):
    """Lightning's MLflow logger for a training run, tagged with clickclip's run id."""
    from lightning.pytorch.loggers import MLFlowLogger

    uri = tracking_uri(cfg)
    ensure_experiment(cfg.experiment, uri)
    return MLFlowLogger(experiment_name=cfg.experiment, run_name=run_name, tracking_uri=uri,
                        tags={"clickclip.run_id": run_name})


def champion_version(cfg: PromoteConfig) -> str | None:
    """The version the `champion` alias points at, or None when there is none yet."""
    from mlflow.exceptions import MlflowException

    try:
        return str(client_for(cfg).get_model_version_by_alias(cfg.model_name, "champion").version)
    except MlflowException:
        return None


def download_checkpoint(cfg: PromoteConfig, version: str, workdir: Path) -> Path:
    """Download a registered version and return its open_clip checkpoint folder."""
    import mlflow

    local = Path(mlflow.artifacts.download_artifacts(
        artifact_uri=f"models:/{cfg.model_name}/{version}", dst_path=str(workdir), tracking_uri=tracking_uri(cfg)))
    return local / registered_artifact(local, CHECKPOINT_ARTIFACT)


def registered_artifact(model_folder: Path, name: str) -> str:
    """Where a downloaded pyfunc model keeps one of its artifacts, as its MLmodel file says (the
    folder is named after the logged source folder, not after the artifact's key)."""
    import yaml

    flavor = yaml.safe_load((model_folder / "MLmodel").read_text())["flavors"]["python_function"]
    return flavor["artifacts"][name]["path"]


def existing_run(cfg: PromoteConfig, mlflow_run_id: str | None) -> str | None:
    """`mlflow_run_id` if the store still has that run (a reset store has not)."""
    from mlflow.exceptions import MlflowException

    if mlflow_run_id is None:
        return None
    try:
        client_for(cfg).get_run(mlflow_run_id)
    except MlflowException:
        return None
    return mlflow_run_id


def versions_of_run(cfg: PromoteConfig, mlflow_run_id: str | None) -> list:
    """Registered versions of `promote.model_name` logged from this MLflow run."""
    if mlflow_run_id is None:
        return []
    return client_for(cfg).search_model_versions(f"name='{cfg.model_name}' and run_id='{mlflow_run_id}'")


def flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(flatten(value, f"{name}."))
        else:
            flat[name] = value
    return flat


def log_and_register(cfg: RunConfig, mlflow_run_id: str | None, run_name: str, tags: dict[str, str],
                     metrics: dict[str, float], artifacts: list[Path], model_dir: Path, onnx_dir: Path):
    """Log params, metrics, tags, artifacts and the pyfunc model (its code, the checkpoint and the
    ONNX towers) into the training's MLflow run (or a fresh one), then register it as a new version
    of `promote.model_name` carrying `tags`. Returns (the MLflow run id, the model version)."""
    from mlflow.entities import LoggedModelStatus, Metric, Param
    from mlflow.exceptions import MlflowException

    pcfg = cfg.promote
    client = client_for(pcfg)
    experiment_id = ensure_experiment(pcfg.experiment, tracking_uri(pcfg))
    if mlflow_run_id is None:
        mlflow_run_id = client.create_run(experiment_id, run_name=run_name).info.run_id
    else:
        client.update_run(mlflow_run_id, status="RUNNING")
    now = int(time.time() * 1000)
    client.log_batch(mlflow_run_id, metrics=[Metric(k, v, now, 0) for k, v in metrics.items()],
                     params=[Param(k, str(v)) for k, v in flatten(public_config(cfg)).items()])
    for key, value in tags.items():
        client.set_tag(mlflow_run_id, key, value)
    for path in artifacts:
        if path.is_dir():
            client.log_artifacts(mlflow_run_id, str(path), artifact_path=path.name)
        elif path.is_file():
            client.log_artifact(mlflow_run_id, str(path))
    model = client.create_logged_model(experiment_id, name=MODEL_ARTIFACT, source_run_id=mlflow_run_id)
    with tempfile.TemporaryDirectory() as workdir:
        local = _save_pyfunc(Path(workdir) / MODEL_ARTIFACT, model_dir, onnx_dir, mlflow_run_id, model.model_id)
        client.log_model_artifacts(model.model_id, str(local))
    client.finalize_logged_model(model.model_id, LoggedModelStatus.READY)
    try:
        client.create_registered_model(pcfg.model_name)
    except MlflowException as exc:
        if exc.error_code != "RESOURCE_ALREADY_EXISTS":
            raise
    version = client.create_model_version(pcfg.model_name, source=f"models:/{model.model_id}", run_id=mlflow_run_id,
                                          tags=tags, model_id=model.model_id)
    client.set_terminated(mlflow_run_id)
    return mlflow_run_id, version


def _save_pyfunc(path: Path, model_dir: Path, onnx_dir: Path, mlflow_run_id: str, model_id: str) -> Path:
    """The registered model: a pyfunc logged as code (no pickles) whose artifacts are the open_clip
    checkpoint and the ONNX towers."""
    import mlflow
    import numpy as np
    import pandas as pd
    from mlflow.models import Model, ModelSignature
    from mlflow.types import ColSpec, Schema, TensorSpec

    dim = json.loads((model_dir / "open_clip_config.json").read_text())["model_cfg"]["embed_dim"]
    signature = ModelSignature(
        inputs=Schema([ColSpec("string", "text", required=False), ColSpec("binary", "image", required=False)]),
        outputs=Schema([TensorSpec(np.dtype("float32"), (-1, dim))]))
    mlflow.pyfunc.save_model(
        path=str(path), python_model=str(PYFUNC_CODE),
        artifacts={CHECKPOINT_ARTIFACT: str(model_dir), "onnx": str(onnx_dir)},
        signature=signature, input_example=pd.DataFrame({"text": ["navy striped trainers"]}),
        pip_requirements=PIP_REQUIREMENTS,
        mlflow_model=Model(artifact_path=MODEL_ARTIFACT, run_id=mlflow_run_id, model_id=model_id))
    return path


def version_tags(cfg: PromoteConfig, version: str) -> dict[str, str]:
    return dict(client_for(cfg).get_model_version(cfg.model_name, version).tags)


def aliases(cfg: PromoteConfig) -> dict[str, str]:
    return {alias: str(v) for alias, v in client_for(cfg).get_registered_model(cfg.model_name).aliases.items()}


def move_champion(client, name: str, version: str) -> None:
    """Point `champion` at `version`; the former champion, if any, becomes `previous`."""
    current = client.get_registered_model(name).aliases.get("champion")
    if current is not None and str(current) != str(version):
        client.set_registered_model_alias(name, "previous", current)
    client.set_registered_model_alias(name, "champion", version)


def promote_version(cfg: PromoteConfig, version: str) -> None:
    move_champion(client_for(cfg), cfg.model_name, version)


def _who() -> str:
    try:
        return getpass.getuser()
    except (KeyError, OSError):
        return "unknown"


def force_promote(cfg: PromoteConfig, version: str, reason: str) -> dict:
    """Move `champion` to `version` past failed gates; records who and why on the version."""
    if not reason.strip():
        raise ValueError("a forced promotion needs --reason")
    client = client_for(cfg)
    client.get_model_version(cfg.model_name, version)  # fails clearly if it does not exist
    move_champion(client, cfg.model_name, version)
    tags = {"clickclip.decision": "forced", "clickclip.forced_by": _who(), "clickclip.force_reason": reason}
    for key, value in tags.items():
        client.set_model_version_tag(cfg.model_name, version, key, value)
    return {"model_name": cfg.model_name, "champion": version, **tags}


def rollback(cfg: PromoteConfig, reason: str = "") -> dict:
    """Point `champion` back at `previous`; the rolled-back version keeps a tag saying so."""
    client = client_for(cfg)
    current_aliases = client.get_registered_model(cfg.model_name).aliases
    if "previous" not in current_aliases:
        raise LookupError(f"model {cfg.model_name!r} has no 'previous' version to roll back to")
    current, previous = current_aliases.get("champion"), current_aliases["previous"]
    client.set_registered_model_alias(cfg.model_name, "champion", previous)
    client.delete_registered_model_alias(cfg.model_name, "previous")
    if current is not None:
        client.set_model_version_tag(cfg.model_name, current, "clickclip.rolled_back",
                                     f"by {_who()}: {reason or 'no reason given'}")
    return {"model_name": cfg.model_name, "champion": str(previous), "rolled_back": current}
