"""Coefficient-weighted sums of task vectors: the one merge that TA, averaging and AdaMerging share.

Task arithmetic (Ilharco et al., 2023): ``θ = θ_0 + λ Σ_k τ_k``.
Simple averaging: ``θ = (1/K) Σ_k θ_k = θ_0 + Σ_k (1/K) τ_k``.
AdaMerging (Yang et al., 2024, Eq. 4 / 6): ``θ^l = θ_0^l + Σ_k λ_k^l τ_k^l`` with task-wise ``λ_k`` or
layer-wise ``λ_k^l`` (one coefficient per task and parameter tensor).
"""
from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import Tensor

from fusion.merge.task_vectors import HyperparameterError, StateDict, num_tasks


def combine(tv: Mapping[str, Tensor], coefficients: Tensor) -> StateDict:
    """``δ^l = Σ_k c[k, l] τ_k^l``.

    Args:
        tv: stacked task vectors ``{name: Tensor[K, *shape]}`` with ``L`` names.
        coefficients: ``Tensor[K]`` (one per task, shared by all tensors) or ``Tensor[K, L]``
            (column ``l`` for the ``l``-th name of ``tv``). Differentiable.
    Returns:
        ``{name: Tensor[*shape]}`` in the dtype of ``coefficients`` promoted with the task vectors.
    """
    k = num_tasks(tv)
    if coefficients.dim() == 1 and coefficients.shape[0] == k:
        coefficients = coefficients[:, None].expand(k, len(tv))
    if coefficients.shape != (k, len(tv)):
        raise HyperparameterError(f"coefficients must have shape [K={k}] or [K={k}, L={len(tv)}], "
                                  f"got {tuple(coefficients.shape)}")
    out = {}
    for l, (name, t) in enumerate(tv.items()):
        c = coefficients[:, l].to(t.dtype if t.dtype == torch.float64 else torch.float32)
        out[name] = torch.tensordot(c, t, dims=1) if t.dtype == c.dtype else _LowPrecisionSum.apply(c, t)
    return out


class _LowPrecisionSum(torch.autograd.Function):
    """``Σ_k c_k τ_k`` for τ stored in a lower precision (bf16), computed in ``c``'s dtype.

    Plain autograd would keep the upcast fp32 copy of τ for the backward, one per tensor, so bf16 task vectors
    would cost more memory during a step than fp32 ones; this keeps τ itself and upcasts it again, one tensor
    at a time, in the backward (``∂/∂c_k = ⟨g, τ_k⟩``).
    """

    @staticmethod
    def forward(ctx, c: Tensor, t: Tensor) -> Tensor:
        ctx.save_for_backward(t)
        ctx.c_dtype = c.dtype
        return torch.tensordot(c, t.to(c.dtype), dims=1)

    @staticmethod
    def backward(ctx, grad: Tensor):
        (t,) = ctx.saved_tensors
        grad_c = t.to(ctx.c_dtype).flatten(1) @ grad.to(ctx.c_dtype).flatten()
        return grad_c, None


def task_arithmetic(tv: Mapping[str, Tensor], lam: float = 0.3) -> StateDict:
    """Task arithmetic's merged update ``λ Σ_k τ_k`` (λ = 0.3 is the 8-task CLIP default)."""
    return combine(tv, torch.full((num_tasks(tv),), float(lam)))


def simple_average(tv: Mapping[str, Tensor]) -> StateDict:
    """Simple weight averaging's update ``(1/K) Σ_k τ_k`` (θ_0 + it equals the mean of the experts)."""
    k = num_tasks(tv)
    return combine(tv, torch.full((k,), 1.0 / k))
