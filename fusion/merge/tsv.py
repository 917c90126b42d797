"""Task Singular Vectors (Gargiulo et al., CVPR 2025, "Task Singular Vectors: Reducing Task Interference in Model
Merging"; reference ``AntoAndGar/task_singular_vectors:src/utils/TSVM_utils.py``, ``TSVC_utils.py``).

For every 2-D weight (the positional embedding and ``proj`` included: the reference excludes only the text
tower's ``text_projection``), each task matrix is decomposed ``τ_k = U_k Σ_k V_kᵀ`` and truncated to its top
``r = ⌊fraction·min(out, in)⌋`` singular directions (fraction = 1/K, the paper's choice).

- TSV-C (compression): store the truncated factors ``(U_k[:, :r], σ_k[:r], V_kᵀ[:r])`` per task; task k's
  update at inference is ``U_k Σ_k V_kᵀ`` (its rank-r truncated SVD). Other parameters are stored dense per task.
- TSV-M (merge): concatenate ``U = [U_1 … U_K]``, ``Σ = diag(σ_1 … σ_K)``, ``V = [V_1 … V_K]``,
  decorrelate U and V by replacing each with its orthonormal polar factor (``U = P S Qᵀ ↦ P Qᵀ``; the reference
  ``compute_and_sum_svd_mem_reduction`` does this with ``u_u @ v_u`` of an SVD, the orthogonal-Procrustes
  solution of the paper's decorrelation step), then ``merged = U⊥ Σ V⊥ᵀ`` and ``δ = α·merged``. Parameters that
  are not 2-D get ``α·mean_k τ_k`` (the reference's running mean). α = 1.0 is the reference's (and
  FusionBench's) value without a search; the reference searches α over (0, 3] on validation data.

Deviation: the reference truncates to ``int(min(out, in)/K)`` directions, which is 0 (a zero update for the whole
matrix) when ``min(out, in) < K``; here every task keeps at least one direction.
"""
from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import NamedTuple

import torch
from torch import Tensor

from fusion.merge.iso import for_svd, polar
from fusion.merge.task_vectors import HyperparameterError, StateDict, num_tasks


class LowRank(NamedTuple):
    """Per-task truncated SVD factors of one stacked matrix: ``u: [K, out, r]``, ``s: [K, r]``, ``vh: [K, r, in]``."""
    u: Tensor
    s: Tensor
    vh: Tensor


@dataclass(frozen=True)
class TSVCompressed:
    """TSV-C's stored form of a pool: ``low_rank`` factors of the 2-D weights, ``dense`` stacked ``[K, *shape]``
    task vectors of every other parameter."""
    low_rank: dict[str, LowRank]
    dense: dict[str, Tensor]

    @property
    def num_tasks(self) -> int:
        """K, the number of tasks stored."""
        first = next(iter(self.low_rank.values())).u if self.low_rank else next(iter(self.dense.values()))
        return first.shape[0]

    def task_delta(self, k: int) -> StateDict:
        """:func:`tsv_task_delta` (the :class:`fusion.merge.retrieval.TaskSpecific` contract)."""
        return tsv_task_delta(self, k)

    def stored_bytes(self) -> dict[str, int]:
        """Nothing shared; every task's factors and dense vectors (:func:`tsv_storage_bytes`)."""
        return {"shared": 0, "per_task": tsv_storage_bytes(self)}


def _fraction(tv: Mapping[str, Tensor], fraction: float | None) -> float:
    """``fraction`` (``None`` = 1/K), checked to lie in (0, 1]."""
    fraction = 1.0 / num_tasks(tv) if fraction is None else fraction
    if not 0.0 < float(fraction) <= 1.0:
        raise HyperparameterError(f"tsv fraction is the share of each task's singular directions kept and must lie "
                                  f"in (0, 1] (the paper uses 1/K; null means 1/K), got {fraction!r}")
    return float(fraction)


def kept_rank(n: int, fraction: float) -> int:
    """``max(1, ⌊fraction·n⌋)`` directions of a rank-``n`` matrix (tolerant of float error in ``n·(1/K)``)."""
    return max(1, math.floor(n * fraction + 1e-9))


