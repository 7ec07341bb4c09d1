"""Train: fine-tune an open_clip model on clicked (query, image) pairs with Lightning.

Reads split's `pairs.parquet`; writes `runs/<id>/train/model/` (safetensors checkpoint of the
best epoch by validation recall@10), Lightning checkpoints for resuming, and `metrics.json`.
"""

from __future__ import annotations

import json
import os
import pickle
import shutil
import signal
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import lightning as L
import open_clip
import torch
from lightning.pytorch.callbacks import LearningRateMonitor, ModelCheckpoint
from lightning.pytorch.plugins.io import TorchCheckpointIO

from pipeline import registry
from pipeline.config import RunConfig, TrainConfig
from pipeline.data.groups import look_alikes
from pipeline.errors import StageError, Stopped
from pipeline.stages import StageInputs, StageOutput
from pipeline.training.datasets import PairDataset, loss_weights, make_loader, title_pairs, training_pairs
from pipeline.training.finetuner import ClipFineTuner, lock_towers, validation_recall
from pipeline.training.hard_negatives import buddy_pairs, mine_hard_negatives
from pipeline.training.image_cache import ImageCache
from pipeline.training.model import ClipBundle, embed_image_files, embed_texts, save_checkpoint, starting_model
from pipeline.training.negatives import refuse_inexact_grad_cache
from pipeline.training.progress import EpochHistory, ProgressLines


@dataclass(frozen=True)
class TrainResult:
    model_dir: Path
    metrics: Path
    summary: dict


def prepare_model(bundle: ClipBundle, cfg: TrainConfig) -> None:
    """Tower locking, channels-last and compilation, in place, as configured."""
    lock_towers(bundle.model, cfg)
    if cfg.channels_last:
        bundle.model.visual.to(memory_format=torch.channels_last)
    if cfg.compile:
        # in place, so parameter names (and the safetensors checkpoint) are unchanged
        bundle.model.visual.compile()
        bundle.model.transformer.compile()


class AtomicCheckpointIO(TorchCheckpointIO):
    """Lightning's checkpoint writer, through a temporary file renamed into place: a full disk or a
    kill mid-write leaves the previous checkpoint, never a truncated one."""

    def save_checkpoint(self, checkpoint, path, storage_options=None) -> None:
        path = Path(path)
        tmp = path.with_name(f".{path.name}.tmp")
        try:
            super().save_checkpoint(checkpoint, tmp, storage_options)
            os.replace(tmp, path)
        finally:
            tmp.unlink(missing_ok=True)


def resumable_checkpoint(ckpt_dir: Path, warnings: list[str]) -> Path | None:
    """The checkpoint to resume from: last.ckpt, else best.ckpt, if it loads weights-only. A file
    that asks to run code when loaded is refused; one that cannot be read (truncated, say) is set
    aside with a warning, and the next is tried, then a fresh start."""
    for name in ("last.ckpt", "best.ckpt"):
        path = ckpt_dir / name
        if not path.is_file():
            continue
        try:
            torch.load(path, map_location="cpu", weights_only=True)
            return path
        except pickle.UnpicklingError as exc:
            if "weights only load failed" in str(exc).lower():
                raise StageError(f"{path} is not a safe weights-only checkpoint (loading it would run code it "
                                 f"carries), so training will not resume from it. Delete {ckpt_dir.parent} to "
                                 "train from the start") from None
            problem = exc
        except (EOFError, RuntimeError, OSError, ValueError) as exc:
            problem = exc
        aside = path.with_name(f"{path.name}.unreadable")
        os.replace(path, aside)
        warnings.append(f"{path} could not be read ({str(problem).splitlines()[0][:200]}); set aside as {aside.name}")
    return None


def interpolate(start: dict[str, torch.Tensor], trained: dict[str, torch.Tensor], alpha: float
                ) -> dict[str, torch.Tensor]:
    """WiSE-FT: (1 − α) start + α trained for every floating-point tensor; others (integer
    buffers) from the trained state."""
    return {name: torch.lerp(start[name].to(value.dtype), value, alpha) if value.is_floating_point() else value
            for name, value in trained.items()}


@torch.no_grad()
def validation_score(module: ClipFineTuner, loader) -> float:
    """Validation recall@10 as the epochs score it (finetuner.validation_recall), outside Lightning."""
    module.model.eval()
    batches = []
    for batch in loader:
        image_features, text_features, texts, image_ids = module.scored(batch)
        batches.append((image_features.float().cpu().numpy(), text_features.float().cpu().numpy(), texts, image_ids))
    return validation_recall(batches, k=10) if batches else 0.0


def wise_ft(module: ClipFineTuner, start: dict[str, torch.Tensor], alphas: tuple[float, ...], loader
            ) -> dict | None:
    """Score each interpolation on validation, load the best (the first of equals) into the
    model; the curve and the choice, or None when only the trained weights are asked for."""
    if tuple(alphas) == (1.0,):
        return None
    trained = {name: value.detach().clone() for name, value in module.model.state_dict().items()}
    curve = []
    for alpha in alphas:
        module.model.load_state_dict(interpolate(start, trained, alpha))
        curve.append((float(alpha), round(validation_score(module, loader), 4)))
    best = max(curve, key=lambda point: point[1])[0]
    module.model.load_state_dict(interpolate(start, trained, best))
    return {"alpha": best, "curve": curve}


