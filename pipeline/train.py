"""Train: fine-tune an open_clip model on clicked (query, image) pairs with Lightning.

Reads split's `pairs.parquet`; writes `runs/<id>/train/model/` (safetensors checkpoint of the
best epoch by validation recall@10), Lightning checkpoints for resuming, and `metrics.json`.
"""

from __future__ import annotations

import json
import math
import shutil
import time
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import lightning as L
import numpy as np
import open_clip
import polars as pl
import torch
import torch.nn.functional as F
from lightning.pytorch.callbacks import LearningRateMonitor, ModelCheckpoint
from lightning.pytorch.loggers import MLFlowLogger
from open_clip.loss import ClipLoss, SigLipLoss
from torch.utils.checkpoint import checkpoint
from torch.utils.data import DataLoader, Dataset, default_collate

from pipeline.batching import EpochShuffleSampler, UniqueBatchSampler
from pipeline.config import RunConfig, TrainConfig
from pipeline.errors import StageError
from pipeline.grad_cache import grad_cache_backward
from pipeline.image_cache import ImageCache
from pipeline.images import load_rgb, resolve_image_path
from pipeline.memory_bank import MemoryBank, key_ids, memory_bank_loss
from pipeline.metrics import mean_metrics, per_query_metrics, rank_by_similarity
from pipeline.model import ClipBundle, encode_text, save_checkpoint, split_transform, starting_model
from pipeline.tracking import ensure_experiment, tracking_uri

MAX_LOGIT_SCALE = math.log(100)  # open_clip's clamp


@dataclass(frozen=True)
class TrainResult:
    model_dir: Path
    metrics: Path
    summary: dict


class PairDataset(Dataset):
    """(uint8 image tensor, query text, image_id, product_id or "", pair weight) for each clicked pair.

    Images leave the dataset as uint8 CHW; ClipFineTuner normalises them on the device."""

    def __init__(self, pairs: pl.DataFrame, root: Path, bundle: ClipBundle, train: bool, seed: int = 0,
                 cache: ImageCache | None = None):
        self.queries = pairs["query"].to_list()
        self.image_ids = pairs["image_id"].to_list()
        self.product_ids = [p or "" for p in pairs["product_id"].to_list()]
        self.paths = pairs["path"].to_list()
        self.weights = pairs["weight"].cast(pl.Float32).to_list()
        self.root = root
        self.cache = cache
        self.train = train
        self.seed = seed
        self.transform = split_transform(bundle.preprocess_train if train else bundle.preprocess_eval)[0]

    def __len__(self) -> int:
        return len(self.queries)

    def __getitem__(self, key: int | tuple[int, int]) -> tuple[torch.Tensor, str, str, str, float]:
        """`key` is an index, or (index, epoch) from the training samplers."""
        index, epoch = key if isinstance(key, tuple) else (key, 0)
        path = self.paths[index]
        image = self.cache.get(path) if self.cache else load_rgb(resolve_image_path(self.root, path))
        if self.train:
            # the random crop depends on (seed, epoch, index) only: resumable and worker-independent
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(int(np.random.SeedSequence([self.seed, epoch, index]).generate_state(1)[0]))
                tensor = self.transform(image)
        else:
            tensor = self.transform(image)
        return (tensor, self.queries[index], self.image_ids[index], self.product_ids[index],
                self.weights[index])


