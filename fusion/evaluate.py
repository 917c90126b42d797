"""Per-task accuracy of an encoder + frozen heads on a task pool split (torchmetrics), on the run's device.

The encoder takes whatever the task data batches (images, or packed tokens for a text pool)."""
from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn
from torchmetrics.classification import MulticlassAccuracy

from fusion.data.contract import check_task_dataset, iterate_batches
from fusion.train.objectives import token_rows
from fusion.utils import progress

Encoder = Callable[[Tensor], Tensor]


def on_device(module: Encoder, device: torch.device) -> Encoder:
    """``module`` moved to ``device`` (in place, as ``nn.Module.to``); plain callables are left as they are."""
    return module.to(device) if isinstance(module, nn.Module) else module


@dataclass
class TaskSubset:
    """The examples ``indices`` of a :class:`fusion.data.contract.TaskDataset`, itself a task dataset."""

    dataset: object
    indices: Tensor

    @property
    def name(self) -> str:
        return f"{self.dataset.name}[{len(self.indices)} of {len(self.dataset)}]"

    def __len__(self) -> int:
        return len(self.indices)

    def batch(self, indices: Tensor) -> tuple[Tensor, Tensor]:
        return self.dataset.batch(self.indices[indices.cpu()])

    def to(self, device: str | torch.device) -> "TaskSubset":
        return TaskSubset(self.dataset.to(device), self.indices)


def random_subset(dataset, size: int | None, seed: int = 0) -> TaskSubset:
    """``size`` examples of ``dataset`` drawn without replacement by a ``torch.Generator`` seeded with ``seed``
    (sorted, so batches read in storage order); ``None`` or ``size ≥ len`` keeps every example."""
    check_task_dataset(dataset, "random_subset")
    n = len(dataset)
    if size is not None and size < 1:
        raise ValueError(f"subset size must be >= 1 (or None for every example), got {size}")
    if size is None or size >= n:
        return TaskSubset(dataset, torch.arange(n))
    chosen = torch.randperm(n, generator=torch.Generator().manual_seed(int(seed)))[:size]
    return TaskSubset(dataset, chosen.sort().values)


@torch.no_grad()
def task_accuracy(encoder: Encoder, heads, dataset, task: str, *, batch_size: int = 512,
                  device: str | torch.device = "cpu") -> float:
    """Top-1 accuracy of ``heads(encoder(x), task)`` over ``dataset``, batches read one at a time onto ``device``
    (a causal LM's: next-token accuracy over every completion token, teacher-forced, :func:`token_rows`)."""
    device = torch.device(device)
    check_task_dataset(dataset, f"task '{task}'")
    encoder, heads = on_device(encoder, device), on_device(heads, device)
    metric = MulticlassAccuracy(num_classes=heads.num_classes(task), average="micro").to(device)
    for x, y in iterate_batches(dataset, batch_size):
        x = x.to(device, non_blocking=True)
        logits, target = token_rows(heads(encoder(x), task), y.to(device, non_blocking=True), x, labeled=True)
        metric.update(logits.argmax(-1), target)
    return float(metric.compute())


def evaluate(encoder: Encoder | Mapping[str, Encoder], heads, taskpool, *, split: str = "test",
             tasks: Sequence[str] | None = None, batch_size: int = 512,
             device: str | torch.device = "cpu", subset: int | None = None, subset_seed: int = 0) -> dict[str, float]:
    """``{task: accuracy}``; ``encoder`` is one model for all tasks or a ``{task: model}`` mapping
    (the individual experts, or a task-id-at-inference method's task models, built when read). ``subset``: only
    that many seeded random examples per task (:func:`random_subset`, seed ``subset_seed``)."""
    out = {}
    for task in progress(list(tasks or taskpool.tasks), f"evaluating on {split}"):
        enc = encoder[task] if isinstance(encoder, Mapping) else encoder
        data = taskpool.dataset(task, split)
        data = data if subset is None else random_subset(data, subset, subset_seed)
        out[task] = task_accuracy(enc, heads, data, task, batch_size=batch_size, device=device)
    return out


def summarize(per_task: dict[str, float]) -> dict:
    """``{"per_task": ..., "mean_accuracy": mean}``."""
    return {"per_task": per_task, "mean_accuracy": sum(per_task.values()) / max(len(per_task), 1)}


def normalized_accuracy(per_task: Mapping[str, float], experts: Mapping[str, float]) -> float:
    """The mean over tasks of ``accuracy / expert accuracy`` (what the TALL-mask and EMR papers report as the
    accuracy retained); a task whose expert scores 0 counts as fully retained."""
    return sum(a / experts[t] if experts[t] > 0 else 1.0 for t, a in per_task.items()) / max(len(per_task), 1)


@torch.no_grad()
def routing_matrix(model, taskpool, tasks: Sequence[str], split: str = "test", batch_size: int = 256,
                   max_images: int | None = 512) -> Tensor:
    """``Tensor[len(tasks), K]``: the mean routing weight per expert of an input-dependent parametrization
    (:meth:`fusion.param.contract.Parametrization.collect_routing`) over each task's ``split`` images, in eval mode.

    ``max_images``: only the first N images of each task (the splits are stored in a seeded random order, so this
    is a random sample); a mean over 512 images is exact to ~0.01 and costs a fraction of a full extra pass of the
    routed model (which runs K+1 MLP products per block). ``None`` reads every image.
    """
    device, was_training = next(model.buffers()).device, model.training
    model.eval()
    rows = []
    try:
        with model.collect_routing() as rec:
            for task in tasks:
                rec.clear()
                for x, _ in iterate_batches(taskpool.dataset(task, split), batch_size, max_images):
                    model(x.to(device))
                rows.append(rec.mean())
    finally:
        model.train(was_training)
    return torch.stack(rows)
