"""The Lightning module: it wires a model, a loss, a negatives strategy and the optimiser policy
together, guards against non-finite gradients, and scores validation recall@10 each epoch."""

from __future__ import annotations

import math
import time

import lightning as L
import numpy as np
import torch

from pipeline.config import TrainConfig
from pipeline.retrieval.metrics import mean_metrics, per_query_metrics, rank_by_similarity
from pipeline.training.losses import build_loss
from pipeline.training.model import ClipBundle, encode_text, freeze_batchnorm, split_transform
from pipeline.training.negatives import MemoryBankNegatives, build_negatives
from pipeline.training.optim import build_optimizer, clip_gradients

MAX_LOGIT_SCALE = math.log(100)  # open_clip's clamp


class ClipFineTuner(L.LightningModule):
    """Fine-tunes an open_clip model with a contrastive loss over the configured negatives."""

    def __init__(self, bundle: ClipBundle, cfg: TrainConfig):
        super().__init__()
        self.model = bundle.model
        self.cfg = cfg
        self.loss = build_loss(cfg, bundle.model)
        self.negatives = build_negatives(cfg, bundle.model_cfg["embed_dim"], bundle.model)
        if isinstance(self.negatives, MemoryBankNegatives):
            self.bank = self.negatives.bank  # a submodule, so the checkpoint keeps the memory
        self.automatic_optimization = not self.negatives.manual_optimization
        self.normalize = split_transform(bundle.preprocess_eval)[1]
        self.saw_nan = False
        # this attempt's training (a rerun that resumes with no epoch left runs none: fit_seconds stays 0)
        self.first_step, self.fit_started, self.fit_seconds = 0, time.perf_counter(), 0.0
        self.samplers: list = []  # the training samplers, sharded across ranks in setup()
        self._val: list[tuple[np.ndarray, np.ndarray, list[str], list[str]]] = []

    def training_mode(self) -> None:
        """The model in train mode for the epochs, frozen BatchNorm (train.batchnorm) in eval mode.
        Lightning does not call train() at fit start (it warns about eval-mode modules) and, after
        validation, gives each submodule back the mode it had, so setting it at every epoch's
        start keeps it for the whole epoch (hard-negative mining leaves the model in eval mode)."""
        self.model.train()
        if self.cfg.batchnorm == "frozen":
            freeze_batchnorm(self.model)

    def on_train_epoch_start(self) -> None:
        self.training_mode()

    def pixels(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 images from the loader, on the device, as the model's normalised float input."""
        images = self.normalize(images.to(self.device, non_blocking=True))
        return images.contiguous(memory_format=torch.channels_last) if self.cfg.channels_last else images

    def embed(self, images: torch.Tensor, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.model.encode_image(self.pixels(images), normalize=True), encode_text(self.model, tokens)

    def stop_on_nan(self) -> None:
        """A non-finite loss or gradient ends training; the promotion gate `no_nan` then fails."""
        self.saw_nan = True
        self.trainer.should_stop = True

    def training_step(self, batch, batch_idx):
        texts, weights = batch[1], batch[4]
        loss = self.negatives.step(self, batch, self.loss, weights if self.cfg.pair_weights != "none" else None)
        if loss is None:
            return None
        # a non-finite loss is caught by the gradient check before the optimiser step: testing it
        # here would make the host wait for the forward pass on every step
        # under DDP each rank's loss covers its own rows (local loss): the logged value is their mean
        self.log("train/loss", loss, prog_bar=True, batch_size=len(texts), sync_dist=self.trainer.world_size > 1)
        self.log("train/logit_scale", self.model.logit_scale.exp(), batch_size=len(texts))
        return loss

    def setup(self, stage: str) -> None:
        """Under DDP, every rank's loss spans all ranks' embeddings (see build_loss); each rank
        reads its own share of every epoch's batches."""
        world, rank = self.trainer.world_size, self.trainer.global_rank
        if world > 1:
            self.loss = build_loss(self.cfg, self.model, rank, world)
        for sampler in self.samplers:
            sampler.shard(rank, world)

    def transfer_batch_to_device(self, batch, device, dataloader_idx):
        images, texts, image_ids, product_ids, weights, tokens = batch
        if not (self.negatives.batch_on_host and self.trainer.training):
            images = images.to(device, non_blocking=True)
        # tokens stay in host memory: encode_text trims them there, without waiting on the device
        return [images, texts, image_ids, product_ids, weights.to(device, non_blocking=True), tokens]

    def configure_gradient_clipping(self, optimizer, gradient_clip_val=None, gradient_clip_algorithm=None) -> None:
        clip_gradients(optimizer, gradient_clip_val)

    def on_train_start(self) -> None:
        # throughput counts this attempt's steps over this attempt's time (a resumed run starts
        # at the checkpoint's step)
        self.first_step, self.fit_started = self.trainer.global_step, time.perf_counter()
        # a resumed run continues the samplers' epoch sequence where the checkpoint left it
        loader = self.trainer.train_dataloader
        for sampler in (getattr(loader, "batch_sampler", None), getattr(loader, "sampler", None)):
            if hasattr(sampler, "start_at_epoch"):
                sampler.start_at_epoch(self.current_epoch)

    def on_train_end(self) -> None:
        self.fit_seconds = time.perf_counter() - self.fit_started

    def throughput(self) -> tuple[int, float]:
        """(steps this attempt ran, their samples per second across all ranks)."""
        if self.fit_seconds <= 0:  # on_train_end never ran: no epoch was trained
            return 0, 0.0
        steps = self.trainer.global_step - self.first_step
        return steps, steps * self.cfg.batch_size * self.trainer.world_size / self.fit_seconds

    def on_before_optimizer_step(self, optimizer) -> None:
        """A non-finite gradient stops training before it reaches the weights: the checkpoints keep
        the last good state, and the promotion gate `no_nan` fails."""
        grads = [p.grad for p in self.model.parameters() if p.grad is not None]
        # one fused norm over all gradients and one wait for the device, not one per tensor
        if grads and not torch.isfinite(torch.stack(torch._foreach_norm(grads))).all():
            self.stop_on_nan()
            optimizer.zero_grad(set_to_none=True)  # parameters without gradients are left as they are

    def on_train_batch_end(self, outputs, batch, batch_idx) -> None:
        with torch.no_grad():
            self.model.logit_scale.clamp_(0, MAX_LOGIT_SCALE)

    def scored(self, batch) -> tuple:
        """A validation batch embedded: (image features, text features, texts, image ids), as
        validation_recall takes them (the epochs' score, and WiSE-FT's in pipeline.stages.train)."""
        images, texts, image_ids, _, _, tokens = batch
        image_features, text_features = self.embed(images, tokens)
        return image_features, text_features, list(texts), list(image_ids)

    def validation_step(self, batch, batch_idx):
        image_features, text_features, texts, image_ids = self.scored(batch)
        loss = self.loss(image_features, text_features, self.model.logit_scale.exp())
        self.log("val/loss", loss, batch_size=len(texts), sync_dist=self.trainer.world_size > 1)
        self._val.append((image_features.float().cpu().numpy(), text_features.float().cpu().numpy(), texts, image_ids))

    def on_validation_epoch_end(self) -> None:
        if not self._val:
            return
        recall = validation_recall(self._val, k=10)
        self._val.clear()
        # every rank scores the whole validation set, so the ranks agree; sync_dist keeps Lightning sure
        self.log("val/recall_at_10", recall, prog_bar=True, sync_dist=self.trainer.world_size > 1)

    def configure_optimizers(self):
        return build_optimizer(self.model, self.cfg, self.trainer.estimated_stepping_batches)


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
