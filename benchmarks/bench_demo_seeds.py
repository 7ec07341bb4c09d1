"""The demo over training seeds: does its verdict hold whatever the seed?

For each seed, what `make demo` runs after its data step (`clickclip run --config configs/demo.yaml`
with `train.seed` set), each in its own folder (its own registry, pgvector and state, so every seed
is a first run: no champion, the gate compares with the starting model), on one demo shop
(`clickclip demo-data` defaults unless --products/--sessions say otherwise). Per seed: recall@10 of
every configuration evaluate scored, the gate's paired 95% interval (served candidate − served
baseline), the served configuration − BM25 interval, and the decision; then each configuration's
mean ± sd over the seeds. `--set` passes overrides on to every run (to try other demo settings).

Prints its settings and the tables, and ends with one JSON line.

    .venv/bin/python benchmarks/bench_demo_seeds.py --seeds 0 1 2 3 4
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CLICKCLIP = Path(sys.executable).with_name("clickclip")


def commit() -> str:
    done = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True)
    dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=ROOT, capture_output=True,
                           text=True).stdout.strip()
    return (done.stdout.strip() or "unknown") + ("+changes" if dirty else "")


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def clickclip(home: Path, *args: str) -> str:
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}  # each seed its own registry
    done = subprocess.run([str(CLICKCLIP), *args], cwd=home, capture_output=True, text=True, env=env, timeout=3600)
    if done.returncode != 0:
        raise RuntimeError(f"clickclip {' '.join(args)} failed:\n{done.stdout[-2000:]}\n{done.stderr[-3000:]}")
    return done.stdout


def one_seed(home: Path, data: Path, config: Path, seed: int, overrides: list[str]) -> dict:
    """A first demo run with train.seed = seed, in its own folder; the figures from its manifest."""
    shutil.rmtree(home, ignore_errors=True)
    (home / "configs").mkdir(parents=True)
    (home / "data").mkdir()
    (home / "data" / "demo").symlink_to(data)
    shutil.copy(config, home / "configs" / "demo.yaml")
    sets = [arg for value in [f"train.seed={seed}", *overrides] for arg in ("--set", value)]
    started = time.perf_counter()
    clickclip(home, "run", "--config", "configs/demo.yaml", "--run-id", f"seed-{seed}", *sets)
    return figures(home, seed, time.perf_counter() - started)


def figures(home: Path, seed: int, seconds: float) -> dict:
    """One seed's figures from its run's manifest."""
    stages = json.loads((home / "runs" / f"seed-{seed}" / "manifest.json").read_text())["stages"]
    evaluation, decision, train = (stages[s]["summary"] for s in ("evaluate", "promote", "train"))
    served = evaluation["served"]
    gate = evaluation["delta_vs_baseline"]["recall@10"]
    keyword = evaluation["vs_keyword"][served["candidate"]]
    return {"seed": seed, "recall@10": {name: round(m["recall@10"], 4) for name, m in evaluation["models"].items()},
            "served": served["candidate"], "baseline": served["baseline"],
            "gate": {k: round(v, 4) for k, v in gate.items()}, "vs_bm25": {k: round(v, 4) for k, v in keyword.items()},
            "promoted": bool(decision["promoted"]), "queries": evaluation["queries"],
            "best_val_recall@10": train.get("best_val_recall@10"), "train_seconds": train["seconds"],
            "seconds": round(seconds, 1)}


def interval(d: dict) -> str:
    return f"{d['mean']:+.4f} [{d['low']:+.4f}, {d['high']:+.4f}]"


def tables(rows: list[dict]) -> str:
    names = list(rows[0]["recall@10"])
    lines = ["| seed | " + " | ".join(names) + " | gate: served − baseline [95% CI] | served − bm25 [95% CI] | "
             "decision | s |", "|" + "---|" * (len(names) + 5)]
    for r in rows:
        lines.append(f"| {r['seed']} | " + " | ".join(f"{r['recall@10'][n]:.4f}" for n in names)
                     + f" | {interval(r['gate'])} | {interval(r['vs_bm25'])} | "
                     f"{'promoted' if r['promoted'] else 'not promoted'} | {r['seconds']} |")
    lines += ["", "| configuration | recall@10 mean ± sd | min | max |", "|---|---|---|---|"]
    for n in names:
        values = [r["recall@10"][n] for r in rows]
        sd = statistics.stdev(values) if len(values) > 1 else 0.0
        lines.append(f"| {n} | {statistics.mean(values):.4f} ± {sd:.4f} | {min(values):.4f} | {max(values):.4f} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    parser.add_argument("--config", type=Path, default=ROOT / "configs" / "demo.yaml")
    parser.add_argument("--products", type=int)
    parser.add_argument("--sessions", type=int)
    parser.add_argument("--set", dest="overrides", action="append", default=[], help="KEY=VALUE for every run")
    parser.add_argument("--home", type=Path, help="work folder (default: a temporary one)")
    args = parser.parse_args()
    home = (args.home or Path(tempfile.mkdtemp(prefix="clickclip-seeds-"))).resolve()
    import torch

    print(f"demo seeds {args.seeds}: {args.config.name} with {args.overrides or 'no overrides'}; demo data "
          f"products {args.products or 'default'}, sessions {args.sessions or 'default'}; {cpu_model()}, "
          f"{os.cpu_count()} cores, torch {torch.__version__} with {torch.get_num_threads()} threads; commit "
          f"{commit()}; work folder {home}", flush=True)
    data = home / "demo-data"
    if not (data / "images.parquet").is_file():
        sizes = [a for flag, v in (("--products", args.products), ("--sessions", args.sessions)) if v
                 for a in (flag, str(v))]
        done = subprocess.run([str(CLICKCLIP), "demo-data", "--out", str(data), *sizes], capture_output=True,
                              text=True)
        if done.returncode != 0:
            raise RuntimeError(f"clickclip demo-data failed:\n{done.stderr[-3000:]}")
    rows = []
    for seed in args.seeds:
        row = one_seed(home / f"seed-{seed}", data, args.config.resolve(), seed, args.overrides)
        rows.append(row)
        print(f"seed {seed}: served {row['served']} {row['recall@10'][row['served']]:.4f}, baseline "
              f"{row['baseline']} {row['recall@10'][row['baseline']]:.4f}, gate {interval(row['gate'])}, vs bm25 "
              f"{interval(row['vs_bm25'])}, {'promoted' if row['promoted'] else 'not promoted'} ({row['seconds']} s)",
              flush=True)
    print(tables(rows))
    served = [r["recall@10"][r["served"]] for r in rows]
    print(json.dumps({"bench": "demo_seeds", "seeds": args.seeds, "overrides": args.overrides, "commit": commit(),
                      "cpu": cpu_model(), "threads": torch.get_num_threads(),
                      "served_recall@10_mean": round(statistics.mean(served), 4),
                      "served_recall@10_min": min(served), "served_recall@10_max": max(served),
                      "gate_low_min": min(r["gate"]["low"] for r in rows),
                      "vs_bm25_low_min": min(r["vs_bm25"]["low"] for r in rows),
                      "promoted": sum(r["promoted"] for r in rows), "runs": rows}))


if __name__ == "__main__":
    main()
