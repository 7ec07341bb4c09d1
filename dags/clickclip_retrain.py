"""Weekly clickclip retraining: first the interleaving gate on last week's challenger, if any
(`clickclip interleave-readout --decide`: it becomes champion, is retired, or stays), then one task
per stage of clickclip's stage list (extract >> split >> train >> evaluate >> publish >> promote),
then a branch on the promotion decision.

Deploy by copying this file into Airflow's dags folder. Airflow's own environment needs nothing
of clickclip: every task runs the `clickclip` command of the project's virtualenv, so torch,
open_clip and mlflow are never imported by the scheduler or the DAG processor.

Environment (set on the workers, e.g. in the deployment's env):
- CLICKCLIP_HOME: the clickclip checkout the commands run in (paths in configs are relative to it)
- CLICKCLIP_BIN: the clickclip executable (default: $CLICKCLIP_HOME/.venv/bin/clickclip)
- CLICKCLIP_CONFIG: the run config scheduled runs use, relative to CLICKCLIP_HOME (default
  configs/demo.yaml; `clickclip init` writes configs/myshop.yaml); a triggered run's `config` param
  overrides it
- CLICKCLIP_EVENTS_URI: the asset URI that producers of new click-log partitions update
- MLFLOW_TRACKING_URI: the tracking and registry server, if not the config's
- CLICKCLIP_TRAIN_ON: `local` (default: train runs on the worker like every stage) or `kubernetes`:
  train runs in its own pod (KubernetesPodOperator, provider apache-airflow-providers-cncf-kubernetes)
  on a GPU node, with the run folder on a shared volume; then also
  CLICKCLIP_IMAGE (the container image with clickclip installed), CLICKCLIP_K8S_NAMESPACE (default
  `default`), CLICKCLIP_K8S_GPUS (GPUs the pod requests, default 1; set train.devices to match),
  CLICKCLIP_K8S_PVC (the persistent volume claim holding the checkout, data, runs and state that
  the workers see at CLICKCLIP_HOME; mounted in the pod at /clickclip).
  Training on several machines is a PyTorchJob instead (README, "Scaling out").
"""

from __future__ import annotations

import importlib.util
import json
import os
import shlex
import sys
from datetime import timedelta
from pathlib import Path

import pendulum
from airflow.sdk import Asset, AssetOrTimeSchedule, CronTriggerTimetable, Param, dag, get_current_context, task

HOME = Path(os.environ.get("CLICKCLIP_HOME", Path(__file__).resolve().parents[1]))
BIN = os.environ.get("CLICKCLIP_BIN", str(HOME / ".venv" / "bin" / "clickclip"))
EVENTS = Asset(os.environ.get("CLICKCLIP_EVENTS_URI", "file:///data/clickclip/events"))
TRAIN_ON = os.environ.get("CLICKCLIP_TRAIN_ON", "local")
if TRAIN_ON not in ("local", "kubernetes"):
    raise ValueError(f"CLICKCLIP_TRAIN_ON is {TRAIN_ON!r}: use 'local' or 'kubernetes'")
POD_HOME = "/clickclip"  # where the pod mounts CLICKCLIP_K8S_PVC
CONFIG = os.environ.get("CLICKCLIP_CONFIG", "configs/demo.yaml")



def stage_list() -> tuple:
    """clickclip's stages, read from pipeline/stages/__init__.py, which imports nothing: the DAG
    follows the pipeline's own list without importing torch, mlflow or the package itself."""
    name = "clickclip_stage_list"
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, HOME / "pipeline" / "stages" / "__init__.py")
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module  # dataclasses look their module up while the file executes
        spec.loader.exec_module(module)
    return sys.modules[name].STAGES


def retry_policy(stage) -> dict:
    """The stage's own retries and time limit; those with back-off wait for transient I/O (a
    partition still being written, a busy filesystem), at most an hour between tries."""
    policy = {"retries": stage.retries, "retry_delay": timedelta(minutes=stage.retry_minutes),
              "execution_timeout": timedelta(minutes=stage.timeout_minutes)}
    if stage.backoff:
        policy |= {"retry_exponential_backoff": True, "max_retry_delay": timedelta(hours=1)}
    return policy


def data_interval(context) -> str | None:
    """The dates the run reads, as `clickclip --data-interval FIRST/LAST`: its data interval [start,
    end) as whole days, start's day to the day before end's, so a backfilled week never reads events
    after its interval; the `since` / `until` params override either end (a `since` param also sets
    `extract.window.last_days` to null, so the window starts on it). clickclip applies one rule
    (WindowConfig): the window ends on LAST and starts on FIRST, or `extract.window.last_days` before
    LAST, so every config that loads from the CLI runs here. Asset-triggered runs (no interval, no
    params) read the config's window."""
    params = context["params"]
    start, end = context.get("data_interval_start"), context.get("data_interval_end")
    interval = (start.date(), (end - timedelta(days=1)).date()) if start and end and end > start else (None, None)
    first = params.get("since") or (interval[0] and interval[0].isoformat())
    last = params.get("until") or (interval[1] and interval[1].isoformat())
    if not first and not last:
        return None
    if not first or not last:  # one param on a run without an interval: the other end is open
        raise ValueError(f"params since={params.get('since')!r}, until={params.get('until')!r}: a run without a data "
                         "interval needs both")
    return f"{first}/{last}"


def run_id_for(context) -> str:
    """The run id derives from the end of the run's data interval (or, for asset-triggered runs, when
    it ran), so a rerun of the same interval lands in the same run folder and reuses what is done.
    The interval's end, not the logical date: a scheduled run's logical date is its trigger time, a
    backfilled run's the start of its interval, and one week must have one run folder either way."""
    end = context.get("data_interval_end")
    moment = end if end is not None else context.get("logical_date") or context["dag_run"].run_after
    return f"weekly-{moment:%Y%m%dT%H%M}"


