"""Where MLflow lives: config, then MLFLOW_TRACKING_URI, then a local SQLite store in ./mlruns."""

from __future__ import annotations

import os
from pathlib import Path

from pipeline.config import PromoteConfig, RunConfig

DEFAULT_STORE = Path("mlruns")


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


def ensure_experiment(name: str, uri: str) -> str:
    """Experiment id for `name`, created with a sensible artifact location if missing."""
    from mlflow.tracking import MlflowClient  # mlflow imports slowly; only stages that log pay for it

    client = MlflowClient(tracking_uri=uri)
    experiment = client.get_experiment_by_name(name)
    if experiment is not None:
        return experiment.experiment_id
    return client.create_experiment(name, artifact_location=artifact_location(uri))


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
