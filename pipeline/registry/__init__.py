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
import re
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from pipeline.config import PromoteConfig, RunConfig
from pipeline.errors import ClickclipError

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


CREDENTIALS = re.compile(r"(://)[^/@\s]+@")


class RegistryError(ClickclipError):
    """The model registry could not be read or written: not the same as "no champion yet"."""


def redact_uri(uri: str) -> str:
    """Hide credentials in a tracking URI before it is written anywhere."""
    if "@" in uri and "://" in uri:
        scheme, rest = uri.split("://", 1)
        return f"{scheme}://***@{rest.split('@', 1)[1]}"
    return uri


def redact_text(text: str) -> str:
    """Hide credentials of any URI inside a message (library errors quote the URI they failed on)."""
    return CREDENTIALS.sub(r"\1***@", text)


def _absent(exc: Exception) -> bool:
    """Whether MLflow said "no such registered model" or "no such alias", the one answer that
    means there is no champion; anything else (network, auth, a broken store) is an error."""
    from mlflow.exceptions import MlflowException

    if not isinstance(exc, MlflowException):
        return False
    message = str(exc).lower()
    return exc.error_code == "RESOURCE_DOES_NOT_EXIST" or (
        exc.error_code == "INVALID_PARAMETER_VALUE" and "alias" in message and "not found" in message)


@contextmanager
def _store(cfg: PromoteConfig, doing: str) -> Iterator[None]:
    """Turn any failure of the store into a RegistryError naming it (credentials redacted)."""
    try:
        yield
    except ClickclipError:
        raise
    except Exception as exc:  # noqa: BLE001 - the boundary: every store failure gets the store's name
        detail = redact_text(str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__)
        raise RegistryError(f"the MLflow store at {redact_uri(tracking_uri(cfg))} failed while {doing}: {detail}. "
                            "Check promote.tracking_uri (or MLFLOW_TRACKING_URI), that the server is up and the "
                            "credentials are valid, then rerun") from None


def public_config(cfg: RunConfig) -> dict:
    """The run config as JSON for manifests and MLflow params, with credentials redacted."""
    tree = cfg.model_dump(mode="json")
    if tree["promote"].get("tracking_uri"):
        tree["promote"]["tracking_uri"] = redact_uri(tree["promote"]["tracking_uri"])
    if tree.get("publish", {}).get("dsn"):
        tree["publish"]["dsn"] = redact_uri(tree["publish"]["dsn"])
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
    import mlflow
    from lightning.pytorch.loggers import MLFlowLogger

    uri = tracking_uri(cfg)
    before = os.environ.get("MLFLOW_TRACKING_URI")
    with _store(cfg, "starting the training's MLflow run"):
        ensure_experiment(cfg.experiment, uri)
        logger = MLFlowLogger(experiment_name=cfg.experiment, run_name=run_name, tracking_uri=uri,
                              tags={"clickclip.run_id": run_name})
        try:
            _ = logger.experiment, logger.run_id  # created now, where a failure gets the store's name
        finally:
            # the logger sets MLflow's process-wide URI (and MLFLOW_TRACKING_URI, which child processes
            # inherit); it keeps its own client, so put back what was there
            mlflow.set_tracking_uri(before)
    return logger


def champion_version(cfg: PromoteConfig) -> str | None:
    """The version the `champion` alias points at, or None when there is none yet. Any other failure
    to read the registry is a RegistryError, never taken for "no champion"."""
    with _store(cfg, "looking up the champion"):
        try:
            return str(client_for(cfg).get_model_version_by_alias(cfg.model_name, "champion").version)
        except Exception as exc:
            if _absent(exc):
                return None
            raise


def baseline_champion(cfg: PromoteConfig, run_id: str) -> str | None:
    """The champion a run is compared against: the current one, unless the current one was
    registered from this very run (it was promoted since), then the champion it was compared to."""
    version = champion_version(cfg)
    if version is None:
        return None
    tags = version_tags(cfg, version)
    if tags.get("clickclip.run_id") != run_id:
        return version
    parent = tags.get("clickclip.parent_champion_version", "none")
    return None if parent == "none" else parent


