"""The Airflow DAG, checked with real Airflow in its own virtualenv (.venv-airflow, made by
`make test`): it parses, its graph/schedule/params are as documented, and a full `dag.test()`
run on a tiny config registers a model version."""

import json
import os
import subprocess
from pathlib import Path

import pytest
import yaml
from mlflow.tracking import MlflowClient

from tests.conftest import shop_config

REPO = Path(__file__).resolve().parents[1]
AIRFLOW_PYTHON = REPO / ".venv-airflow" / "bin" / "python"

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def airflow_env(tmp_path_factory) -> dict[str, str]:
    assert AIRFLOW_PYTHON.is_file(), "no .venv-airflow: run `make test`, which creates it"
    home = tmp_path_factory.mktemp("airflow_home")
    env = {**os.environ, "AIRFLOW_HOME": str(home), "AIRFLOW__CORE__DAGS_FOLDER": str(REPO / "dags"),
           "AIRFLOW__CORE__LOAD_EXAMPLES": "False", "CLICKCLIP_HOME": str(REPO),
           "CLICKCLIP_BIN": str(REPO / ".venv" / "bin" / "clickclip")}
    airflow = str(AIRFLOW_PYTHON.parent / "airflow")
    for command in (["db", "migrate"], ["dags", "reserialize"]):
        subprocess.run([airflow, *command], env=env, check=True, capture_output=True, timeout=300)
    return env


def _check(env: dict[str, str], *args: str) -> dict:
    out = subprocess.run([str(AIRFLOW_PYTHON), str(REPO / "tests" / "airflow" / "check_dag.py"), *args],
                         env=env, capture_output=True, text=True, timeout=900)
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_dag_parses_with_the_documented_shape(airflow_env):
    report = _check(airflow_env)
    assert report["import_errors"] == {}
    assert report["dag_ids"] == ["clickclip_retrain"]
    down = report["downstream"]
    # publish builds and validates the index between evaluate and the alias move (in promote)
    assert [down[s] for s in ("extract", "split", "train", "evaluate", "publish")] == [
        ["split"], ["train"], ["evaluate"], ["publish"], ["promote"]]
    assert down["decide"] == ["announce_champion", "record_refusal"]
    assert down["interleave_gate"] == ["extract"]  # last week's challenger is decided on first
    assert report["schedule"] == "AssetOrTimeSchedule" and report["cron"] == "0 3 * * 1"
    assert report["catchup"] is False and report["max_active_runs"] == 1
    assert report["params"] == ["config", "since", "until"]
    assert report["retries"]["extract"] == report["retries"]["split"] == 3
    # promote is idempotent, so an error is retried; a failed gate is not an error
    assert report["retries"]["promote"] == report["retries"]["publish"] == 2
    stages = ("extract", "split", "train", "evaluate", "publish", "promote")
    assert all(report["execution_timeout"][s] != "None" for s in stages)
    assert {report["operators"][s] for s in stages} == {"_BashDecoratedOperator"}  # logs stream as they run


def test_scheduled_runs_use_the_deployments_config_and_params_set_the_window_rules_ends(airflow_env):
    """Scheduled runs carry no conf: their config is CLICKCLIP_CONFIG (init writes configs/myshop.yaml;
    the default configs/demo.yaml). The interval goes to every task as --data-interval; a `since`
    param starts the window there even under init's last_days (before, it was dropped)."""
    assert _check(airflow_env)["param_defaults"]["config"] == "configs/demo.yaml"
    shop = {**airflow_env, "CLICKCLIP_CONFIG": "configs/myshop.yaml"}
    assert _check(shop)["param_defaults"]["config"] == "configs/myshop.yaml"
    plain = _check(shop, "--arguments-for", "{}")["arguments"]
    assert plain == ["extract", "--config", "configs/myshop.yaml", "--run-id", "weekly-20261109T0300", "--json",
                     "--data-interval", "2026-11-02/2026-11-08"]
    since = _check(shop, "--arguments-for", json.dumps({"since": "2026-10-01"}))["arguments"]
    assert since[-4:] == ["--set", "extract.window.last_days=null", "--data-interval", "2026-10-01/2026-11-08"]


