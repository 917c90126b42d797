"""OPCM: continual model merging by orthogonal projection (Tang et al., 2025, "Merging Models on the Fly Without
Retraining: A Sequential Approach to Scalable Continual Model Merging"; ``fusion_bench/method/opcm/opcm.py``).

Experts arrive one at a time. With ``S_t`` the unnormalised running update (``S_1 = τ_1``):

- 2-D float weights: ``τ_prev = U Σ Vᵀ`` (full SVD of ``S_{t−1}``), ``P = Uᵀ τ_t V``; zero P's diagonal and
  ``P[:r, :r]`` with ``r`` the first index where the cumulative share of σ exceeds α; ``τ̃_t = U P Vᵀ``.
- every other float parameter (biases, LayerNorms, 1-D/≥3-D tensors): ``τ̃_t = τ_t``.
- ``S_t = S_{t−1} + τ̃_t`` and the merged update is ``δ_t = S_t · mean_{i≤t}‖τ_i‖ / ‖S_t‖`` (global L2 norms),
  so its norm is the running mean norm of the individual task vectors.

This is FusionBench's recursion ``δ_t = (λ_{t−1}·δ_{t−1} + τ̃_t)/λ_t`` with ``λ_t = ‖S_t‖/mean‖τ‖``: since
``λ_{t−1}·δ_{t−1} = S_{t−1}`` and the SVD of ``δ_{t−1}`` has the same singular vectors and σ-shares as that of
``S_{t−1}``, only the final rescaling matters. Memory: ``S`` plus one expert at a time — constant in K.
Deviation: FusionBench projects only ``nn.Linear`` weights; on a state dict we project every 2-D float weight
(for open_clip this also covers ``attn.in_proj_weight``, ``positional_embedding`` and ``proj``). The task order
(shuffled and averaged over 10 orders in the paper) is the caller's.
"""
from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping

import torch
from torch import Tensor

from fusion.merge.task_vectors import HyperparameterError, StateDict


def split_rank(s: Tensor, alpha: float) -> int:
    """The first index ``r`` with ``Σ_{i≤r} σ_i / Σ σ > α`` for descending ``s: Tensor[n]``."""
    share = s.cumsum(0) / s.sum()
    return int((share > alpha).float().argmax().item())


def project_update(prev: Tensor, tau: Tensor, alpha: float = 0.5) -> Tensor:
    """OPCM's cleaned update ``τ̃ = U P Vᵀ``: ``(Tensor[out, in], Tensor[out, in]) -> Tensor[out, in]``.

    ``U, V`` are the full singular bases of ``prev``; ``P = Uᵀ τ V`` with its diagonal and ``P[:r, :r]`` zeroed.
    If ``prev`` is zero (no earlier update in this tensor), ``τ`` is returned unchanged.
    """
    work = torch.float64 if tau.dtype == torch.float64 else torch.float32
    prev, tau = prev.to(work), tau.to(work)
    u, s, vh = torch.linalg.svd(prev, full_matrices=True)
    if not bool(s.sum() > 0):
        return tau
    r = split_rank(s, alpha)
    p = u.T @ tau @ vh.T
    p.diagonal().zero_()
    p[:r, :r] = 0
    return u @ p @ vh


def _check_alpha(alpha: float) -> None:
    """α is a cumulative-σ share and must lie in (0, 1)."""
    if not 0.0 < float(alpha) < 1.0:
        raise HyperparameterError(f"opcm alpha is the cumulative singular-value share that fixes the protected rank "
                                  f"and must lie in (0, 1) (0.5 in the paper), got {alpha!r}")


def _add_expert(running: StateDict | None, pretrained: Mapping[str, Tensor], expert: Mapping[str, Tensor],
                alpha: float) -> tuple[StateDict, float]:
    """One OPCM step: ``S ← S + τ̃`` (or ``S = τ`` for the first expert); returns ``(S, ‖τ‖²)``."""
    out, sq = {}, 0.0
    for name, theta0 in pretrained.items():
        if not theta0.is_floating_point():
            continue
        tau = expert[name].to(torch.float64 if theta0.dtype == torch.float64 else torch.float32) - theta0
        sq += float(tau.double().pow(2).sum())
        if running is None:
            out[name] = tau
        elif tau.dim() == 2:
            out[name] = running[name] + project_update(running[name], tau, alpha)
        else:
            out[name] = running[name] + tau
    return out, sq


def _rescaled(running: Mapping[str, Tensor], mean_norm: float) -> StateDict:
    """``S · mean_norm / ‖S‖`` (global L2 norm)."""
    norm = float(torch.sqrt(sum(t.double().pow(2).sum() for t in running.values())))
    scale = mean_norm / norm if norm > 0 else 0.0
    return {n: t * scale for n, t in running.items()}


def opcm(pretrained: Mapping[str, Tensor], experts: Iterable[Mapping[str, Tensor]], *, alpha: float = 0.5,
         on_step: Callable[[int, StateDict], None] | None = None) -> StateDict:
    """OPCM's merged update after consuming ``experts`` one at a time (see the module docstring).

    Args:
        pretrained: θ0 ``{name: Tensor[*shape]}``.
        experts: an iterable (e.g. a generator that loads checkpoints lazily) of fine-tuned state dicts θ_t;
            each is released before the next is requested.
        alpha: cumulative σ share fixing the protected rank (0.5).
        on_step: optional ``on_step(t, δ_t)`` after each expert (t = 1, 2, ...), for continual evaluation.
    Returns:
        ``{name: Tensor[*shape]}`` over the float parameters of ``pretrained``; the caller adds θ0.
    """
    _check_alpha(alpha)
    running, norms_sum, t = None, 0.0, 0
    for expert in experts:
        running, sq = _add_expert(running, pretrained, expert, alpha)
        del expert
        t, norms_sum = t + 1, norms_sum + sq ** 0.5
        if on_step is not None:
            on_step(t, _rescaled(running, norms_sum / t))
    if running is None:
        raise ValueError("opcm got no experts: the iterable was empty")
    return _rescaled(running, norms_sum / t)
