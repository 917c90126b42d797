"""MaTS: merging by matching models in task parameter subspaces (Tam, Bansal & Raffel, TMLR 2024).

Each expert's curvature ``C_k`` (a PSD operator on the parameters) defines the subspace in which the merge must
match it; the merge solves the linear system (the paper's Eq. 5, written for updates ``δ = θ − θ0``, which is the
same system because it is linear)::

    (Σ_k C_k) δ = Σ_k C_k τ_k

by conjugate gradient (CG, ≈100 iterations) started from task arithmetic ``δ_0 = λ Σ_k τ_k`` (λ = 0.3, the
reference's ``task_vectors/model_lambda_0.3`` initialisation), instead of a closed form. Two curvatures:

- ``regmean`` (:func:`mats_regmean`): per ``nn.Linear`` weight ``C_k(W) = W G̃_k`` with the RegMean Gram
  ``G̃_k = α X_kᵀX_k + (1−α) diag`` — with enough iterations this is RegMean's closed form (:mod:`regmean`);
  the system and its singular-case ridge come from :func:`fusion.merge.regmean.regmean_system`.
- ``fisher`` (:func:`mats_fisher`): a diagonal Fisher, ``C_k(θ) = F̃_k ⊙ θ`` with Fisher merging's weights
  ``F̃_k = c_k (F̂_k + floor)`` (:func:`fusion.merge.fisher.fisher_weights`); converged, it is Fisher merging.

Parameters without a curvature (biases, LayerNorms, embeddings, open_clip's attention projections) are averaged,
as RegMean and Fisher merging do. Deviations from ``r-three/mats``: the reference runs scipy's CG once over each
flattened weight; for the RegMean curvature we run each output row as its own CG system (the rows of ``W G = B``
decouple exactly and share the matrix, so this is a batch of independent solves with the same fixed point and,
per iteration, an error no larger in the A-norm); the diagonal Fisher stays one system per tensor, as there.
The paper's K-FAC "blockwise Fisher" curvature (input Gram ⊗ output-gradient Gram) is not implemented.
"""
from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

import torch
from torch import Tensor

from fusion.merge.fisher import Stacked, fisher_weights, model_coefficients
from fusion.merge.regmean import regmean_system
from fusion.merge.task_vectors import HyperparameterError, StateDict, TaskVectors


def _check_cg(iters: int, tol: float) -> None:
    if isinstance(iters, bool) or not isinstance(iters, int) or iters < 1:
        raise HyperparameterError(f"mats iters is the number of conjugate-gradient iterations and must be an "
                                  f"integer ≥ 1 (100 in the MaTS reference), got {iters!r}")
    if not tol >= 0:
        raise HyperparameterError(f"mats tol is CG's relative residual stopping threshold and must be ≥ 0 "
                                  f"(1e-5, scipy's default; 0 runs all iterations), got {tol!r}")


def conjugate_gradient(apply_a: Callable[[Tensor], Tensor], b: Tensor, x0: Tensor, iters: int = 100,
                       tol: float = 0.0) -> Tensor:
    """Batched conjugate gradient (Hestenes & Stiefel 1952) for ``B`` independent SPD systems ``A_i x_i = b_i``.

    Args:
        apply_a: ``Tensor[B, n] -> Tensor[B, n]``, applying each system's symmetric positive (semi)definite
            operator to its own row.
        b: ``Tensor[B, n]`` right-hand sides.
        x0: ``Tensor[B, n]`` starting points.
        iters: maximum iterations (≥ 1); at most ``n`` are needed in exact arithmetic.
        tol: stop once every row's residual satisfies ``‖b − A x‖ ≤ tol·‖b‖`` (0: run all ``iters``).
    Returns:
        ``Tensor[B, n]``. Each row's step sizes are its own; a row whose residual (or search direction's
        curvature) is exactly zero stops moving. The A-norm error of each row decreases monotonically.
    """
    _check_cg(iters, tol)
    if b.dim() != 2 or x0.shape != b.shape:
        raise ValueError(f"conjugate_gradient wants b and x0 of one shape [B, n], got {tuple(b.shape)} and "
                         f"{tuple(x0.shape)}")
    x = x0.clone()
    r = b - apply_a(x)
    p, rs = r.clone(), (r * r).sum(-1, keepdim=True)
    target = (tol * b.norm(dim=-1, keepdim=True)) ** 2
    for _ in range(iters):
        if tol > 0 and bool((rs <= target).all()):
            break
        ap = apply_a(p)
        curvature = (p * ap).sum(-1, keepdim=True)
        step = torch.where(curvature > 0, rs / curvature.clamp_min(torch.finfo(b.dtype).tiny), 0.0)
        x, r = x + step * p, r - step * ap
        rs_new = (r * r).sum(-1, keepdim=True)
        p = r + torch.where(rs > 0, rs_new / rs.clamp_min(torch.finfo(b.dtype).tiny), 0.0) * p
        rs = rs_new
    return x


