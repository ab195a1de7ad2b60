"""Batches from a DataBundle split: in-memory tensors are indexed directly, torch Datasets go through a
DataLoader. Training order is a pure function of (seed, step), so a resumed run sees the same batches."""

from __future__ import annotations

import functools
from collections.abc import Iterator, Sequence

import torch
from torch import Tensor
from torch.utils.data import DataLoader

from .seeding import derive_seed


def num_examples(split) -> int:
    return split.shape[0] if isinstance(split, Tensor) else len(split)


def _first(item):
    return item[0] if isinstance(item, (tuple, list)) else item


def _collate(items) -> Tensor:
    return torch.stack([_first(i) for i in items])


def take(split, indices: Sequence[int]) -> Tensor:
    """The examples at ``indices`` as one batch tensor."""
    if isinstance(split, Tensor):
        return split[torch.as_tensor(indices, dtype=torch.long)]
    return _collate([split[int(i)] for i in indices])


@functools.lru_cache(maxsize=2)
def epoch_order(n: int, seed: int, epoch: int) -> Tensor:
    """The shuffled order of one epoch (cached: every step of the epoch indexes into it)."""
    g = torch.Generator().manual_seed(derive_seed(seed, "epoch", epoch))
    return torch.randperm(n, generator=g)


def batch_indices(n: int, batch_size: int, seed: int, step: int, shuffle: bool = True) -> Tensor:
    """Indices of the global batch for training step ``step`` (0-based): epochs of shuffled, full batches."""
    if batch_size > n:  # tiny data sets: sample with replacement rather than fail
        g = torch.Generator().manual_seed(derive_seed(seed, "batch", step))
        return torch.randint(n, (batch_size,), generator=g)
    epoch, i = divmod(step, n // batch_size)
    order = epoch_order(n, seed, epoch) if shuffle else torch.arange(n)
    return order[i * batch_size : (i + 1) * batch_size]


class _StepBatches(torch.utils.data.Sampler):
    def __init__(self, n: int, batch_size: int, seed: int, start: int, stop: int, shuffle: bool, shard):
        self.args = (n, batch_size, seed)
        self.start, self.stop, self.shuffle, self.shard = start, stop, shuffle, shard

    def __iter__(self):
        for step in range(self.start, self.stop):
            yield self.shard(batch_indices(*self.args, step, self.shuffle)).tolist()

    def __len__(self) -> int:
        return self.stop - self.start


def train_batches(split, batch_size: int, seed: int, start: int, stop: int, *, shuffle: bool = True,
                  shard=lambda b: b, num_workers: int = 0) -> Iterator[Tensor]:
    """This rank's part of the global batches for steps start … stop − 1."""
    n = num_examples(split)
    if isinstance(split, Tensor):
        for step in range(start, stop):
            yield split[shard(batch_indices(n, batch_size, seed, step, shuffle))]
        return
    sampler = _StepBatches(n, batch_size, seed, start, stop, shuffle, shard)
    loader = DataLoader(split, batch_sampler=sampler, num_workers=num_workers, collate_fn=_collate,
                        persistent_workers=False)
    yield from loader


def eval_batches(split, batch_size: int, limit: int | None = None) -> Iterator[tuple[int, Tensor]]:
    """(batch number, batch) over the first ``limit`` examples in order, without shuffling."""
    n = num_examples(split) if limit is None else min(limit, num_examples(split))
    for b, start in enumerate(range(0, n, batch_size)):
        yield b, take(split, range(start, min(start + batch_size, n)))
