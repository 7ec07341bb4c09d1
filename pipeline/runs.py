"""Run folders and their manifest: content hashes of inputs and outputs, and stage reuse.

`runs/<run_id>/manifest.json` records, per stage, a fingerprint of everything the stage
depends on (its config section, the input content hashes, the upstream fingerprints) and the
sha256 of each output. A stage whose fingerprint matches and whose outputs are intact is reused.
"""

from __future__ import annotations

import contextlib
import fcntl
import functools
import json
import os
import shutil
import socket
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pipeline import __version__, registry
from pipeline.config import RunConfig, SourceConfig, check_run_id, result_settings
from pipeline.data.files import atomic_write, file_sha256, text_sha256
from pipeline.data.partitions import source_files
from pipeline.errors import ClickclipError
from pipeline.stages import STAGES, StageInputs, stage_spec


def source_digest(source: SourceConfig) -> str:
    """Content hash of a source's files (their paths and bytes)."""
    return text_sha256([(str(p), file_sha256(p)) for p in source_files(source)])


def image_root_digest(root: Path) -> str:
    """Cheap fingerprint of the image folder: relative path, size and mtime of every file."""
    if not root.is_dir():
        return "missing"
    entries = []
    for dirpath, _, files in os.walk(root):
        for name in files:
            # lstat: a dangling or looping symbolic link anywhere under the root is an entry, not a crash
            stat = (Path(dirpath) / name).lstat()
            entries.append((os.path.relpath(Path(dirpath) / name, root), stat.st_size, stat.st_mtime_ns))
    return text_sha256(sorted(entries))


PACKAGE = Path(__file__).resolve().parent


@functools.cache
def code_digest() -> str:
    """The running package's source digest: part of every stage's fingerprint, so a changed line of
    code reruns the stages rather than being hidden by outputs the old code made."""
    return source_tree_digest(PACKAGE)


def source_tree_digest(package: Path) -> str:
    """sha256 of a package's version and the relative path and bytes of every .py and .sql file."""
    files = sorted(p for suffix in ("*.py", "*.sql") for p in package.rglob(suffix) if "__pycache__" not in p.parts)
    return text_sha256(__version__, [(p.relative_to(package).as_posix(), file_sha256(p)) for p in files])


@functools.cache
def git_commit() -> str:
    return commit_of(PACKAGE)


def commit_of(package: Path) -> str:
    """The commit of the checkout `package` runs from, else the one `make` recorded in its COMMIT
    file, else a sentence saying neither is there (code_digest still names the code)."""
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10, cwd=package)
        if out.returncode == 0 and out.stdout.strip():
            return out.stdout.strip()
    except (OSError, subprocess.TimeoutExpired):
        pass
    recorded = package / "COMMIT"
    if recorded.is_file() and recorded.read_text().strip():
        return recorded.read_text().strip()
    return "unavailable: not a git checkout and no pipeline/COMMIT (the code is named by its source sha256)"


class RunLockedError(ClickclipError):
    """Another live process is working in the same run folder."""


def _ddp_worker_of(holder: str) -> bool:
    """Whether this process is a DDP rank that Lightning launched from the lock's holder."""
    return os.environ.get("LOCAL_RANK", "0") != "0" and holder.startswith(f"pid {os.getppid()} ")


def launched_rank() -> int:
    """This process's global rank when a multi-machine launcher started every rank itself (torchrun
    sets RANK, SLURM's srun SLURM_PROCID), else 0."""
    for variable in ("RANK", "SLURM_PROCID"):
        value = os.environ.get(variable, "")
        if value.isdigit():
            return int(value)
    return 0


@contextlib.contextmanager
def run_lock(root: Path, what: str = "run folder") -> Iterator[None]:
    """Hold an exclusive lock on a folder (a run folder, or the state folder of a name), or fail at
    once naming the holder.

    An flock dies with its process, so a lock left by a killed run is never stale: the next run
    simply takes it. Under torchrun or SLURM every rank runs the command on its own (on several
    machines, with the folder on shared storage): rank 0 holds the lock, the others take none."""
    if launched_rank() > 0:
        yield
        return
    try:
        root.mkdir(parents=True, exist_ok=True)
        handle = (root / ".lock").open("a+")
    except OSError as exc:
        raise ClickclipError(f"cannot write the {what} {root}: {exc.strerror or exc}; make it writable for this user, "
                             "or point the config elsewhere (runs_dir, reports_dir, state_dir)") from None
    with handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.seek(0)
            holder = handle.read().strip() or "unknown process"
            if _ddp_worker_of(holder):
                yield  # Lightning's DDP re-ran our command for another rank: the parent holds the lock
                return
            raise RunLockedError(f"{what} {root} is in use by {holder}; wait for it to finish"
                                 + (" or use another --run-id" if what == "run folder" else "")) from None
        handle.seek(0)
        handle.truncate()
        handle.write(f"pid {os.getpid()} on {socket.gethostname()} since "
                     f"{time.strftime('%Y-%m-%dT%H:%M:%SZ', time.gmtime())}")
        handle.flush()
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


