"""The pipeline's stages, declared once, in order.

Each entry names the stage, the config sections and run inputs its fingerprint depends on, the
stages whose outputs it reads, the outputs it records, its scheduler retries, and where its
`run(cfg, inputs, out_dir) -> StageOutput` lives. The runner, the CLI subcommands, the
fingerprints and the Airflow DAG all read this list; adding a stage is one entry plus its module.

This module imports nothing (not even the rest of the package), so the DAG can read it in an
Airflow environment that has neither torch nor mlflow.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


@dataclass(frozen=True)
class Stage:
    name: str
    function: str  # "module:function", imported only when the stage runs
    config: tuple[str, ...]  # RunConfig sections (or "section.key" settings) its output depends on
    inputs: tuple[str, ...] = ()  # run inputs ("events", "images", "image_root") whose content it reads
    upstream: tuple[str, ...] = ()  # stages whose outputs or summaries it reads
    champion: bool = False  # its output depends on the registry's champion (the version compared against)
    outputs: tuple[str, ...] = ()  # recorded outputs (a stage may record optional ones besides)
    retries: int = 0  # how often a scheduler retries it
    retry_minutes: int = 5  # first wait between retries
    backoff: bool = False  # exponential back-off between retries (transient I/O)
    timeout_minutes: int = 120  # a scheduler stops (and fails) the stage after this long
    shareable: bool = False  # its outputs depend on nothing run-specific: another run's may be reused
    writes_state: bool = False  # writes <state_dir>/<name>/ (shared by every run of the name): locked
    # it decides or serves on the figures before it: its settings are in no default run id (changing
    # one re-decides in the same folder) and it may rerun in a folder that holds a decision
    decides: bool = False
    doc: str = field(default="", compare=False)


@dataclass(frozen=True)
class StageInputs:
    """What a stage gets from its run: upstream outputs and summaries, and the run's identity."""

    run_id: str
    outputs: dict[str, dict[str, Path]]  # upstream stage -> output name -> path
    summaries: dict[str, dict[str, Any]]  # upstream stage -> its summary
    report_dir: Path  # reports_dir/<run_id>, for the human report
    manifest: Path  # the run's manifest.json (logged with the model)
    digests: dict[str, str]  # content digests of the run's inputs (events, images, image_root)
    git_commit: str  # of the code running this stage
    code_digest: str  # sha256 of the package's .py and .sql files

    def output(self, stage: str, name: str) -> Path:
        return self.outputs[stage][name]

    def summary(self, stage: str) -> dict[str, Any]:
        return self.summaries[stage]


@dataclass(frozen=True)
class StageOutput:
    outputs: dict[str, Path]  # name -> file written under the stage's folder
    summary: dict[str, Any]


STAGES: tuple[Stage, ...] = (
    # the starting model's tokenizer and text context decide which queries are too long
    Stage("extract", "pipeline.stages.extract:run", config=("data", "extract", "train.model", "train.checkpoint"),
          inputs=("events", "images"), shareable=True, writes_state=True,
          outputs=("pairs", "quarantine", "propensity"), retries=3, backoff=True,
          doc="click logs -> debiased (query, image) pairs; unusable rows quarantined with a reason"),
    Stage("split", "pipeline.stages.split:run", config=("split",), inputs=("image_root",), upstream=("extract",),
          outputs=("images", "image_quarantine", "pairs", "pairs_excluded", "leak_audit", "groups_sheet"),
          retries=3, backoff=True, shareable=True, writes_state=True,
          doc="near-duplicate and product groups, sticky leak-free train/val/test, held-out queries"),
    Stage("train", "pipeline.stages.train:run", config=("train",), upstream=("split",), shareable=True,
          outputs=("weights", "metrics"), retries=1, retry_minutes=10, timeout_minutes=12 * 60,
          doc="fine-tune the open_clip model on the training pairs with Lightning"),
    # promote.metric picks the gated slices and worst queries; model_name, the champion; serve_as, the gated pair;
    # the query normalisation and the index settings are part of every served configuration evaluate builds
    Stage("evaluate", "pipeline.stages.evaluate:run",
          config=("evaluate", "promote.metric", "promote.model_name", "promote.serve_as", "extract.strip_punctuation",
                  "publish.backend", "publish.hnsw_m", "publish.hnsw_ef_construction", "publish.ef_search"),
          upstream=("extract", "split", "train"),
          champion=True, outputs=("metrics", "report"), retries=1, timeout_minutes=4 * 60,
          doc="candidate vs champion vs start vs BM25 on held-out queries; the recall report"),
    # the index search will serve, built and validated before the alias moves; idempotent (the
    # table is the run's, rewritten in one transaction), so errors are retried
    Stage("publish", "pipeline.stages.publish:run", config=("publish", "promote"), inputs=("image_root",),
          upstream=("extract", "split", "train", "evaluate"), outputs=("index",), retries=2, writes_state=True,
          timeout_minutes=4 * 60, decides=True,
          doc="the candidate's catalog vectors into a pgvector HNSW index, validated against exact search"),
    # idempotent (a rerun finds the run's version), so errors are retried; a failed gate is a
    # decision, not an error: the command succeeds and the DAG branches on it
    Stage("promote", "pipeline.stages.promote:run", config=("promote",),
          upstream=("extract", "split", "train", "evaluate", "publish"), outputs=("decision",), retries=2,
          timeout_minutes=60, writes_state=True, decides=True,
          doc="register the model in MLflow, move `champion` only if every gate passes, and flip the serving index"),
)

STAGE_NAMES: tuple[str, ...] = tuple(stage.name for stage in STAGES)


def stage_spec(name: str) -> Stage:
    for entry in STAGES:
        if entry.name == name:
            return entry
    raise KeyError(f"no stage {name!r}; the stages are {', '.join(STAGE_NAMES)}")
