"""First-order bi-level training: Concrete AdaMerging's mask meta-learning (Tang et al., arXiv 2312.06173, §3.3;
``tanganke/subspace_fusion:scripts/clip_layer_wise_concrete_adamerging.py:meta_train``).

The outer variable is the mask logits ``x``, the inner one the merge coefficients ``λ``. Each optimizer step:

1. reset ``λ`` to its initial value (0.3);
2. inner step: sample a mask, merge, and take ONE step of the inner optimizer (Adam, lr 1) on ``λ`` with the
   objective on the first half of the step's batches; the mask is *detached* (no gradient reaches ``x``);
3. outer step: re-merge with a FRESH sample and the updated ``λ`` (held fixed), compute the objective on the
   second half of the batches and step the outer optimizer (Adam, lr 1e-3) on ``x``.

No gradient flows through the inner update (first-order). Both steps call :meth:`MergeTraining.task_losses`, the
per-task forward/backward of the one loop. The parametrization's declared ``inner_parameters()``,
``outer_parameters()`` and ``outer_detached()`` (:class:`fusion.param.contract.Parametrization`) name the two
variables; :class:`fusion.param.concrete.ConcreteMergedEncoder` gives λ and the mask logits. Each step reads two
batches per task (inner and outer): the DataModule draws them as one batch of ``2 × method.data.batch_size``
(:attr:`BilevelTraining.batches_per_step`), split in half here.
"""
from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Mapping, Sequence

import torch
from torch import Tensor, nn

from fusion.param.contract import Parametrization
from fusion.train.module import MergeTraining, NonFiniteLossError
from fusion.train.objectives import Objective

Batch = Mapping[str, tuple[Tensor, Tensor | None]]


def split_batch(batch: Batch) -> tuple[dict, dict]:
    """Each task's batch cut in two halves: ``(inner, outer)`` (two independent batches of the same stream)."""
    inner, outer = {}, {}
    for task, (images, labels) in batch.items():
        if len(images) < 2:
            raise ValueError(f"bi-level training splits each task's batch into an inner and an outer half, but "
                             f"task '{task}' has {len(images)} example(s)")
        h = len(images) // 2
        inner[task] = (images[:h], None if labels is None else labels[:h])
        outer[task] = (images[h:], None if labels is None else labels[h:])
    return inner, outer


@contextlib.contextmanager
def frozen(params: Sequence[nn.Parameter]) -> Iterator[None]:
    """Temporarily ``requires_grad=False`` (no gradient is computed for ``params``)."""
    flags = [p.requires_grad for p in params]
    for p in params:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p, flag in zip(params, flags):
            p.requires_grad_(flag)


def check_gradients(params: Sequence[nn.Parameter], what: str, step: int) -> None:
    for p in params:
        if p.grad is not None and not torch.isfinite(p.grad).all():
            raise NonFiniteLossError(f"non-finite {what} gradient at step {step}; parameters not updated")


def refuse_ddp_wrapper(strategy) -> None:
    """A clear error under torch's DDP wrapper, which cannot reduce two backward passes over different parameters."""
    from torch.nn.parallel import DistributedDataParallel

    if isinstance(strategy.model, DistributedDataParallel):
        raise RuntimeError("bi-level training (Concrete AdaMerging) runs two backward passes over different parameters "
                           "per step (λ, then the mask logits), which the DDP wrapper cannot reduce; use trainer=fsdp "
                           "(the same data parallelism; the merge reduces its gradients itself, once per pass)")


