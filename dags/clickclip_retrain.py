"""Weekly clickclip retraining: one task per stage of clickclip's stage list (extract >> split >>
train >> evaluate >> publish >> promote), then a branch on the promotion decision.

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
import shlex
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
    """The stage's own retries and time limit; those with back-off wait for transient I/O (a
    partition still being written, a busy filesystem), at most an hour between tries."""
    policy = {"retries": stage.retries, "retry_delay": timedelta(minutes=stage.retry_minutes),
              "execution_timeout": timedelta(minutes=stage.timeout_minutes)}
    if stage.backoff:
        policy |= {"retry_exponential_backoff": True, "max_retry_delay": timedelta(hours=1)}
    return policy


def extract_window(context) -> dict[str, str]:
    """The dates the run reads: its data interval [start, end) as whole days, start's day to the day
    before end's, so a backfilled week never reads events after its interval. The `since` / `until`
    params override it; asset-triggered runs have no interval and read the config's window."""
    params = context["params"]
    if params.get("since") or params.get("until"):
        return {key: params[key] for key in ("since", "until") if params.get(key)}
    start, end = context.get("data_interval_start"), context.get("data_interval_end")
    if start is None or end is None or end <= start:
        return {}
    return {"since": start.date().isoformat(), "until": (end - timedelta(days=1)).date().isoformat()}


def run_id_for(context) -> str:
    """The run id derives from the logical date (or, for asset-triggered runs, when it ran), so a
    rerun of the same interval lands in the same run folder and reuses what is done."""
    moment = context.get("logical_date") or context["dag_run"].run_after
    return f"weekly-{moment:%Y%m%dT%H%M}"


def clickclip(stage: str) -> str:
    """The shell command of one stage, run in the project's environment by a Bash task: its output
    streams into the task log as it runs, and its last line (the stage's JSON summary) is the XCom."""
    context = get_current_context()
    command = [BIN, stage, "--config", context["params"]["config"], "--run-id", run_id_for(context), "--json"]
    for key, day in extract_window(context).items():
        command += ["--set", f"extract.window.{key}={day}"]
    return shlex.join(command)


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
        "config": Param("configs/demo.yaml", type="string", description="run config, relative to CLICKCLIP_HOME"),
        "since": Param(None, type=["null", "string"], format="date",
                       description="first day of the window (default: the run's data interval)"),
        "until": Param(None, type=["null", "string"], format="date",
                       description="last day of the window (default: the day before the interval's end)"),
    },
    tags=["clickclip", "ml"],
)
def clickclip_retrain():
    tasks = [task.bash(task_id=stage.name, cwd=str(HOME), output_processor=json.loads, **retry_policy(stage))(
        clickclip)(stage.name) for stage in stage_list()]
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
