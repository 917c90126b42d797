"""The task-data contract every task pool honours: HF datasets, mini8, a saved directory, a user's own.

A **task dataset** is one split of one task. It gives batches of the model's input tensor by index — never one
PIL image or one string at a time — so the training stream, evaluation and the data-based merges (Fisher, RegMean)
all read data the same way, and a dataset can keep its decoded inputs on the training device::

    x, y = dataset.batch(torch.arange(16))     # images: Tensor[16, 3, H, W] float32 (normalised), Tensor[16] int64
                                               # text: Tensor[16, 2, T] int64 (token ids, attention mask), labels
    dataset = dataset.to("cuda")               # the same data, batches made on (and resident in) the device

``x`` is whatever the model pool's encoder takes (:mod:`fusion.pools.contract`); nothing downstream looks inside it.

A **task pool** names its tasks and hands out datasets, class names and prompt templates; its
:meth:`TaskPool.fingerprint` identifies the exact data and preprocessing, so cached results (the pretrained and
expert reference rows) are never reused for another dataset.

:func:`check_task_pool` and :func:`check_task_dataset` enforce the contract at the boundary: an object that
lacks a method fails there, with a message naming its class, the missing methods and where they are declared.
"""
from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Protocol, runtime_checkable

import torch
from torch import Tensor

from fusion.utils import missing_members


class TaskContractError(TypeError):
    """A task pool or task dataset does not offer a method of the contract."""


@runtime_checkable
class TaskDataset(Protocol):
    """One split of one task: ``len``, batched access by index, and a copy on a device."""

    name: str

    def __len__(self) -> int: ...

    def batch(self, indices: Tensor) -> tuple[Tensor, Tensor]:
        """The encoder's inputs ``x: Tensor[B, ...]`` (images ``[B, 3, H, W]`` float32 normalised as the model
        expects; text ``[B, 2, T]`` int64 ids and mask; instructions for a causal LM ``[B, 3, T]`` ids, mask and
        role) and labels ``Tensor[B]`` (int64; a causal LM's: next-token labels ``[B, T]``, −100 where ignored,
        :mod:`fusion.pools.causal_inputs`), on the dataset's device."""

    def to(self, device: str | torch.device) -> "TaskDataset":
        """The same data with batches made on ``device`` (decoded inputs resident there)."""


@runtime_checkable
class TaskPool(Protocol):
    """Tasks, their splits as :class:`TaskDataset`, class names and templates (for zero-shot heads; a text pool's
    heads are its experts' own)."""

    name: str

    @property
    def tasks(self) -> list[str]: ...

    def dataset(self, task: str, split: str) -> TaskDataset: ...

    def classnames(self, task: str) -> tuple[str, ...]: ...

    def templates(self, task: str) -> tuple[str, ...]: ...

    def select(self, tasks: Sequence[str] | None) -> "TaskPool": ...

    def fingerprint(self) -> str:
        """A short hash of the data and preprocessing of every task (changes when either changes)."""


_POOL_METHODS = ("tasks", "dataset", "classnames", "templates", "select", "fingerprint")
_DATASET_METHODS = ("__len__", "batch", "to")


def check_task_pool(pool: object, source: str = "taskpool") -> TaskPool:
    """``pool`` if it honours :class:`TaskPool`, else :class:`TaskContractError` naming class and methods."""
    missing = missing_members(pool, _POOL_METHODS)
    if missing:
        cls = f"{type(pool).__module__}.{type(pool).__qualname__}"
        raise TaskContractError(f"{source}: {cls} is not a task pool: it lacks {missing} (the contract is "
                                f"fusion.data.contract.TaskPool: {list(_POOL_METHODS)})")
    return pool  # type: ignore[return-value]


def check_task_dataset(dataset: object, source: str = "dataset") -> TaskDataset:
    """``dataset`` if it honours :class:`TaskDataset`, else :class:`TaskContractError` naming what it lacks."""
    missing = missing_members(dataset, _DATASET_METHODS)
    if missing:
        cls = f"{type(dataset).__module__}.{type(dataset).__qualname__}"
        raise TaskContractError(f"{source}: {cls} is not a task dataset: it lacks {missing} (the contract is "
                                f"fusion.data.contract.TaskDataset: len, batch(indices) -> (inputs, labels), "
                                "to(device))")
    return dataset  # type: ignore[return-value]


def iterate_batches(dataset: TaskDataset, batch_size: int,
                    limit: int | None = None) -> Iterator[tuple[Tensor, Tensor]]:
    """The first ``limit`` examples (default: all) once, in order, in batches of ``batch_size`` (the last may be
    smaller)."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be ≥ 1, got {batch_size}")
    n = len(dataset) if limit is None else min(len(dataset), limit)
    for start in range(0, n, batch_size):
        yield dataset.batch(torch.arange(start, min(start + batch_size, n)))
