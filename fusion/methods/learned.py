"""Learned merges: a parametrization over frozen task vectors, trained by the one loop (MergeTraining).

AdaMerging (task-wise / layer-wise) is ``parametrization = fusion.param.coefficients.{task_wise,layer_wise}``;
AdaMerging++ is the same with ``preprocess = fusion.merge.ties.ties_disjoint`` (selected by config). The
objective is entropy on the unlabeled test split (the paper's transductive protocol) or cross-entropy on a
labeled split.
"""
from __future__ import annotations

import json
import logging
from collections.abc import Callable, Sequence
from typing import Any

import torch
from pytorch_lightning.utilities import rank_zero_only

from fusion.methods.base import MergeOutcome, RunContext
from fusion.report import coefficient_heatmap
from fusion.train.checkpoint import resume_path
from fusion.train.module import MergeTraining, NonFiniteLossError
from fusion.train.objectives import needs_labels, objective_name
from fusion.utils import atomic_save_safetensors, atomic_write_json

log = logging.getLogger(__name__)


def protocol(objective: Callable, split: str, labeled: bool) -> str:
    """A readable statement of what data the method trained on."""
    if labeled:
        return f"{objective_name(objective)} on the labeled {split} split"
    transductive = " (test-time adaptation: transductive, adapts on the evaluation split)" if split == "test" else ""
    return f"{objective_name(objective)} minimisation on unlabeled {split} images{transductive}"


class LearnedMerge:
    """Train a merged model built by ``model(base, task_vectors, init)`` over (optionally preprocessed) task vectors.

    Args:
        model: ``(base, task_vectors, init) -> nn.Module`` with ``prepare()``, ``forward(images, state)``,
            ``merge_and_unload()`` (Hydra ``_partial_``), e.g. :func:`fusion.param.coefficients.coefficient_merge`.
        objective: ``(logits, labels | None) -> loss``.
        optimizer, scheduler: Hydra partials over parameters / optimizer.
        data: ``(taskpool, tasks, seed) -> MultiTaskDataModule`` partial (split, batch_size, labeled).
        steps: optimizer steps.
        init: a float, one float per task, or a StaticMerge whose (tuned) ``lam`` is the initial value.
        preprocess: optional ``τ -> τ'`` (e.g. TIES trim + elect + disjoint for AdaMerging++).
    """

    def __init__(self, name: str, model: Callable, objective: Callable, optimizer: Callable,
                 data: Callable, steps: int, init: Any = 0.3, preprocess: Callable | None = None,
                 scheduler: Callable | None = None, tv_dtype: str | None = None):
        if steps < 1:
            raise ValueError(f"method.steps must be ≥ 1, got {steps}")
        self.name, self.model, self.objective = name, model, objective
        self.optimizer, self.scheduler, self.data, self.steps = optimizer, scheduler, data, int(steps)
        self.init, self.preprocess = init, preprocess
        self.tv_dtype = getattr(torch, tv_dtype) if tv_dtype else None

    def initial_value(self, pool, taskpool, ctx: RunContext) -> tuple[Any, dict | None]:
        if hasattr(self.init, "initial_coefficient"):
            return self.init.initial_coefficient(pool, taskpool, ctx)
        return self.init, None

    def build_model(self, pool, init: Any, ctx: RunContext):
        # one process: on the run's device; several: on the host, where each rank's strategy shards or places them
        tv = pool.task_vectors(dtype=self.tv_dtype, device="cpu" if ctx.distributed else ctx.device)
        if self.preprocess is not None:
            tv = self.preprocess(tv)
        return self.model(base=pool.encoder, task_vectors=tv, init=init)

    def run(self, pool, taskpool, ctx: RunContext) -> MergeOutcome:
        init, init_tuning = self.initial_value(pool, taskpool, ctx)
        model = self.build_model(pool, init, ctx)
        datamodule = self.data(taskpool=taskpool, tasks=pool.tasks, seed=ctx.seed, device=ctx.device)
        if needs_labels(self.objective) and not datamodule.labeled:
            raise ValueError(f"objective '{objective_name(self.objective)}' needs labels but method.data.labeled is "
                             "false; set method.data.labeled=true and method.data.split=val")
        module = MergeTraining(model, pool.heads, self.objective, self.optimizer, self.scheduler)
        trainer = ctx.trainer(max_steps=self.steps, default_root_dir=str(ctx.output_dir), logger=ctx.loggers or False)
        try:
            trainer.fit(module, datamodule=datamodule, ckpt_path=resume_path(trainer))
        except NonFiniteLossError:
            self.save_outputs(model, pool.tasks, ctx, suffix=".last_good")
            raise
        self.save_outputs(model, pool.tasks, ctx)
        model.to(ctx.device)  # Lightning's teardown moved it back to the CPU
        info = {"init": init, "init_tuning": init_tuning, "steps": self.steps,
                "trainable_parameters": sum(p.numel() for p in model.parameters() if p.requires_grad), **model.stats()}
        sharding = getattr(model, "sharding_info", lambda: None)()
        if sharding is not None:  # trainer=fsdp: the task-vector elements rank 0 held
            info["task_vector_sharding"] = sharding
        if hasattr(model, "artifacts") and rank_zero_only.rank == 0:
            info["artifacts"] = model.artifacts(ctx.output_dir, taskpool, pool.tasks)
        # input-dependent models (routers) are evaluated as they are, in eval mode (per-sample routing, no dropout)
        encoder = model.eval() if getattr(model, "input_dependent", False) else model.merge_and_unload()
        return MergeOutcome(encoder, info, protocol(self.objective, datamodule.split, datamodule.labeled))

    @rank_zero_only
    def save_outputs(self, model, tasks: Sequence[str], ctx: RunContext, suffix: str = "") -> None:
        """Learned parameters (safetensors + JSON) and, for coefficients, a tasks × tensors heatmap."""
        out = ctx.output_dir
        state = {n: p.detach().float() for n, p in model.named_parameters() if p.requires_grad}
        meta = {"tasks": json.dumps(list(tasks)), "tensor_names": json.dumps(getattr(model, "names", []))}
        atomic_save_safetensors(out / f"merge_parameters{suffix}.safetensors", state, meta)
        weighting = getattr(model, "weighting", None)
        if hasattr(weighting, "values"):
            values = weighting.values().detach()
            atomic_write_json(out / f"coefficients{suffix}.json",
                              {"tasks": list(tasks), "tensor_names": model.names, "lambdas": values.tolist()})
            if not suffix:
                coefficient_heatmap(values, tasks, out / "coefficients.png", title=f"{self.name}: learned λ")
