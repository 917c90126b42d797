"""Concrete AdaMerging (Tang et al., arXiv 2312.06173, §3.3 and Alg. 1): a shared Concrete mask meta-learned bi-level,
then ordinary AdaMerging over the masked task vectors.

Phase 1 (:class:`fusion.train.bilevel.BilevelTraining`): the mask logits are the outer variable, task- or layer-wise
``λ`` the inner one (reset to 0.3 every step, one Adam step at lr 1 with the mask detached; outer Adam at lr 1e-3 on
a fresh sample). Phase 2: the final mask ``m`` is frozen and :class:`fusion.methods.learned.LearnedMerge` (the
AdaMerging code path) learns ``λ`` over ``τ̃_k = τ_k ⊙ m / mean(m)``, given as its ``preprocess``.
Concrete Task Arithmetic needs no class: it is ``LearnedMerge`` with ``model = concrete_merge``.
"""
from __future__ import annotations

import functools
import json
import logging
from collections.abc import Callable
from typing import Any

import torch
from pytorch_lightning.utilities import rank_zero_only

from fusion.merge.masks import mask_task_vectors
from fusion.methods.base import MergeOutcome, RunContext
from fusion.methods.learned import protocol
from fusion.param.concrete import load_mask
from fusion.train.bilevel import BilevelTraining
from fusion.train.module import NonFiniteLossError
from fusion.train.objectives import needs_labels, objective_name
from fusion.utils import atomic_save_safetensors

log = logging.getLogger(__name__)


