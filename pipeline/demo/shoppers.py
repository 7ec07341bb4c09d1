"""Simulated shoppers for the demo shop: they search the demo's queries and click as the demo's
click log was drawn, so serve, its log, interleaving and next week's extract run on one machine.

A shopper picks a query of the shop's truth (`<shop>/truth/queries.parquet`, uniformly), examines
position k with the generator's probability (`shop.true_propensities`) and clicks an examined
result with probability 0.02 + 0.78 · relevance², relevance by the truth (`shop.relevance` over the
product's category, colour and pattern; 1 for the product a model number names) — the model
`shop._click_log` draws the demo's log with. `simulate` sends them to a running `clickclip serve`.
"""

from __future__ import annotations

import json
import random
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import polars as pl

from pipeline.demo.shop import relevance, true_propensities
from pipeline.errors import DataContractError


class Truth:
    """The demo shop's truth: what each query means and each image shows."""

    def __init__(self, shop: Path):
        folder = shop / "truth"
        if not (folder / "queries.parquet").is_file() or not (folder / "products.parquet").is_file():
            raise DataContractError(f"{folder}: no demo truth (queries.parquet, products.parquet); simulated shoppers "
                                    "need a shop written by `clickclip demo-data`")
        queries = pl.read_parquet(folder / "queries.parquet")
        self.queries = queries["query"].to_list()
        self.meaning = dict(zip(queries["query"], zip(queries["kind"], queries["target"], strict=True), strict=True))
        products = pl.read_parquet(folder / "products.parquet")
        self.attrs = {row["image_id"]: (row["category"], row["colour"], row["pattern"], row["model_number"])
                      for row in products.iter_rows(named=True)}

    def relevance(self, query: str, image_id: str) -> float:
        kind, target = self.meaning[query]
        attrs = self.attrs.get(image_id)
        if attrs is None:
            return 0.0
        if kind == "identifier":
            return float(attrs[3] == target)
        category, colour, pattern = (None if part == "None" else part for part in target.split("/"))
        return relevance((category, colour, pattern), attrs[:3])


def clicks(truth: Truth, query: str, shown: list[str], rng: random.Random) -> list[str]:
    """The results a shopper clicks, by the demo's position-based click model."""
    examination = true_propensities(max(len(shown), 1))
    return [image for position, image in enumerate(shown)
            if rng.random() < examination[position] * (0.02 + 0.78 * truth.relevance(query, image) ** 2)]


def _get(url: str) -> dict:
    with urllib.request.urlopen(url, timeout=30) as response:
        return json.loads(response.read())


def _post(url: str, body: dict) -> None:
    request = urllib.request.Request(url, json.dumps(body).encode(), {"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=30):
        pass


def simulate(url: str, shop: Path, searches: int, concurrency: int = 1, k: int = 10, seed: int = 0,
             seconds: float | None = None) -> dict:
    """`searches` shoppers (stopping early after `seconds`), `concurrency` at a time, each one search
    and its clicks against `clickclip serve` at `url`; latencies of the searches, counts, errors."""
    truth = Truth(shop)
    base = url.rstrip("/")
    lock = threading.Lock()
    latencies: list[float] = []
    counts = {"searches": 0, "clicks": 0, "errors": 0, "interleaved": 0}
    first_error: list[str] = []
    deadline = time.monotonic() + seconds if seconds else None

    def shopper(n: int) -> None:
        if deadline is not None and time.monotonic() > deadline:
            return
        rng = random.Random(f"{seed}:{n}")
        query = rng.choice(truth.queries)
        started = time.perf_counter()
        try:
            answer = _get(f"{base}/search?{urllib.parse.urlencode({'q': query, 'k': k, 'session': f'sim-{seed}-{n}'})}")
            took = time.perf_counter() - started
            chosen = clicks(truth, query, [r["image_id"] for r in answer["results"]], rng)
            for image in chosen:
                _post(f"{base}/click", {"request_id": answer["request_id"], "image_id": image,
                                        "dwell_ms": int(rng.lognormvariate(10, 0.5))})
        except (urllib.error.URLError, OSError, ValueError, KeyError) as exc:
            with lock:
                counts["errors"] += 1
                first_error[:] = first_error or [f"{type(exc).__name__}: {exc}"]
            return
        with lock:
            latencies.append(took)
            counts["searches"] += 1
            counts["clicks"] += len(chosen)
            counts["interleaved"] += bool(answer.get("interleaved"))

    started = time.perf_counter()
    with ThreadPoolExecutor(max_workers=concurrency) as pool:
        list(pool.map(shopper, range(searches)))
    wall = time.perf_counter() - started
    ms = np.array(latencies) * 1000 if latencies else np.array([np.nan])
    return {**counts, "concurrency": concurrency, "seconds": round(wall, 2),
            "searches_per_second": round(counts["searches"] / wall, 1) if wall else None,
            "latency_ms": {"p50": round(float(np.percentile(ms, 50)), 2), "p95": round(float(np.percentile(ms, 95)), 2),
                           "max": round(float(ms.max()), 2)},
            "first_error": first_error[0] if first_error else None}