def download_checkpoint(cfg: PromoteConfig, version: str, workdir: Path) -> Path:
    """Download a registered version and return its open_clip checkpoint folder."""
    return download_version(cfg, version, workdir)[0]


def download_version(cfg: PromoteConfig, version: str, workdir: Path) -> tuple[Path, Path]:
    """Download a registered version: its open_clip checkpoint folder and its ONNX towers' folder."""
    import mlflow

    with _store(cfg, f"downloading version {version}"):
        # the version's own artifact location, from this store's registry: a models:/ URI would be
        # resolved through MLflow's process-wide registry URI, which clickclip never sets
        source = client_for(cfg).get_model_version_download_uri(cfg.model_name, version)
        local = Path(mlflow.artifacts.download_artifacts(artifact_uri=source, dst_path=str(workdir),
                                                         tracking_uri=tracking_uri(cfg)))
    return local / registered_artifact(local, CHECKPOINT_ARTIFACT), local / registered_artifact(local, "onnx")


def registered_artifact(model_folder: Path, name: str) -> str:
    """Where a downloaded pyfunc model keeps one of its artifacts, as its MLmodel file says (the
    folder is named after the logged source folder, not after the artifact's key)."""
    import yaml

    flavor = yaml.safe_load((model_folder / "MLmodel").read_text())["flavors"]["python_function"]
    return flavor["artifacts"][name]["path"]


def existing_run(cfg: PromoteConfig, mlflow_run_id: str | None) -> str | None:
    """`mlflow_run_id` if the store still has that run (a reset store has not); any other failure
    to look is a RegistryError."""
    if mlflow_run_id is None:
        return None
    with _store(cfg, "looking up the training's MLflow run"):
        try:
            client_for(cfg).get_run(mlflow_run_id)
        except Exception as exc:
            if _absent(exc):
                return None
            raise
    return mlflow_run_id


def _quoted(value: str) -> str:
    return "'" + value.replace("\\", "\\\\").replace("'", "\\'") + "'"


def versions_of_run(cfg: PromoteConfig, run_id: str) -> list:
    """Registered versions of `promote.model_name` tagged with clickclip's run id, oldest first: the
    tag is set at registration, so a version is found whatever became of its MLflow run."""
    with _store(cfg, "searching the registered versions"):
        found = client_for(cfg).search_model_versions(
            f"name={_quoted(cfg.model_name)} and tags.`clickclip.run_id` = {_quoted(run_id)}")
    return sorted(found, key=lambda v: int(v.version))


def rolled_back_versions(cfg: PromoteConfig) -> set[str]:
    """Versions `clickclip rollback` took the champion away from (tag `clickclip.rolled_back`)."""
    with _store(cfg, "searching the registered versions"):
        found = client_for(cfg).search_model_versions(f"name={_quoted(cfg.model_name)}")
    return {str(v.version) for v in found if "clickclip.rolled_back" in (v.tags or {})}


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
    pcfg = cfg.promote
    with _store(pcfg, "logging and registering the model"):
        return _log_and_register(cfg, mlflow_run_id, run_name, tags, metrics, artifacts, model_dir, onnx_dir)


def _log_and_register(cfg: RunConfig, mlflow_run_id: str | None, run_name: str, tags: dict[str, str],
                      metrics: dict[str, float], artifacts: list[Path], model_dir: Path, onnx_dir: Path):
    from mlflow.entities import LoggedModelStatus, Metric, Param
    from mlflow.exceptions import MlflowException

    pcfg = cfg.promote
    client = client_for(pcfg)
    experiment_id = ensure_experiment(pcfg.experiment, tracking_uri(pcfg))
    if mlflow_run_id is not None and client.get_run(mlflow_run_id).data.params:
        # an earlier promote of this training logged its settings there: MLflow never rewrites a
        # param, so settings changed since go to a fresh run that names the training's
        tags = tags | {"clickclip.training_mlflow_run_id": mlflow_run_id}
        mlflow_run_id = None
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
    # the source is the logged model's artifact location, not models:/<id>: MLflow resolves the latter
    # through its process-wide tracking URI, which clickclip never sets
    source = client.get_logged_model(model.model_id).artifact_location
    version = client.create_model_version(pcfg.model_name, source=source, run_id=mlflow_run_id, tags=tags,
                                          model_id=model.model_id)
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