@dataclass
class Run:
    """One run folder, its manifest, and the reuse decisions made from it."""

    run_id: str
    root: Path
    config: RunConfig
    inputs: dict[str, str]
    manifest: dict[str, Any] = field(default_factory=dict)
    # stage -> fingerprint whose outputs this process already hashed; spares re-hashing large outputs
    verified: dict[str, str] = field(default_factory=dict)
    running: set[str] = field(default_factory=set)  # stages writing into their partial folder now
    looked_up: dict[str, Any] = field(default_factory=dict)  # registry answers, once per process

    @property
    def manifest_path(self) -> Path:
        return self.root / "manifest.json"

    def stage_dir(self, stage: str) -> Path:
        """Where a stage writes: `.<stage>.partial` while it runs, renamed to `<stage>` when it is done."""
        path = self.partial_dir(stage) if stage in self.running else self.root / stage
        path.mkdir(parents=True, exist_ok=True)
        return path

    def partial_dir(self, stage: str) -> Path:
        # kept across attempts: a killed training resumes from the Lightning checkpoint inside it
        return self.root / f".{stage}.partial"

    def begin(self, stage: str) -> None:
        """Start (or resume) a stage's partial folder; one left by an attempt with another
        fingerprint (config or inputs changed under a fixed --run-id) is discarded, never resumed."""
        partial, fingerprint = self.partial_dir(stage), self.fingerprint(stage)
        marker = partial / ".fingerprint"
        if partial.exists() and (not marker.is_file() or marker.read_text() != fingerprint):
            shutil.rmtree(partial)
        partial.mkdir(parents=True, exist_ok=True)
        marker.write_text(fingerprint)
        self.running.add(stage)

    def publish(self, stage: str, outputs: dict[str, Path]) -> dict[str, Path]:
        """Move a finished stage's folder into place in one rename; return its outputs' final paths.

        Until this rename nothing of the attempt is visible under `<stage>/`, and until the manifest
        records the stage, no later run reuses it."""
        partial, final = self.partial_dir(stage), self.root / stage
        (partial / ".fingerprint").unlink(missing_ok=True)
        if final.exists():
            old = self.root / f".{stage}.old"
            shutil.rmtree(old, ignore_errors=True)
            os.replace(final, old)
            shutil.rmtree(old, ignore_errors=True)
        os.replace(partial, final)
        return {name: final / Path(path).resolve().relative_to(partial.resolve())
                if Path(path).resolve().is_relative_to(partial.resolve()) else Path(path)
                for name, path in outputs.items()}

    def report_dir(self) -> Path:
        path = self.config.reports_dir / self.run_id
        path.mkdir(parents=True, exist_ok=True)
        return path

    def fingerprint(self, name: str) -> str:
        """Everything a stage's outputs depend on: its config sections, the content of the run inputs
        it reads, and the fingerprints of the stages whose outputs it reads."""
        spec = stage_spec(name)
        tree = result_settings(self.config)
        own = ([setting(tree, key) for key in spec.config], [self.inputs[key] for key in spec.inputs])
        if spec.champion:
            own += (self.baseline_champion(),)
        return text_sha256(name, own, [self.fingerprint(upstream) for upstream in spec.upstream], code_digest())

    def baseline_champion(self) -> str | None:
        """The champion version this run compares against (looked up once per process): a reused
        evaluation is never one made against another champion."""
        if "champion" not in self.looked_up:
            self.looked_up["champion"] = registry.baseline_champion(self.config.promote, self.run_id)
        return self.looked_up["champion"]

    def stage_inputs(self, name: str) -> StageInputs:
        """What the stage `name` reads: every upstream stage's recorded outputs and summary."""
        spec = stage_spec(name)
        recorded = self.manifest.get("stages", {})
        return StageInputs(
            run_id=self.run_id,
            outputs={up: {out: self.root / entry["path"] for out, entry in recorded[up]["outputs"].items()}
                     for up in spec.upstream},
            summaries={up: recorded[up]["summary"] for up in spec.upstream},
            report_dir=self.config.reports_dir / self.run_id, manifest=self.manifest_path, digests=self.inputs,
            git_commit=git_commit(), code_digest=code_digest())

    def reusable(self, stage: str) -> dict[str, Any] | None:
        """The recorded stage entry if its fingerprint matches and every output is intact."""
        entry = self.manifest.get("stages", {}).get(stage)
        fingerprint = self.fingerprint(stage)
        if not entry or entry.get("fingerprint") != fingerprint:
            return None
        if self.verified.get(stage) == fingerprint:
            return entry
        for output in entry["outputs"].values():
            path = self.root / output["path"]
            if not path.is_file() or file_sha256(path) != output["sha256"]:
                return None
        self.verified[stage] = fingerprint
        return entry

    def adopt(self, stage: str) -> dict[str, Any] | None:
        """The stage as another run folder under runs_dir recorded it under the same fingerprint, its
        files linked into this run (hard links, so no copy), or None. A config change that leaves
        extract or train as they were reuses them instead of recomputing them."""
        fingerprint = self.fingerprint(stage)
        for manifest in sorted(self.root.parent.glob("*/manifest.json")):
            other = manifest.parent
            if other == self.root:
                continue
            try:
                entry = json.loads(manifest.read_text()).get("stages", {}).get(stage)
            except (OSError, json.JSONDecodeError):
                continue
            if not entry or entry.get("fingerprint") != fingerprint or not _intact(other, entry):
                continue
            partial = self.partial_dir(stage)
            shutil.rmtree(partial, ignore_errors=True)
            shutil.copytree(other / stage, partial, copy_function=_link_or_copy)
            outputs = self.publish(stage, {name: partial / Path(out["path"]).relative_to(stage)
                                           for name, out in entry["outputs"].items()})
            self.record(stage, outputs, entry["summary"] | {"reused_from_run": other.name}, 0.0)
            return self.manifest["stages"][stage]
        return None

    def output(self, stage: str, name: str) -> Path:
        """Path of a recorded output of an earlier stage."""
        return self.root / self.manifest["stages"][stage]["outputs"][name]["path"]

    def summary(self, stage: str) -> dict[str, Any]:
        return self.manifest["stages"][stage]["summary"]

    def record(self, stage: str, outputs: dict[str, Path], summary: dict[str, Any],
               seconds: float) -> None:
        entry = {
            "fingerprint": self.fingerprint(stage),
            "finished_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "seconds": round(seconds, 2),
            # relative to the run folder; the published report lives beside it, under reports_dir
            "outputs": {name: {"path": os.path.relpath(path, self.root), "sha256": file_sha256(path)}
                        for name, path in outputs.items()},
            "summary": summary,
        }
        self.manifest.setdefault("stages", {})[stage] = entry
        self.verified[stage] = entry["fingerprint"]
        self.save()

    def save(self) -> None:
        self.manifest.update(run_id=self.run_id, git_commit=git_commit(), code_sha256=code_digest(), inputs=self.inputs,
                             config=registry.public_config(self.config))
        with atomic_write(self.manifest_path) as tmp:
            tmp.write_text(json.dumps(self.manifest, indent=2, sort_keys=True, default=str))


