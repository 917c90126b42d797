"""Multi-task DataModule: each step yields one batch per task, from per-task infinite seeded streams.

Test-time adaptation (AdaMerging protocol) reads the *unlabeled test* split: with ``labeled=False`` labels are
never yielded, so they cannot leak into training. Under DDP each rank takes its own slice of every global batch,
so N ranks with batch ``b/N`` see exactly the examples 1 process sees with batch ``b``.
"""
from __future__ import annotations

from collections.abc import Iterator, Sequence

import pytorch_lightning as pl
import torch
from torch import Tensor
from torch.utils.data import DataLoader, IterableDataset

from fusion.utils import rank_and_world


def index_stream(n: int, batch_size: int, seed: int) -> Iterator[Tensor]:
    """Global batches of indices from successive seeded permutations of ``range(n)`` (epochs without replacement)."""
    gen = torch.Generator().manual_seed(seed)
    buffer = torch.empty(0, dtype=torch.long)
    while True:
        while len(buffer) < batch_size:
            buffer = torch.cat([buffer, torch.randperm(n, generator=gen)])
        yield buffer[:batch_size]
        buffer = buffer[batch_size:]


class MultiTaskStream(IterableDataset):
    """Yields ``{task: (images, labels or None)}``; ``global_batch_size`` per task, sliced by rank."""

    def __init__(self, datasets: dict[str, object], global_batch_size: int, labeled: bool, seed: int, start: int = 0):
        self.datasets, self.batch_size, self.labeled, self.seed = datasets, global_batch_size, labeled, seed
        self.start = start  # batches to skip (resume)

    def __iter__(self) -> Iterator[dict[str, tuple[Tensor, Tensor | None]]]:
        rank, world = rank_and_world()
        if self.batch_size % world:
            raise ValueError(f"data.batch_size={self.batch_size} must be divisible by the number of ranks ({world})")
        per_rank = self.batch_size // world
        streams = {t: index_stream(len(ds), self.batch_size, self.seed + i)
                   for i, (t, ds) in enumerate(self.datasets.items())}
        step = 0
        while True:
            batch = {}
            for task, stream in streams.items():
                idx = next(stream)[rank * per_rank:(rank + 1) * per_rank]
                if step >= self.start:
                    x, y = self.datasets[task].batch(idx)
                    batch[task] = (x, y if self.labeled else None)
            if step >= self.start:
                yield batch
            step += 1


class MultiTaskDataModule(pl.LightningDataModule):
    """One batch per task per step from ``split`` of a task pool (``labeled=False``: images only)."""

    def __init__(self, taskpool, tasks: Sequence[str] | None = None, split: str = "test", batch_size: int = 16,
                 labeled: bool = False, seed: int = 0):
        super().__init__()
        self.taskpool, self.split, self.batch_size = taskpool, split, batch_size
        self.tasks = list(tasks or taskpool.tasks)
        self.labeled, self.seed, self.start = labeled, seed, 0
        if not self.tasks:
            raise ValueError("MultiTaskDataModule needs at least one task")

    def stream(self) -> MultiTaskStream:
        datasets = {t: self.taskpool.dataset(t, self.split) for t in self.tasks}
        return MultiTaskStream(datasets, self.batch_size, self.labeled, self.seed, self.start)

    def train_dataloader(self) -> DataLoader:
        return DataLoader(self.stream(), batch_size=None, num_workers=0)