class TokenizingCollate:
    """Collate PairDataset items into [images, texts, image_ids, product_ids, weights, tokens].

    The queries are tokenised here, in the loader's worker processes: open_clip's tokenizer takes
    about 40 ms of Python per 1,024 queries, time the training process would leave the GPU idle."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer

    def __call__(self, items: list) -> list:
        images, texts, image_ids, product_ids, weights = default_collate(items)
        return [images, list(texts), list(image_ids), list(product_ids), weights, self.tokenizer(list(texts))]


LOSS_BLOCK = 8192  # rows of logits per block once a (single-process) batch is larger than this


def _rows_cross_entropy(queries: torch.Tensor, keys: torch.Tensor, logit_scale: torch.Tensor, start: int,
                        weights: torch.Tensor | None) -> torch.Tensor:
    """Summed cross-entropy of rows start.. of the logits `logit_scale * queries @ keys.T`, whose
    positives lie on the diagonal of the full matrix."""
    logits = logit_scale * queries @ keys.T
    labels = torch.arange(start, start + len(queries), device=logits.device)
    loss = F.cross_entropy(logits, labels, reduction="none")
    return (loss * weights).sum() if weights is not None else loss.sum()


class WeightedClipLoss(ClipLoss):
    """open_clip's ClipLoss, with optional per-pair weights on each pair's two cross-entropy terms.

    Weights are normalised to mean 1 within the batch, so uniform weights give exactly ClipLoss.
    Above `block` pairs (one process) the loss is computed in row blocks of both logit matrices,
    each recomputed in the backward pass (activation checkpointing): every row's cross-entropy is
    self-contained, so this is the same loss, while memory grows as block x batch instead of
    batch² (a 65,536-pair grad-cache batch would need 2 x 16 GiB of float32 logits at once).
    Written here because open_clip's ClipLoss always builds both full matrices."""

    def __init__(self, *args, block: int = LOSS_BLOCK, **kwargs):
        super().__init__(*args, **kwargs)
        self.block = block

    def _blockwise(self, image_features, text_features, logit_scale, weights):
        n = image_features.shape[0]
        w = None
        if weights is not None:
            w = weights.to(device=image_features.device, dtype=torch.float32)
            w = w / w.mean()
        total = image_features.new_zeros((), dtype=torch.float32)
        for start in range(0, n, self.block):
            stop = min(start + self.block, n)
            part = None if w is None else w[start:stop]
            for queries, keys in ((image_features, text_features), (text_features, image_features)):
                total = total + checkpoint(_rows_cross_entropy, queries[start:stop], keys, logit_scale, start, part,
                                           use_reentrant=False)
        return total / (2 * n)

    def forward(self, image_features, text_features, logit_scale, weights: torch.Tensor | None = None,
                output_dict: bool = False):
        if self.world_size == 1 and image_features.shape[0] > self.block:
            loss = self._blockwise(image_features, text_features, logit_scale, weights)
            return {"contrastive_loss": loss} if output_dict else loss
        if weights is None:
            return super().forward(image_features, text_features, logit_scale, output_dict=output_dict)
        logits_per_image, logits_per_text = self.get_logits(image_features, text_features, logit_scale)
        labels = self.get_ground_truth(image_features.device, logits_per_image.shape[0])
        w = weights.to(device=logits_per_image.device, dtype=logits_per_image.dtype)
        if self.world_size > 1:  # the logits span every rank's batch: so must the weights
            gathered = [torch.zeros_like(w) for _ in range(self.world_size)]
            torch.distributed.all_gather(gathered, w)
            w = torch.cat(gathered)
        w = w / w.mean()
        loss = ((F.cross_entropy(logits_per_image, labels, reduction="none") * w).mean()
                + (F.cross_entropy(logits_per_text, labels, reduction="none") * w).mean()) / 2
        return {"contrastive_loss": loss} if output_dict else loss


