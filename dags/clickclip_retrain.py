"""Weekly clickclip retraining: one task per stage of clickclip's stage list (extract >> split >>
train >> evaluate >> promote), then a branch on the promotion decision.

Deploy by copying this file into Airflow's dags folder. Airflow's own environment needs nothing
of clickclip: every task runs the `clickclip` command of the project's virtualenv, so torch,
open_clip and mlflow are never imported by the scheduler or the DAG processor.

Environment (set on the workers, e.g. in the deployment's env):
- CLICKCLIP_HOME: the clickclip checkout the commands run in (paths in configs are relative to it)
- CLICKCLIP_BIN: the clickclip executable (default: $CLICKCLIP_HOME/.venv/bin/clickclip)
- CLICKCLIP_EVENTS_URI: the asset URI that producers of new click-log partitions update
- MLFLOW_TRACKING_URI: the tracking and registry server, if not the config's
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from datetime import timedelta
from pathlib import Path

import pendulum
from airflow.sdk import Asset, AssetOrTimeSchedule, CronTriggerTimetable, Param, dag, get_current_context, task

HOME = Path(os.environ.get("CLICKCLIP_HOME", Path(__file__).resolve().parents[1]))
BIN = os.environ.get("CLICKCLIP_BIN", str(HOME / ".venv" / "bin" / "clickclip"))
EVENTS = Asset(os.environ.get("CLICKCLIP_EVENTS_URI", "file:///data/clickclip/events"))



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
    """The stage's own retries; those with back-off wait for transient I/O (a partition still being
    written, a busy filesystem), at most an hour between tries."""
    policy = {"retries": stage.retries, "retry_delay": timedelta(minutes=stage.retry_minutes)}
    if stage.backoff:
        policy |= {"retry_exponential_backoff": True, "max_retry_delay": timedelta(hours=1)}
    return policy


def run_id_for(context) -> str:
    """The run id derives from the logical date (or, for asset-triggered runs, when it ran), so a
    rerun of the same interval lands in the same run folder and reuses what is done."""
    moment = context.get("logical_date") or context["dag_run"].run_after
    return f"weekly-{moment:%Y%m%dT%H%M}"


def clickclip(stage: str) -> dict:
    """Run one stage in the project's environment; return its JSON summary (last stdout line)."""
    context = get_current_context()
    params = context["params"]
    command = [BIN, stage, "--config", params["config"], "--run-id", run_id_for(context)]
    for key in ("since", "until"):
        if params.get(key):
            command += ["--set", f"extract.window.{key}={params[key]}"]
    result = subprocess.run(command, cwd=HOME, capture_output=True, text=True)
    print(result.stderr[-20000:])
    if result.returncode != 0:
        raise RuntimeError(f"clickclip {stage} failed (exit {result.returncode}); see the log above")
    return json.loads(result.stdout.strip().splitlines()[-1])


@dag(
    dag_id="clickclip_retrain",
    description="Retrain the CLIP search model on the latest click logs and promote it if it wins",
    schedule=AssetOrTimeSchedule(timetable=CronTriggerTimetable("0 3 * * 1", timezone="UTC"), assets=[EVENTS]),
    start_date=pendulum.datetime(2026, 1, 5, tz="UTC"),
    catchup=False,
    max_active_runs=1,
    default_args={"owner": "ml-platform", "retries": 0},
    params={
        "config": Param("configs/demo.yaml", type="string", description="run config, relative to CLICKCLIP_HOME"),
        "since": Param(None, type=["null", "string"], format="date", description="first day of the window"),
        "until": Param(None, type=["null", "string"], format="date", description="last day of the window"),
    },
    tags=["clickclip", "ml"],
)
def clickclip_retrain():
    tasks = [task(task_id=stage.name, **retry_policy(stage))(clickclip)(stage.name) for stage in stage_list()]
    for upstream, downstream in zip(tasks, tasks[1:], strict=False):
        upstream >> downstream
    decision = tasks[-1]  # promote's summary: the decision

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
