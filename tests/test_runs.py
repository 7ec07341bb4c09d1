import signal
import subprocess
import sys
import time

import pytest

from pipeline.data.files import atomic_write
from pipeline.runs import RunLockedError, open_run, run_lock

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


@pytest.mark.parametrize("variable", ["RANK", "SLURM_PROCID"])
def test_ranks_started_by_torchrun_or_slurm_leave_the_lock_to_rank_0(tmp_path, monkeypatch, variable):
    """On several machines every rank runs `clickclip train` itself, the run folder on shared
    storage: rank 0 holds the lock (and alone writes results), the other ranks neither take it nor
    fail on it; a second run on the folder still fails as rank 0."""
    holder = subprocess.Popen([sys.executable, "-c", HOLD, str(tmp_path)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        monkeypatch.setenv(variable, "3")
        with run_lock(tmp_path):
            pass
        monkeypatch.setenv(variable, "0")
        with pytest.raises(RunLockedError):
            with run_lock(tmp_path):
                pass
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()


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


def test_code_is_part_of_every_fingerprint(tiny_config, tmp_path, monkeypatch):
    import shutil

    import pipeline.runs as runs

    stages = ("extract", "split", "train", "evaluate", "promote")
    before = {s: runs.open_run(tiny_config, run_id="r").fingerprint(s) for s in stages}
    monkeypatch.setattr(runs, "code_digest", lambda: "another version of the code")
    after = {s: runs.open_run(tiny_config, run_id="r").fingerprint(s) for s in stages}
    assert all(before[s] != after[s] for s in stages)
    monkeypatch.undo()
    # the digest covers the SQL files as well as the Python
    package = tmp_path / "pipeline"
    shutil.copytree(runs.PACKAGE, package, ignore=shutil.ignore_patterns("__pycache__"))
    digest = runs.source_tree_digest(package)
    assert digest == runs.code_digest()
    sql = next(package.rglob("*.sql"))
    sql.write_text(sql.read_text() + "\n-- a comment is a change\n")
    assert runs.source_tree_digest(package) != digest


def test_the_commit_is_known_outside_a_checkout_when_make_recorded_it(tmp_path):
    from pipeline.runs import commit_of

    copy = tmp_path / "pipeline"  # a copy of the code without .git, as in a container image
    copy.mkdir()
    assert commit_of(copy).startswith("unavailable")
    (copy / "COMMIT").write_text("0123456789abcdef0123456789abcdef01234567\n")
    assert commit_of(copy) == "0123456789abcdef0123456789abcdef01234567"


def test_other_settings_get_their_own_run_and_reuse_the_stages_they_leave_alone(tiny_config):
    from pipeline.runner import run_stage

    first = open_run(tiny_config)
    for stage in ("extract", "split"):
        run_stage(first, stage)
    smaller = tiny_config.model_copy(update={"train": tiny_config.train.model_copy(update={"batch_size": 16})})
    second = open_run(smaller)
    assert second.run_id != first.run_id  # the folder holds what its own settings produced
    for stage in ("extract", "split"):  # both taken from the first run, not recomputed
        assert run_stage(second, stage)["reused_from_run"] == first.run_id
    pairs = "split/pairs.parquet"
    assert (second.root / pairs).read_bytes() == (first.root / pairs).read_bytes()
    # deciding differently is no new run: the promote settings re-decide in the same folder
    stricter = tiny_config.model_copy(update={"promote": tiny_config.promote.model_copy(update={"margin": 0.5})})
    assert open_run(stricter).run_id == first.run_id


def test_a_promoted_run_refuses_to_rerun_a_stage_under_other_settings(tiny_config):
    from pipeline.errors import StageError
    from pipeline.runner import refuse_rewriting_a_decision

    run = open_run(tiny_config, "decided")
    refuse_rewriting_a_decision(run, "evaluate")  # nothing decided yet
    run.manifest["stages"] = {"promote": {"summary": {"version": "3"}}}
    with pytest.raises(StageError, match="already holds a promotion decision \\(version 3"):
        refuse_rewriting_a_decision(run, "evaluate")
    refuse_rewriting_a_decision(run, "promote")  # promote itself re-decides


def test_the_state_folder_of_a_name_is_locked_for_the_stages_that_write_it(tiny_config):
    from pipeline.runner import state_lock

    with state_lock(tiny_config):
        with pytest.raises(RunLockedError, match="state folder .*in use by pid"):
            with state_lock(tiny_config):
                pass


def test_a_run_folder_that_cannot_be_written_is_a_clear_error(tiny_config, tmp_path):
    from pipeline.errors import ClickclipError

    blocker = tmp_path / "not-a-folder"
    blocker.write_text("a file where runs_dir should be")  # (tests run as root: permissions would not stop us)
    cfg = tiny_config.model_copy(update={"runs_dir": blocker / "runs", "state_dir": blocker / "state"})
    with pytest.raises(ClickclipError, match=r"cannot create the run folder .*not-a-folder/runs"):
        open_run(cfg, "r")
    from pipeline.runner import state_lock

    with pytest.raises(ClickclipError, match=r"cannot write the state folder .*not-a-folder/state"):
        with state_lock(cfg):
            pass


def test_the_promotion_metric_is_part_of_evaluates_fingerprint_and_of_the_run_id(tiny_config):
    other = tiny_config.model_copy(update={"promote": tiny_config.promote.model_copy(update={"metric": "recall@5"})})
    before, after = open_run(tiny_config, "m"), open_run(other, "m")
    assert before.fingerprint("train") == after.fingerprint("train")
    assert before.fingerprint("evaluate") != after.fingerprint("evaluate")  # it picks the gated slices
    assert open_run(tiny_config).run_id != open_run(other).run_id


def test_serve_as_is_part_of_evaluates_fingerprint(tiny_config):
    """Regression: evaluate's summary holds the gated pair and its interval, both picked by
    promote.serve_as; a changed serve_as reused the old evaluation, and promote gated the wrong pair."""
    other = tiny_config.model_copy(update={"promote": tiny_config.promote.model_copy(update={"serve_as": "hybrid"})})
    before, after = open_run(tiny_config, "m"), open_run(other, "m")
    assert before.fingerprint("train") == after.fingerprint("train")
    assert before.fingerprint("evaluate") != after.fingerprint("evaluate")


def test_a_stop_right_after_the_partial_folder_appears_names_the_stage(tiny_config, monkeypatch):
    """SIGTERM landing between the partial folder's creation and the stage's own work said "stopped"
    without the stage (seen under load in tests/test_faults.py's SIGTERM test)."""
    from pipeline.errors import Stopped
    from pipeline.runner import run_stage
    from pipeline.runs import Run

    real_begin = Run.begin

    def begin_then_signal(self, stage):
        real_begin(self, stage)
        raise Stopped(signal.SIGTERM)

    monkeypatch.setattr(Run, "begin", begin_then_signal)
    run = open_run(tiny_config, "x")
    with pytest.raises(Stopped) as stopped:
        run_stage(run, "extract")
    assert stopped.value.stage == "extract"
    assert (run.root / ".extract.partial").is_dir() and "extract" not in run.running