def hard_negative_buddies(bundle: ClipBundle, pairs, all_pairs_path: Path, images_path: Path, root: Path,
                          cfg: TrainConfig) -> tuple[dict[int, list[int]], dict]:
    """Mine each training query's hard negatives with the starting model (see hard_negatives)."""
    import polars as pl

    everything = pl.read_parquet(all_pairs_path).filter(pl.col("clicks") > 0)
    known: dict[str, set[str]] = {}
    for query, image in zip(everything["query"], everything["image_id"], strict=True):
        known.setdefault(query, set()).add(image)
    images = pl.read_parquet(images_path)
    same = look_alikes(images["image_id"].to_list(), images["product_id"].to_list(), images["group_id"].to_list())
    image_ids = pairs["image_id"].unique().sort().to_list()
    paths = dict(zip(pairs["image_id"], pairs["path"], strict=True))
    queries = pairs["query"].unique().sort().to_list()
    started = time.perf_counter()
    negatives = mine_hard_negatives(embed_texts(bundle, queries), embed_image_files(bundle, root, [paths[i] for i in
                                    image_ids], num_workers=0), queries, image_ids, known, same,
                                    cfg.hard_negatives, cfg.hard_negative_pool)
    buddies = buddy_pairs(pairs["query"].to_list(), pairs["image_id"].to_list(), negatives)
    return buddies, {"queries": len(queries), "mined": sum(len(v) for v in negatives.values()),
                     "pairs_with_a_buddy": sum(1 for v in buddies.values() if v),
                     "seconds": round(time.perf_counter() - started, 1)}


def warm_start(bundle: ClipBundle, cfg: TrainConfig, images_path: Path, root: Path, terminal: bool) -> dict:
    """The cold-start recipe: contrastive epochs on the catalog's own (image, title) pairs of the
    train split, in place on the model, before the click epochs (which then resume from
    their own checkpoints, so a resumed run does not repeat this)."""
    pairs = title_pairs(images_path)
    if pairs.height < cfg.batch_size:
        raise StageError(f"train.warm_start: titles needs at least one batch of titled training images; "
                         f"{pairs.height} found, train.batch_size={cfg.batch_size}")
    started = time.perf_counter()
    loader = make_loader(PairDataset(pairs, root, bundle, True, cfg.seed), pairs, cfg, True, bundle.tokenizer)
    module = ClipFineTuner(bundle, cfg)
    module.samplers = [s for s in (loader.batch_sampler, loader.sampler) if hasattr(s, "shard")]
    trainer = build_trainer(cfg, False, [], max_epochs=cfg.warm_start_epochs, enable_checkpointing=False,
                            enable_progress_bar=terminal)
    trainer.fit(module, loader)
    return {"pairs": pairs.height, "epochs": cfg.warm_start_epochs, "seconds": round(time.perf_counter() - started, 1),
            "finished_without_nan": not module.saw_nan}


def build_trainer(cfg: TrainConfig, logger, callbacks: list[L.Callback], **overrides) -> L.Trainer:
    """The Lightning Trainer as train runs it (bench_train builds its trainer here too)."""
    settings = dict(
        max_epochs=cfg.epochs, accelerator=cfg.accelerator, devices=cfg.devices, num_nodes=cfg.num_nodes,
        # (grad_cache optimises manually and clips in its own step)
        gradient_clip_val=cfg.gradient_clip if cfg.negatives != "grad_cache" else None,
        strategy=cfg.strategy, use_distributed_sampler=False,  # our samplers shard themselves
        precision=cfg.precision, logger=logger, callbacks=callbacks, plugins=[AtomicCheckpointIO()],
        deterministic=True, log_every_n_steps=10, num_sanity_val_steps=0, enable_model_summary=False)
    return L.Trainer(**(settings | overrides))