def test_train_runs_in_a_kubernetes_pod_when_the_deployment_says_so(airflow_env):
    """CLICKCLIP_TRAIN_ON=kubernetes: the DagBag loads the variant whose train task is a
    KubernetesPodOperator fed the same clickclip arguments; a wrong value is an import error
    naming the variable. (No cluster: the pod is never started.)"""
    pod = {**airflow_env, "CLICKCLIP_TRAIN_ON": "kubernetes", "CLICKCLIP_IMAGE": "registry.example/clickclip:1",
           "CLICKCLIP_K8S_GPUS": "4"}
    report = _check(pod)
    assert report["import_errors"] == {}
    down, operators = report["downstream"], report["operators"]
    assert operators["train"] == "KubernetesPodOperator"
    assert {operators[s] for s in ("extract", "split", "evaluate", "publish", "promote")} == {"_BashDecoratedOperator"}
    assert [down[s] for s in ("split", "train_arguments", "train", "evaluate")] == [
        ["train_arguments"], ["train"], ["evaluate"], ["publish"]]
    assert report["pod"] == {"image": "registry.example/clickclip:1", "gpus": "4", "mount": "/clickclip"}
    assert report["retries"]["train"] == _check(airflow_env)["retries"]["train"]

    wrong = _check({**airflow_env, "CLICKCLIP_TRAIN_ON": "k8s"})
    assert wrong["dag_ids"] == []
    assert "CLICKCLIP_TRAIN_ON is 'k8s'" in next(iter(wrong["import_errors"].values()))


def test_dag_does_not_import_heavy_libraries_at_parse_time(airflow_env):
    code = ("import sys, runpy; runpy.run_path(sys.argv[1]); "
            "heavy = [m for m in ('torch', 'open_clip', 'mlflow', 'pipeline') if m in sys.modules]; "
            "assert not heavy, heavy")
    subprocess.run([str(AIRFLOW_PYTHON), "-c", code, str(REPO / "dags" / "clickclip_retrain.py")],
                   env=airflow_env, check=True, capture_output=True, timeout=300)


def test_full_dag_run_registers_a_model(airflow_env, tiny_shop, tmp_path):
    cfg = shop_config(tiny_shop, tmp_path)
    config_file = tmp_path / "tiny.yaml"
    config_file.write_text(yaml.safe_dump(cfg.model_dump(mode="json")))
    # a backfilled week: its interval ends on 14 November, inside the shop's log (9 to 15 November)
    report = _check(airflow_env, "--run", str(config_file), "--logical-date", "2026-11-14T03:00:00+00:00")
    assert report["state"] == "success", report
    (run_dir,) = (tmp_path / "runs").iterdir()
    extract = json.loads((run_dir / "manifest.json").read_text())["stages"]["extract"]["summary"]
    assert extract["window"]["since"] == "2026-11-07" and extract["window"]["until"] == "2026-11-13"
    days = sorted(p.name for p in (tiny_shop / "events").iterdir())
    own = [d for d in days if "2026-11-07" <= d.removeprefix("date=") <= "2026-11-13"]
    assert extract["window"]["files_read"] == sum(len(list((tiny_shop / "events" / d).glob("*.parquet")))
                                                  for d in own) and len(own) < len(days)
    assert report["task_states"]["announce_champion"] == "success"
    assert report["task_states"]["record_refusal"] == "skipped"
    versions = MlflowClient(tracking_uri=cfg.promote.tracking_uri).search_model_versions("name='clickclip-tiny'")
    assert len(versions) == 1
    assert versions[0].tags["clickclip.run_id"].startswith("weekly-")


def test_a_three_week_backfill_runs_one_week_at_a_time_in_order(airflow_env):
    """`airflow backfill create` over three weeks makes three runs, oldest first (the scheduler's order,
    the backfill's sort ordinal; --run-backwards would reverse it),
    one at a time (the DAG's max_active_runs=1 and the backfill's), each reading its own week and
    landing in its own run folder. A backfilled run's logical date is its interval's start, a
    scheduled one's its trigger time: run ids derive from the interval's end, so either way one
    week has one run folder. (Creating the backfill needs no scheduler; executing it does, and the
    season replay, tests/test_season.py, executes weeks in this order with `dag.test()`.)"""
    airflow = str(AIRFLOW_PYTHON.parent / "airflow")
    done = subprocess.run([airflow, "backfill", "create", "--dag-id", "clickclip_retrain", "--from-date", "2026-09-14",
                           "--to-date", "2026-09-29", "--max-active-runs", "1"], env=airflow_env, capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    report = _check(airflow_env, "--list-runs")
    assert report["max_active_runs"] == 1
    # in the order the scheduler starts them (the backfill's sort ordinal), the weeks ascend
    runs = sorted((r for r in report["runs"] if r["run_type"].endswith("backfill")),
                  key=lambda r: r["backfill_sort_ordinal"])
    assert [r["data_interval"] for r in runs] == ["2026-09-07/2026-09-13", "2026-09-14/2026-09-20",
                                                  "2026-09-21/2026-09-27"]
    assert [r["clickclip_run_id"] for r in runs] == ["weekly-20260914T0300", "weekly-20260921T0300",
                                                     "weekly-20260928T0300"]
    assert {r["backfill_max_active_runs"] for r in runs} == {1}
