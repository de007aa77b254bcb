"""What image tasks share: rows that reference images by index, subsets, held-out splits, epoch order.

An example is an `ImageRow(split, index, epoch)`: the image is read (and, for a training row, augmented
as a pure function of (seed, epoch, index)) only when its batch is collated, so a run holds no decoded
image between steps and a resumed run sees exactly the images an uninterrupted one would.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np
import torch


@dataclass(frozen=True)
class ImageRow:
    """One image of a batch: `index` into the task's `split` dataset; `epoch` set for augmented training rows."""

    split: str
    index: int
    epoch: int | None = None


@dataclass
class Subset:
    """Some items of a dataset (by index), with its classes."""

    dataset: object
    indices: np.ndarray

    @property
    def classes(self) -> tuple[str, ...]:
        return self.dataset.classes

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int):
        return self.dataset[int(self.indices[i])]


def trained_classes(trained: tuple[str, ...], found, source: str) -> tuple[str, ...]:
    """The classes of the data at `source` (`found`), which must be those a loaded adapter was trained for
    (`trained`; empty for a new run): its head's outputs are those classes, in that order."""
    found = tuple(found)
    if trained and found != tuple(trained):
        raise ValueError(f"{source} has the classes {list(found)}, but the adapter was trained for {list(trained)}; "
                         f"give data with those classes, in that order")
    return found


def hold_out(dataset, fraction: float, seed: int) -> tuple[Subset, Subset]:
    """(train, valid): a seeded random `fraction` of `dataset` held out for validation (at least one item)."""
    order = np.random.default_rng(seed).permutation(len(dataset))
    n_valid = max(1, round(len(dataset) * fraction))
    if n_valid >= len(dataset):
        raise ValueError(f"data.valid_fraction={fraction} leaves no training image of {len(dataset)}; lower it or "
                         f"give data.valid")
    return Subset(dataset, np.sort(order[n_valid:])), Subset(dataset, np.sort(order[:n_valid]))


def subset_indices(n: int, limit: int | None, seed: int) -> np.ndarray:
    """Indices of `limit` items of `n` (a seeded random choice, in index order), or all of them."""
    if limit is None or limit >= n:
        return np.arange(n)
    return np.sort(np.random.default_rng(seed).choice(n, size=limit, replace=False))


def shuffled_batches(rows: list, epoch: int, batch_size: int, seed: int) -> list[list]:
    """One epoch's batches: `rows` in a random order that is a pure function of (seed, epoch), each row
    marked with the epoch (its augmentation depends on it)."""
    order = torch.randperm(len(rows), generator=torch.Generator().manual_seed(seed * 100_003 + epoch))
    marked = [replace(rows[i], epoch=epoch) for i in order.tolist()]
    return [marked[i:i + batch_size] for i in range(0, len(marked), batch_size)]