def _intact(root: Path, entry: dict[str, Any]) -> bool:
    return all((root / out["path"]).is_file() and file_sha256(root / out["path"]) == out["sha256"]
               for out in entry["outputs"].values())


def _link_or_copy(source: str, target: str) -> None:
    try:
        os.link(source, target)
    except OSError:  # another filesystem, or links not allowed
        shutil.copy2(source, target)


def setting(tree: dict[str, Any], dotted: str) -> Any:
    """A config section ("train") or one setting of it ("train.model") from the dumped config."""
    for part in dotted.split("."):
        tree = tree[part]
    return tree


def input_digests(cfg: RunConfig) -> dict[str, str]:
    return {
        "events": source_digest(cfg.data.events),
        "images": source_digest(cfg.data.images),
        "image_root": image_root_digest(cfg.data.image_root),
    }


def open_run(cfg: RunConfig, run_id: str | None = None) -> Run:
    """Open (or create) the run folder. Without a run id, the id derives from the inputs and every
    setting that changes a figure, so the same data and settings land in the same folder, and a run
    under other settings gets its own folder (reusing from the others what its settings leave as it was)."""
    inputs = input_digests(cfg)
    if run_id is None:
        # every setting a stage before publish and promote depends on; theirs (margin, gates, the
        # index's settings) only decide and serve, so changing one re-decides in the same folder
        tree = result_settings(cfg)
        settings = {key: setting(tree, key) for spec in STAGES if not spec.decides for key in spec.config}
        run_id = f"{cfg.name}-{text_sha256(settings, inputs)[:10]}"
    check_run_id(run_id)
    root = cfg.runs_dir / run_id
    try:
        root.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ClickclipError(f"cannot create the run folder {root}: {exc.strerror or exc}; make runs_dir writable "
                             "for this user or point runs_dir elsewhere") from None
    run = Run(run_id=run_id, root=root, config=cfg, inputs=inputs)
    if run.manifest_path.is_file():
        run.manifest = json.loads(run.manifest_path.read_text())
    return run
