"""Concrete AdaMerging (Tang et al., arXiv 2312.06173, §3.3 and Alg. 1): two uses of the one runner.

Phase 1 (``method.phase1``, a :class:`fusion.methods.learned.LearnedMerge` whose loop is
:class:`fusion.train.bilevel.BilevelTraining`): a shared Concrete mask meta-learned bi-level, the mask logits the outer
variable, task- or layer-wise ``λ`` the inner one (reset to ``λ_0`` every step, one Adam step at lr 1 with the mask
detached; outer Adam at lr 1e-3 on a fresh sample). Phase 2 (``method.phase2``, the AdaMerging runner): the final
mask ``m`` is frozen and ``λ`` is learned over ``τ̃_k = τ_k ⊙ m / mean(m)``, given as its ``preprocess``. Both
phases inherit the method's ``objective``, ``data`` and ``tv_dtype`` unless the phase's own config sets them (e.g.
``+method.phase2.objective=...``), start at the method's ``init`` (resolved once) and read the task vectors after
the method's ``preprocess``. Concrete Task Arithmetic needs no class: it is one ``LearnedMerge`` with
``model = concrete_merge``.
"""
from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import replace
from typing import Any

from fusion.merge.masks import mask_task_vectors
from fusion.methods.base import MergeOutcome, RunContext
from fusion.methods.learned import LearnedMerge, initial_value
from fusion.param.contract import MergeRecord
from fusion.train.module import NonFiniteLossError
from fusion.train.objectives import Objective


def inherit(phase: functools.partial, **shared: Any) -> Any:
    """Call the Hydra partial ``phase`` with ``shared`` keywords, except those its own config sets."""
    return phase(**{k: v for k, v in shared.items() if k not in phase.keywords})


def then(first: Callable | None, second: Callable) -> Callable:
    """``second ∘ first`` (``second`` alone when ``first`` is ``None``): τ → τ' transforms run in order."""
    return second if first is None else lambda tv: second(first(tv))


def mask_record(record: MergeRecord) -> MergeRecord:
    """What phase 1 leaves on disk: the evaluation mask and its logits (``mask_logits.safetensors``), no λ (reset
    every step, they are not phase 1's result)."""
    return replace(record, trainable=record.mask_logits or {}, parameters_file="mask_logits", coefficients=None)


class ConcreteAdaMerging:
    """Meta-learn a shared Concrete mask (phase 1), then run AdaMerging over the masked task vectors (phase 2).

    Args:
        name: the method's name in results.json; the phases run as ``<name>/phase1`` and ``<name>/phase2``.
        phase1: ``(**kwargs) -> LearnedMerge`` (Hydra ``_partial_``): the mask phase (``model`` a
            :func:`fusion.param.concrete.concrete_merge` with learnable λ, ``training`` bi-level).
        phase2: ``(**kwargs) -> LearnedMerge`` (Hydra ``_partial_``): AdaMerging over the masked task vectors.
        objective, data, tv_dtype: what both phases use unless their own config sets it.
        init: ``λ_0`` of both phases (phase 1 resets ``λ`` to it every step): a float, one per task, or a
            StaticMerge whose val-tuned ``lam`` is used (``method/init=task_arithmetic``), resolved once.
        preprocess: optional ``τ -> τ'`` applied before both phases (phase 2 then applies the mask to it).
        mask_checkpoint: a ``mask.safetensors`` from an earlier run; phase 1 is skipped.
    """

    def __init__(self, name: str, phase1: Callable[..., LearnedMerge], phase2: Callable[..., LearnedMerge],
                 objective: Objective, data: Callable, init: Any = 0.3, preprocess: Callable | None = None,
                 tv_dtype: str | None = None, mask_checkpoint: str | None = None):
        self.name, self.init, self.preprocess, self.mask_checkpoint = name, init, preprocess, mask_checkpoint
        self.phases = {1: phase1, 2: phase2}
        self.shared = {"objective": objective, "data": data, "tv_dtype": tv_dtype}

    def phase(self, number: int, preprocess: Callable | None) -> LearnedMerge:
        return inherit(self.phases[number], name=f"{self.name}/phase{number}", preprocess=preprocess, **self.shared)

    def stages(self) -> list[LearnedMerge]:
        """The two phases as configured (phase 2 before its mask is known: over the unmasked task vectors)."""
        return [self.phase(1, self.preprocess), self.phase(2, self.preprocess)]

    def run(self, pool, taskpool, ctx: RunContext) -> MergeOutcome:
        init, tuning = initial_value(self.init, pool, taskpool, ctx)
        mask, records, meta, origin, data = self.learn_mask(pool, taskpool, ctx, init)
        phase2 = self.phase(2, then(self.preprocess, functools.partial(mask_task_vectors, masks=mask)))
        second = phase2.train(pool, taskpool, ctx, init, tuning)
        protocol = (f"{origin}, then AdaMerging over the masked task vectors for {phase2.steps} steps; "
                    + (second.protocol if data in (None, second.protocol) else
                       f"phase 1: {data}; phase 2: {second.protocol}"))
        loaded = {"mask": {"loaded_from": str(self.mask_checkpoint)}} if self.mask_checkpoint else {}
        info = {**second.info, **loaded, "meta": meta}  # a learned mask's "mask" entry: written from its record
        return MergeOutcome(second.encoder, info, protocol, records={**records, **second.records})

    def learn_mask(self, pool, taskpool, ctx: RunContext, init: Any):
        """Phase 1 (or the mask of ``mask_checkpoint``): ``(mask, records, phase-1 info, origin, phase-1 data)``.
        A divergence leaves the last good mask and its logits (``.last_good``)."""
        if self.mask_checkpoint:
            from fusion.report.merge_files import read_mask

            tv = pool.task_vectors() if self.preprocess is None else self.preprocess(pool.task_vectors())
            origin = f"Concrete mask loaded from {self.mask_checkpoint}"
            return read_mask(self.mask_checkpoint, tv), {}, {}, origin, None
        phase1 = self.phase(1, self.preprocess)
        try:
            first = phase1.train(pool, taskpool, ctx, init)
        except NonFiniteLossError as err:
            err.records = {"mask": mask_record(err.records["artifacts"])}
            raise
        record = first.records["artifacts"]
        return (record.mask, {"mask": mask_record(record)}, first.info,
                f"Concrete mask meta-learned for {phase1.steps} bi-level steps", first.protocol)