def mats_regmean(tv: TaskVectors, grams: Sequence[Mapping[str, Tensor]], alpha: float = 1.0, lam: float = 0.3,
                 iters: int = 100, tol: float = 1e-5, *, ridge: float = 0.0) -> StateDict:
    """MaTS with the RegMean curvature: per ``<module>.weight`` with a Gram, CG on ``δ Σ G̃_k = Σ τ_k G̃_k``.

    Args:
        tv: stacked task vectors ``{name: Tensor[K, *shape]}``; weights ``[K, out, in]``.
        grams: K dicts ``{module: G_k = X_kᵀ X_k: Tensor[in, in]}`` (the same modules for every expert).
        alpha: off-diagonal scale of the Grams (1.0, the reference's ``model_lambda`` for this objective).
        lam: task-arithmetic coefficient of the start ``δ_0 = λ Σ_k τ_k`` (0.3).
        iters, tol: CG iterations (≥ 1) and relative residual threshold (:func:`conjugate_gradient`).
        ridge: as in :func:`regmean_system`; a singular ``Σ G̃`` gets an automatic ridge and a warning.
    Returns:
        ``δ = {name: Tensor[*shape]}`` in the task vectors' dtype; parameters without a Gram get ``mean_k τ_k``.
    """
    _check_cg(iters, tol)
    if any(set(g) != set(grams[0]) for g in grams) or len(grams) != next(iter(tv.values())).shape[0]:
        raise ValueError(f"mats_regmean needs one Gram dict per task vector over the same modules, got "
                         f"{len(grams)} dicts for {next(iter(tv.values())).shape[0]} task vectors")
    out = {}
    for name, t in tv.items():
        module = name[: -len(".weight")] if name.endswith(".weight") else None
        system = (regmean_system(list(t), [g[module] for g in grams], alpha, ridge=ridge)
                  if module in grams[0] and t.dim() == 3 else None)
        if system is None:
            out[name] = t.mean(0)
            continue
        lhs, rhs = system
        start = lam * t.double().sum(0)
        out[name] = conjugate_gradient(lambda x: x @ lhs, rhs.T, start, iters, tol).to(t.dtype)
    return out


def mats_fisher(tv: TaskVectors, fishers: Stacked, lam: float = 0.3, iters: int = 100, tol: float = 1e-5, *,
                floor: float = 1e-6, normalize: bool = True) -> StateDict:
    """MaTS with a diagonal-Fisher curvature: per parameter with a Fisher, CG on ``(Σ F̃_k) ⊙ δ = Σ F̃_k ⊙ τ_k``
    over the flattened tensor (one system, as the reference), started from ``λ Σ_k τ_k``.

    Args:
        tv: stacked task vectors ``{name: Tensor[K, *shape]}``.
        fishers: diagonal Fishers ``F̂_k``, K dicts or ``{name: Tensor[K, *shape]}``, for a subset of ``tv``.
        lam, iters, tol: as in :func:`mats_regmean`.
        floor, normalize: Fisher merging's weights ``F̃_k = c_k (F̂_k + floor)`` (:mod:`fusion.merge.fisher`).
    Returns:
        ``δ = {name: Tensor[*shape]}``; parameters without a Fisher get ``mean_k τ_k``.
    """
    _check_cg(iters, tol)
    names = list(fishers.keys() if isinstance(fishers, Mapping) else fishers[0].keys())
    coef = model_coefficients(fishers, names, floor) if normalize else None
    out = {}
    for name, t in tv.items():
        if name not in names:
            out[name] = t.mean(0)
            continue
        w = fisher_weights(fishers, name, coef, floor).to(t.device)
        diag, rhs = w.sum(0).reshape(1, -1), (w * t.double()).sum(0).reshape(1, -1)
        start = lam * t.double().sum(0).reshape(1, -1)
        out[name] = conjugate_gradient(lambda x: diag * x, rhs, start, iters, tol).reshape(t.shape[1:]).to(t.dtype)
    return out
