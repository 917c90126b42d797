"""PCB-Merging: Parameter Competition Balancing (Du et al., NeurIPS 2024; ``duguodong7/pcb-merging``,
``vision_source_code/pcb.py``). All operations are over each task's flattened model ``τ_k ∈ R^P``.

1. Clip: each |τ_k| is clamped to its own [1%, 99%] order statistics (``clip = 0.01``, the reference's ``clamp``:
   values below ``sorted[int(P·c)]`` are raised to it and values above ``sorted[int(P(1−c)) − 1]`` lowered to it);
   signs are kept. The clipped vectors are the ones merged.
2. Intra-balancing (Eq. 2): ``β_intra = exp(K · norm(|τ_k|)²)`` with ``norm`` the min-max normalisation within the
   task (a softmax up to a per-task constant, which step 5 removes).
3. Inter-balancing (Eq. 3): ``β_inter = tanh(τ_k ⊙ Σ_j ŝ_j)`` where ``ŝ_j = sign(τ_j)·norm(|τ_j|)``.
4. Score ``β = β_intra ⊙ β_inter`` (Eq. 4).
5. Keep the top ``ratio`` of scores per task (5% in the vision code): scores below ``sorted[int(P(1−ratio))]`` are
   raised to it, then min-max normalised, so the weights ``w_k`` are 0 outside the top share and reach 1.
6. ``δ = Σ_k λ_k w_k ⊙ τ̂_k / Σ_k w_k`` (0 where no task keeps a coordinate), λ_k = 1.2.

Deviations from METHODS.md's summary (which follows the paper's text), taken from the vision code it cites:
the inter-balance sums the *normalised signed* task vectors ŝ_j rather than the raw τ_j, and the outlier clipping
is applied to |τ_k| at both ends before everything else. Guards added: constant rows (max = min) get weight 0
instead of NaN.
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from torch import Tensor

from fusion.merge.sparsify import check_fraction
from fusion.merge.task_vectors import HyperparameterError, StateDict, flatten, num_tasks, unflatten


def minmax(x: Tensor) -> Tensor:
    """Row-wise ``(x − min)/(max − min)`` of ``Tensor[K, P]`` (0 for constant rows)."""
    lo, hi = x.min(dim=1, keepdim=True).values, x.max(dim=1, keepdim=True).values
    span = hi - lo
    return torch.where(span > 0, (x - lo) / span.clamp(min=torch.finfo(x.dtype).tiny), torch.zeros_like(x))


def clamp_order_statistics(x: Tensor, low: float, high: float) -> Tensor:
    """Row-wise clamp of ``Tensor[K, P]`` to ``[sorted[int(P·low)], sorted[int(P(1−high)) − 1]]`` (reference code)."""
    p = x.shape[1]
    lo = x.kthvalue(int(p * low) + 1, dim=1, keepdim=True).values  # sorted[i] is the (i+1)-th smallest
    hi = x.kthvalue(max(int(p * (1 - high) - 1), 0) + 1, dim=1, keepdim=True).values
    return torch.minimum(torch.maximum(x, lo), hi)


def pcb_weights(flat: Tensor, ratio: float = 0.05, clip: float = 0.01) -> tuple[Tensor, Tensor]:
    """PCB steps 1–5 on ``flat: Tensor[K, P]``: ``(clipped τ̂: Tensor[K, P], weights w: Tensor[K, P])``."""
    k = flat.shape[0]
    mag = clamp_order_statistics(flat.abs(), clip, clip)
    clipped = torch.sign(flat) * mag
    intra = torch.exp(k * minmax(mag) ** 2)
    inter = torch.tanh(flat * (torch.sign(flat) * minmax(mag)).sum(0, keepdim=True))
    return clipped, minmax(clamp_order_statistics(intra * inter, 1 - ratio, 0.0))


def _check_pcb(tv: Mapping[str, Tensor], ratio: float, clip: float) -> None:
    """Clear errors for a single task and out-of-range ``ratio``/``clip``."""
    if num_tasks(tv) < 2:
        raise HyperparameterError(f"pcb needs at least 2 task vectors to balance competition between them, got "
                                  f"K={num_tasks(tv)}; with one task use task_arithmetic")
    check_fraction(ratio, "ratio")
    if not 0.0 <= float(clip) < 0.5:
        raise HyperparameterError(f"pcb clip is the outlier fraction clipped at each end and must lie in [0, 0.5), "
                                  f"got {clip!r} (0.01 in the reference code)")


def pcb(tv: Mapping[str, Tensor], ratio: float = 0.05, lam: float | Sequence[float] = 1.2,
        clip: float = 0.01) -> StateDict:
    """PCB-Merging's update ``Σ_k λ_k w_k ⊙ τ̂_k / Σ_k w_k`` (see the module docstring for the steps).

    Args:
        tv: stacked task vectors ``{name: Tensor[K, *shape]}``, K ≥ 2.
        ratio: kept share of scores per task (0.05, vision code).
        lam: λ_k, one float or K floats (1.2; the paper also searches them with nevergrad).
        clip: outlier fraction clipped at each end of |τ_k| (0.01).
    Returns:
        ``{name: Tensor[*shape]}``.
    """
    _check_pcb(tv, ratio, clip)
    flat = flatten(tv)
    flat = flat.double() if flat.dtype == torch.float64 else flat.float()
    clipped, w = pcb_weights(flat, ratio, clip)
    lams = torch.as_tensor(lam, dtype=flat.dtype).reshape(-1, 1)
    if lams.shape[0] not in (1, flat.shape[0]):
        raise HyperparameterError(f"pcb lam must be one float or K={flat.shape[0]} floats, got {lam!r}")
    merged = (lams * clipped * w).sum(0) / w.sum(0).clamp(min=1e-12)
    return {n: t[0] for n, t in unflatten(merged.unsqueeze(0), {n: t[:1] for n, t in tv.items()}).items()}
