"""AdaMerging's merge coefficients (Yang et al., ICLR 2024, Eq. 4 task-wise and Eq. 6 layer-wise).

Task-wise: ``δ = Σ_k λ_k τ_k`` (K scalars). Layer-wise: ``δ^l = Σ_k λ_k^l τ_k^l`` with one coefficient per task
and parameter tensor (weights and biases count apart). Both call :func:`fusion.merge.combine.combine`, the same
function task arithmetic uses. ``clamp=(0, 1)`` clamps λ each time it is used (the official code); FusionBench
does not clamp (``clamp=None``).
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from torch import Tensor, nn

from fusion.merge.combine import combine
from fusion.merge.task_vectors import HyperparameterError


def initial_values(init: float | Sequence[float] | Sequence[Sequence[float]], num_tasks: int,
                   num_tensors: int | None = None) -> Tensor:
    """``Tensor[K]`` (task-wise, ``num_tensors=None``) or ``Tensor[K, L]`` (layer-wise) from a scalar, one value per
    task, or (layer-wise only) a ``K × L`` table, e.g. the λ of :class:`fusion.methods.search.EvolutionarySearch`."""
    values = torch.as_tensor(init, dtype=torch.float32)
    if values.dim() == 2:
        if num_tensors is None or tuple(values.shape) != (num_tasks, num_tensors):
            fix = ("pair a layer-wise init with a layer-wise method (layer_wise: true)" if num_tensors is None else
                   f"the model needs [K={num_tasks}, L={num_tensors}]: search on the same pool and tensors")
            raise HyperparameterError(f"method.init is a {tuple(values.shape)} table of coefficients; {fix}")
        return values.clone()
    values = values.flatten()
    if values.numel() == 1:
        values = values.expand(num_tasks).clone()
    elif values.numel() != num_tasks:
        raise HyperparameterError(f"method.init must be a scalar, one value per task (K={num_tasks}) or a K × L "
                                  f"table (layer-wise), got {values.numel()} values")
    return values.clone() if num_tensors is None else values[:, None].repeat(1, num_tensors)


class Coefficients(nn.Module):
    """Learnable ``λ`` of shape ``[K]`` (task-wise) or ``[K, L]`` (layer-wise); ``forward(τ) = Σ λ τ``.

    A :class:`fusion.param.contract.Weighting` of :class:`fusion.param.merged.MergedEncoder`.
    """

    def __init__(self, num_tasks: int, num_tensors: int | None = None, init: float | Sequence[float] = 0.3,
                 clamp: tuple[float, float] | None = None):
        super().__init__()
        values = initial_values(init, num_tasks, num_tensors)
        self.lambdas = nn.Parameter(values)
        if clamp is not None and not clamp[0] < clamp[1]:
            raise HyperparameterError(f"clamp must be (low, high) with low < high, got {clamp}")
        self.clamp = tuple(clamp) if clamp is not None else None

    def coefficients(self) -> Tensor:
        """λ as used in the merge (clamped when configured)."""
        return self.lambdas.clamp(*self.clamp) if self.clamp else self.lambdas

    def forward(self, task_vectors: Mapping[str, Tensor]) -> dict[str, Tensor]:
        if self.lambdas.dim() == 2 and self.lambdas.shape[1] != len(task_vectors):
            raise ValueError(f"layer-wise λ has {self.lambdas.shape[1]} columns but there are "
                             f"{len(task_vectors)} task-vector tensors")
        return combine(task_vectors, self.coefficients())

    def elementwise_split(self) -> tuple[nn.Module, None]:
        """``δ^l_j`` depends on ``τ^l_{·,j}`` alone: the whole weighting runs on task-vector chunks (trainer=fsdp)."""
        return self, None

    def stats(self) -> dict[str, float]:
        v = self.coefficients().detach()
        return {"lambda_mean": float(v.mean()), "lambda_min": float(v.min()), "lambda_max": float(v.max())}


def coefficient_merge(base, task_vectors, init: float | Sequence[float] = 0.3, layer_wise: bool = True,
                      clamp: tuple[float, float] | None = None):
    """AdaMerging's merged encoder: ``MergedEncoder(base, τ, Coefficients)`` (layer-wise or task-wise)."""
    from fusion.merge.task_vectors import num_tasks
    from fusion.param.merged import MergedEncoder

    k, n = num_tasks(task_vectors), len(task_vectors)
    weighting = Coefficients(k, n if layer_wise else None, init, clamp)
    return MergedEncoder(base, task_vectors, weighting)


def task_wise(num_tasks: int, num_tensors: int, init: float | Sequence[float] = 0.3,
              clamp: tuple[float, float] | None = None) -> Coefficients:
    """Task-wise AdaMerging: K coefficients shared by every tensor."""
    return Coefficients(num_tasks, None, init, clamp)


def layer_wise(num_tasks: int, num_tensors: int, init: float | Sequence[float] = 0.3,
               clamp: tuple[float, float] | None = None) -> Coefficients:
    """Layer-wise AdaMerging: K × L coefficients (L = number of parameter tensors)."""
    return Coefficients(num_tasks, num_tensors, init, clamp)
