"""Gradient caching: the contrastive loss over a batch larger than fits in memory, exactly.

Plain gradient accumulation adds no negatives to a contrastive loss: each micro-batch only sees
its own. Gradient caching (Gao et al. 2021; open_clip's `accum_freq`) embeds every micro-batch
without a graph, computes the loss over the whole batch against detached embeddings, then re-runs
each micro-batch with a graph and back-propagates the cached embedding gradients through it. The
parameter gradients equal those of one big batch, while activations are held for one micro-batch
at a time. Written by hand because neither open_clip nor Lightning exposes it as a component.

The model must be deterministic between the two passes (no dropout; open_clip's towers have none
by default).
"""

from __future__ import annotations

from collections.abc import Callable

import torch


def _embed(model: torch.nn.Module, images: torch.Tensor, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    from pipeline.training.model import encode_text

    return model.encode_image(images, normalize=True), encode_text(model, tokens)


def grad_cache_backward(model: torch.nn.Module, images: torch.Tensor, tokens: torch.Tensor, micro_batch: int,
                        loss_fn: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor],
                        backward: Callable[[torch.Tensor], None] = torch.Tensor.backward,
                        prepare: Callable[[torch.Tensor], torch.Tensor] | None = None) -> torch.Tensor:
    """Accumulate into `.grad` the gradients of loss_fn over the full batch; return the loss.

    images: (B, 3, H, W); tokens: (B, L), best in host memory (see encode_text);
    loss_fn(image_features, text_features, logit_scale);
    prepare: moves one micro-batch of images to the device as model input (default: `.to(device)`)."""
    device = model.logit_scale.device
    prepare = prepare or (lambda chunk: chunk.to(device, non_blocking=True))
    chunks = list(zip(images.split(micro_batch), tokens.split(micro_batch), strict=True))
    with torch.no_grad():  # `images` may sit in host memory: each micro-batch moves to the device on use
        features = [_embed(model, prepare(i), t) for i, t in chunks]
    image_all = torch.cat([f[0] for f in features]).detach().requires_grad_()
    text_all = torch.cat([f[1] for f in features]).detach().requires_grad_()
    loss = loss_fn(image_all, text_all, model.logit_scale.exp())
    backward(loss)  # gradients for the cached embeddings, and for the temperature directly
    start = 0
    for image_chunk, token_chunk in chunks:
        stop = start + len(image_chunk)
        image_features, text_features = _embed(model, prepare(image_chunk), token_chunk)
        surrogate = (image_features * image_all.grad[start:stop]).sum() + \
            (text_features * text_all.grad[start:stop]).sum()
        backward(surrogate)
        start = stop
    return loss.detach()
