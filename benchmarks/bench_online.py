"""Online validation: how many searches interleaving needs against an A/B test, whether its gate
agrees with the truth, and serve's latency with logging on.

1. Sensitivity (the shipped team-draft, click credit and readout of pipeline.retrieval.interleaving,
   shoppers of pipeline.demo.shoppers on a demo shop's truth). Rankers of known quality rank the
   whole catalog by truth relevance plus a fixed per-(query, image) error of standard deviation
   sigma: the champion's 1.0, a better challenger's 0.85, a worse one's 1.2; an equal challenger
   puts at every position another image of the same truth relevance as the champion's (other
   images, exactly the same expected clicks). Each pair's true difference in clicks per search
   (by the truth and the click model, exactly) is printed. For the better pair, from `--sample`
   simulated searches of each kind: the searches a fixed-horizon test at 95% confidence and 80%
   power needs — interleaving on the per-search outcome (+1 win, -1 loss, 0 otherwise), the A/B
   test on clicks per search in two arms of equal traffic (both arms counted) — and their ratio.
2. Agreement: for `--pairs` seeded pairs of each kind, the interleaving gate (95%, min_queries)
   read every `--every` searches up to `--max-searches`: promote for a better challenger, retire
   for a worse, no verdict for an equal one; and the searches it took. Reading it repeatedly
   (as a scheduler would) is peeking: an equal pair can cross a bound by chance.
3. Latency: a deployment (demo shop, `clickclip init`'s config with the demo's tiny model trained
   `--epochs` epochs, `clickclip run`: the embedded registry and pgvector), `clickclip serve` with
   its impression log on and 20% randomised swaps, and `clickclip simulate` with 8 concurrent
   shoppers for `--latency-searches` searches (at most `--latency-seconds`); the request p95.

Prints its settings and a table, and ends with one JSON line.

    .venv/bin/python benchmarks/bench_online.py
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import random
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import numpy as np
import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from pipeline.demo.shop import true_propensities  # noqa: E402
from pipeline.demo.shoppers import Truth, clicks  # noqa: E402
from pipeline.retrieval.interleaving import CHALLENGER, outcome, readout, request_rng, team_draft  # noqa: E402

SIGMA = {"champion": 1.0, "better": 0.85, "worse": 1.2}
EXPECTED = {"better": "promote", "worse": "retire", "equal": "continue"}
Z = 1.959964 + 0.841621  # two-sided 95% and 80% power


class Ranker:
    """Truth relevance plus a fixed error per (query, image), drawn from the ranker's seed."""

    def __init__(self, truth: Truth, images: list[str], sigma: float, seed: int):
        self.truth, self.images, self.sigma, self.seed = truth, images, sigma, seed
        self._cache: dict[str, list[str]] = {}

    def __call__(self, query: str, k: int) -> list[str]:
        if query not in self._cache:
            digest = int.from_bytes(hashlib.sha256(f"{self.seed}:{query}".encode()).digest()[:8], "big")
            noise = np.random.default_rng(digest).normal(0, self.sigma, len(self.images))
            scores = np.array([self.truth.relevance(query, i) for i in self.images]) + noise
            self._cache[query] = [self.images[j] for j in np.argsort(-scores)[:k]]
        return self._cache[query]


class EqualRanker:
    """As good as `base` by the truth, exactly: at every position an image of the same truth relevance
    as base's (drawn from the whole catalog, so the lists differ), hence the same expected clicks."""

    def __init__(self, base: Ranker, seed: int):
        self.base, self.seed = base, seed
        self._cache: dict[str, list[str]] = {}

    def __call__(self, query: str, k: int) -> list[str]:
        if query not in self._cache:
            truth, images = self.base.truth, self.base.images
            rng = random.Random(f"{self.seed}:{query}")
            by_level: dict[float, list[str]] = {}
            for image in images:
                by_level.setdefault(truth.relevance(query, image), []).append(image)
            chosen: list[str] = []
            for image in self.base(query, k):
                pool = [i for i in by_level[truth.relevance(query, image)] if i not in chosen]
                chosen.append(rng.choice(pool))
            self._cache[query] = chosen
        return self._cache[query]


def expected_clicks(truth: Truth, ranker, k: int = 10) -> float:
    """Clicks per search by the truth and the click model, exactly (queries uniformly)."""
    examination = true_propensities(k)
    return float(np.mean([sum(examination[p] * (0.02 + 0.78 * truth.relevance(q, i) ** 2)
                              for p, i in enumerate(ranker(q, k))) for q in truth.queries]))


def interleaved_outcomes(truth: Truth, champion: Ranker, challenger: Ranker, searches: int, seed: int, k: int = 10):
    rng = random.Random(seed)
    for n in range(searches):
        query = rng.choice(truth.queries)
        shown = team_draft(champion(query, k), challenger(query, k), k, request_rng(seed, f"r{n}"))
        team = dict(shown)
        yield outcome([team[i] for i in clicks(truth, query, [i for i, _ in shown], rng)])