class ClipFineTuner(L.LightningModule):
    """The symmetric contrastive loss of open_clip over in-batch negatives."""

    def __init__(self, bundle: ClipBundle, cfg: TrainConfig):
        super().__init__()
        self.model = bundle.model
        self.cfg = cfg
        if cfg.loss == "siglip":
            siglip = SigLipLoss()
            self.loss = lambda image, text, scale, weights=None: siglip(image, text, scale, self.model.logit_bias)
        else:
            self.loss = WeightedClipLoss()
        self.normalize = split_transform(bundle.preprocess_eval)[1]
        self.saw_nan = False
        self.samplers: list = []  # the training samplers, sharded across ranks in setup()
        self.automatic_optimization = cfg.negatives != "grad_cache"
        if cfg.negatives == "memory_bank":
            self.bank = MemoryBank(cfg.memory_bank_size, bundle.model_cfg["embed_dim"])
        self._val: list[tuple[np.ndarray, np.ndarray, list[str], list[str]]] = []

    def _pixels(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 images from the loader, on the device, as the model's normalised float input."""
        images = self.normalize(images.to(self.device, non_blocking=True))
        return images.contiguous(memory_format=torch.channels_last) if self.cfg.channels_last else images

    def _embed(self, images: torch.Tensor, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.model.encode_image(self._pixels(images), normalize=True), encode_text(self.model, tokens)

    def training_step(self, batch, batch_idx):
        images, texts, image_ids, product_ids, weights, tokens = batch
        weights = weights if self.cfg.pair_weights == "extract" else None
        loss_fn = partial(self.loss, weights=weights)
        if self.cfg.negatives == "grad_cache":
            loss = self._grad_cache_step(images, tokens, loss_fn)
            if not torch.isfinite(loss):  # one wait per (large) step; the other paths check gradients only
                self.saw_nan = True
                self.trainer.should_stop = True
                return None
        elif self.cfg.negatives == "memory_bank":
            keys = torch.stack([key_ids(list(image_ids)), key_ids(list(product_ids)), key_ids(list(texts))],
                               dim=1).to(self.device)
            image_features, text_features = self._embed(images, tokens)
            if self.global_step >= self.cfg.memory_bank_warmup_steps:
                loss = memory_bank_loss(image_features, text_features, self.model.logit_scale.exp(), self.bank,
                                        keys, weights)
            else:
                loss = loss_fn(image_features, text_features, self.model.logit_scale.exp())
            self.bank.enqueue(image_features, text_features, keys)
        else:
            image_features, text_features = self._embed(images, tokens)
            loss = loss_fn(image_features, text_features, self.model.logit_scale.exp())
        # a non-finite loss is caught by the gradient check before the optimiser step: testing it
        # here would make the host wait for the forward pass on every step
        self.log("train/loss", loss, prog_bar=True, batch_size=len(texts))
        self.log("train/logit_scale", self.model.logit_scale.exp(), batch_size=len(texts))
        return loss

    def _grad_cache_step(self, images: torch.Tensor, tokens: torch.Tensor, loss_fn) -> torch.Tensor:
        """One optimiser step over the whole batch, embedded micro-batch by micro-batch."""
        optimizer, scheduler = self.optimizers(), self.lr_schedulers()
        optimizer.zero_grad()
        loss = grad_cache_backward(self.model, images, tokens, self.cfg.micro_batch_size, loss_fn,
                                   self.manual_backward, prepare=self._pixels)
        if not torch.isfinite(loss):
            return loss
        if self.cfg.gradient_clip:
            self.configure_gradient_clipping(optimizer, self.cfg.gradient_clip, "norm")
        optimizer.step()
        scheduler.step()
        return loss

    def setup(self, stage: str) -> None:
        """Under DDP, every rank computes the loss over all ranks' embeddings (gathered with their
        gradients); DDP's gradient averaging then gives exactly the single-process full-batch
        gradient (tests/test_ddp.py). Each rank reads its own share of every epoch's batches."""
        world, rank = self.trainer.world_size, self.trainer.global_rank
        if world > 1:
            if self.cfg.loss == "siglip":
                siglip = SigLipLoss(rank=rank, world_size=world)
                self.loss = lambda image, text, scale, weights=None: siglip(image, text, scale, self.model.logit_bias)
            else:
                self.loss = WeightedClipLoss(gather_with_grad=True, rank=rank, world_size=world)
        for sampler in self.samplers:
            sampler.shard(rank, world)

    def transfer_batch_to_device(self, batch, device, dataloader_idx):
        images, texts, image_ids, product_ids, weights, tokens = batch
        if not (self.cfg.negatives == "grad_cache" and self.trainer.training):
            # under grad_cache the whole batch stays in host memory: grad_cache moves one micro-batch
            # at a time, so device memory does not grow with the effective batch
            images = images.to(device, non_blocking=True)
        # tokens stay in host memory: encode_text trims them there, without waiting on the device
        return [images, texts, image_ids, product_ids, weights.to(device, non_blocking=True), tokens]

    def configure_gradient_clipping(self, optimizer, gradient_clip_val=None, gradient_clip_algorithm=None) -> None:
        """Clip by norm. Without a loss scaler (32-true, bf16-mixed) the gradients are clipped directly,
        which also works with the fused AdamW (Lightning's own clipping refuses fused optimizers);
        16-mixed uses an unfused AdamW and Lightning's clipping, which unscales first."""
        if not gradient_clip_val:
            return
        if self.cfg.precision == "16-mixed":
            self.clip_gradients(optimizer, gradient_clip_val, gradient_clip_algorithm or "norm")
        else:
            params = [p for group in optimizer.param_groups for p in group["params"]]
            torch.nn.utils.clip_grad_norm_(params, gradient_clip_val)

    def on_train_start(self) -> None:
        # a resumed run continues the samplers' epoch sequence where the checkpoint left it
        loader = self.trainer.train_dataloader
        for sampler in (getattr(loader, "batch_sampler", None), getattr(loader, "sampler", None)):
            if hasattr(sampler, "start_at_epoch"):
                sampler.start_at_epoch(self.current_epoch)

    def on_before_optimizer_step(self, optimizer) -> None:
        """A non-finite gradient stops training before it reaches the weights: the checkpoints keep
        the last good state, and the promotion gate `no_nan` fails."""
        grads = [p.grad for p in self.model.parameters() if p.grad is not None]
        # one fused norm over all gradients and one wait for the device, not one per tensor
        if grads and not torch.isfinite(torch.stack(torch._foreach_norm(grads))).all():
            self.saw_nan = True
            self.trainer.should_stop = True
            optimizer.zero_grad(set_to_none=True)  # parameters without gradients are left as they are

    def on_train_batch_end(self, outputs, batch, batch_idx) -> None:
        with torch.no_grad():
            self.model.logit_scale.clamp_(0, MAX_LOGIT_SCALE)

    def validation_step(self, batch, batch_idx):
        images, texts, image_ids, _, _, tokens = batch
        image_features, text_features = self._embed(images, tokens)
        loss = self.loss(image_features, text_features, self.model.logit_scale.exp())
        self.log("val/loss", loss, batch_size=len(texts), sync_dist=self.trainer.world_size > 1)
        self._val.append((image_features.float().cpu().numpy(), text_features.float().cpu().numpy(),
                          list(texts), list(image_ids)))

    def on_validation_epoch_end(self) -> None:
        if not self._val:
            return
        recall = validation_recall(self._val, k=10)
        self._val.clear()
        # every rank scores the whole validation set, so the ranks agree; sync_dist keeps Lightning sure
        self.log("val/recall_at_10", recall, prog_bar=True, sync_dist=self.trainer.world_size > 1)

    def configure_optimizers(self):
        # open_clip's rule: no weight decay on gains, biases, norms, embeddings and the temperature
        decay, no_decay = [], []
        for name, param in self.model.named_parameters():
            if not param.requires_grad:
                continue
            exempt = param.ndim < 2 or "bias" in name or "ln" in name or "logit_scale" in name \
                or "embedding" in name
            (no_decay if exempt else decay).append(param)
        # the fused kernel is one launch for all parameters instead of several per tensor (CUDA)
        # (not under 16-mixed: its loss scaler must unscale before clipping, which fused steps refuse)
        fused = all(p.is_cuda for p in decay + no_decay) and self.cfg.precision != "16-mixed"
        optimizer = torch.optim.AdamW(
            [{"params": decay, "weight_decay": self.cfg.weight_decay},
             {"params": no_decay, "weight_decay": 0.0}], lr=self.cfg.learning_rate, fused=fused or None)
        total = max(1, int(self.trainer.estimated_stepping_batches))
        warmup = min(self.cfg.warmup_steps, total - 1)

        def schedule(step: int) -> float:
            if step < warmup:
                return (step + 1) / warmup
            progress = (step - warmup) / max(1, total - warmup)
            return 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))

        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}