class BilevelTraining(MergeTraining):
    """:class:`MergeTraining` whose steps are first-order bi-level (inner ``λ``, outer mask logits).

    Args:
        model, heads, objective, scheduler: as :class:`MergeTraining` (``optimizer`` is the OUTER one, over the
            mask logits; the scheduler steps it).
        inner_optimizer: ``params -> Optimizer`` for ``λ`` (Hydra ``_partial_``; METHODS.md: Adam, lr 1).
        persistent_inner: ``False`` (default) builds a fresh inner optimizer every step, so the inner update is
            exactly one Adam step from ``λ_0``; ``True`` keeps one inner optimizer whose moments carry across steps,
            as the reference code does (its ``λ`` is reset but its Adam state is not).
    """

    batches_per_step = 2  # the inner and the outer batch

    def __init__(self, model: Parametrization, heads: nn.Module, objective: Objective, optimizer: Callable,
                 inner_optimizer: Callable, scheduler: Callable | None = None, persistent_inner: bool = False):
        super().__init__(model, heads, objective, optimizer, scheduler)
        self.inner_optimizer_factory, self.persistent_inner = inner_optimizer, persistent_inner
        self._inner_params = [p for p in self.model.inner_parameters() if p.requires_grad]
        self.inner_init = [p.detach().clone() for p in self._inner_params]
        if not self.inner_init:
            raise ValueError(f"bi-level training needs learnable inner variables, but {type(model).__name__} "
                             "declares none (Concrete: method.phase1.model.learn_coefficients=task_wise or layer_wise)")
        self._inner_opt: torch.optim.Optimizer | None = None

    def on_fit_start(self) -> None:
        refuse_ddp_wrapper(self.trainer.strategy)

    def describe(self) -> dict[str, object]:
        return {"persistent_inner_optimizer": self.persistent_inner}

    def trainable_parameters(self) -> list[nn.Parameter]:
        """The outer variables (mask logits): what the configured optimizer steps."""
        return [p for p in self.model.outer_parameters() if p.requires_grad]

    def inner_parameters(self) -> list[nn.Parameter]:
        """The inner variables (λ), fixed when the module is built."""
        return list(self._inner_params)

    def inner_optimizer(self) -> torch.optim.Optimizer:
        if self._inner_opt is None or not self.persistent_inner:
            self._inner_opt = self.inner_optimizer_factory(self.inner_parameters())
        return self._inner_opt

    @torch.no_grad()
    def reset_inner(self) -> None:
        for p, v in zip(self.inner_parameters(), self.inner_init):
            p.copy_(v)

    def inner_step(self, batch: Batch) -> dict[str, Tensor]:
        """Reset ``λ``, then one inner optimizer step on ``λ`` with the mask detached."""
        self.reset_inner()
        for p in self.trainable_parameters():
            p.grad = None
        opt = self.inner_optimizer()
        opt.zero_grad(set_to_none=True)
        with self.model.outer_detached():
            losses = self.task_losses(batch)
        check_gradients(self.inner_parameters(), "inner (λ)", self.global_step)
        opt.step()
        opt.zero_grad(set_to_none=True)  # the outer step must not see (or add to) the inner gradient
        return losses

    def outer_step(self, batch: Batch, opt: torch.optim.Optimizer) -> dict[str, Tensor]:
        """A fresh mask sample with ``λ`` held fixed; one step of ``opt`` on the mask logits."""
        opt.zero_grad(set_to_none=True)
        with frozen(self.inner_parameters()):
            losses = self.task_losses(batch)
        check_gradients(self.trainable_parameters(), "outer (mask logit)", self.global_step)
        opt.step()
        return losses

    def training_step(self, batch: Batch, batch_idx: int) -> Tensor:
        inner_batch, outer_batch = split_batch(batch)
        inner = self.inner_step(inner_batch)
        outer = self.outer_step(outer_batch, self.optimizers())
        sched = self.lr_schedulers()
        if sched is not None:
            sched.step()
        total = torch.stack(list(outer.values())).sum()
        self.log(f"train/{self.loss_name}", total, prog_bar=True)
        self.log(f"train/inner_{self.loss_name}", torch.stack(list(inner.values())).sum())
        for task, loss in outer.items():
            self.log(f"train/{self.loss_name}/{task}", loss)
        for key, value in self.model.stats().items():
            self.log(f"train/{key}", value)
        return total
