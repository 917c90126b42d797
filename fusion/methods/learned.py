"""The one runner of learned merges: a parametrization over frozen task vectors, trained by the one loop.

AdaMerging (task-wise / layer-wise) is ``model = fusion.param.coefficients.coefficient_merge``; AdaMerging++ is the
same with ``preprocess = fusion.merge.ties.ties_disjoint`` (``method/preprocess=ties``); Concrete Task Arithmetic
is ``model = fusion.param.concrete.concrete_merge``; WEMoE, sparse WEMoE and SMEAR are the routers of
:mod:`fusion.param.routed`. Concrete AdaMerging is two uses of this runner (:mod:`fusion.methods.concrete`). The
objective is entropy on the unlabeled test split (the paper's transductive protocol) or cross-entropy on a labeled
split (``method/objective=cross_entropy method/data=val_labeled``).
"""
from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import replace
from typing import Any, Protocol, runtime_checkable

from pytorch_lightning.utilities import rank_zero_only

from fusion.errors import ConfigError
from fusion.merge.task_vectors import floating_dtype
from fusion.methods.base import MergedStart, MergeOutcome, RunContext
from fusion.methods.static import merged_encoder
from fusion.param.contract import MergeRecord, Parametrization, check_parametrization
from fusion.pools.pool import require_no_distractors
from fusion.pools.tied import untied_state
from fusion.train.module import MergeTraining, NonFiniteLossError
from fusion.train.objectives import Objective

log = logging.getLogger(__name__)


@runtime_checkable
class InitialCoefficient(Protocol):
    """A method whose (tuned) λ can start a learned merge: :class:`fusion.methods.static.StaticMerge` (one float),
    :class:`fusion.methods.search.EvolutionarySearch` (K floats, or a K × L table for the layer-wise search)."""

    def initial_coefficient(self, pool, taskpool, ctx: RunContext) -> tuple[Any, dict[str, Any] | None]: ...


@runtime_checkable
class LearnedMethod(Protocol):
    """A method that trains: one or more uses of :class:`LearnedMerge` (its training stages, in order)."""

    def stages(self) -> list["LearnedMerge"]: ...


@runtime_checkable
class MergeMethod(Protocol):
    """Any method (:meth:`run` -> :class:`MergeOutcome`): as an ``init`` it contributes its merged vector."""

    name: str

    def run(self, pool, taskpool, ctx: RunContext) -> MergeOutcome: ...


def merged_start(method: MergeMethod, pool, taskpool, ctx: RunContext) -> tuple[MergedStart, Any]:
    """Run ``method`` and take ``δ = θ_merged − θ_0`` of the one model it exports (RegMean, Fisher, MaTS…)."""
    name, outcome = method.name, method.run(pool, taskpool, ctx)
    if outcome.inference != "single model":
        raise ConfigError(f"method.init '{name}' needs the task id at inference ({outcome.inference}): it has no "
                          "single merged model to start from; use a merge (method/init=task_arithmetic, tsv_m, …)")
    theta0, merged = pool.pretrained_state(), untied_state(outcome.encoder)
    if set(merged) != set(theta0):
        raise ConfigError(f"method.init '{name}' exports a model with other parameters than the pool's encoder (an "
                          "input-dependent router?); start from a static merge instead")
    delta = {k: merged[k].to(v.device) - v for k, v in theta0.items() if v.is_floating_point()}
    return MergedStart(delta, name), outcome.info.get("tuning")


def describe_init(init: Any) -> Any:
    """``init`` as results.json records it."""
    return init.describe() if isinstance(init, MergedStart) else init


def initial_value(init: Any, pool, taskpool, ctx: RunContext) -> tuple[Any, dict[str, Any] | None]:
    """``(λ_0, tuning record)``: a fixed ``init`` (a float or one per task) as it is, the val-tuned ``lam`` of a
    static merge (``method/init=task_arithmetic``), the searched λ of an evolutionary search
    (``method/init=evolutionary_layer_wise``), or the merged vector (:class:`MergedStart`) of a merge without λ
    (``method/init=tsv_m``) or of any single-model method (``method/init=regmean``). ``init`` is declared as that
    union; this picks its branch."""
    if isinstance(init, InitialCoefficient):
        return init.initial_coefficient(pool, taskpool, ctx)
    if isinstance(init, MergeMethod):
        return merged_start(init, pool, taskpool, ctx)
    return init, None


def protocol(objective: Objective, split: str, labeled: bool) -> str:
    """A readable statement of what data the method trained on."""
    if labeled:
        return f"{objective.name} on the labeled {split} split"
    transductive = " (test-time adaptation: transductive, adapts on the evaluation split)" if split == "test" else ""
    return f"{objective.name} minimisation on unlabeled {split} inputs{transductive}"


