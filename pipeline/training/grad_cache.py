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

from pipeline.errors import StageError


def _embed(model: torch.nn.Module, images: torch.Tensor, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    from pipeline.training.model import encode_text

    return model.encode_image(images, normalize=True), encode_text(model, tokens)


def _gathered(tensor: torch.Tensor, world_size: int) -> torch.Tensor:
    """Every rank's `tensor` concatenated in rank order (no graph: the cached embeddings are leaves)."""
    parts = [torch.empty_like(tensor) for _ in range(world_size)]
    torch.distributed.all_gather(parts, tensor.contiguous())
    return torch.cat(parts)


def sum_gradients_across_ranks(model: torch.nn.Module) -> None:
    """All-reduce (sum) every `.grad` of `model` over the default process group, flattened into one
    buffer per dtype (one collective instead of one per parameter)."""
    from torch._utils import _flatten_dense_tensors, _unflatten_dense_tensors

    grads = [p.grad for p in model.parameters() if p.grad is not None]
    for dtype in {g.dtype for g in grads}:
        same = [g for g in grads if g.dtype == dtype]
        flat = _flatten_dense_tensors(same)
        torch.distributed.all_reduce(flat)
        for grad, summed in zip(same, _unflatten_dense_tensors(flat, same), strict=True):
            grad.copy_(summed)


def grad_cache_backward(model: torch.nn.Module, images: torch.Tensor, tokens: torch.Tensor, micro_batch: int,
                        loss_fn: Callable[..., torch.Tensor],
                        backward: Callable[[torch.Tensor], None] = torch.Tensor.backward,
                        prepare: Callable[[torch.Tensor], torch.Tensor] | None = None,
                        weights: torch.Tensor | None = None, world_size: int = 1, rank: int = 0) -> torch.Tensor:
    """Accumulate into `.grad` the gradients of loss_fn over the full batch; return the loss.

    images: (B, 3, H, W); tokens: (B, L), best in host memory (see encode_text);
    loss_fn(image_features, text_features, logit_scale[, weights=...]): a single-process loss;
    prepare: moves one micro-batch of images to the device as model input (default: `.to(device)`);
    weights: per-pair weights of this batch, passed on to loss_fn.

    Across processes (world_size > 1, a torch.distributed group; every rank's batch the same
    size): each rank embeds its own batch without graph, the embeddings (and weights) of all ranks
    are gathered, every rank computes the loss over the global batch against them and re-runs
    only its own micro-batches with its slice of the cached gradients. The gradients are then
    summed across ranks here, so the caller must keep DDP's own reducer out of these backward
    passes (Lightning: strategy.block_backward_sync()); every rank ends with the single-process
    gradient of the global batch (tests/test_ddp.py)."""
    device = model.logit_scale.device
    prepare = prepare or (lambda chunk: chunk.to(device, non_blocking=True))
    chunks = list(zip(images.split(micro_batch), tokens.split(micro_batch), strict=True))
    with torch.no_grad():  # `images` may sit in host memory: each micro-batch moves to the device on use
        features = [_embed(model, prepare(i), t) for i, t in chunks]
    image_mine = torch.cat([f[0] for f in features])
    text_mine = torch.cat([f[1] for f in features])
    offset = 0
    if world_size > 1:
        sizes = _gathered(torch.tensor([len(image_mine)], device=device), world_size).tolist()
        if len(set(sizes)) > 1:  # gathering unequal tensors fails deep in the backend, or hangs
            raise StageError(f"grad cache under DDP needs the same batch size on every rank; got {sizes} "
                             "(ranks in order)")
        offset = rank * len(image_mine)
        image_mine, text_mine = _gathered(image_mine, world_size), _gathered(text_mine, world_size)
        weights = None if weights is None else _gathered(weights.to(device), world_size)
    image_all = image_mine.detach().requires_grad_()
    text_all = text_mine.detach().requires_grad_()
    extra = {} if weights is None else {"weights": weights}
    loss = loss_fn(image_all, text_all, model.logit_scale.exp(), **extra)
    # every rank back-propagates the same global loss into the temperature: 1/world_size of it
    # each, so the sum across ranks is one loss's gradient; the embeddings' gradients are scaled
    # back up below, each rank owning its slice (on one process both factors are 1, exactly)
    backward(loss / world_size)
    start = offset
    for image_chunk, token_chunk in chunks:
        stop = start + len(image_chunk)
        image_features, text_features = _embed(model, prepare(image_chunk), token_chunk)
        image_grad, text_grad = image_all.grad[start:stop] * world_size, text_all.grad[start:stop] * world_size
        backward((image_features * image_grad).sum() + (text_features * text_grad).sum())
        start = stop
    if world_size > 1:
        sum_gradients_across_ranks(model)
    return loss.detach()