def stage_arguments(stage: str) -> list[str]:
    """The `clickclip` arguments of one stage in the running DAG run."""
    return arguments_for(stage, get_current_context())


def arguments_for(stage: str, context) -> list[str]:
    """The `clickclip` arguments of one stage in the DAG run `context` describes."""
    arguments = [stage, "--config", context["params"]["config"], "--run-id", run_id_for(context), "--json"]
    interval = data_interval(context)
    if context["params"].get("since"):  # an explicit first day: the window starts there, whatever last_days says
        arguments += ["--set", "extract.window.last_days=null"]
    return arguments + (["--data-interval", interval] if interval else [])


def clickclip(stage: str) -> str:
    """The shell command of one stage, run in the project's environment by a Bash task: its output
    streams into the task log as it runs, and its last line (the stage's JSON summary) is the XCom."""
    return shlex.join([BIN, *stage_arguments(stage)])


def interleave_gate_command() -> str:
    """The interleaving readout of serve's log with its gate (a no-op without a challenger)."""
    context = get_current_context()
    return shlex.join([BIN, "interleave-readout", "--config", context["params"]["config"], "--decide", "--json"])


def train_in_a_pod() -> tuple:
    """The train task as a Kubernetes pod (CLICKCLIP_TRAIN_ON=kubernetes): a small task works out
    the same arguments as on a worker, the pod runs `clickclip train` with them in POD_HOME."""
    from airflow.providers.cncf.kubernetes.operators.pod import KubernetesPodOperator
    from kubernetes.client import models as k8s

    train = next(stage for stage in stage_list() if stage.name == "train")
    arguments = task(task_id="train_arguments")(stage_arguments)("train")
    volume = k8s.V1Volume(name="clickclip", persistent_volume_claim=k8s.V1PersistentVolumeClaimVolumeSource(
        claim_name=os.environ.get("CLICKCLIP_K8S_PVC", "clickclip")))
    pod = KubernetesPodOperator(
        task_id="train", name="clickclip-train", namespace=os.environ.get("CLICKCLIP_K8S_NAMESPACE", "default"),
        image=os.environ.get("CLICKCLIP_IMAGE", "clickclip:latest"),
        cmds=["/bin/sh", "-c", f'cd {POD_HOME} && exec clickclip "$@"', "clickclip"], arguments=arguments,
        env_vars={"CLICKCLIP_HOME": POD_HOME,
                  **({"MLFLOW_TRACKING_URI": os.environ["MLFLOW_TRACKING_URI"]}
                     if "MLFLOW_TRACKING_URI" in os.environ else {})},
        container_resources=k8s.V1ResourceRequirements(
            limits={"nvidia.com/gpu": os.environ.get("CLICKCLIP_K8S_GPUS", "1")}),
        volumes=[volume], volume_mounts=[k8s.V1VolumeMount(name="clickclip", mount_path=POD_HOME)],
        get_logs=True, on_finish_action="delete_succeeded_pod", **retry_policy(train))
    arguments >> pod
    return arguments, pod


@dag(
    dag_id="clickclip_retrain",
    description="Retrain the CLIP search model on the latest click logs and promote it if it wins",
    # every Monday 03:00 UTC for the week before it: the data interval is the 7 days up to the run
    schedule=AssetOrTimeSchedule(
        timetable=CronTriggerTimetable("0 3 * * 1", timezone="UTC", interval=timedelta(days=7)), assets=[EVENTS]),
    start_date=pendulum.datetime(2026, 1, 5, tz="UTC"),
    catchup=False,
    max_active_runs=1,
    default_args={"owner": "ml-platform", "retries": 0},
    params={
        "config": Param(CONFIG, type="string", description="run config, relative to CLICKCLIP_HOME"),
        "since": Param(None, type=["null", "string"], format="date",
                       description="first day of the window (default: the run's data interval)"),
        "until": Param(None, type=["null", "string"], format="date",
                       description="last day of the window (default: the day before the interval's end)"),
    },
    tags=["clickclip", "ml"],
)
def clickclip_retrain():
    # the challenger is decided on before this week's candidate is compared with the champion
    previous = task.bash(task_id="interleave_gate", cwd=str(HOME), output_processor=json.loads, retries=2,
                         retry_delay=timedelta(minutes=5), execution_timeout=timedelta(minutes=30))(
        interleave_gate_command)()
    for stage in stage_list():
        if stage.name == "train" and TRAIN_ON == "kubernetes":
            first, last = train_in_a_pod()
        else:
            first = last = task.bash(task_id=stage.name, cwd=str(HOME), output_processor=json.loads,
                                     **retry_policy(stage))(clickclip)(stage.name)
        if previous is not None:
            previous >> first
        previous = last
    decision = previous  # promote's summary: the decision

    @task.branch
    def decide(decision: dict) -> str:
        return "announce_champion" if decision["promoted"] else "record_refusal"

    @task
    def announce_champion(decision: dict) -> str:
        message = (f"new champion {decision['model_name']} version {decision['version']}: "
                   f"{decision['champion_uri']} ({decision['reason']})")
        print(message)
        return message

    @task
    def record_refusal(decision: dict) -> str:
        message = f"{decision['model_name']} version {decision['version']} not promoted: {decision['reason']}"
        print(message)
        return message

    decide(decision) >> [announce_champion(decision), record_refusal(decision)]


clickclip_retrain()
