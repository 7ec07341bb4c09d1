"""A cross-batch memory of embeddings: more negatives than one batch holds (XBM, Wang et al. 2020).

A FIFO ring of detached image and text embeddings from recent steps, with the keys of their pairs
(image, product, normalised query). Each row's loss sees the batch plus the memory in both
directions; a memory entry that shares the row's image, product or query is not a negative (it
is the same or an equally relevant item) and is masked out. The memory's embeddings come from
slightly older weights, which is why XBM starts using it only after a warm-up.
Written by hand: open_clip has no cross-batch memory, and XBM's code is not a library.
"""

from __future__ import annotations

import hashlib

import torch
import torch.nn.functional as F

NO_KEY = -1  # a missing product_id matches nothing


def key_ids(values: list[str | None]) -> torch.Tensor:
    """Stable non-negative 63-bit ids for string keys (the same string gives the same id in every
    process and run); None or "" gives NO_KEY."""
    return torch.tensor([NO_KEY if not v else
                         int.from_bytes(hashlib.blake2b(v.encode(), digest_size=8).digest(), "big") >> 1
                         for v in values], dtype=torch.long)


class MemoryBank(torch.nn.Module):
    """The ring buffer; its state is in buffers, so Lightning checkpoints save and restore it."""

    def __init__(self, size: int, dim: int):
        super().__init__()
        self.size = size
        self.register_buffer("images", torch.zeros(size, dim))
        self.register_buffer("texts", torch.zeros(size, dim))
        self.register_buffer("keys", torch.full((size, 3), NO_KEY, dtype=torch.long))  # image, product, query
        self.register_buffer("pointer", torch.zeros((), dtype=torch.long))
        self.register_buffer("filled", torch.zeros((), dtype=torch.long))

    @torch.no_grad()
    def enqueue(self, images: torch.Tensor, texts: torch.Tensor, keys: torch.Tensor) -> None:
        """Write the newest entries over the oldest; a batch larger than the memory keeps its tail."""
        images, texts, keys = images[-self.size:], texts[-self.size:], keys[-self.size:]
        slots = (self.pointer + torch.arange(len(images), device=self.pointer.device)) % self.size
        self.images[slots] = images.detach().to(self.images.dtype)
        self.texts[slots] = texts.detach().to(self.texts.dtype)
        self.keys[slots] = keys.to(self.keys.device)
        self.pointer.copy_((self.pointer + len(images)) % self.size)
        self.filled.copy_(torch.clamp(self.filled + len(images), max=self.size))

    def usable(self, keys: torch.Tensor) -> torch.Tensor:
        """(B, size) bool: whether memory entry j may act as a negative for batch row i."""
        occupied = torch.arange(self.size, device=self.keys.device) < self.filled
        same = (keys[:, None, :] == self.keys[None, :, :]) & (keys[:, None, :] != NO_KEY)
        return occupied[None, :] & ~same.any(dim=-1)


def memory_bank_loss(image: torch.Tensor, text: torch.Tensor, logit_scale: torch.Tensor, bank: MemoryBank,
                     keys: torch.Tensor, weights: torch.Tensor | None = None) -> torch.Tensor:
    """The symmetric contrastive loss with the memory's entries as extra negatives, both directions.

    With an empty memory this is open_clip's ClipLoss; weights as in WeightedClipLoss."""
    usable = bank.usable(keys)
    batch_part = torch.zeros(len(image), len(image), dtype=torch.bool, device=image.device)
    blocked = torch.cat([batch_part, ~usable], dim=1)
    bank_images, bank_texts = bank.images.to(image.dtype), bank.texts.to(text.dtype)
    logits_image = (logit_scale * image @ torch.cat([text, bank_texts]).T).masked_fill(blocked, float("-inf"))
    logits_text = (logit_scale * text @ torch.cat([image, bank_images]).T).masked_fill(blocked, float("-inf"))
    labels = torch.arange(len(image), device=image.device)
    w = torch.ones(len(image), device=image.device) if weights is None else \
        weights.to(device=image.device, dtype=image.dtype)
    w = w / w.mean()
    return ((F.cross_entropy(logits_image, labels, reduction="none") * w).mean()
            + (F.cross_entropy(logits_text, labels, reduction="none") * w).mean()) / 2
