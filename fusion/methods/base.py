"""What every merge method receives (:class:`RunContext`) and returns (:class:`MergeOutcome`)."""
from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from fusion.param.contract import MergeRecord
from fusion.train.checkpoint import Resume


@dataclass
class RunContext:
    """Run-level objects a method may use: where to write, the seed, the run's device (from conf/trainer: every
    merge, statistic and evaluation runs there), and the Trainer factory and checkpoint to resume for learned
    methods (:meth:`fit`)."""

    output_dir: Path
    seed: int = 0
    trainer: Callable[..., Any] | None = None  # (stage, **Trainer kwargs) -> pl.Trainer, from conf/trainer
    loggers: list = field(default_factory=list)
    eval_batch_size: int = 512
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    distributed: bool = False  # several training processes (trainer=ddp/fsdp): Lightning places each rank's copy
    resume: Resume | None = None  # the checkpoint of `resume=<run dir>`, validated against method and pool
    resumed: bool = False  # whether a training stage has continued from `resume`

    def evaluate(self, encoder, heads, taskpool, split: str) -> dict[str, float]:
        """``{task: accuracy}`` of ``encoder`` on ``split``, on this run's device and evaluation batch size."""
        from fusion.evaluate import evaluate

        return evaluate(encoder, heads, taskpool, split=split, batch_size=self.eval_batch_size, device=self.device)

    def fit(self, module, datamodule, steps: int, stage: str) -> None:
        """Train ``module`` for ``steps`` optimizer steps with the run's Trainer; ``stage`` names the checkpoints it
        writes, and the run's ``resume`` checkpoint is continued from when it was written in this stage."""
        if self.trainer is None:
            raise RuntimeError("this RunContext has no Trainer factory: learned methods run through fusion.app.train")
        trainer = self.trainer(stage=stage, max_steps=steps, default_root_dir=str(self.output_dir),
                               logger=self.loggers or False)
        ckpt_path = None
        if self.resume is not None and self.resume.stage == stage:
            ckpt_path, self.resumed = str(self.resume.path), True
        trainer.fit(module, datamodule=datamodule, ckpt_path=ckpt_path)


@dataclass
class MergeOutcome:
    """The merged encoder (``inputs -> features``), what the method wants recorded in results.json, and what the
    report writes next to it: ``records`` maps a ``method_info`` key to a :class:`MergeRecord` (learned methods).

    ``inference`` is ``"single model"`` for a merge, or ``"task id"`` when ``encoder`` is a ``{task: encoder}``
    mapping rebuilt from compressed experts (:mod:`fusion.methods.retrieval`)."""

    encoder: nn.Module | Mapping[str, nn.Module]
    info: dict[str, Any] = field(default_factory=dict)
    protocol: str = "static merge: no data"
    records: dict[str, MergeRecord] = field(default_factory=dict)
    inference: str = "single model"


@dataclass(frozen=True)
class MergedStart:
    """Where a learned merge starts when its ``init`` is a merge that yields a vector, not a λ (``method/init=tsv_m``,
    ``regmean``, ``wudi``…): the parametrization's base is ``θ_0 + delta`` and its coefficients start at 0, so its
    first step evaluates exactly that merge and training learns ``Σ_k λ_k τ_k`` on top of it."""

    delta: dict[str, Any]
    source: str

    def describe(self) -> dict[str, str]:
        """What results.json records as the init."""
        return {"merged_vector": self.source}

