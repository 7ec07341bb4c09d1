"""Where a training step's negatives come from, one small object per `train.negatives` setting.

Each has one `step(module, batch, loss, weights) -> loss or None` (None: a non-finite loss stopped
training) and says whether it optimises by hand and keeps the batch in host memory.
"""

from __future__ import annotations

from contextlib import nullcontext

import torch

from pipeline.config import TrainConfig
from pipeline.errors import ConfigError
from pipeline.training.grad_cache import grad_cache_backward
from pipeline.training.losses import build_loss
from pipeline.training.memory_bank import MemoryBank, key_ids, memory_bank_loss
from pipeline.training.model import batchnorm_layers


class InBatchNegatives:
    """The other pairs of the batch are each pair's negatives."""

    manual_optimization = False
    batch_on_host = False

    def step(self, module, batch: list, loss, weights: torch.Tensor | None) -> torch.Tensor:
        images, _, _, _, _, tokens = batch
        image_features, text_features = module.embed(images, tokens)
        return loss(image_features, text_features, module.model.logit_scale.exp(), weights=weights)


class MemoryBankNegatives:
    """In-batch negatives plus a FIFO of recent steps' embeddings (XBM), after a warm-up; entries
    sharing a row's image, product or query are masked."""

    manual_optimization = False
    batch_on_host = False

    def __init__(self, size: int, dim: int, warmup_steps: int):
        self.bank = MemoryBank(size, dim)
        self.warmup_steps = warmup_steps

    def step(self, module, batch: list, loss, weights: torch.Tensor | None) -> torch.Tensor:
        images, texts, image_ids, product_ids, _, tokens = batch
        keys = torch.stack([key_ids(list(image_ids)), key_ids(list(product_ids)), key_ids(list(texts))],
                           dim=1).to(module.device)
        image_features, text_features = module.embed(images, tokens)
        scale = module.model.logit_scale.exp()
        if module.global_step >= self.warmup_steps:
            value = memory_bank_loss(image_features, text_features, scale, self.bank, keys, weights)
        else:
            value = loss(image_features, text_features, scale, weights=weights)
        self.bank.enqueue(image_features, text_features, keys)
        return value


class GradCacheNegatives:
    """The whole batch's loss, embedded micro-batch by micro-batch, with the gradients of one big
    batch (pipeline.training.grad_cache). It optimises by hand, one step per batch, and so clips
    in its own step; the batch stays in host memory and moves one micro-batch at a time, so device
    memory does not grow with the effective batch."""

    manual_optimization = True
    batch_on_host = True

    def __init__(self, micro_batch_size: int, gradient_clip: float | None, single_process_loss):
        self.micro_batch_size = micro_batch_size
        self.gradient_clip = gradient_clip
        # under DDP every rank computes the loss over the gathered global batch itself, so it is
        # the single-process loss, not the module's (which gathers on its own); on one process the two are alike
        self.single_process_loss = single_process_loss

    def step(self, module, batch: list, loss, weights: torch.Tensor | None) -> torch.Tensor | None:
        images, _, _, _, _, tokens = batch
        optimizer, scheduler = module.optimizers(), module.lr_schedulers()
        optimizer.zero_grad()
        world, rank = module.trainer.world_size, module.trainer.global_rank
        # DDP's reducer stays out: grad_cache_backward runs several backward passes and sums the
        # gradients across ranks once itself
        with module.trainer.strategy.block_backward_sync() if world > 1 else nullcontext():
            value = grad_cache_backward(module.model, images, tokens, self.micro_batch_size, self.single_process_loss,
                                        module.manual_backward, prepare=module.pixels, weights=weights,
                                        world_size=world, rank=rank)
        if not torch.isfinite(value):  # one wait per (large) step; the other paths check gradients only
            module.stop_on_nan()
            return None
        if self.gradient_clip:
            module.configure_gradient_clipping(optimizer, self.gradient_clip, "norm")
        optimizer.step()
        scheduler.step()
        return value


def refuse_inexact_grad_cache(cfg: TrainConfig, model: torch.nn.Module) -> None:
    """Grad cache equals one big batch only for a model whose forward pass does not depend on the
    rest of the batch: BatchNorm in train mode does (its statistics would be each micro-batch's,
    and its running statistics updated in both passes), so it is refused unless frozen."""
    layers = batchnorm_layers(model)
    if cfg.negatives == "grad_cache" and cfg.batchnorm == "train" and layers:
        shown = ", ".join(layers[:4]) + (f", ... ({len(layers)} in all)" if len(layers) > 4 else "")
        raise ConfigError(
            f"train.negatives 'grad_cache' is not exact for train.model {cfg.model!r}: it has BatchNorm layers "
            f"({shown}), whose statistics would come from each micro-batch of {cfg.micro_batch_size} instead of "
            f"the batch of {cfg.batch_size}. Set train.batchnorm: frozen (running statistics; exact), or use "
            "train.negatives 'in_batch' or 'memory_bank', or a model without BatchNorm (ClickCLIP-Tiny, ViT-B-32)")


def build_negatives(cfg: TrainConfig, embed_dim: int, model: torch.nn.Module):
    refuse_inexact_grad_cache(cfg, model)
    if cfg.negatives == "grad_cache":
        return GradCacheNegatives(cfg.micro_batch_size, cfg.gradient_clip, build_loss(cfg, model))
    if cfg.negatives == "memory_bank":
        return MemoryBankNegatives(cfg.memory_bank_size, embed_dim, cfg.memory_bank_warmup_steps)
    return InBatchNegatives()
