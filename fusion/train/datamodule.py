"""Multi-task DataModule: each step yields one batch per task, from per-task infinite seeded streams.

Test-time adaptation (AdaMerging protocol) reads the *unlabeled test* split: with ``labeled=False`` labels are
never yielded, so they cannot leak into training. Under DDP each rank takes its own slice of every global batch,
so N ranks with batch ``b/N`` see exactly the examples 1 process sees with batch ``b``.

The datasets are the decoded splits of the task-data contract (:mod:`fusion.data.contract`). With ``device`` set
(the run's device; ``cuda`` means this rank's GPU) and ``resident=True`` each split's decoded images are copied
to that device once, and every batch is indexed and normalised there: no decoding, no host-to-device copy per step.
"""
from __future__ import annotations

from collections.abc import Iterator, Sequence

import pytorch_lightning as pl
import torch
from torch import Tensor
from torch.utils.data import DataLoader, IterableDataset

from fusion.data.contract import check_task_dataset
from fusion.errors import ConfigError
from fusion.param.sharding import rank_and_world


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

    def __init__(self, datasets: dict[str, object], global_batch_size: int, labeled: bool, seed: int, start: int = 0,
                 device: str | torch.device | None = None):
        self.datasets, self.batch_size, self.labeled, self.seed = datasets, global_batch_size, labeled, seed
        self.start = start  # batches to skip (resume)
        self.device = device

    def __iter__(self) -> Iterator[dict[str, tuple[Tensor, Tensor | None]]]:
        rank, world = rank_and_world()
        if self.batch_size % world:
            raise ConfigError(f"each step's batch of {self.batch_size} examples per task (method.data.batch_size × the "
                              f"loop's batches per step) must be divisible by the number of ranks ({world})")
        per_rank = self.batch_size // world
        device = rank_device(self.device)
        datasets = {t: ds.to(device) for t, ds in self.datasets.items()} if device is not None else self.datasets
        streams = {t: index_stream(len(ds), self.batch_size, self.seed + i)
                   for i, (t, ds) in enumerate(self.datasets.items())}
        step = 0
        while True:
            batch = {}
            for task, stream in streams.items():
                idx = next(stream)[rank * per_rank:(rank + 1) * per_rank]
                if step >= self.start:
                    x, y = datasets[task].batch(idx)
                    batch[task] = (x, y if self.labeled else None)
            if step >= self.start:
                yield batch
            step += 1


def rank_device(device: str | torch.device | None) -> torch.device | None:
    """``device`` for this process: a bare ``cuda`` becomes this rank's current GPU (set by Lightning)."""
    if device is None:
        return None
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        return torch.device("cuda", torch.cuda.current_device())
    return device


class MultiTaskDataModule(pl.LightningDataModule):
    """One batch per task per step from ``split`` of a task pool (``labeled=False``: images only).

    ``device``: where batches are made (the method passes the run's device); ``resident``: keep each split's
    decoded images on that device (``false``: index them on the host and copy each batch). ``batches_per_step``:
    the training loop's (bi-level: 2), passed by the runner; each step's batch then holds that many batches of
    ``batch_size`` per task, drawn as one.
    """

    def __init__(self, taskpool, tasks: Sequence[str] | None = None, split: str = "test", batch_size: int = 16,
                 labeled: bool = False, seed: int = 0, device: str | torch.device | None = None,
                 resident: bool = True, batches_per_step: int = 1):
        super().__init__()
        self.taskpool, self.split, self.batch_size = taskpool, split, batch_size * batches_per_step
        self.tasks = list(tasks or taskpool.tasks)
        self.labeled, self.seed, self.start = labeled, seed, 0
        self.device, self.resident = device, resident
        if not self.tasks:
            raise ConfigError("MultiTaskDataModule needs at least one task")

    def stream(self) -> MultiTaskStream:
        datasets = {t: check_task_dataset(self.taskpool.dataset(t, self.split), f"task '{t}' ({self.split})")
                    for t in self.tasks}
        return MultiTaskStream(datasets, self.batch_size, self.labeled, self.seed, self.start,
                               self.device if self.resident else None)

    def train_dataloader(self) -> DataLoader:
        return DataLoader(self.stream(), batch_size=None, num_workers=0)