def ab_clicks(truth: Truth, ranker: Ranker, searches: int, seed: int, k: int = 10) -> np.ndarray:
    rng = random.Random(seed)
    out = np.empty(searches)
    for n in range(searches):
        query = rng.choice(truth.queries)
        out[n] = len(clicks(truth, query, ranker(query, k), rng))
    return out


def sensitivity(truth: Truth, images: list[str], sample: int, seed: int) -> dict:
    champion = Ranker(truth, images, SIGMA["champion"], seed)
    better = Ranker(truth, images, SIGMA["better"], seed + 1)
    scores = np.array([1 if o == CHALLENGER else -1 if o == "champion" else 0
                       for o in interleaved_outcomes(truth, champion, better, sample, seed)], dtype=float)
    n_interleaving = (Z * scores.std(ddof=1) / scores.mean()) ** 2
    a, b = ab_clicks(truth, champion, sample, seed + 2), ab_clicks(truth, better, sample, seed + 3)
    delta = b.mean() - a.mean()
    per_arm = Z * Z * (a.var(ddof=1) + b.var(ddof=1)) / delta ** 2
    return {"sample_searches": sample, "true_clicks_per_search": [round(expected_clicks(truth, champion), 4),
                                                                  round(expected_clicks(truth, better), 4)],
            "interleaving_mean_outcome": round(float(scores.mean()), 4),
            "ab_clicks_per_search": [round(float(a.mean()), 4), round(float(b.mean()), 4)],
            "interleaving_searches_needed": int(np.ceil(n_interleaving)),
            "ab_searches_needed": int(np.ceil(2 * per_arm)),
            "ratio": round(float(2 * per_arm / n_interleaving), 2)}


def agreement(truth: Truth, images: list[str], pairs: int, every: int, max_searches: int, min_queries: int,
              seed: int) -> list[dict]:
    rows = []
    for kind in ("better", "worse", "equal"):
        for p in range(pairs):
            base = seed + 100 * (p + 1)
            champion = Ranker(truth, images, SIGMA["champion"], base)
            challenger = EqualRanker(champion, base + 7) if kind == "equal" else Ranker(
                truth, images, SIGMA[kind], base + 7)
            delta = expected_clicks(truth, challenger) - expected_clicks(truth, champion)
            outcomes, decision, at = [], "continue", None
            for o in interleaved_outcomes(truth, champion, challenger, max_searches, base):
                outcomes.append(o)
                if len(outcomes) % every == 0:
                    decision = readout(outcomes, 0.95, min_queries).decision
                    if decision != "continue":
                        at = len(outcomes)
                        break
            rows.append({"kind": kind, "pair": p, "true_click_difference": round(delta, 4), "decision": decision,
                         "expected": EXPECTED[kind],
                         "agrees": decision == EXPECTED[kind], "searches": at or len(outcomes)})
    return rows


