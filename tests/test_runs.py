import signal
import subprocess
import sys
import time

import pytest

from pipeline.data.files import atomic_write
from pipeline.runs import RunLockedError, run_lock

HOLD = """
import sys, time
from pathlib import Path
from pipeline.runs import run_lock
with run_lock(Path(sys.argv[1])):
    print("locked", flush=True)
    time.sleep(60)
"""


def test_second_run_on_the_same_folder_fails_fast_and_a_killed_holder_leaves_no_stale_lock(tmp_path):
    holder = subprocess.Popen([sys.executable, "-c", HOLD, str(tmp_path)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        started = time.monotonic()
        with pytest.raises(RunLockedError, match=f"pid {holder.pid}"):
            with run_lock(tmp_path):
                pass
        assert time.monotonic() - started < 2
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    with run_lock(tmp_path):  # the dead process's lock is gone with it
        pass


def test_atomic_write_leaves_nothing_on_failure(tmp_path):
    target = tmp_path / "out.json"
    with pytest.raises(RuntimeError):
        with atomic_write(target) as tmp:
            tmp.write_text("half")
            raise RuntimeError("crash while writing")
    assert not target.exists() and list(tmp_path.iterdir()) == []
    with atomic_write(target) as tmp:
        tmp.write_text("whole")
    assert target.read_text() == "whole"


def test_a_partial_stage_folder_is_resumed_only_under_the_same_fingerprint(tiny_shop, tmp_path):
    from pipeline.runs import open_run
    from tests.conftest import shop_config

    run = open_run(shop_config(tiny_shop, tmp_path), run_id="r")
    run.begin("train")
    (run.stage_dir("train") / "last.ckpt").write_text("epoch 3")
    run.running.discard("train")  # the process died here

    again = open_run(shop_config(tiny_shop, tmp_path), run_id="r")
    again.begin("train")
    assert (again.stage_dir("train") / "last.ckpt").read_text() == "epoch 3"  # same config: resumable
    again.running.discard("train")

    changed = open_run(shop_config(tiny_shop, tmp_path, train={"learning_rate": 0.5}), run_id="r")
    changed.begin("train")
    assert not (changed.stage_dir("train") / "last.ckpt").exists()  # another config: never resumed
    outputs = changed.publish("train", {"weights": changed.stage_dir("train") / "w.bin"})
    assert outputs["weights"] == tmp_path / "runs" / "r" / "train" / "w.bin"
    assert not (tmp_path / "runs" / "r" / ".train.partial").exists()