def train(cfg: RunConfig, pairs_path: Path, images_path: Path, out_dir: Path, run_name: str,
          callbacks: list[L.Callback] | None = None) -> TrainResult:
    """Fine-tune from the configured starting model; resumes from `out_dir/lightning/last.ckpt`.

    `callbacks` are added to Lightning's (the fault-injection tests use one)."""
    tcfg = cfg.train
    L.seed_everything(tcfg.seed, workers=True, verbose=False)
    bundle = starting_model(tcfg)
    refuse_inexact_grad_cache(tcfg, bundle.model)  # before any data is read or negatives mined
    train_pairs = loss_weights(training_pairs(pairs_path, images_path, "train", tcfg.min_clicks), tcfg.pair_weights)
    val_pairs = training_pairs(pairs_path, images_path, "val", tcfg.min_clicks)
    if train_pairs.height < tcfg.batch_size:
        raise StageError(f"only {train_pairs.height} clicked training pairs, fewer than one batch "
                         f"(train.batch_size={tcfg.batch_size}); lower the batch size or add data")
    root = cfg.data.image_root
    start_state = {name: value.detach().clone() for name, value in bundle.model.state_dict().items()} \
        if tuple(tcfg.wise_ft_alphas) != (1.0,) else {}
    buddies, mined = (hard_negative_buddies(bundle, train_pairs, pairs_path, images_path, root, tcfg)
                      if tcfg.hard_negatives else (None, None))
    prepare_model(bundle, tcfg)
    module = ClipFineTuner(bundle, tcfg)
    logger = registry.training_logger(cfg.promote, run_name)
    ckpt_dir = out_dir / "lightning"
    best = ModelCheckpoint(dirpath=ckpt_dir, filename="best", monitor="val/recall_at_10", mode="max",
                           save_last=True, save_weights_only=False)
    # on a terminal a progress bar; in a scheduler's log, plain lines (a bar there shows nothing)
    terminal = sys.stderr.isatty()
    progress = [] if terminal else [ProgressLines(tcfg.log_every_steps, tcfg.batch_size)]
    history = EpochHistory()
    trainer = build_trainer(tcfg, logger, [best, LearningRateMonitor("step"), history, *progress, *(callbacks or [])],
                            enable_progress_bar=terminal)
    started = time.perf_counter()
    warnings: list[str] = []
    resume = resumable_checkpoint(ckpt_dir, warnings)
    if resume is None and warnings:
        warnings.append("no checkpoint loads: training starts from the beginning")
    cache = None
    if tcfg.image_cache:
        size = open_clip.get_model_preprocess_cfg(bundle.model)["size"]
        cache = ImageCache(out_dir / "image_cache", train_pairs["path"].to_list() + val_pairs["path"].to_list(),
                           root, size[0] if isinstance(size, tuple | list) else size)
    warm = warm_start(bundle, tcfg, images_path, root, terminal) if tcfg.warm_start == "titles" and resume is None \
        else None
    train_loader = make_loader(PairDataset(train_pairs, root, bundle, True, tcfg.seed, cache), train_pairs, tcfg,
                               True, bundle.tokenizer, buddies)
    module.samplers = [s for s in (train_loader.batch_sampler, train_loader.sampler) if hasattr(s, "shard")]
    val_loader = make_loader(PairDataset(val_pairs, root, bundle, False, cache=cache), val_pairs, tcfg, False,
                             bundle.tokenizer)
    trainer.fit(module, train_loader, val_loader,
                ckpt_path=str(resume) if resume else None, weights_only=True)  # never unpickles code
    seconds = time.perf_counter() - started
    steps_run, samples_per_s = module.throughput()
    if trainer.received_sigterm:  # Lightning ended the loop on SIGTERM: the stage did not finish
        raise Stopped(signal.SIGTERM)
    if trainer.global_rank > 0:
        # Lightning's DDP re-runs our command line for ranks > 0; rank 0 alone writes the results
        # and goes on to evaluate and promote
        raise SystemExit(0)

    if best.best_model_path:
        state = torch.load(best.best_model_path, map_location="cpu", weights_only=True)["state_dict"]
        module.load_state_dict(state)
    interpolation = wise_ft(module, start_state, tcfg.wise_ft_alphas, val_loader) if start_state else None
    model_dir = save_checkpoint(bundle, out_dir / "model")
    shutil.rmtree(out_dir / "image_cache", ignore_errors=True)  # it served the epochs; the run keeps the model
    summary = {
        "train_pairs": train_pairs.height, "val_pairs": val_pairs.height, "epochs": trainer.current_epoch,
        "steps": trainer.global_step, "seconds": round(seconds, 1),
        # this attempt's steps over this attempt's training time (a resumed run ran only the rest)
        "steps_this_attempt": steps_run, "fit_seconds": round(module.fit_seconds, 2),
        "samples_per_s": round(samples_per_s, 1),
        "best_val_recall@10": float(best.best_model_score) if best.best_model_score is not None else None,
        # what that score ranks: the validation queries over the images of the validation pairs only
        "validation": {"queries": val_pairs["query"].n_unique(), "gallery": val_pairs["image_id"].n_unique(),
                       "pairs": val_pairs.height},
        "finished_without_nan": not module.saw_nan, "start_weights": bundle.source,
        "mlflow_run_id": logger.run_id, "resumed_from": resume.name if resume else None, "warnings": warnings,
        "history": history.epochs, "wise_ft": interpolation, "warm_start": warm, "hard_negatives": mined,
    }
    metrics_path = out_dir / "metrics.json"
    metrics_path.write_text(json.dumps(summary, indent=2))
    return TrainResult(model_dir / "open_clip_model.safetensors", metrics_path, summary)


def run(cfg: RunConfig, inputs: StageInputs, out_dir: Path) -> StageOutput:
    result = train(cfg, inputs.output("split", "pairs"), inputs.output("split", "images"), out_dir, inputs.run_id)
    # the lineage of the model: the code that trained it (promote tags the version with it)
    summary = result.summary | {"git_commit": inputs.git_commit, "source_sha256": inputs.code_digest}
    return StageOutput({"weights": result.model_dir, "metrics": result.metrics}, summary)
