"""The one LightningModule that trains any merge parametrization with any objective.

Each optimizer step:

1. ``state = model.prepare()`` builds the merged parameters once (differentiable in the trainable φ);
2. the state is *detached* into leaf tensors; for each task, a forward with those leaves and a backward
   accumulate ``∂L/∂θ`` (and router gradients) — only one task's activations are alive at a time;
3. one backward of ``Σ ⟨state, ∂L/∂θ⟩`` carries the accumulated gradient through the merge into φ
   (for coefficients: ``∂L/∂λ_k^l = ⟨∂L/∂θ^l, τ_k^l⟩``); with sharded task vectors (``trainer=fsdp``) each rank
   holds a partial sum, which the model averages over the ranks (``reduce_gradients_``);
4. the optimizer steps.

The sum of per-task losses therefore has the same gradient as one backward of the summed loss (tested), at
the memory of one task.
"""
from __future__ import annotations

import logging
import math
from collections.abc import Callable, Mapping

import pytorch_lightning as pl
import torch
from torch import Tensor, nn

from fusion.param.contract import Parametrization
from fusion.train.objectives import Objective, token_rows

log = logging.getLogger(__name__)


class NonFiniteLossError(FloatingPointError):
    """A training loss or gradient became NaN/inf; the last good parameters are kept.

    ``records``: what the runner recorded of the last good parameters (``{info key: MergeRecord}``), which the
    report writes with the suffix ``.last_good`` before the error propagates.
    """

    records: dict = {}


def backward_through_state(state: Mapping[str, Tensor], leaves: Mapping[str, Tensor], backward: Callable) -> None:
    """Propagate the gradients accumulated on ``leaves`` back through ``state`` (one backward)."""
    pairs = [(state[k], leaves[k].grad) for k in state if leaves[k].grad is not None and state[k].requires_grad]
    if pairs:  # ⟨state, g⟩ summed over tensors: its gradient in each state tensor is exactly g
        backward(sum((s * g).sum() for s, g in pairs))


class MergeTraining(pl.LightningModule):
    """Trains ``model`` (a merged encoder) through frozen ``heads`` with ``objective`` on multi-task batches.

    Args:
        model: a :class:`fusion.param.contract.Parametrization`.
        heads: frozen ``(features, task) -> logits`` (:class:`fusion.pools.heads.Heads`).
        objective: a :class:`fusion.train.objectives.Objective`.
        optimizer: ``params -> Optimizer`` (Hydra ``_partial_``).
        scheduler: optional ``optimizer -> LRScheduler`` stepped every optimizer step.
    """

    batches_per_step = 1  # multi-task batches read per optimizer step (the DataModule draws them as one)

    def __init__(self, model: Parametrization, heads: nn.Module, objective: Objective, optimizer: Callable,
                 scheduler: Callable | None = None):
        super().__init__()
        self.model, self.heads = model, heads
        self.objective, self.optimizer_factory, self.scheduler_factory = objective, optimizer, scheduler
        self.loss_name = objective.name
        self.automatic_optimization = False
        self.strict_loading = False  # checkpoints hold only the trainable parameters (see on_save_checkpoint)

    def trainable_parameters(self) -> list[nn.Parameter]:
        return [p for p in self.model.parameters() if p.requires_grad]

    def describe(self) -> dict[str, object]:
        """What results.json records about the loop beyond the runner's own keys (bi-level: its inner optimizer)."""
        return {}

    def trainable_names(self) -> set[str]:
        return {n for n, p in self.named_parameters() if p.requires_grad}

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        """Keep only the trainable merge parameters: the frozen experts are rebuilt from the pool on resume."""
        keep = self.trainable_names()
        checkpoint["state_dict"] = {k: v for k, v in checkpoint["state_dict"].items() if k in keep}

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        """Loaded with ``strict=False`` (frozen weights are absent); every trainable parameter must be there."""
        missing = sorted(self.trainable_names() - set(checkpoint["state_dict"]))
        if missing:
            raise KeyError(f"checkpoint lacks trainable parameters {missing[:3]} (of {len(missing)} missing): it was "
                           "written by a different merge parametrization")

    def configure_optimizers(self):
        params = self.trainable_parameters()
        if not params:
            raise ValueError("the merge parametrization has no trainable parameters")
        opt = self.optimizer_factory(params)
        if self.scheduler_factory is None:
            return opt
        return [opt], [{"scheduler": self.scheduler_factory(opt), "interval": "step"}]

    def task_losses(self, batch: Mapping[str, tuple[Tensor, Tensor | None]]) -> dict[str, Tensor]:
        """Per-task forward+backward with the merge built once; returns the detached losses."""
        state = self.model.prepare()
        leaves = {k: v.detach().requires_grad_(v.requires_grad) for k, v in state.items()}
        losses = {}
        for task, (images, labels) in batch.items():
            logits = self.heads(self.model(images, leaves), task)
            loss = self.objective(*token_rows(logits, labels, images, self.objective.needs_labels))
            self.manual_backward(loss)
            losses[task] = loss.detach()
        backward_through_state(state, leaves, self.manual_backward)
        self.model.reduce_gradients_()  # sharded task vectors (trainer=fsdp): each rank holds a partial sum
        return losses

    def training_step(self, batch: Mapping[str, tuple[Tensor, Tensor | None]], batch_idx: int) -> Tensor:
        opt = self.optimizers()
        opt.zero_grad(set_to_none=True)
        losses = self.task_losses(batch)
        self.check_finite(losses)
        opt.step()
        sched = self.lr_schedulers()
        if sched is not None:
            sched.step()
        total = torch.stack(list(losses.values())).sum()
        self.log(f"train/{self.loss_name}", total, prog_bar=self.trainer.progress_bar_callback is not None)
        for task, loss in losses.items():
            self.log(f"train/{self.loss_name}/{task}", loss)
        if self.trainer._logger_connector.should_update_logs:  # stats read the device: only on the steps logged
            for key, value in self.model.stats().items():
                if math.isfinite(value):
                    self.log(f"train/{key}", value)
        return total

    def check_finite(self, losses: Mapping[str, Tensor]) -> None:
        """One device sync per step: every loss and trainable gradient finite, else :class:`NonFiniteLossError`
        naming the first bad task (the parameters are not updated)."""
        grads = [p.grad for p in self.trainable_parameters() if p.grad is not None]
        ok = torch.isfinite(torch.stack(list(losses.values()))).all()
        for g in grads:
            ok = ok & torch.isfinite(g).all().to(ok.device)
        if bool(ok):
            return
        bad = [t for t, v in losses.items() if not torch.isfinite(v)]
        if bad:
            raise NonFiniteLossError(f"non-finite {self.loss_name} ({float(losses[bad[0]])}) on task '{bad[0]}' at "
                                     f"step {self.global_step}; lower the learning rate or enable clamping")
        raise NonFiniteLossError(f"non-finite gradient at step {self.global_step}; parameters not updated")
