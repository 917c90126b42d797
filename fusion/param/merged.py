"""The functional merged model every learned method shares (no deep copy of the model per step).

``θ(φ) = θ_0 + δ_φ(τ)``: a frozen base encoder, frozen stacked task vectors ``τ`` and a trainable
*weighting* module ``δ_φ`` (task-wise / layer-wise coefficients, Concrete masks, ...). The merged
parameters are built once per optimizer step by :meth:`MergedEncoder.prepare` and the base is run with
``torch.func.functional_call`` so gradients reach ``φ``.

Contract (tests/test_contract.py): a static parametrization says :meth:`merge_and_unload` and gives back a
plain module whose outputs equal the wrapped model's; an input-dependent one (routers) refuses it.

Under ``trainer=fsdp`` :meth:`MergedEncoder.shard_task_vectors` keeps only this rank's chunk of every task vector
(:mod:`fusion.param.sharding`); the weighting (:class:`fusion.param.contract.Weighting`) then says which part of it
is elementwise in ``τ`` (``elementwise_split()``).
"""
from __future__ import annotations

import copy
from collections.abc import Mapping

import torch
from torch import Tensor, nn
from torch.func import functional_call

from fusion.merge.task_vectors import TaskVectors, num_tasks
from fusion.param.contract import InputDependentError, MergeRecord, NotShardableError, ParametrizationBase, Weighting
from fusion.param.sharding import ShardLayout, all_gather_rows, average_gradients_, rank_and_world

__all__ = ["InputDependentError", "MergedEncoder", "NotShardableError", "freeze_"]


def freeze_(module: nn.Module) -> nn.Module:
    """``requires_grad=False`` for every parameter of ``module`` (in place); returns it."""
    for p in module.parameters():
        p.requires_grad_(False)
    return module


class MergedEncoder(ParametrizationBase):
    """A frozen encoder whose parameters named in ``task_vectors`` are ``θ_0 + weighting(τ)``.

    Args:
        base: the pretrained encoder (frozen here, shared, not copied).
        task_vectors: stacked ``{name: Tensor[K, *shape]}``; names must be parameters of ``base``.
        weighting: a :class:`fusion.param.contract.Weighting` (an ``nn.Module``): ``τ -> δ`` with ``stats()``,
            ``coefficients()`` and ``elementwise_split()``.
    """

    def __init__(self, base: nn.Module, task_vectors: Mapping[str, Tensor], weighting: Weighting):
        super().__init__()
        params = dict(base.named_parameters())
        unknown = [n for n in task_vectors if n not in params]
        if unknown:
            raise KeyError(f"task-vector keys {unknown[:3]} are not parameters of the base encoder "
                           f"(first base keys: {list(params)[:3]})")
        self.base = freeze_(base)
        self.names = list(task_vectors)
        for i, name in enumerate(self.names):
            self.register_buffer(f"tv_{i}", task_vectors[name], persistent=False)
        self.weighting = weighting
        self.sharding: ShardLayout | None = None
        self.num_tasks = num_tasks(task_vectors)
        self._group = None

    def task_vectors(self) -> TaskVectors:
        if self.sharding is not None:
            raise RuntimeError(f"the task vectors are sharded over {self.sharding.world} ranks; this rank holds "
                               "only its chunks (tv_shard)")
        return {n: getattr(self, f"tv_{i}") for i, n in enumerate(self.names)}

    def shard_task_vectors(self, group=None) -> dict[str, int]:
        """Keep only this rank's chunk of every task vector (one ``[K, width]`` buffer); returns the sizes.

        Called by :class:`fusion.train.strategies.ShardedMergeStrategy` before the model moves to its device.
        """
        self.weighting.elementwise_split()  # NotShardableError when this weighting is not elementwise in τ
        if self.sharding is not None:
            return self.sharding.describe(self.num_tasks)
        rank, world = rank_and_world(group)
        tv = self.task_vectors()
        layout = ShardLayout.of(tv, rank, world)
        shard = layout.shard(tv)
        for i in range(len(self.names)):
            delattr(self, f"tv_{i}")
        self.register_buffer("tv_shard", shard, persistent=False)
        self.sharding, self._group = layout, group
        return layout.describe(self.num_tasks)

    def sharding_info(self) -> dict[str, int] | None:
        """The sizes :meth:`shard_task_vectors` returned, or ``None`` when unsharded."""
        return self.sharding.describe(self.num_tasks) if self.sharding is not None else None

    def delta(self) -> dict[str, Tensor]:
        """The update ``δ = weighting(τ)``; sharded: each rank's chunk, all-gathered, then the non-elementwise rest."""
        if self.sharding is None:
            return self.weighting(self.task_vectors())
        elementwise, finish = self.weighting.elementwise_split()
        local = elementwise(self.sharding.views(self.tv_shard))
        delta = self.sharding.assemble(all_gather_rows(self.sharding.flatten(local), self._group))
        return finish(delta) if finish is not None else delta

    def reduce_gradients_(self) -> None:
        """Sharded: average the trainable gradients over the ranks (each holds a partial sum; see the module doc)."""
        if self.sharding is not None:
            average_gradients_(self.parameters(), self._group)

    def prepare(self) -> dict[str, Tensor]:
        """The merged parameters ``{name: θ_0 + δ}`` (differentiable in the weighting's parameters)."""
        delta = self.delta()
        params = dict(self.base.named_parameters())
        return {n: params[n] + delta[n].to(params[n].dtype) for n in self.names}

    def forward(self, images: Tensor, state: Mapping[str, Tensor] | None = None) -> Tensor:
        """Encode ``images`` with the merged parameters (``state`` from :meth:`prepare`, or fresh)."""
        return functional_call(self.base, dict(state if state is not None else self.prepare()), (images,),
                               strict=False)

    def stats(self) -> dict[str, float]:
        """Scalars to log about the trainable weighting (e.g. ``lambda_mean``)."""
        return self.weighting.stats()

    def record(self) -> MergeRecord:
        """The trainable parameters and the coefficients as used in the merge (``None`` if the weighting has none)."""
        values = self.weighting.coefficients()
        return MergeRecord(tensor_names=list(self.names), trainable=self.trainable_state(),
                           coefficients=None if values is None else values.detach())

    @torch.no_grad()
    def merge_and_unload(self) -> nn.Module:
        """A plain copy of the base encoder holding the merged weights (detached, frozen)."""
        merged = self.prepare()
        clone = copy.deepcopy(self.base)
        for name, p in clone.named_parameters():
            if name in merged:
                p.copy_(merged[name])
        return freeze_(clone).eval()