def lock_towers(model: torch.nn.Module, cfg: TrainConfig) -> None:
    """Freeze towers as configured, with open_clip's own LiT locking."""
    if cfg.lock_image:
        model.lock_image_tower(unlocked_groups=cfg.lock_image_unlocked_groups)
    if cfg.lock_text:
        model.lock_text_tower(unlocked_layers=cfg.lock_text_unlocked_layers)


def validation_recall(batches, k: int) -> float:
    """recall@k of text->image retrieval among the validation images."""
    image_emb = np.concatenate([b[0] for b in batches])
    text_emb = np.concatenate([b[1] for b in batches])
    queries = [q for b in batches for q in b[2]]
    image_ids = [i for b in batches for i in b[3]]
    first_image = {iid: n for n, iid in reversed(list(enumerate(image_ids)))}
    first_query = {q: n for n, q in reversed(list(enumerate(queries)))}
    gallery_ids = list(first_image)
    gallery = image_emb[[first_image[i] for i in gallery_ids]]
    relevant: dict[str, set[str]] = {}
    for q, iid in zip(queries, image_ids, strict=True):
        relevant.setdefault(q, set()).add(iid)
    query_list = list(relevant)
    ranked = rank_by_similarity(text_emb[[first_query[q] for q in query_list]], gallery, gallery_ids, k)
    per_query = per_query_metrics(ranked, [relevant[q] for q in query_list], [k])
    return mean_metrics(per_query)[f"recall@{k}"]


