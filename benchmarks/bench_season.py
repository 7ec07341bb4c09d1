"""A season of weekly runs through the real scheduler: the Airflow DAG, week by week.

A demo season (`clickclip demo-data --weeks N`: new, retired and re-shot products, seasonal
queries, one week with a day of scraper traffic) in a deployment folder laid out as a shop's
would be: `clickclip init`'s config, the embedded MLflow registry (SQLite) and pgvector. For each
week the shop is moved on (`clickclip demo-advance`), and the DAG runs for the Monday after it
(`dag.test()` at that logical date, in the Airflow environment `make test` installs: every stage
is a `clickclip` command, as deployed). After every week it checks:

- window: the window read is the rule's (WindowConfig): ending on the data interval's last day,
  `last_days` long;
- incremental: the incremental extract's pairs equal a full extract of the same window;
- sticky split: every image keeps the split an earlier week gave it; only new or re-shot images
  are read and hashed;
- earlier held-out: from week 2 on, the gate compared a stated, non-zero number of queries;
- decision: promote's decision is recorded on the registered version;
- serving: the `champion` alias, the served index's version and the version `clickclip search`
  answers with agree;
- history: from week 2 on, the report's "Week by week" table holds every week so far, and its plot;
- bad week: the scraper week is not promoted (the quarantine-rate gate refuses it);
- rollback: `clickclip rollback` after week `--rollback-week`, and the next week compares against
  the rolled-back-to champion.

Prints a table per week and ends with one JSON line. `--tiny` is the test's size (tests/test_season.py):
a 100-product shop, 2 epochs, and gates that any week without a failed data gate passes (so that
a rollback has a `previous` to go back to); without it, init's gates as written.

    .venv/bin/python benchmarks/bench_season.py                # demo size: 600 products, 20,000 sessions a week
    .venv/bin/python benchmarks/bench_season.py --tiny --weeks 6
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from contextlib import chdir
from datetime import date, timedelta
from pathlib import Path

import numpy as np
import polars as pl
import yaml

ROOT = Path(__file__).resolve().parents[1]
AIRFLOW_PYTHON = ROOT / ".venv-airflow" / "bin" / "python"
CLICKCLIP = ROOT / ".venv" / "bin" / "clickclip"
CONFIG = "configs/shop.yaml"
NAME = "season"

# the demo's training (configs/demo.yaml): init's pretrained ViT-B-32 settings need weights this machine lacks
DEMO_TRAIN = {"model": "ClickCLIP-TinyRN", "epochs": 10, "batch_size": 64, "learning_rate": 0.002,
              "warmup_steps": 20}
TINY_TRAIN = {"model": "ClickCLIP-Tiny", "epochs": 2, "batch_size": 32, "learning_rate": 0.002, "warmup_steps": 10,
              "unique_batches": True, "wise_ft_alphas": [1.0]}
# any week whose data gates pass promotes: the test needs a `previous` to roll back to
TINY_GATES = {"margin": -1.0, "gates": {"use_lower_bound": False, "max_earlier_heldout_regression": 1.0}}


def clickclip(home: Path, *args: str) -> subprocess.CompletedProcess:
    done = subprocess.run([str(CLICKCLIP), *args], cwd=home, capture_output=True, text=True, timeout=900)
    if done.returncode != 0:
        raise RuntimeError(f"clickclip {' '.join(args)} failed:\n{done.stdout[-2000:]}\n{done.stderr[-3000:]}")
    return done


def deploy(home: Path, weeks: int, products: int, sessions: int, tiny: bool, seed: int) -> dict:
    """The deployment folder: the season's shop in data/, init's config (training sized for this
    machine), the checkout's pipeline/ where the DAG reads the stage list, an Airflow home."""
    home.mkdir(parents=True, exist_ok=True)
    (home / "pipeline").unlink(missing_ok=True)
    (home / "pipeline").symlink_to(ROOT / "pipeline")
    clickclip(home, "demo-data", "--weeks", str(weeks), "--out", "data", "--products", str(products),
              "--sessions", str(sessions), "--seed", str(seed), "--force")
    (home / CONFIG).unlink(missing_ok=True)
    clickclip(home, "init", "--out", CONFIG, "--name", NAME, "--events", "data/events", "--images",
              "data/images.parquet", "--image-root", "data/images", "--model", (TINY_TRAIN if tiny else DEMO_TRAIN)[
                  "model"])
    tree = yaml.safe_load((home / CONFIG).read_text())
    tree["train"].update(TINY_TRAIN if tiny else DEMO_TRAIN)
    if tiny:
        tree["promote"].update(TINY_GATES)
    (home / CONFIG).write_text(yaml.safe_dump(tree, sort_keys=False))
    env = {**os.environ, "AIRFLOW_HOME": str(home / "airflow"), "AIRFLOW__CORE__DAGS_FOLDER": str(ROOT / "dags"),
           "AIRFLOW__CORE__LOAD_EXAMPLES": "False", "CLICKCLIP_HOME": str(home), "CLICKCLIP_BIN": str(CLICKCLIP)}
    airflow = str(AIRFLOW_PYTHON.parent / "airflow")
    for command in (["db", "migrate"], ["dags", "reserialize"]):
        subprocess.run([airflow, *command], env=env, check=True, capture_output=True, timeout=600)
    return env


