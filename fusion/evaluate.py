"""Per-task accuracy of an encoder + frozen heads on a task pool split (torchmetrics)."""
from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import Tensor
from torchmetrics.classification import MulticlassAccuracy

from fusion.data.taskpool import loader

Encoder = Callable[[Tensor], Tensor]


@torch.no_grad()
def task_accuracy(encoder: Encoder, heads, dataset, task: str, *, batch_size: int = 512,
                  device: str | torch.device = "cpu") -> float:
    """Top-1 accuracy of ``heads(encoder(x), task)`` over ``dataset``."""
    metric = MulticlassAccuracy(num_classes=heads.num_classes(task), average="micro").to(device)
    for x, y in loader(dataset, batch_size):
        logits = heads(encoder(x.to(device)), task)
        metric.update(logits.argmax(-1), y.to(device))
    return float(metric.compute())


def evaluate(encoder: Encoder | dict[str, Encoder], heads, taskpool, *, split: str = "test",
             tasks: Sequence[str] | None = None, batch_size: int = 512,
             device: str | torch.device = "cpu") -> dict[str, float]:
    """``{task: accuracy}``; ``encoder`` is one model for all tasks or a ``{task: model}`` mapping
    (e.g. the individual experts)."""
    out = {}
    for task in tasks or taskpool.tasks:
        enc = encoder[task] if isinstance(encoder, dict) else encoder
        out[task] = task_accuracy(enc, heads, taskpool.dataset(task, split), task, batch_size=batch_size,
                                  device=device)
    return out


def summarize(per_task: dict[str, float]) -> dict:
    """``{"per_task": ..., "mean_accuracy": mean}``."""
    return {"per_task": per_task, "mean_accuracy": sum(per_task.values()) / max(len(per_task), 1)}