def log_report(cfg: PromoteConfig, mlflow_run_id: str, report_dir: Path) -> None:
    """(Re)log the report folder into the version's MLflow run, over the copy logged before."""
    with _store(cfg, f"logging the report to run {mlflow_run_id}"):
        client_for(cfg).log_artifacts(mlflow_run_id, str(report_dir), artifact_path=report_dir.name)


def version_run_id(cfg: PromoteConfig, version: str) -> str:
    """The MLflow run a version was registered from (where its report is logged)."""
    with _store(cfg, f"reading version {version}"):
        return client_for(cfg).get_model_version(cfg.model_name, version).run_id


def version_tags(cfg: PromoteConfig, version: str) -> dict[str, str]:
    with _store(cfg, f"reading version {version}"):
        return dict(client_for(cfg).get_model_version(cfg.model_name, version).tags)


def set_version_tags(cfg: PromoteConfig, version: str, tags: dict[str, str]) -> None:
    with _store(cfg, f"tagging version {version}"):
        client = client_for(cfg)
        for key, value in tags.items():
            client.set_model_version_tag(cfg.model_name, version, key, value)


def aliases(cfg: PromoteConfig) -> dict[str, str]:
    """The model's aliases; none while the model is not registered yet (any other failure is an error)."""
    with _store(cfg, "reading the aliases"):
        try:
            model = client_for(cfg).get_registered_model(cfg.model_name)
        except Exception as exc:
            if _absent(exc):
                return {}
            raise
        return {alias: str(v) for alias, v in model.aliases.items()}


def move_champion(client, name: str, version: str) -> None:
    """Point `champion` at `version`; the former champion, if any, becomes `previous`."""
    current = client.get_registered_model(name).aliases.get("champion")
    if current is not None and str(current) != str(version):
        client.set_registered_model_alias(name, "previous", current)
    client.set_registered_model_alias(name, "champion", version)


class ChampionMoved(RegistryError):
    """The champion is no longer the version a decision was made against."""


def promote_version(cfg: PromoteConfig, version: str, expected_champion: str | None) -> None:
    """Move `champion` to `version` only if it still points at `expected_champion` (None: no
    champion), the version the decision was made against: compare, then set. MLflow has no atomic
    compare-and-set, so the re-read is the last thing before the move."""
    with _store(cfg, f"moving the champion alias to version {version}"):
        current = champion_version(cfg)
        if current != expected_champion:
            raise ChampionMoved(
                f"not promoting {cfg.model_name} version {version}: it was evaluated against champion "
                f"{expected_champion or '(none)'}, but the registry's champion is now {current or '(none)'}. "
                "Rerun the pipeline (clickclip run) so evaluate compares against the new champion")
        move_champion(client_for(cfg), cfg.model_name, version)


def who() -> str:
    try:
        return getpass.getuser()
    except (KeyError, OSError):
        return "unknown"


def force_promote(cfg: PromoteConfig, version: str, reason: str) -> dict:
    """Move `champion` to `version` past failed gates; records who and why on the version."""
    if not reason.strip():
        raise ValueError("a forced promotion needs --reason")
    with _store(cfg, f"forcing version {version} to champion"):
        client = client_for(cfg)
        client.get_model_version(cfg.model_name, version)  # fails clearly if it does not exist
        move_champion(client, cfg.model_name, version)
        tags = {"clickclip.decision": "forced", "clickclip.forced_by": who(), "clickclip.force_reason": reason}
        for key, value in tags.items():
            client.set_model_version_tag(cfg.model_name, version, key, value)
    return {"model_name": cfg.model_name, "champion": version, **tags}


def set_alias(cfg: PromoteConfig, alias: str, version: str) -> None:
    with _store(cfg, f"pointing {alias} at version {version}"):
        client_for(cfg).set_registered_model_alias(cfg.model_name, alias, version)


def delete_alias(cfg: PromoteConfig, alias: str) -> None:
    """Remove `alias` (nothing to do when it is already gone)."""
    with _store(cfg, f"deleting the {alias} alias"):
        client = client_for(cfg)
        if alias in client.get_registered_model(cfg.model_name).aliases:
            client.delete_registered_model_alias(cfg.model_name, alias)
