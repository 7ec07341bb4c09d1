"""Contrastive losses: open_clip's ClipLoss with pair weights and a blockwise path for huge
batches, and open_clip's SigLipLoss with the model's learned logit bias; `build_loss` picks one.

Every loss is called as loss(image_features, text_features, logit_scale, weights=None) with
L2-normalised (B, D) features and the learned scale exp(t).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from open_clip.loss import ClipLoss, SigLipLoss
from torch.utils.checkpoint import checkpoint

from pipeline.config import TrainConfig

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
        if self.world_size > 1:  # weights are normalised over every rank's batch, as the negatives are
            gathered = [torch.zeros_like(w) for _ in range(self.world_size)]
            torch.distributed.all_gather(gathered, w)
            everyone = torch.cat(gathered)
            w = (w if self.local_loss else everyone) / everyone.mean()  # local loss: this rank's rows
        else:
            w = w / w.mean()
        loss = ((F.cross_entropy(logits_per_image, labels, reduction="none") * w).mean()
                + (F.cross_entropy(logits_per_text, labels, reduction="none") * w).mean()) / 2
        return {"contrastive_loss": loss} if output_dict else loss


class BiasedSigLipLoss:
    """open_clip's SigLipLoss with the model's learned logit bias, read at each call (the bias is a
    parameter of the model). Pair weights are refused with SigLIP in config, so `weights` is unused.

    A plain callable, not a module: the model's parameters must not appear twice in the checkpoint."""

    def __init__(self, model: torch.nn.Module, rank: int = 0, world_size: int = 1):
        self.model = model
        self.siglip = SigLipLoss(rank=rank, world_size=world_size) if world_size > 1 else SigLipLoss()

    def __call__(self, image_features, text_features, logit_scale, weights: torch.Tensor | None = None):
        return self.siglip(image_features, text_features, logit_scale, self.model.logit_bias)


def build_loss(cfg: TrainConfig, model: torch.nn.Module, rank: int = 0, world_size: int = 1):
    """The configured loss. Under DDP (world_size > 1) each rank gathers every rank's embeddings
    with their gradients and computes the rows of its own pairs only (open_clip's local_loss: a
    local x global logit matrix, world_size times smaller than the full one); DDP's gradient
    averaging then gives exactly the single-process full-batch gradient, and the mean of the
    ranks' losses is the full batch's loss (tests/test_ddp.py)."""
    if cfg.loss == "siglip":
        return BiasedSigLipLoss(model, rank, world_size)
    if world_size > 1:
        return WeightedClipLoss(local_loss=True, gather_with_grad=True, rank=rank, world_size=world_size)
    return WeightedClipLoss()
