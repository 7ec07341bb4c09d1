"""Runs inside the Airflow virtualenv (.venv-airflow), called by tests/test_dags.py.

Parses dags/ with Airflow's DagBag and, with --run CONFIG, test-runs the whole DAG on that config
with `dag.test()`. Prints one JSON object describing what it found.
"""

import argparse
import json
from datetime import datetime
from pathlib import Path

from airflow.dag_processing.dagbag import DagBag

REPO = Path(__file__).resolve().parents[2]


def describe(dag) -> dict:
    schedule = dag.timetable
    return {
        "task_ids": sorted(dag.task_ids),
        "downstream": {t: sorted(dag.get_task(t).downstream_task_ids) for t in dag.task_ids},
        "execution_timeout": {t: str(dag.get_task(t).execution_timeout) for t in dag.task_ids},
        "operators": {t: type(dag.get_task(t)).__name__ for t in dag.task_ids},
        "retries": {t: dag.get_task(t).retries for t in dag.task_ids},
        "schedule": type(schedule).__name__,
        "cron": schedule.timetable.expression,
        "timezone": str(schedule.timetable.timezone),
        "assets": [asset.uri for asset in schedule.asset_condition.objects],
        "catchup": dag.catchup,
        "max_active_runs": dag.max_active_runs,
        "params": sorted(dag.params.keys()),
        "param_defaults": dag.params.dump(),
        **({"pod": describe_pod(dag.get_task("train"))} if type(dag.get_task("train")).__name__ ==
           "KubernetesPodOperator" else {}),
    }


def describe_pod(pod) -> dict:
    return {"image": pod.image, "gpus": pod.container_resources.limits["nvidia.com/gpu"],
            "mount": pod.volume_mounts[0].mount_path}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--run", help="config file to test-run the DAG on")
    parser.add_argument("--logical-date", help="the run's logical date (ISO), as a backfill would set it")
    parser.add_argument("--arguments-for", metavar="PARAMS_JSON",
                        help="the extract task's clickclip arguments for a run of the week ending 2026-11-09 "
                             "03:00 UTC triggered with these params")
    parser.add_argument("--list-runs", action="store_true",
                        help="the DAG runs in the database (a backfill creates them), oldest logical date first, with "
                             "the run id and --data-interval the DAG's tasks would pass")
    args = parser.parse_args()
    bag = DagBag(dag_folder=str(REPO / "dags"))
    report = {"import_errors": {path: str(error) for path, error in bag.import_errors.items()},
              "dag_ids": sorted(bag.dags)}
    dag = bag.dags.get("clickclip_retrain")
    if dag is not None:
        report.update(describe(dag))
        if args.run:
            when = datetime.fromisoformat(args.logical_date) if args.logical_date else None
            run = dag.test(run_conf={"config": args.run}, **({"logical_date": when} if when else {}))
            report["data_interval"] = [str(run.data_interval_start), str(run.data_interval_end)]
            report["state"] = str(run.state)
            report["task_states"] = {ti.task_id: str(ti.state) for ti in run.get_task_instances()}
            report["task_seconds"] = {ti.task_id: ti.duration for ti in run.get_task_instances()}
            report["run_id"] = run.run_id
        if args.list_runs:
            report["runs"] = list_runs()
        if args.arguments_for:
            report["arguments"] = arguments_for(dag, json.loads(args.arguments_for))
    print(json.dumps(report, default=str))


def _dag_module():
    import importlib.util

    spec = importlib.util.spec_from_file_location("clickclip_dag", REPO / "dags" / "clickclip_retrain.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def arguments_for(dag, params: dict) -> list[str]:
    import pendulum

    end = pendulum.datetime(2026, 11, 9, 3, tz="UTC")
    context = {"params": {**dag.params.dump(), **params}, "data_interval_start": end.subtract(days=7),
               "data_interval_end": end, "logical_date": end}
    return _dag_module().arguments_for("extract", context)


def list_runs() -> list[dict]:
    from airflow.models import DagRun
    from airflow.models.backfill import BackfillDagRun
    from airflow.utils.session import create_session

    module = _dag_module()
    with create_session() as session:
        runs = session.query(DagRun).filter(DagRun.dag_id == "clickclip_retrain").order_by(DagRun.logical_date).all()
        # the order the scheduler starts a backfill's runs in (reversed by --run-backwards)
        ordinal = {row.dag_run_id: row.sort_ordinal for row in session.query(BackfillDagRun)}
        out = []
        for run in runs:
            context = {"params": {}, "data_interval_start": run.data_interval_start,
                       "data_interval_end": run.data_interval_end, "logical_date": run.logical_date, "dag_run": run}
            out.append({"airflow_run_id": run.run_id, "run_type": str(run.run_type), "logical_date": run.logical_date,
                        "clickclip_run_id": module.run_id_for(context), "data_interval": module.data_interval(context),
                        "backfill_max_active_runs": run.backfill.max_active_runs if run.backfill else None,
                        "backfill_sort_ordinal": ordinal.get(run.id)})
        return out


if __name__ == "__main__":
    main()
