"""The order of training batches: endless, reproducible, sharded over processes and resumable."""

from __future__ import annotations

import collections
from typing import Iterator, Sequence

import torch

from backbones.errors import UserError


class TrainingStream:
    """An endless, reproducible stream of training batches for one process.

    Each epoch is a permutation of the dataset drawn from ``(seed, epoch)``; process ``rank`` of
    ``world_size`` takes every ``world_size``-th element, so the processes see disjoint shards. Items
    are ``(index, sample_seed)`` pairs: the dataset seeds its augmentation from ``sample_seed``, so a
    resumed run sees the same images, augmented the same way, as an uninterrupted one. Batches group
    images by ``group_ids`` (aspect ratio) when given.
    """

    def __init__(self, num_items: int, batch_size: int, seed: int, rank: int = 0, world_size: int = 1,
                 group_ids: Sequence[int] | None = None):
        if num_items == 0:
            raise UserError("the training dataset is empty: no image has a usable annotation")
        self.num_items, self.batch_size, self.seed = num_items, batch_size, seed
        self.rank, self.world_size = rank, world_size
        self.group_ids = list(group_ids) if group_ids is not None else [0] * num_items

    def _items(self) -> Iterator[tuple[int, int]]:
        epoch = 0
        while True:
            generator = torch.Generator().manual_seed(self.seed * 100003 + epoch)
            order = torch.randperm(self.num_items, generator=generator).tolist()
            for position in range(self.rank, len(order), self.world_size):
                yield order[position], (self.seed * 1_000_003 + epoch * 7919 + position) % 2**31
            epoch += 1

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        buffers: dict[int, list[tuple[int, int]]] = {}
        for item in self._items():
            buffer = buffers.setdefault(self.group_ids[item[0]], [])
            buffer.append(item)
            if len(buffer) == self.batch_size:
                yield buffer[:]
                buffer.clear()


class Resumed:
    """A batch sampler over an already-positioned batch iterator (the DataLoader asks for ``__iter__``). It
    remembers the last batches it gave out (``given``): the DataLoader returns batches in that order, so the
    ``k``-th batch it returns is ``given[k]``, which names what a stalled read was reading."""

    def __init__(self, batches: Iterator[list], remember: int = 1024):
        self.batches = batches
        self.recent: collections.deque[list] = collections.deque(maxlen=remember)
        self.count = 0  # batches given out so far

    def __iter__(self) -> Iterator[list]:
        for batch in self.batches:
            self.recent.append(batch)
            self.count += 1
            yield batch

    def given(self, k: int) -> list | None:
        """The ``k``-th batch given out (from 0), if still remembered."""
        position = k - (self.count - len(self.recent))
        return self.recent[position] if 0 <= position < len(self.recent) else None
