"""The functional merged model every learned method shares (no deep copy of the model per step).

``θ(φ) = θ_0 + δ_φ(τ)``: a frozen base encoder, frozen stacked task vectors ``τ`` and a trainable
*weighting* module ``δ_φ`` (task-wise / layer-wise coefficients, Concrete masks, ...). The merged
parameters are built once per optimizer step by :meth:`MergedEncoder.prepare` and the base is run with
``torch.func.functional_call`` so gradients reach ``φ``.

Contract (tests/test_contract.py): a static parametrization says :meth:`merge_and_unload` and gives back a
plain module whose outputs equal the wrapped model's; an input-dependent one (routers) refuses it.
"""
from __future__ import annotations

import copy
from collections.abc import Mapping

import torch
from torch import Tensor, nn
from torch.func import functional_call

from fusion.merge.task_vectors import TaskVectors


class InputDependentError(TypeError):
    """``merge_and_unload`` on a model whose weights depend on its input (a router)."""


def freeze_(module: nn.Module) -> nn.Module:
    """``requires_grad=False`` for every parameter of ``module`` (in place); returns it."""
    for p in module.parameters():
        p.requires_grad_(False)
    return module


class MergedEncoder(nn.Module):
    """A frozen encoder whose parameters named in ``task_vectors`` are ``θ_0 + weighting(τ)``.

    Args:
        base: the pretrained encoder (frozen here, shared, not copied).
        task_vectors: stacked ``{name: Tensor[K, *shape]}``; names must be parameters of ``base``.
        weighting: ``nn.Module`` mapping the task-vector dict to the update ``{name: Tensor[*shape]}``.
    """

    input_dependent = False

    def __init__(self, base: nn.Module, task_vectors: Mapping[str, Tensor], weighting: nn.Module):
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

    def task_vectors(self) -> TaskVectors:
        return {n: getattr(self, f"tv_{i}") for i, n in enumerate(self.names)}

    def prepare(self) -> dict[str, Tensor]:
        """The merged parameters ``{name: θ_0 + δ}`` (differentiable in the weighting's parameters)."""
        delta = self.weighting(self.task_vectors())
        params = dict(self.base.named_parameters())
        return {n: params[n] + delta[n].to(params[n].dtype) for n in self.names}

    def forward(self, images: Tensor, state: Mapping[str, Tensor] | None = None) -> Tensor:
        """Encode ``images`` with the merged parameters (``state`` from :meth:`prepare`, or fresh)."""
        return functional_call(self.base, dict(state if state is not None else self.prepare()), (images,),
                               strict=False)

    def stats(self) -> dict[str, float]:
        """Scalars to log about the trainable weighting (e.g. ``lambda_mean``)."""
        stats = getattr(self.weighting, "stats", None)
        return stats() if stats else {}

    @torch.no_grad()
    def merge_and_unload(self) -> nn.Module:
        """A plain copy of the base encoder holding the merged weights (detached, frozen)."""
        merged = self.prepare()
        clone = copy.deepcopy(self.base)
        for name, p in clone.named_parameters():
            if name in merged:
                p.copy_(merged[name])
        return freeze_(clone).eval()
