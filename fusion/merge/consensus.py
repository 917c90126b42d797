"""TALL masks and Consensus Merging (Wang et al., ICML 2024, "Localizing Task Information for Improved Model
Merging and Compression"; ``nik-dim/tall_masks:src/utils/tallmask_utils.py``).

- TALL mask (Eq. 3): ``m_t = 1[|τ_t| ≥ λ_t · |τ_MTL − τ_t|]``, with τ_MTL the merged multi-task vector
  (the unscaled TA sum ``Σ_t τ_t`` or the TIES merge). The reference code uses a strict ``>``; we follow the
  paper/METHODS.md ``≥`` (they differ only on exact ties).
- Consensus mask (Eq. 5): keep the coordinates that are on in at least ``k`` task masks (``k = 2`` removes
  "catastrophic" (0 tasks) and "selfish" (1 task) weights).
- Consensus merge: ``δ = λ · (τ_MTL ⊙ m_consensus)`` — the mask filters the same τ_MTL the masks were built from,
  as in ``tall_masks:src/task_vectors.py`` (``merged_tv * consensus_mask``).
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from torch import Tensor

from fusion.merge.task_vectors import HyperparameterError, StateDict, num_tasks
from fusion.merge.ties import ties


def _per_task(lambdas: float | Sequence[float], k: int) -> Tensor:
    """``Tensor[K]`` of non-negative mask thresholds λ_t from a float or a length-K sequence."""
    lam = torch.as_tensor(lambdas, dtype=torch.float64).reshape(-1)
    if lam.numel() == 1:
        lam = lam.expand(k)
    if lam.numel() != k or bool((lam < 0).any()):
        raise HyperparameterError(f"lambdas must be one non-negative float or K={k} of them (the paper's grid is "
                                  f"0.2–0.6), got {lambdas!r}")
    return lam


def tall_masks(tv: Mapping[str, Tensor], merged_delta: Mapping[str, Tensor] | None = None,
               lambdas: float | Sequence[float] = 0.4) -> dict[str, Tensor]:
    """TALL masks ``m_t = |τ_t| ≥ λ_t·|τ_MTL − τ_t|`` (Wang et al. 2024, Eq. 3).

    Args:
        tv: stacked task vectors ``{name: Tensor[K, *shape]}``.
        merged_delta: τ_MTL ``{name: Tensor[*shape]}``; ``None`` means the unscaled TA sum ``Σ_t τ_t``.
        lambdas: λ_t, one float for all tasks or K floats (chosen per task on validation data in the paper).
    Returns:
        ``{name: BoolTensor[K, *shape]}``.
    """
    k = num_tasks(tv)
    lam = _per_task(lambdas, k)
    out = {}
    for name, t in tv.items():
        mtl = t.sum(0) if merged_delta is None else merged_delta[name].to(t.dtype)
        scale = lam.to(t.device, torch.float64).reshape(k, *([1] * (t.dim() - 1)))
        out[name] = t.abs().double() >= scale * (mtl.unsqueeze(0) - t).abs().double()
    return out


def consensus_mask(masks: Mapping[str, Tensor], k: int = 2) -> dict[str, Tensor]:
    """Coordinates on in at least ``k`` of the K task masks (Eq. 5): ``{name: BoolTensor[*shape]}``."""
    return {n: m.sum(0) >= k for n, m in masks.items()}


def _check_consensus_args(tv: Mapping[str, Tensor], k: int, base: str) -> None:
    """Clear errors for a single task, a non-integer or negative ``k`` and an unknown ``base``."""
    n = num_tasks(tv)
    if n < 2:
        raise HyperparameterError(f"consensus_merge needs at least 2 task vectors to count agreement, got K={n}; "
                                  "with one task use task_arithmetic (or add experts to the pool)")
    if int(k) != k or k < 0:
        raise HyperparameterError(f"consensus_merge k is the minimum number of agreeing task masks, a non-negative "
                                  f"integer (k=2 in the paper), got {k!r}")
    if base not in ("ta", "ties"):
        raise HyperparameterError(f"consensus_merge base must be 'ta' or 'ties', got {base!r}")


def consensus_merge(tv: Mapping[str, Tensor], k: int = 2, lam: float = 0.3, base: str = "ta",
                    lambdas: float | Sequence[float] = 0.4, ties_k: float = 0.2) -> StateDict:
    """Consensus TA / Consensus TIES (Wang et al. 2024, §4): ``δ = λ·(τ_MTL ⊙ 1[Σ_t m_t ≥ k])``.

    Args:
        tv: stacked task vectors ``{name: Tensor[K, *shape]}``, K ≥ 2.
        k: minimum number of task masks a coordinate must be on in (``prun_thre_k``, 2 in the paper).
        lam: the final scale (tuned on validation data in the paper; 0.3 is the TA sum default).
        base: ``"ta"`` (τ_MTL = Σ_t τ_t) or ``"ties"`` (τ_MTL = TIES sum-merge with top-``ties_k``, λ = 1).
        lambdas: TALL-mask thresholds λ_t (float or K floats; 0.4 is the middle of the paper's grid).
    Returns:
        ``{name: Tensor[*shape]}``.
    """
    _check_consensus_args(tv, k, base)
    mtl = ({n: t.sum(0) for n, t in tv.items()} if base == "ta"
           else ties(tv, k=ties_k, lam=1.0, aggregate="sum"))
    keep = consensus_mask(tall_masks(tv, mtl, lambdas), k)
    return {n: lam * mtl[n] * keep[n] for n in mtl}
