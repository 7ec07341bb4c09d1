"""Fault injection: broken inputs, hostile artifacts, resource exhaustion, NaN, and SIGKILL at a
random point of each stage followed by a rerun."""

import json
import os
import pickle
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

from pipeline.errors import StageError
from tests.conftest import shop_config
from tests.fault_corpus import CASES, run_case

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_bad_input_corpus(case, tmp_path):
    result = run_case(case, tmp_path)
    assert result["passed"], result["detail"]


def _split_inputs(tiny_shop, work, **sections):
    from pipeline.stages.extract import extract
    from pipeline.stages.split import split

    cfg = shop_config(tiny_shop, work, **sections)
    for stage in ("extract", "split"):
        (work / stage).mkdir(parents=True, exist_ok=True)
    return cfg, split(cfg, extract(cfg, work / "extract").pairs, work / "split")


class Payload:
    """Unpickling this runs code: what a hostile checkpoint would carry."""

    def __reduce__(self):
        return (os.system, (f"touch {os.environ['CLICKCLIP_PWNED']}",))


def test_a_hostile_lightning_checkpoint_is_refused_not_unpickled(tiny_shop, tmp_path, monkeypatch):
    from pipeline.stages.train import train

    cfg, split_result = _split_inputs(tiny_shop, tmp_path, train={"epochs": 1})
    marker = tmp_path / "pwned"
    monkeypatch.setenv("CLICKCLIP_PWNED", str(marker))
    (tmp_path / "train" / "lightning").mkdir(parents=True)
    with (tmp_path / "train" / "lightning" / "last.ckpt").open("wb") as handle:
        pickle.dump({"state_dict": Payload()}, handle)
    with pytest.raises(StageError, match=r"last.ckpt is not a safe weights-only checkpoint.*Delete .*train"):
        train(cfg, split_result.pairs, split_result.images, tmp_path / "train", "hostile")
    assert not marker.exists()


def test_a_truncated_checkpoint_is_set_aside_and_training_restarts(tiny_shop, tmp_path):
    from pipeline.stages.train import train

    cfg, split_result = _split_inputs(tiny_shop, tmp_path, train={"epochs": 1})
    (tmp_path / "train" / "lightning").mkdir(parents=True)
    (tmp_path / "train" / "lightning" / "last.ckpt").write_bytes(b"PK\x03\x04 cut short by a full disk")
    result = train(cfg, split_result.pairs, split_result.images, tmp_path / "train", "truncated")
    assert result.summary["resumed_from"] is None and result.summary["epochs"] == 1
    assert "could not be read" in result.summary["warnings"][0]
    assert (tmp_path / "train" / "lightning" / "last.ckpt.unreadable").is_file()


def test_nan_stops_training_keeps_finite_weights_and_fails_the_gate(tiny_shop, tmp_path):
    import lightning as L
    from safetensors.torch import load_file

    from pipeline.config import PromoteConfig
    from pipeline.stages.promote import GateInputs, decide
    from pipeline.stages.train import train

    class PoisonBatch(L.Callback):
        def on_train_batch_start(self, trainer, module, batch, batch_idx):
            if trainer.global_step == 45:  # in the second epoch: the first has a good checkpoint
                batch[0] = torch.full(batch[0].shape, float("nan"), device=batch[0].device)  # uint8 holds no NaN

    cfg, split_result = _split_inputs(tiny_shop, tmp_path, train={"epochs": 3})
    result = train(cfg, split_result.pairs, split_result.images, tmp_path / "train", "nan", [PoisonBatch()])
    assert not result.summary["finished_without_nan"]
    assert result.summary["steps"] < 3 * 38  # it stopped early
    weights = load_file(result.model_dir)
    assert all(torch.isfinite(t).all() for t in weights.values())
    promoted, reason, _ = decide({"baseline": "start", "models": {"candidate": {"recall@10": 0.9},
                                                                   "start": {"recall@10": 0.1}},
                                  "delta_vs_baseline": {"recall@10": {"mean": 0.8, "low": 0.7, "high": 0.9}}},
                                 PromoteConfig(), GateInputs(0.0, True, result.summary["finished_without_nan"]))
    assert not promoted and "no_nan" in reason