def task_singular_factors(t: Tensor, fraction: float) -> LowRank:
    """Each task's top ``r = kept_rank(min(out, in), fraction)`` singular triplets of ``t: Tensor[K, out, in]``
    (batched SVD in float32/float64, see :func:`fusion.merge.iso.for_svd`)."""
    u, s, vh = torch.linalg.svd(for_svd(t), full_matrices=False)
    r = kept_rank(min(t.shape[1:]), fraction)
    return LowRank(u[..., :r], s[:, :r], vh[:, :r])


def tsv_merge_matrix(t: Tensor, fraction: float) -> Tensor:
    """TSV-M for one stacked matrix ``t: Tensor[K, out, in] -> Tensor[out, in]``: ``polar([U_1…U_K]) Σ
    polar([V_1…V_K])ᵀ`` over the truncated factors (the TSV-M decorrelation)."""
    f = task_singular_factors(t, fraction)
    k, out, r = f.u.shape
    u = f.u.permute(1, 0, 2).reshape(out, k * r)  # [U_1 … U_K]
    vh = f.vh.reshape(k * r, -1)                   # [V_1 … V_K]ᵀ
    return (polar(u) * f.s.reshape(-1)) @ polar(vh)


def tsv_m(tv: Mapping[str, Tensor], alpha: float = 1.0, fraction: float | None = None) -> StateDict:
    """TSV-M's update: ``α·`` :func:`tsv_merge_matrix` for 2-D weights and ``α·mean_k τ_k`` otherwise.

    Args:
        tv: stacked task vectors ``{name: Tensor[K, *shape]}`` with K ≥ 2.
        alpha: the final scale (1.0; the reference searches (0, 3]).
        fraction: share of each task's singular directions kept, in (0, 1]; ``None`` = 1/K (the paper).
    Returns:
        ``{name: Tensor[*shape]}`` in the task vectors' dtype.
    """
    if not float(alpha) > 0:
        raise HyperparameterError(f"tsv_m alpha scales the merged update and must be > 0 (1.0 in the reference, "
                                  f"which searches (0, 3]), got {alpha!r}")
    if num_tasks(tv) < 2:
        raise HyperparameterError(f"tsv_m merges the singular directions of at least 2 task vectors, got "
                                  f"K={num_tasks(tv)}; with one task use task_arithmetic")
    fraction = _fraction(tv, fraction)
    out = {}
    for name, t in tv.items():
        merged = tsv_merge_matrix(t, fraction) if t.dim() == 3 else for_svd(t).mean(0)
        out[name] = (alpha * merged).to(t.dtype)
    return out


def tsv_low_rank(tv: Mapping[str, Tensor], fraction: float | None = None) -> TSVCompressed:
    """TSV-C's compression: per-task rank-``r`` factors of every 2-D weight (stored in the task vectors' dtype),
    the other parameters' task vectors kept dense. ``fraction`` ∈ (0, 1], ``None`` = 1/K (the reference)."""
    fraction = _fraction(tv, fraction)
    low_rank, dense = {}, {}
    for name, t in tv.items():
        if t.dim() == 3:
            low_rank[name] = LowRank(*(f.to(t.dtype) for f in task_singular_factors(t, fraction)))
        else:
            dense[name] = t
    return TSVCompressed(low_rank, dense)


def tsv_task_delta(compressed: TSVCompressed, k: int) -> StateDict:
    """Task ``k``'s compressed task vector ``{name: Tensor[*shape]}``: ``U_k diag(σ_k) V_kᵀ`` for the 2-D weights,
    the stored τ_k otherwise (θ_k ≈ θ0 + this, used with the task id known at inference)."""
    n = compressed.num_tasks
    if not 0 <= k < n:
        raise HyperparameterError(f"tsv_task_delta task index k must lie in [0, {n - 1}] for a pool of {n} tasks, "
                                  f"got {k!r}")
    out = {name: (f.u[k] * f.s[k]) @ f.vh[k] for name, f in compressed.low_rank.items()}
    return {**out, **{name: t[k] for name, t in compressed.dense.items()}}


def tsv_storage_bytes(compressed: TSVCompressed) -> int:
    """Bytes TSV-C stores for all K tasks: every factor and every dense task vector, ``numel × element_size``."""
    tensors = [f for factors in compressed.low_rank.values() for f in factors] + list(compressed.dense.values())
    return sum(t.numel() * t.element_size() for t in tensors)
