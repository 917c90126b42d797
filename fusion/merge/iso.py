"""Iso-C and Iso-CTS: isotropic merging in common (and task-specific) subspaces (Marczak et al., ICML 2025,
"No Task Left Behind"; ``danielm1405/iso-merging:src/utils/iso.py``, FusionBench ``isotropic_merging``).

- Iso-C (Eq. 5–6): for each 2-D weight, ``M = Σ_k τ_k = U Σ Vᵀ``; replace Σ by ``mean(σ)·I`` so the merged
  update has a flat spectrum. Parameters that are not 2-D are averaged (mean τ).
- Iso-CTS (§4.2): keep the top ``common_space_fraction`` of M's directions as a common subspace, fill the rest of
  the rank with an equal share of each task's top directions after projecting out the common subspace,
  orthogonalise U and V with an SVD polar step (``U ← PQᵀ`` for ``U = PSQᵀ``), then use the mean spectrum.
- ``θ = θ0 + α·merged`` for every parameter; α = 1.5 (FusionBench; the paper grid-searches (0, 3]).
"""
from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import Tensor

from fusion.merge.task_vectors import HyperparameterError, StateDict, num_tasks


def for_svd(t: Tensor) -> Tensor:
    """SVD-friendly dtype: float64 stays float64, everything else becomes float32."""
    return t.double() if t.dtype == torch.float64 else t.float()


def isotropic(m: Tensor) -> Tensor:
    """``U·mean(σ)·Vᵀ`` for ``m = U diag(σ) Vᵀ``: ``Tensor[out, in] -> Tensor[out, in]`` (Iso-C, Eq. 6)."""
    u, s, vh = torch.linalg.svd(for_svd(m), full_matrices=False)
    return (u * s.mean()) @ vh


def _check_alpha(alpha: float, method: str) -> None:
    """α must be positive (the paper searches (0, 3])."""
    if not float(alpha) > 0:
        raise HyperparameterError(f"{method} alpha scales the merged update and must be > 0 (FusionBench uses 1.5), "
                                  f"got {alpha!r}")


def iso_c(tv: Mapping[str, Tensor], alpha: float = 1.5) -> StateDict:
    """Iso-C's update ``α·iso(Σ_k τ_k)`` for 2-D weights and ``α·mean_k τ_k`` otherwise.

    Args:
        tv: stacked task vectors ``{name: Tensor[K, *shape]}``.
        alpha: the final scale (1.5).
    Returns:
        ``{name: Tensor[*shape]}`` in the task vectors' dtype.
    """
    _check_alpha(alpha, "iso_c")
    out = {}
    for name, t in tv.items():
        merged = isotropic(t.sum(0)) if t.dim() == 3 else for_svd(t).mean(0)
        out[name] = (alpha * merged).to(t.dtype)
    return out


def _split_rank(n: int, k: int, common_space_fraction: float) -> tuple[int, int]:
    """``(common, per_task)`` with ``common + k·per_task = n`` as in the reference code (the task-specific
    total is rounded to a multiple of ``k``)."""
    common = int(n * common_space_fraction)
    per_task = min(round((n - common) / k), n // k)
    return n - k * per_task, per_task


def polar(a: Tensor) -> Tensor:
    """The orthonormal polar factor ``PQᵀ`` of ``a = P S Qᵀ`` (nearest matrix with orthonormal columns/rows)."""
    p, _, qh = torch.linalg.svd(a, full_matrices=False)
    return p @ qh


def iso_cts_factors(t: Tensor, common_space_fraction: float = 0.8) -> tuple[Tensor, Tensor, Tensor]:
    """Iso-CTS factors of one stacked 2-D weight ``t: Tensor[K, out, in]``.

    Returns:
        ``(U: Tensor[out, r], s: Tensor[r], Vh: Tensor[r, in])`` with ``r = min(out, in)``, orthonormal columns
        of U and rows of Vh, and a flat ``s`` (all entries equal to the mean of the gathered singular values).
    """
    t = for_svd(t)
    k, n = t.shape[0], min(t.shape[1:])
    common, per_task = _split_rank(n, k, common_space_fraction)
    u, s, vh = torch.linalg.svd(t.sum(0), full_matrices=False)
    us, ss, vhs = [u[:, :common]], [s[:common]], [vh[:common]]
    proj = u[:, :common] @ u[:, :common].T
    for task in t:
        ut, st, vht = torch.linalg.svd(task - proj @ task, full_matrices=False)
        us.append(ut[:, :per_task]); ss.append(st[:per_task]); vhs.append(vht[:per_task])
    s_all = torch.cat(ss)
    return polar(torch.cat(us, dim=1)), torch.full_like(s_all, s_all.mean().item()), polar(torch.cat(vhs))


def iso_cts(tv: Mapping[str, Tensor], alpha: float = 1.5, common_space_fraction: float = 0.8) -> StateDict:
    """Iso-CTS's update ``α·U diag(s̄) Vh`` (:func:`iso_cts_factors`) for 2-D weights, ``α·mean_k τ_k`` otherwise.

    Args:
        tv: stacked task vectors ``{name: Tensor[K, *shape]}`` with K ≥ 2.
        alpha: final scale (1.5); common_space_fraction: share of the rank kept as common subspace (0.8).
    Returns:
        ``{name: Tensor[*shape]}`` in the task vectors' dtype.
    """
    _check_alpha(alpha, "iso_cts")
    if num_tasks(tv) < 2:
        raise HyperparameterError(f"iso_cts needs at least 2 task vectors to build task-specific subspaces, got "
                                  f"K={num_tasks(tv)}; with one task use iso_c or task_arithmetic")
    if not 0.0 <= float(common_space_fraction) <= 1.0:
        raise HyperparameterError(f"iso_cts common_space_fraction must lie in [0, 1] (0.8 in the paper), "
                                  f"got {common_space_fraction!r}")
    out = {}
    for name, t in tv.items():
        if t.dim() == 3:
            u, s, vh = iso_cts_factors(t, common_space_fraction)
            merged = (u * s) @ vh
        else:
            merged = for_svd(t).mean(0)
        out[name] = (alpha * merged).to(t.dtype)
    return out