def test_too_little_memory_and_spill_space_is_a_clear_error(tiny_shop, tmp_path):
    from pipeline.stages.extract import extract

    cfg = shop_config(tiny_shop, tmp_path, extract={"duckdb": {
        "memory_limit": "4MB", "threads": 1, "temp_directory": str(tmp_path / "spill"),
        "max_temp_directory_size": "64KB"}})
    with pytest.raises(StageError, match=r"out of memory.*memory_limit is 4MB.*spill"):
        extract(cfg, tmp_path)


DETERMINISTIC = {"extract": ("pairs", "quarantine", "propensity"),
                 "split": ("images", "image_quarantine", "pairs", "pairs_excluded", "leak_audit"),
                 "train": ("weights",)}
TIMINGS = {"run_id", "search", "reindex"}  # the parts of evaluate's metrics that measure this machine


def _cli(config: Path, stage: str, work: Path, kill_when: Path | None = None) -> int:
    """Run one stage; with `kill_when`, SIGKILL it the moment that file appears (a named point inside
    the stage) and check the kill landed while the stage was running."""
    command = [str(Path(sys.executable).with_name("clickclip")), stage, "--config", str(config), "--run-id", "x"]
    process = subprocess.Popen(command, cwd=work, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    if kill_when is not None:
        deadline, size = time.monotonic() + 600, -1
        # the file has appeared and is whole (same size twice): a kill mid-write is another test's matter
        while process.poll() is None and time.monotonic() < deadline:
            current = kill_when.stat().st_size if kill_when.exists() else -1
            if current >= 0 and current == size:
                break
            size = current
            time.sleep(0.005)  # split's work after its leak audit takes tens of milliseconds on the tiny shop
        process.send_signal(signal.SIGKILL)
    # a timeout here means a killed stage left children holding its pipes (orphaned pool workers)
    _, err = process.communicate(timeout=300)
    if kill_when is not None:
        assert process.returncode == -signal.SIGKILL, (f"{stage} ended before {kill_when.name} appeared", err[-3000:])
    assert process.returncode in (0, -signal.SIGKILL), err[-3000:]
    return process.returncode


def _pipeline_dir(tiny_shop, work: Path) -> Path:
    work.mkdir(parents=True)
    cfg = shop_config(tiny_shop, work, train={"epochs": 2})
    config = work / "run.yaml"
    config.write_text(yaml.safe_dump(cfg.model_dump(mode="json")))
    return config


def _manifest(work: Path) -> dict:
    return json.loads((work / "runs" / "x" / "manifest.json").read_text())["stages"]


@pytest.mark.e2e
@pytest.mark.parametrize(("stage", "point"), [("extract", ".extract.partial"),
                                              ("train", ".train.partial/lightning/last.ckpt")])
def test_sigterm_is_a_stop_not_a_success(tiny_shop, tmp_path, stage, point):
    config = _pipeline_dir(tiny_shop, tmp_path / "w")
    for earlier in ("extract", "split")[: ("extract", "split", "train").index(stage)]:
        assert _cli(config, earlier, tmp_path / "w") == 0
    run_dir = tmp_path / "w" / "runs" / "x"
    command = [str(Path(sys.executable).with_name("clickclip")), stage, "--config", str(config), "--run-id", "x"]
    process = subprocess.Popen(command, cwd=tmp_path / "w", stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 300
    while not (run_dir / point).exists() and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    process.send_signal(signal.SIGTERM)  # what a scheduler sends to stop a task
    out, err = process.communicate(timeout=300)
    assert process.returncode == 143, err[-3000:]  # 128 + SIGTERM: a scheduler sees a failure
    assert f"stopped by SIGTERM during {stage}" in err
    assert not out.strip().endswith("}")  # no stage summary: nothing says it finished
    recorded = _manifest(tmp_path / "w") if (run_dir / "manifest.json").is_file() else {}
    assert (run_dir / f".{stage}.partial").is_dir() and stage not in recorded
    assert _cli(config, stage, tmp_path / "w") == 0  # the rerun resumes and finishes
    assert stage in _manifest(tmp_path / "w")


# where each stage is killed: the moment this file appears inside its partial folder
KILL_POINTS = {
    "extract": "pairs.parquet",  # pairs written; quarantine, propensities and summary not yet
    "split": "leak_audit.json",  # audited; registry, pairs and contact sheet not yet
    "train": "lightning/last.ckpt",  # after the first epoch's checkpoint
    "evaluate": "metrics.json",  # scored; Markdown and HTML reports not yet
    "promote": "onnx/text.onnx",  # ONNX towers exported; nothing logged or registered yet
}


@pytest.mark.e2e
def test_sigkill_at_named_points_of_each_stage_then_rerun_gives_the_same_artifacts(tiny_shop, tmp_path):
    reference = _pipeline_dir(tiny_shop, tmp_path / "reference")
    for stage in ("extract", "split", "train", "evaluate", "publish", "promote"):
        assert _cli(reference, stage, tmp_path / "reference") == 0
    expected = _manifest(tmp_path / "reference")

    crashed = _pipeline_dir(tiny_shop, tmp_path / "crashed")
    run_dir = tmp_path / "crashed" / "runs" / "x"
    kills = {}
    for stage in ("extract", "split", "train", "evaluate", "publish", "promote"):
        if stage not in KILL_POINTS:  # publish writes its one file last: no point inside it to kill at
            assert _cli(crashed, stage, tmp_path / "crashed") == 0
            continue
        point = KILL_POINTS[stage]
        kills[stage] = _cli(crashed, stage, tmp_path / "crashed", kill_when=run_dir / f".{stage}.partial" / point)
        assert (run_dir / f".{stage}.partial").is_dir()  # killed mid-stage: the partial folder is what is left
        assert not (run_dir / stage).exists()
        assert _cli(crashed, stage, tmp_path / "crashed") == 0, kills
    print(f"killed at: {KILL_POINTS}")
    got = _manifest(tmp_path / "crashed")
    assert all(code == -signal.SIGKILL for code in kills.values()), kills
    for stage, outputs in DETERMINISTIC.items():
        for name in outputs:
            assert got[stage]["outputs"][name]["sha256"] == expected[stage]["outputs"][name]["sha256"], (
                stage, name, kills)
    metrics = [json.loads((tmp_path / side / "runs" / "x" / "evaluate" / "metrics.json").read_text())
               for side in ("reference", "crashed")]
    assert [{k: v for k, v in m.items() if k not in TIMINGS} for m in metrics][0] == \
        [{k: v for k, v in m.items() if k not in TIMINGS} for m in metrics][1]
    assert got["promote"]["summary"]["promoted"] == expected["promote"]["summary"]["promoted"]
    assert got["promote"]["summary"]["version"] == "1"  # one registered version despite the kill
    assert not list((tmp_path / "crashed" / "runs" / "x").glob(".*.partial"))


ORPHAN = """
import time
from pipeline.data.near_duplicates import _parallel, _pool

def slow(x):
    time.sleep(60)
    return x

if __name__ == "__main__":
    with _pool() as pool:
        _parallel(pool, slow, list(range(4)), "hashing")
"""


def test_pool_workers_die_with_a_sigkilled_stage(tmp_path):
    script = tmp_path / "orphan.py"
    script.write_text(ORPHAN)
    process = subprocess.Popen([sys.executable, str(script)], cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)},
                               stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 60
    workers: list[str] = []
    while len(workers) < 2 and time.monotonic() < deadline:
        time.sleep(0.2)
        workers = subprocess.run(["pgrep", "-P", str(process.pid)], capture_output=True, text=True).stdout.split()
    assert workers, "the pool never started"
    process.send_signal(signal.SIGKILL)
    process.communicate(timeout=30)  # returns only once no orphaned worker holds the stderr pipe
    time.sleep(0.5)
    alive = [w for w in workers
             if Path(f"/proc/{w}").exists() and "State:\tZ" not in Path(f"/proc/{w}/status").read_text()]
    assert not alive