def training_pairs(pairs_path: Path, images_path: Path, split: str, min_clicks: int) -> pl.DataFrame:
    images = pl.read_parquet(images_path).select("image_id", "path")
    # held-out queries are never trained on: evaluation measures them as unseen queries
    pairs = pl.read_parquet(pairs_path).filter((pl.col("split") == split) & (pl.col("clicks") >= min_clicks)
                                               & (pl.col("clicks") > 0) & ~pl.col("query_heldout"))
    return pairs.join(images, on="image_id").sort("query", "image_id")


def _loader(dataset: PairDataset, pairs: pl.DataFrame, cfg: TrainConfig, train: bool, tokenizer) -> DataLoader:
    workers = {"num_workers": cfg.num_workers, "persistent_workers": cfg.num_workers > 0,
               "pin_memory": torch.cuda.is_available(), "collate_fn": TokenizingCollate(tokenizer)}
    if train and cfg.unique_batches:
        sampler = UniqueBatchSampler(pairs["query"].to_list(), pairs["image_id"].to_list(),
                                     pairs["product_id"].to_list(), cfg.batch_size, cfg.seed)
        return DataLoader(dataset, batch_sampler=sampler, **workers)
    if train:
        return DataLoader(dataset, batch_size=cfg.batch_size, sampler=EpochShuffleSampler(len(dataset), cfg.seed),
                          drop_last=True, **workers)
    return DataLoader(dataset, batch_size=cfg.batch_size, shuffle=False, **workers)


