"""What every merge method receives (:class:`RunContext`) and returns (:class:`MergeOutcome`)."""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from torch import nn


@dataclass
class RunContext:
    """Run-level objects a method may use: where to write, the seed, and a Trainer factory for learned methods."""

    output_dir: Path
    seed: int = 0
    trainer: Callable[..., Any] | None = None  # partial(pl.Trainer, ...) from conf/trainer
    loggers: list = field(default_factory=list)
    eval_batch_size: int = 512


@dataclass
class MergeOutcome:
    """The merged encoder (``images -> features``) and what the method wants recorded in results.json."""

    encoder: nn.Module
    info: dict[str, Any] = field(default_factory=dict)
    protocol: str = "static merge: no data"
