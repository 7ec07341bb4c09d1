"""The optimiser and precision policy: AdamW with decay-exempt groups, linear warm-up then cosine
decay per step, fused kernels where they are safe, and gradient clipping that works with them."""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

from pipeline.config import TrainConfig


def parameter_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """Two AdamW groups: weight decay on weight matrices only. Exempt: what open_clip's training
    exempts (parameters under 2 dims, biases, norms, the temperature) and also the token and
    positional embeddings, which open_clip decays: a fine-tune on a shop's few thousand queries
    would shrink the rows of every token it never sees towards zero."""
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        exempt = param.ndim < 2 or "bias" in name or "ln" in name or "logit_scale" in name or "embedding" in name
        (no_decay if exempt else decay).append(param)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def warmup_cosine(warmup: int, total: int) -> Callable[[int], float]:
    """Learning-rate factor per step: linear warm-up over `warmup` steps, then cosine to 0 at `total`."""
    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = (step - warmup) / max(1, total - warmup)
        return 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))

    return factor


def build_optimizer(model: torch.nn.Module, cfg: TrainConfig, total_steps: int) -> dict:
    """Lightning's optimizer config: AdamW and a per-step warm-up + cosine schedule."""
    groups = parameter_groups(model, cfg.weight_decay)
    params = [p for group in groups for p in group["params"]]
    # the fused kernel is one launch for all parameters instead of several per tensor (CUDA); no
    # loss scaler runs (config refuses 16-mixed), so nothing needs to unscale before clipping
    fused = all(p.is_cuda for p in params)
    optimizer = torch.optim.AdamW(groups, lr=cfg.learning_rate, fused=fused or None)
    total = max(1, int(total_steps))
    schedule = warmup_cosine(min(cfg.warmup_steps, total - 1), total)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
    return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}


def clip_gradients(optimizer: torch.optim.Optimizer, max_norm: float | None) -> None:
    """Clip by norm, directly: with no loss scaler (32-true, bf16-mixed) nothing needs unscaling, and
    this also works with the fused AdamW (Lightning's own clipping refuses fused optimizers)."""
    if max_norm:
        params = [p for group in optimizer.param_groups for p in group["params"]]
        torch.nn.utils.clip_grad_norm_(params, max_norm)