class LearnedMerge:
    """Train a parametrization built by ``model(base, task_vectors, init)`` over (optionally preprocessed) task
    vectors with ``training`` (the loop), then evaluate what it exports.

    Args:
        name: the method's name in results.json (and the training stage its checkpoints record).
        model: ``(base, task_vectors, init) -> Parametrization`` (Hydra ``_partial_``), e.g.
            :func:`fusion.param.coefficients.coefficient_merge`.
        objective: a :class:`fusion.train.objectives.Objective`.
        optimizer, scheduler: Hydra partials over parameters / optimizer.
        data: ``(taskpool, tasks, seed, device, batches_per_step) -> MultiTaskDataModule`` partial (split,
            batch_size, labeled).
        steps: optimizer steps.
        init: a float, one float per task, or an :class:`InitialCoefficient` (a StaticMerge's tuned ``lam``, an
            evolutionary search's λ) whose value is the initial value.
        preprocess: optional ``τ -> τ'`` (e.g. TIES trim + elect + disjoint for AdaMerging++).
        tv_dtype: task-vector dtype name (``bfloat16`` halves their memory).
        training: ``(model, heads, objective, optimizer, scheduler) -> MergeTraining`` (Hydra ``_partial_``);
            default :class:`MergeTraining`; Concrete AdaMerging's mask phase uses
            :class:`fusion.train.bilevel.BilevelTraining`.
    """

    def __init__(self, name: str, model: Callable, objective: Objective, optimizer: Callable, data: Callable,
                 steps: int, init: Any = 0.3, preprocess: Callable | None = None, scheduler: Callable | None = None,
                 tv_dtype: str | None = None, training: Callable[..., MergeTraining] | None = None):
        if steps < 1:
            raise ConfigError(f"method.steps must be ≥ 1, got {steps}")
        self.name, self.model, self.objective = name, model, objective
        self.optimizer, self.scheduler, self.data, self.steps = optimizer, scheduler, data, int(steps)
        self.init, self.preprocess = init, preprocess
        self.tv_dtype = floating_dtype(tv_dtype, "method.tv_dtype")
        self.training = training or MergeTraining

    def stages(self) -> list[LearnedMerge]:
        """One training stage: this runner."""
        return [self]

    def build_model(self, pool, init: Any, ctx: RunContext) -> Parametrization:
        # one process: on the run's device; several: on the host, where each rank's strategy shards or places them
        tv = pool.task_vectors(dtype=self.tv_dtype, device="cpu" if ctx.distributed else ctx.device)
        if self.preprocess is not None:
            tv = self.preprocess(tv)
        base = pool.encoder
        if isinstance(init, MergedStart):  # start at that merge: base θ0 + δ, coefficients from 0
            base, init = merged_encoder(pool, init.delta), 0.0
        model = check_parametrization(self.model(base=base, task_vectors=tv, init=init, **self.pool_inputs(pool)),
                                      f"method '{self.name}'")
        if model.input_dependent and base is not pool.encoder:
            raise ConfigError(f"method '{self.name}' is a router, whose saved model is rebuilt over the pretrained "
                              "encoder: it cannot start from a merged vector; use a λ init (method/init="
                              "task_arithmetic)")
        return model

    def pool_inputs(self, pool) -> dict[str, Any]:
        """What the model factory takes from the pool besides θ_0 and the task vectors: nothing here
        (:class:`RoutedMerge`: the pool's transformer-MLP pattern)."""
        return {}

    def build_data(self, taskpool, tasks, ctx: RunContext, module: MergeTraining):
        datamodule = self.data(taskpool=taskpool, tasks=tasks, seed=ctx.seed, device=ctx.device,
                               batches_per_step=module.batches_per_step)
        if self.objective.needs_labels and not datamodule.labeled:
            raise ConfigError(f"objective '{self.objective.name}' needs labels but method.data.labeled is false; "
                              "use method/data=val_labeled (the labeled val split)")
        return datamodule

    def run(self, pool, taskpool, ctx: RunContext) -> MergeOutcome:
        init, tuning = initial_value(self.init, pool, taskpool, ctx)
        return self.train(pool, taskpool, ctx, init, tuning)

    def train(self, pool, taskpool, ctx: RunContext, init: Any, tuning: dict | None = None) -> MergeOutcome:
        """Build, train and export the parametrization from the initial value ``init`` (already resolved)."""
        require_no_distractors(pool, self.name, "writes its learned coefficients, masks and routing labelled one "
                                                "row per task (fusion.report.merge_files)")
        model = self.build_model(pool, init, ctx)
        module = self.training(model=model, heads=pool.heads, objective=self.objective, optimizer=self.optimizer,
                               scheduler=self.scheduler)
        datamodule = self.build_data(taskpool, pool.tasks, ctx, module)
        try:
            ctx.fit(module, datamodule, self.steps, stage=self.name)
        except NonFiniteLossError as err:
            err.records = {"artifacts": self.record(model)}
            raise
        model.to(ctx.device)  # Lightning's teardown moved it back to the CPU
        info = {"init": describe_init(init), "init_tuning": tuning, "steps": self.steps, **module.describe(),
                "trainable_parameters": sum(p.numel() for p in model.parameters() if p.requires_grad), **model.stats()}
        sharding = model.sharding_info()
        if sharding is not None:  # trainer=fsdp: the task-vector elements rank 0 held
            info["task_vector_sharding"] = sharding
        record = self.record(model, taskpool, pool.tasks, ctx)
        return MergeOutcome(model.export(), info, protocol(self.objective, datamodule.split, datamodule.labeled),
                            records={"artifacts": record})

    def record(self, model: Parametrization, taskpool=None, tasks=None, ctx: RunContext | None = None) -> MergeRecord:
        """What the report writes: the parametrization's record titled by this method; for an input-dependent
        model (on rank 0, with a task pool) the mean routing per task (:func:`fusion.evaluate.routing_matrix`)."""
        record = replace(model.record(), title=self.name)
        if model.input_dependent and taskpool is not None and rank_zero_only.rank == 0:
            from fusion.evaluate import routing_matrix

            record.routing = routing_matrix(model, taskpool, tasks)
        return record


class RoutedMerge(LearnedMerge):
    """A learned merge whose model routes the pool's transformer MLPs (WEMoE, sparse WEMoE, SMEAR:
    :mod:`fusion.param.routed`): the factory also receives the pool's declared MLP pattern
    (:attr:`fusion.pools.contract.Backbone.mlp_pattern`) as ``pool_mlp_pattern``, which it uses when
    ``method.model.mlp_pattern`` is null (:func:`fusion.param.routed.resolve_mlp_pattern`)."""

    def pool_inputs(self, pool) -> dict[str, Any]:
        return {"pool_mlp_pattern": pool.mlp_pattern}
