"""Batches without false negatives: no query, image or product appears twice in one batch.

Click logs repeat queries and images; under the contrastive loss a second copy in the batch
would be pushed away as a negative though it is a positive. Written by hand because neither
Lightning nor open_clip samples under such constraints.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence

import numpy as np
from torch.utils.data import Sampler

from pipeline.errors import StageError


def with_buddies(order: Sequence[int], buddies: Mapping[int, Sequence[int]], seed: int) -> list[int]:
    """The shuffle with each item followed by one unused buddy (a pair holding a mined hard
    negative of its query), so packing puts them in one batch; every item still comes once."""
    rng = np.random.default_rng([seed, 1])
    used: set[int] = set()
    out: list[int] = []
    for index in order:
        if index in used:
            continue
        used.add(index)
        out.append(index)
        free = [j for j in buddies.get(index, ()) if j not in used]
        if free:
            buddy = free[int(rng.integers(len(free)))]
            used.add(buddy)
            out.append(buddy)
    return out


def unique_batches(queries: Sequence[str], image_ids: Sequence[str], product_ids: Sequence[str | None],
                   batch_size: int, seed: int, open_batches: int = 16,
                   buddies: Mapping[int, Sequence[int]] | None = None) -> list[list[int]]:
    """Greedy packing of a seeded shuffle: each item goes into the first open batch it does not
    clash with. Full batches only; items that never fit are left for the next epoch's shuffle.
    With `buddies`, each item is offered right after one of its buddies (see with_buddies)."""
    order = np.random.default_rng(seed).permutation(len(queries))
    if buddies:
        order = np.array(with_buddies(order.tolist(), buddies, seed), dtype=np.int64)
    pending: list[tuple[list[int], set[str]]] = []
    full: list[list[int]] = []
    for index in order.tolist():
        keys = {f"q:{queries[index]}", f"i:{image_ids[index]}"}
        if product_ids[index] is not None:
            keys.add(f"p:{product_ids[index]}")
        for members, taken in pending:
            if not keys & taken:
                members.append(index)
                taken |= keys
                break
        else:
            if len(pending) == open_batches:
                pending.sort(key=lambda batch: -len(batch[0]))
                pending.pop()  # the emptiest open batch gives way; its items wait for the next epoch
            pending.append(([index], set(keys)))
            continue
        full_now = [batch for batch in pending if len(batch[0]) == batch_size]
        for batch in full_now:
            full.append(batch[0])
            pending.remove(batch)
    return full


class UniqueBatchSampler(Sampler[list[int]]):
    """A batch sampler over `unique_batches`, reshuffled every epoch.

    Under DDP (`shard`) the loss of a step spans every rank's batch, so uniqueness must hold across
    ranks: each step is one unique batch of `batch_size × world` packed from the shared shuffle,
    and rank r takes its r-th slice of `batch_size`."""

    def __init__(self, queries: Sequence[str], image_ids: Sequence[str], product_ids: Sequence[str | None],
                 batch_size: int, seed: int, buddies: Mapping[int, Sequence[int]] | None = None):
        self.queries, self.image_ids, self.product_ids = list(queries), list(image_ids), list(product_ids)
        self.buddies = buddies
        self.batch_size, self.seed, self.epoch = batch_size, seed, 0
        self.rank, self.world = 0, 1
        self._steps = self._packed()

    def _batches(self, epoch: int) -> list[list[int]]:
        """The epoch's steps, each a batch unique across all ranks (batch_size × world items)."""
        return unique_batches(self.queries, self.image_ids, self.product_ids, self.batch_size * self.world,
                              self.seed + epoch, buddies=self.buddies)

    def start_at_epoch(self, epoch: int) -> None:
        """The next iteration is epoch `epoch`: the trainer calls it when training (re)starts."""
        self.epoch = epoch

    def shard(self, rank: int, world: int) -> None:
        """Under DDP: this rank takes its slice of each step's batch (every rank packs the same
        steps from the same seeded shuffle)."""
        self.rank, self.world = rank, world
        self._steps = self._packed()

    def _packed(self) -> int:
        """How many steps an epoch has (the first epoch's count); none is an error, not a run of no steps."""
        steps = len(self._batches(0))
        if not steps:
            raise StageError(f"no batch of {self.batch_size * self.world} pairs with no query, image or product "
                             f"twice can be packed from {len(self.queries)} training pairs"
                             + (f" ({self.world} ranks x train.batch_size {self.batch_size})" if self.world > 1 else
                                "") + "; lower train.batch_size or turn train.unique_batches off")
        return steps

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        epoch = self.epoch
        batches = self._batches(epoch)
        self.epoch += 1
        # a fixed length keeps the LR schedule's step count true; an epoch that packs a batch or
        # two fewer repeats its first batches
        if not batches:
            raise StageError(f"epoch {epoch} packed no batch of {self.batch_size * self.world} pairs with no query, "
                             "image or product twice; lower train.batch_size or turn train.unique_batches off")
        while len(batches) < self._steps:
            batches += batches[: self._steps - len(batches)]
        size = self.batch_size
        mine = [step[self.rank * size:(self.rank + 1) * size] for step in batches[: self._steps]]
        return iter([[(index, epoch) for index in batch] for batch in mine])

    def __len__(self) -> int:
        return self._steps


class EpochShuffleSampler(Sampler[tuple[int, int]]):
    """A seeded shuffle per epoch that yields (index, epoch): the epoch seeds each sample's random
    augmentation, so a run resumed at any epoch sees the same batches and the same crops as an
    uninterrupted one, whatever the number of DataLoader workers.

    Each iteration is the next epoch; the trainer calls start_at_epoch when training (re)starts.
    (Not Lightning's set_epoch: after a resume from an end-of-epoch checkpoint, Lightning 2.6
    passes the epoch before the one it trains.)"""

    def __init__(self, size: int, seed: int):
        self.size, self.seed, self.epoch = size, seed, 0
        self.rank, self.world = 0, 1

    def start_at_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def shard(self, rank: int, world: int) -> None:
        """Under DDP: this rank takes every `world`-th item of each epoch's shared permutation."""
        self.rank, self.world = rank, world

    def __iter__(self) -> Iterator[tuple[int, int]]:
        epoch = self.epoch
        self.epoch += 1
        order = np.random.default_rng([self.seed, epoch]).permutation(self.size)
        mine = order[: len(self) * self.world][self.rank::self.world]
        return iter([(int(index), epoch) for index in mine])

    def __len__(self) -> int:
        return self.size // self.world