def train(cfg: RunConfig, pairs_path: Path, images_path: Path, out_dir: Path, run_name: str,
          callbacks: list[L.Callback] | None = None) -> TrainResult:
    """Fine-tune from the configured starting model; resumes from `out_dir/lightning/last.ckpt`.

    `callbacks` are added to Lightning's (the fault-injection tests use one)."""
    tcfg = cfg.train
    L.seed_everything(tcfg.seed, workers=True, verbose=False)
    bundle = starting_model(tcfg)
    train_pairs = training_pairs(pairs_path, images_path, "train", tcfg.min_clicks)
    val_pairs = training_pairs(pairs_path, images_path, "val", tcfg.min_clicks)
    if train_pairs.height < tcfg.batch_size:
        raise StageError(f"only {train_pairs.height} clicked training pairs, fewer than one batch "
                         f"(train.batch_size={tcfg.batch_size}); lower the batch size or add data")
    root = cfg.data.image_root
    lock_towers(bundle.model, tcfg)
    if tcfg.channels_last:
        bundle.model.visual.to(memory_format=torch.channels_last)
    if tcfg.compile:
        # in place, so parameter names (and the safetensors checkpoint) are unchanged
        bundle.model.visual.compile()
        bundle.model.transformer.compile()
    module = ClipFineTuner(bundle, tcfg)
    uri = tracking_uri(cfg.promote)
    ensure_experiment(cfg.promote.experiment, uri)
    logger = MLFlowLogger(experiment_name=cfg.promote.experiment, run_name=run_name, tracking_uri=uri,
                          tags={"clickclip.run_id": run_name})
    ckpt_dir = out_dir / "lightning"
    best = ModelCheckpoint(dirpath=ckpt_dir, filename="best", monitor="val/recall_at_10", mode="max",
                           save_last=True, save_weights_only=False)
    trainer = L.Trainer(
        max_epochs=tcfg.epochs, accelerator=tcfg.accelerator, devices=tcfg.devices,
        # (grad_cache optimises manually and clips in _grad_cache_step)
        gradient_clip_val=tcfg.gradient_clip if tcfg.negatives != "grad_cache" else None,
        strategy=tcfg.strategy, use_distributed_sampler=False,  # our samplers shard themselves
        precision=tcfg.precision, logger=logger, callbacks=[best, LearningRateMonitor("step"), *(callbacks or [])],
        deterministic=True, log_every_n_steps=10, num_sanity_val_steps=0, enable_model_summary=False)
    started = time.perf_counter()
    resume = "last" if (ckpt_dir / "last.ckpt").is_file() else None
    cache = None
    if tcfg.image_cache:
        size = open_clip.get_model_preprocess_cfg(bundle.model)["size"]
        cache = ImageCache(out_dir / "image_cache", train_pairs["path"].to_list() + val_pairs["path"].to_list(),
                           root, size[0] if isinstance(size, tuple | list) else size)
    train_loader = _loader(PairDataset(train_pairs, root, bundle, True, tcfg.seed, cache), train_pairs, tcfg, True,
                           bundle.tokenizer)
    module.samplers = [s for s in (train_loader.batch_sampler, train_loader.sampler) if hasattr(s, "shard")]
    trainer.fit(module, train_loader,
                _loader(PairDataset(val_pairs, root, bundle, False, cache=cache), val_pairs, tcfg, False,
                        bundle.tokenizer),
                ckpt_path=resume, weights_only=True)  # resuming never unpickles arbitrary objects
    seconds = time.perf_counter() - started
    if trainer.global_rank > 0:
        # Lightning's DDP re-runs our command line for ranks > 0; rank 0 alone writes the results
        # and goes on to evaluate and promote
        raise SystemExit(0)

    if best.best_model_path:
        state = torch.load(best.best_model_path, map_location="cpu", weights_only=True)["state_dict"]
        module.load_state_dict(state)
    model_dir = save_checkpoint(bundle, out_dir / "model")
    shutil.rmtree(out_dir / "image_cache", ignore_errors=True)  # it served the epochs; the run keeps the model
    summary = {
        "train_pairs": train_pairs.height, "val_pairs": val_pairs.height, "epochs": trainer.current_epoch,
        "steps": trainer.global_step, "seconds": round(seconds, 1),
        "samples_per_s": round(trainer.global_step * tcfg.batch_size * trainer.world_size / max(seconds, 1e-9), 1),
        "best_val_recall@10": float(best.best_model_score) if best.best_model_score is not None else None,
        "finished_without_nan": not module.saw_nan, "start_weights": bundle.source,
        "mlflow_run_id": logger.run_id,
    }
    metrics_path = out_dir / "metrics.json"
    metrics_path.write_text(json.dumps(summary, indent=2))
    return TrainResult(model_dir / "open_clip_model.safetensors", metrics_path, summary)
