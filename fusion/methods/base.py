"""What every merge method receives (:class:`RunContext`) and returns (:class:`MergeOutcome`)."""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn


@dataclass
class RunContext:
    """Run-level objects a method may use: where to write, the seed, the run's device (from conf/trainer: every
    merge, statistic and evaluation runs there), and a Trainer factory for learned methods."""

    output_dir: Path
    seed: int = 0
    trainer: Callable[..., Any] | None = None  # partial(pl.Trainer, ...) from conf/trainer
    loggers: list = field(default_factory=list)
    eval_batch_size: int = 512
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    distributed: bool = False  # several training processes (trainer=ddp/fsdp): Lightning places each rank's copy

    def evaluate(self, encoder, heads, taskpool, split: str) -> dict[str, float]:
        """``{task: accuracy}`` of ``encoder`` on ``split``, on this run's device and evaluation batch size."""
        from fusion.evaluate import evaluate

        return evaluate(encoder, heads, taskpool, split=split, batch_size=self.eval_batch_size, device=self.device)


@dataclass
class MergeOutcome:
    """The merged encoder (``images -> features``) and what the method wants recorded in results.json."""

    encoder: nn.Module
    info: dict[str, Any] = field(default_factory=dict)
    protocol: str = "static merge: no data"
