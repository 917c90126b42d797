"""EMR-Merging: elect, mask, rescale (Huang et al., NeurIPS 2024, "EMR-Merging: Tuning-Free High-Performance
Model Merging", §3.2, Eq. 2–5; ``harveyhuang18/EMR_Merging``). Tuning-free; needs the task id at inference.

1. Elect (Eq. 2–3): ``γ = sign(Σ_t τ_t)``; ``ε = max_t |τ_t|`` over the tasks whose sign agrees with γ;
   ``τ_uni = γ ⊙ ε``.
2. Mask (Eq. 4): ``M_t = 1[τ_t ⊙ τ_uni > 0]``.
3. Rescale (Eq. 5): ``λ_t = Σ|τ_t| / Σ|M_t ⊙ τ_uni|``, sums over every entry of the model (the reference
   flattens all parameters into one vector), so the retrieved update has task t's L1 mass.

Task t's model is ``θ_0 + λ_t · M_t ⊙ τ_uni`` (:class:`fusion.merge.retrieval.MaskedTasks`).
"""
from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import Tensor

from fusion.merge.family import elect_sign
from fusion.merge.retrieval import MaskedTasks
from fusion.merge.task_vectors import HyperparameterError, num_tasks


def unified_vector(tv: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """``τ_uni = γ ⊙ max_t(τ_t·γ)⁺`` (Eq. 2–3): ``{name: Tensor[K, *shape]} -> {name: Tensor[*shape]}``."""
    sign = elect_sign(tv)
    return {n: sign[n] * (t * sign[n]).clamp_min(0).amax(0) for n, t in tv.items()}


def emr(tv: Mapping[str, Tensor]) -> MaskedTasks:
    """EMR-Merging's unified vector, per-task masks and rescalers (module docstring).

    Args:
        tv: stacked task vectors ``{name: Tensor[K, *shape]}``, K ≥ 2.
    Returns:
        :class:`MaskedTasks` with ``shared = τ_uni``, ``masks = M_t`` and ``scales = λ_t``.
    """
    if num_tasks(tv) < 2:
        raise HyperparameterError(f"emr needs at least 2 task vectors to elect a unified one, got K={num_tasks(tv)}")
    uni = unified_vector(tv)
    masks = {n: t * uni[n] > 0 for n, t in tv.items()}
    mass = sum(t.abs().double().flatten(1).sum(1) for t in tv.values())
    kept = sum((masks[n] * uni[n].abs()).double().flatten(1).sum(1) for n in tv)
    scales = torch.where(kept > 0, mass / kept.clamp_min(torch.finfo(torch.float64).tiny), torch.zeros_like(mass))
    return MaskedTasks.from_masks(uni, masks, scales)