def run_week(env: dict, logical_date: str) -> dict:
    done = subprocess.run([str(AIRFLOW_PYTHON), str(ROOT / "tests" / "airflow" / "check_dag.py"), "--run", CONFIG,
                           "--logical-date", logical_date], env=env, capture_output=True, text=True, timeout=3600)
    if done.returncode != 0:
        raise RuntimeError(f"the DAG run for {logical_date} failed to run:\n{done.stderr[-4000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def _pairs(path: Path) -> pl.DataFrame:
    return pl.read_parquet(path).sort("query", "image_id")


def incremental_equals_full(cfg, run_dir: Path, scratch: Path) -> tuple[bool, str]:
    """A full extract of the run's window (incremental off), compared with the run's pairs."""
    from pipeline.stages.extract import extract

    full_cfg = cfg.model_copy(update={"extract": cfg.extract.model_copy(update={"incremental": False})})
    scratch.mkdir(parents=True, exist_ok=True)
    full, ours = _pairs(extract(full_cfg, scratch).pairs), _pairs(run_dir / "extract" / "pairs.parquet")
    keys = ["query", "image_id", "clicks", "impressions", "first_seen", "last_seen"]
    same = full.height == ours.height and full.select(keys).equals(ours.select(keys)) and bool(
        np.allclose(full["weight"].to_numpy(), ours["weight"].to_numpy(), rtol=1e-6, atol=1e-9))
    return same, f"{ours.height} pairs incremental, {full.height} full"


def serving_versions(home: Path, cfg, query: str) -> dict:
    """What each of the three places says serves: the registry's alias, the index pointer, and the
    version `clickclip search` answers with."""
    from mlflow.tracking import MlflowClient

    from pipeline import registry
    from pipeline.serving.stores import open_store

    client = MlflowClient(tracking_uri=registry.tracking_uri(cfg.promote))
    try:
        alias = client.get_model_version_by_alias(cfg.promote.model_name, "champion").version
    except Exception:  # no champion yet
        alias = None
    store = open_store(cfg.publish, cfg.state_dir / cfg.name)
    try:
        pointer = store.serving(cfg.promote.model_name)
    finally:
        store.close()
    answered = None
    if pointer is not None:
        answered = json.loads(clickclip(home, "search", "--config", CONFIG, query, "--k", "5").stdout)["version"]
    return {name: None if value is None else str(value)
            for name, value in (("alias", alias), ("index", pointer.version if pointer else None),
                                ("search", answered))}


def version_of_run(cfg, run_id: str):
    from mlflow.tracking import MlflowClient

    from pipeline import registry

    client = MlflowClient(tracking_uri=registry.tracking_uri(cfg.promote))
    return next((v for v in client.search_model_versions(f"name='{cfg.promote.model_name}'")
                 if v.tags.get("clickclip.run_id") == run_id), None)


def registry_aliases(cfg) -> dict[str, str]:
    from pipeline import registry

    return registry.aliases(cfg.promote)


def registry_splits(cfg) -> dict[str, str]:
    path = cfg.state_dir / cfg.name / "split_registry.parquet"
    frame = pl.read_parquet(path)
    return dict(zip(frame["image_id"], frame["split"], strict=True))


def replay(home: Path, env: dict, weeks: int, rollback_week: int | None) -> tuple[list[dict], list[dict]]:
    """Every week through the DAG; returns the table's rows and every check's outcome."""
    from pipeline.config import load_config
    from pipeline.demo.season import advance, run_date, week_start

    season = json.loads((home / "data" / "season" / "season.json").read_text())
    rows, checks, before, rolled_back_to = [], [], {}, None
    previous_catalog: set[tuple[str, str]] = set()

    def check(week: int, name: str, passed: bool, detail: str) -> None:
        checks.append({"week": week, "check": name, "passed": bool(passed), "detail": detail})
        print(f"  week {week} {'✓' if passed else '✗'} {name}: {detail}", flush=True)

    for week in range(1, weeks + 1):
        started = time.perf_counter()
        advance(home / "data", week)
        when = run_date(week)
        report = run_week(env, when.isoformat() + "+00:00")
        seconds = time.perf_counter() - started
        first, last = week_start(week), week_start(week) + timedelta(days=6)
        cfg = load_config(home / CONFIG, interval=(first, last))
        run_id = f"weekly-{when:%Y%m%dT%H%M}"
        run_dir = cfg.runs_dir / run_id
        check(week, "dag_run", report.get("state") == "success",
              f"state {report.get('state')}; tasks {report.get('task_states')}")
        if report.get("state") != "success":
            break
        stages = json.loads((run_dir / "manifest.json").read_text())["stages"]
        extract, split, evaluation, decision = (stages[s]["summary"] for s in ("extract", "split", "evaluate",
                                                                                 "promote"))
        index = stages["publish"]["summary"]
        interval = [date.fromisoformat(d[:10]) for d in report["data_interval"]]
        days = cfg.extract.window.last_days or 7
        wanted = {"since": str(last - timedelta(days=days - 1)), "until": str(last)}
        check(week, "window", interval == [first, first + timedelta(days=7)] and {
            k: extract["window"][k] for k in ("since", "until")} == wanted,
              f"data interval {interval[0]} to {interval[1]} (exclusive); read {extract['window']['since']} to "
              f"{extract['window']['until']}, {days} days back from its last day")
        same, detail = incremental_equals_full(cfg, run_dir, home / "scratch" / f"week-{week}")
        check(week, "incremental_equals_full", same, f"{extract['incremental']['status']}; {detail}")

        splits = registry_splits(cfg)
        moved = [image for image, old in before.items() if splits.get(image, old) != old]
        check(week, "split_sticky", not moved, f"{len(before)} earlier images, {len(moved)} moved")
        before = splits
        catalog = pl.read_parquet(home / "data" / "images.parquet")
        files = {(p, str((home / "data" / "images" / p).stat().st_mtime_ns))
                 for p in catalog["path"] if (home / "data" / "images" / p).is_file()}
        changed = len(files - previous_catalog)
        previous_catalog |= files
        hashed = split["hash_cache"]
        check(week, "hashed_only_new_or_changed", hashed["read"] == changed,
              f"{hashed['read']} files read, {hashed['hashed']} hashed; {changed} new or re-shot this week")

        earlier = evaluation.get("earlier_heldout")
        if week > 1 and evaluation.get("champion_version"):
            check(week, "earlier_heldout_compared", bool(earlier and earlier["queries"] > 0),
                  f"{earlier['queries']} of {earlier.get('of_queries')} queries held out by earlier weeks compared"
                  if earlier else "not computed")
        record = evaluation.get("history") or {"weeks": []}
        if week > 1:
            report_text = (cfg.reports_dir / run_id / "recall.md").read_text()
            check(week, "history_in_report", len(record["weeks"]) == week and "Week by week" in report_text
                  and (cfg.reports_dir / run_id / "history.png").is_file(),
                  f"{len(record['weeks'])} weeks in the report's table; {record.get('sentence')}")
        version = version_of_run(cfg, run_id)
        recorded = version.tags.get("clickclip.decision") if version else None
        check(week, "decision_recorded", recorded == ("promoted" if decision["promoted"] else "rejected")
              and str(version.version) == str(decision["version"]), f"version {decision['version']}: {recorded}")
        if rolled_back_to is not None:
            check(week, "compares_with_rolled_back_champion",
                  str(evaluation.get("champion_version")) == str(rolled_back_to),
                  f"baseline champion version {evaluation.get('champion_version')}, rolled back to {rolled_back_to}")
            rolled_back_to = None
        bad = season["per_week"][week - 1]["bad"]
        if bad:
            failed = [g["gate"] for g in decision.get("gates", []) if not g["passed"]]
            check(week, "bad_week_refused", not decision["promoted"] and "quarantine_rate" in failed,
                  f"promoted {decision['promoted']}; failed gates {failed}")
        if week == rollback_week:
            if "previous" in registry_aliases(cfg):
                done = clickclip(home, "rollback", "--config", CONFIG, "--reason", f"season replay: week {week}",
                                 "--json")
                rolled_back_to = json.loads(done.stdout.strip().splitlines()[-1])["champion"]
            else:  # the gates kept one champion all along: nothing to roll back to
                print(f"  week {week}: no `previous` version (one champion so far): no rollback", flush=True)
        serving = serving_versions(home, cfg, "red mug")
        # nothing serving anywhere agrees too, while no week has promoted yet (init's gates may refuse)
        promoted_yet = any(r["decision"].startswith("promoted") for r in rows) or decision.get("promoted")
        check(week, "serving_agrees", serving["alias"] == serving["index"] == serving["search"]
              and (serving["alias"] is not None or not promoted_yet),
              f"alias {serving['alias']}, index {serving['index']}, search {serving['search']}"
              + ("" if promoted_yet else " (no week promoted yet: nothing serves)"))
        served = evaluation["served"]
        rows.append({
            "week": week, "rows_read": extract["rows_read"], "rows_kept": extract["rows_kept"],
            "rows_quarantined": extract["rows_quarantined"],
            "quarantine_rate": round(extract["rows_quarantined"] / max(1, extract.get("rows_in_window",
                                                                                      extract["rows_read"])), 4),
            "images_hashed": hashed["hashed"], "images_read": hashed["read"],
            "decision": ("promoted" if decision["promoted"] else "refused") + (
                f", rolled back to {rolled_back_to}" if rolled_back_to is not None else ""),
            "candidate_recall@10": round(evaluation["models"][served["candidate"]]["recall@10"], 4),
            "baseline": f"{evaluation['baseline']} {evaluation.get('champion_version') or ''}".strip(),
            "baseline_recall@10": round(evaluation["models"][served["baseline"]]["recall@10"], 4),
            "earlier_queries": (earlier or {}).get("queries"), "version": decision["version"],
            "serving_version": serving["index"], "published": index.get("published"),
            "trend": record.get("trend"), "seconds": round(seconds, 1)})
    return rows, checks


def table(rows: list[dict]) -> str:
    head = ["week", "read", "kept", "quarantined", "hashed", "decision", "candidate r@10", "baseline",
            "baseline r@10", "earlier q", "serving", "s"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        lines.append("| " + " | ".join(str(v) for v in (
            r["week"], r["rows_read"], r["rows_kept"], f"{r['rows_quarantined']} ({r['quarantine_rate']:.1%})",
            r["images_hashed"], r["decision"], r["candidate_recall@10"], r["baseline"], r["baseline_recall@10"],
            r["earlier_queries"] if r["earlier_queries"] is not None else "–", r["serving_version"],
            r["seconds"])) + " |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--weeks", type=int, default=6)
    parser.add_argument("--products", type=int)
    parser.add_argument("--sessions", type=int, help="per week")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--tiny", action="store_true", help="the test's size and relaxed decision gates")
    parser.add_argument("--rollback-week", type=int, default=5, help="0: no rollback")
    parser.add_argument("--epochs", type=int, help="training epochs (default: the demo's 10, the test's 2)")
    parser.add_argument("--home", type=Path, help="deployment folder (default: a temporary one)")
    args = parser.parse_args()
    os.environ.pop("MLFLOW_TRACKING_URI", None)  # init's config: the registry under the deployment folder
    if args.epochs:
        (TINY_TRAIN if args.tiny else DEMO_TRAIN)["epochs"] = args.epochs
    products = args.products or (100 if args.tiny else 600)
    sessions = args.sessions or (1200 if args.tiny else 20000)
    home = (args.home or Path(tempfile.mkdtemp(prefix="clickclip-season-"))).resolve()
    print(f"season: {args.weeks} weeks, {products} products, {sessions} sessions a week, seed {args.seed}, "
          f"{'tiny' if args.tiny else 'demo'} training {TINY_TRAIN if args.tiny else DEMO_TRAIN}, gates "
          f"{TINY_GATES if args.tiny else 'as init writes them'}, rollback after week {args.rollback_week or 'none'}; "
          f"deployment folder {home}; {platform.node()}, {os.cpu_count()} cores", flush=True)
    started = time.perf_counter()
    env = deploy(home, args.weeks, products, sessions, args.tiny, args.seed)
    with chdir(home):
        rows, checks = replay(home, env, args.weeks, args.rollback_week or None)
    print(table(rows))
    failed = [c for c in checks if not c["passed"]]
    print(json.dumps({"weeks": len(rows), "products": products, "sessions_per_week": sessions, "tiny": args.tiny,
                      "checks": len(checks), "checks_failed": len(failed), "failed": failed, "per_week": rows,
                      "per_check": checks,
                      "seconds": round(time.perf_counter() - started, 1)}))
    sys.exit(1 if failed or len(rows) < args.weeks else 0)


if __name__ == "__main__":
    main()