def latency(home: Path, products: int, sessions: int, epochs: int, searches: int, seconds: float) -> dict:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    env.pop("MLFLOW_TRACKING_URI", None)
    clickclip = [sys.executable, "-c", "from pipeline.cli import app; app()"]

    def run(*args: str) -> subprocess.CompletedProcess:
        done = subprocess.run([*clickclip, *args], cwd=home, env=env, capture_output=True, text=True, timeout=3600)
        if done.returncode != 0:
            raise RuntimeError(f"clickclip {' '.join(args)} failed:\n{done.stdout[-2000:]}\n{done.stderr[-3000:]}")
        return done

    home.mkdir(parents=True, exist_ok=True)
    run("demo-data", "--out", "data", "--products", str(products), "--sessions", str(sessions), "--force")
    config = home / "configs" / "shop.yaml"
    config.unlink(missing_ok=True)
    run("init", "--out", "configs/shop.yaml", "--name", "online", "--events", "data/events", "--images",
        "data/images.parquet", "--image-root", "data/images", "--model", "ClickCLIP-TinyRN")
    tree = yaml.safe_load(config.read_text())
    tree["train"].update({"model": "ClickCLIP-TinyRN", "epochs": epochs, "batch_size": 64, "learning_rate": 0.002,
                          "warmup_steps": 20})
    tree["promote"].update({"margin": -1.0, "gates": {"use_lower_bound": False}})  # a champion to serve
    tree["serve"] = {"swap_rate": 0.2}
    config.write_text(yaml.safe_dump(tree, sort_keys=False))
    started = time.perf_counter()
    run("run", "--config", "configs/shop.yaml")
    pipeline_seconds = time.perf_counter() - started
    port = 18000 + os.getpid() % 1000
    server = subprocess.Popen([*clickclip, "serve", "--config", "configs/shop.yaml", "--port", str(port)], cwd=home,
                              env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                              start_new_session=True)
    try:
        deadline = time.monotonic() + 300
        while True:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=5):
                    break
            except OSError:
                if server.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"serve did not start: {server.stdout.read()[-3000:]}") from None
                time.sleep(0.5)
        done = run("simulate", "--shop", "data", "--url", f"http://127.0.0.1:{port}", "--searches", str(searches),
                   "--concurrency", "8", "--seconds", str(seconds), "--json")
        shoppers = json.loads(done.stdout.strip().splitlines()[-1])
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=5) as response:
            health = json.loads(response.read())
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        server.wait(60)
    return {"products": products, "pipeline_seconds": round(pipeline_seconds, 1), "backend": "pgvector (embedded)",
            "impression_log": health["impression_log"]["logging"],
            "rows_logged": health["impression_log"]["rows_logged"],
            **{key: shoppers[key] for key in ("searches", "clicks", "errors", "concurrency", "seconds",
                                              "searches_per_second", "latency_ms")}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--products", type=int, default=600)
    parser.add_argument("--sessions", type=int, default=2000, help="the demo log behind the latency deployment")
    parser.add_argument("--sample", type=int, default=20000, help="searches per method for the sample sizes")
    parser.add_argument("--pairs", type=int, default=3, help="seeded pairs of each kind")
    parser.add_argument("--every", type=int, default=250, help="searches between readouts")
    parser.add_argument("--max-searches", type=int, default=20000)
    parser.add_argument("--min-queries", type=int, default=200, help="serve.interleave.min_queries")
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--latency-searches", type=int, default=3000)
    parser.add_argument("--latency-seconds", type=float, default=120)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--home", type=Path, help="deployment folder (default: a temporary one)")
    parser.add_argument("--skip-latency", action="store_true")
    args = parser.parse_args()
    home = (args.home or Path(tempfile.mkdtemp(prefix="clickclip-online-"))).resolve()
    print(f"online: {args.products} products, sigma {SIGMA}, sample {args.sample} searches, {args.pairs} pairs per "
          f"kind read every {args.every} up to {args.max_searches} (min_queries {args.min_queries}), latency "
          f"{args.latency_searches} searches x 8 clients, {args.epochs} epochs; {platform.node()}, "
          f"{os.cpu_count()} cores; deployment {home}", flush=True)
    os.environ.pop("MLFLOW_TRACKING_URI", None)
    from pipeline.demo.shop import generate

    shop = home / "truth-shop"
    if not (shop / "truth" / "queries.parquet").is_file():
        generate(shop, products=args.products, sessions=args.sessions, seed=args.seed)
    truth = Truth(shop)
    import polars as pl

    images = pl.read_parquet(shop / "images.parquet")["image_id"].to_list()
    started = time.perf_counter()
    sens = sensitivity(truth, images, args.sample, args.seed)
    print(f"sensitivity (better challenger): interleaving needs {sens['interleaving_searches_needed']:,} searches, "
          f"an A/B test on clicks per search {sens['ab_searches_needed']:,}: {sens['ratio']}x", flush=True)
    rows = agreement(truth, images, args.pairs, args.every, args.max_searches, args.min_queries, args.seed)
    print("| challenger | pair | true clicks/search vs champion | gate | expected | agrees | searches |\n"
          "|---|---|---|---|---|---|---|")
    for row in rows:
        print(f"| {row['kind']} | {row['pair']} | {row['true_click_difference']:+.4f} | {row['decision']} | "
              f"{row['expected']} | "
              f"{'yes' if row['agrees'] else 'NO'} | {row['searches']:,} |")
    simulated_seconds = time.perf_counter() - started
    lat = None if args.skip_latency else latency(home / "deploy", args.products, args.sessions, args.epochs,
                                                 args.latency_searches, args.latency_seconds)
    if lat:
        print(f"serve with logging on, 8 clients: {lat['searches']} searches, {lat['errors']} errors, p95 "
              f"{lat['latency_ms']['p95']} ms (p50 {lat['latency_ms']['p50']}), {lat['searches_per_second']}/s")
    print(json.dumps({"bench": "online", "sensitivity": sens,
                      "agreement": sum(r["agrees"] for r in rows) / len(rows), "pairs": rows,
                      "interleaving_searches_needed": sens["interleaving_searches_needed"],
                      "ab_searches_needed": sens["ab_searches_needed"], "ratio": sens["ratio"],
                      "serve_p95_ms": lat["latency_ms"]["p95"] if lat else None, "latency": lat,
                      "simulated_seconds": round(simulated_seconds, 1), "cores": os.cpu_count()}))


if __name__ == "__main__":
    main()
