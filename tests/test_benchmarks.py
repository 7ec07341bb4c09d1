"""Smoke runs of the benchmarks' CPU configurations: they run end to end and end with their JSON line."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.e2e
def test_the_gpu_suite_smoke_runs_training_against_open_clips_script_embedding_and_search(tmp_path):
    """benchmarks/gpu_suite.sh --smoke: the suite a lent GPU runs first, on the CPU with tiny sizes
    (bench_train against open_clip's own script, grad cache, memory bank; bench_eval)."""
    import os

    env = os.environ | {"OUT": str(tmp_path), "PYTHON": sys.executable}
    done = subprocess.run(["bash", str(ROOT / "benchmarks" / "gpu_suite.sh"), "--smoke"], cwd=ROOT,
                          capture_output=True, text=True, timeout=1200, env=env)
    assert done.returncode == 0, (done.stdout[-3000:], done.stderr[-3000:])
    suite = json.loads(done.stdout.strip().splitlines()[-1])
    assert suite["suite"] == "gpu"
    train, evaluation = suite["train"], suite["eval"]
    assert train == json.loads((tmp_path / "train.json").read_text())
    for key in ("ours_samples_per_s", "open_clip_samples_per_s", "grad_cache_samples_per_s",
                "memory_bank_samples_per_s", "grad_cache_max_batch_samples_per_s"):
        assert train[key] > 0, key
    assert train["ratio"] == pytest.approx(train["ours_samples_per_s"] / train["open_clip_samples_per_s"], rel=0.01)
    assert train["flops_per_sample"] > 0
    assert evaluation["gallery"] == 2000 and evaluation["queries"] == 200
    assert evaluation["photo_images"] == 16 and evaluation["photo_embed_per_s_torch"] > 0
    assert 0 < evaluation["ann_recall_vs_exact"] <= 1


@pytest.mark.e2e
def test_bench_extract_smoke_with_incremental_mode(tmp_path):
    done = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "bench_extract.py"), "--impressions", "50000",
                           "--incremental", "--cache", str(tmp_path)], cwd=ROOT, capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    figures = json.loads(done.stdout.strip().splitlines()[-1])
    assert figures["rows_kept"] + figures["rows_quarantined"] == figures["rows_read"] > 49_000
    assert figures["rows_quarantined"] > 0  # the generator plants duplicates, bots and bad rows
    for key in ("seconds", "impressions_per_s", "peak_rss_mb", "polars_seconds", "incremental_nightly_seconds"):
        assert figures[key] > 0, key
    assert "nightly run (1 new partition file(s))" in done.stdout


@pytest.mark.e2e
def test_bench_online_smoke_measures_both_sample_sizes_and_the_gates_agreement(tmp_path):
    done = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "bench_online.py"), "--skip-latency",
                           "--products", "100", "--sessions", "500", "--sample", "3000", "--pairs", "1",
                           "--max-searches", "4000", "--home", str(tmp_path)], cwd=ROOT, capture_output=True,
                          text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    figures = json.loads(done.stdout.strip().splitlines()[-1])
    assert figures["interleaving_searches_needed"] > 0 and figures["ab_searches_needed"] > 0
    assert figures["ratio"] == pytest.approx(figures["ab_searches_needed"] / figures["interleaving_searches_needed"],
                                             rel=0.05)  # both rounded up to whole searches
    assert {row["kind"] for row in figures["pairs"]} == {"better", "worse", "equal"}
    assert 0 <= figures["agreement"] <= 1 and figures["latency"] is None