class ConcreteAdaMerging:
    """Meta-learn a shared Concrete mask (phase 1), then run AdaMerging over the masked task vectors (phase 2).

    Args:
        name: the method's name in results.json.
        model: ``(base, task_vectors, init) -> ConcreteMergedEncoder`` with learnable coefficients (Hydra
            ``_partial_`` of :func:`fusion.param.concrete.concrete_merge`, ``learn_coefficients`` task/layer-wise).
        objective: ``(logits, labels | None) -> loss`` (entropy for test-time adaptation).
        optimizer: the outer optimizer over the mask logits (Adam, lr 1e-3).
        inner_optimizer: the inner optimizer over ``λ`` (Adam, lr 1).
        data: ``(taskpool, tasks, seed) -> MultiTaskDataModule``; each step's batch is split in half
            (inner | outer), so its ``batch_size`` is twice the per-step batch.
        meta_steps: phase-1 (outer) steps.
        adamerging: ``(preprocess=..., init=...) -> LearnedMerge`` (Hydra ``_partial_``): phase 2, called with a
            ``preprocess`` that applies the frozen mask and with ``init``.
        init: ``λ_0`` of both phases (phase 1 resets ``λ`` to it every step): a float, one per task, or a
            StaticMerge whose val-tuned ``lam`` is used (``method/init=task_arithmetic``).
        persistent_inner_optimizer: keep the inner Adam's moments across steps (the reference code) instead of a
            fresh Adam per step (METHODS.md's "one inner Adam step").
        mask_checkpoint: a ``mask.safetensors`` from an earlier run; phase 1 is skipped.
        tv_dtype: task-vector dtype in phase 1 (e.g. ``bfloat16``).
    """

    def __init__(self, name: str, model: Callable, objective: Callable, optimizer: Callable,
                 inner_optimizer: Callable, data: Callable, meta_steps: int, adamerging: Callable,
                 init: Any = 0.3, persistent_inner_optimizer: bool = False, mask_checkpoint: str | None = None,
                 tv_dtype: str | None = None):
        if meta_steps < 1 and mask_checkpoint is None:
            raise ValueError(f"method.meta_steps must be ≥ 1 (or give method.mask_checkpoint), got {meta_steps}")
        self.name, self.model, self.objective = name, model, objective
        self.optimizer, self.inner_optimizer, self.data = optimizer, inner_optimizer, data
        self.meta_steps, self.adamerging, self.init = int(meta_steps), adamerging, init
        self.persistent_inner = persistent_inner_optimizer
        self.mask_checkpoint, self.tv_dtype = mask_checkpoint, tv_dtype

    def run(self, pool, taskpool, ctx: RunContext) -> MergeOutcome:
        init, tuning = self.init, None
        if hasattr(self.init, "initial_coefficient"):  # method/init=task_arithmetic: a val-tuned λ
            init, tuning = self.init.initial_coefficient(pool, taskpool, ctx)
        if self.mask_checkpoint:
            mask = load_mask(self.mask_checkpoint, pool.task_vectors())
            meta: dict[str, Any] = {"mask": {"loaded_from": str(self.mask_checkpoint)}}
            phase1 = f"Concrete mask loaded from {self.mask_checkpoint}"
        else:
            mask, meta, phase1 = self.learn_mask(pool, taskpool, ctx, init)
        phase2 = self.adamerging(preprocess=functools.partial(mask_task_vectors, masks=mask), init=init)
        outcome = phase2.run(pool, taskpool, ctx)
        data = meta.pop("protocol", outcome.protocol)  # phase 1's data (usually the same as phase 2's)
        outcome.info = {**outcome.info, "init_tuning": tuning, "mask": meta.pop("mask", None), "meta": meta}
        outcome.protocol = (f"{phase1}, then AdaMerging over the masked task vectors for {phase2.steps} steps; "
                            + (outcome.protocol if data == outcome.protocol else
                               f"phase 1: {data}; phase 2: {outcome.protocol}"))
        return outcome

    def learn_mask(self, pool, taskpool, ctx: RunContext, init: Any) -> tuple[dict, dict[str, Any], str]:
        """Phase 1: the bi-level meta-learning of the mask; returns ``(final mask, info, summary)``."""
        tv = pool.task_vectors(dtype=getattr(torch, self.tv_dtype) if self.tv_dtype else None,
                               device="cpu" if ctx.distributed else ctx.device)
        model = self.model(base=pool.encoder, task_vectors=tv, init=init)
        datamodule = self.data(taskpool=taskpool, tasks=pool.tasks, seed=ctx.seed, device=ctx.device)
        if needs_labels(self.objective) and not datamodule.labeled:
            raise ValueError(f"objective '{objective_name(self.objective)}' needs labels but method.data.labeled is "
                             "false; set method.data.labeled=true and method.data.split=val")
        module = BilevelTraining(model, pool.heads, self.objective, self.optimizer, self.inner_optimizer,
                                 persistent_inner=self.persistent_inner)
        trainer = ctx.trainer(max_steps=self.meta_steps, default_root_dir=str(ctx.output_dir),
                              logger=ctx.loggers or False)
        try:
            trainer.fit(module, datamodule=datamodule)
        except NonFiniteLossError:
            self.save_outputs(model, pool.tasks, ctx, suffix=".last_good")
            raise
        info = {"meta_steps": self.meta_steps, "persistent_inner_optimizer": self.persistent_inner,
                "mask": self.save_outputs(model, pool.tasks, ctx), **model.stats()}
        info["protocol"] = protocol(self.objective, datamodule.split, datamodule.labeled)
        return model.weighting.final_mask(), info, f"Concrete mask meta-learned for {self.meta_steps} bi-level steps"

    @rank_zero_only
    def save_outputs(self, model, tasks, ctx: RunContext, suffix: str = "") -> dict[str, Any]:
        """Write ``mask{suffix}.safetensors``, ``mask_kept_fraction.png`` and ``mask_logits{suffix}.safetensors``."""
        weighting = model.weighting
        meta = {"tasks": json.dumps(list(tasks)), "tensor_names": json.dumps(model.names)}
        atomic_save_safetensors(ctx.output_dir / f"mask_logits{suffix}.safetensors",
                                {n: x.detach().float() for n, x in weighting.named_logits().items()}, meta)
        return weighting.save_artifacts(ctx.output_dir, suffix, title=f"{self.name}: meta-learned mask")
