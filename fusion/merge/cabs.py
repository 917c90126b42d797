"""CABS: Conflict-Aware and Balanced Sparsification (Yang et al., ICML 2025), a sparsifier of the
sparsify → consensus → scale family (:mod:`fusion.merge.family`).

- Balanced sparsification (BS): n:m magnitude pruning: every block of ``m`` consecutive entries along the
  input dimension of a row keeps its ``n`` largest-magnitude entries (density ``n/m`` in every block, so no layer or
  row is emptied or favoured, unlike a global top-k).
- Conflict-aware sparsification (CA): the task vectors are pruned one after another in a fixed ``order``; task
  ``k`` chooses only among the positions not kept by the tasks before it (the paper's mask ``1 − m_prev``), so the
  kept sets never overlap. The two combine as in the authors' code (``zongzhenyang/CABS``,
  ``prune_task_vector.py``): mask out the claimed positions, then n:m-prune what remains.
- The merge is task arithmetic over the pruned, disjoint vectors (preset :func:`fusion.merge.family.cabs`).

Deviations (stated): rows are the output rows of ≥2-D tensors (conv/patch weights as ``[out, in·kh·kw]``), and a
1-D/0-D tensor is one row; the reference code instead blocks the flattened tensor. When ``m`` does not divide the
row width, the last block of each row (``r < m`` entries) keeps ``ceil(n·r/m)`` entries (the reference skips, i.e.
zeroes, an incomplete trailing block). A block with fewer than ``n`` free positions keeps all of them. A selected
entry that is exactly zero does not claim its position (the reference code's mask would), so a task whose vector
is zero in a layer does not take that layer's positions from the tasks after it. With K tasks
and ``K·n > m`` the later tasks find blocks already taken (the paper's K·density ≤ 1 regime avoids this).
"""
from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import torch
from torch import Tensor

from fusion.merge.task_vectors import HyperparameterError, TaskVectors, num_tasks


def nm_counts(n: int | None, m: int, density: float | None) -> int:
    """Validate ``(n, m)`` or ``(density, m)`` and return ``n`` (``density·m`` must be a whole number ≥ 1)."""
    if int(m) != m or m < 1:
        raise HyperparameterError(f"cabs m is the block length, an integer >= 1, got m={m!r} (e.g. m=32)")
    if (n is None) == (density is None):
        raise HyperparameterError(f"cabs takes exactly one of n (kept per block) or density (= n/m), got n={n!r}, "
                                  f"density={density!r}")
    if density is not None:
        if not 0.0 < float(density) <= 1.0:
            raise HyperparameterError(f"cabs density is the kept fraction n/m and must lie in (0, 1], got "
                                      f"{density!r} (e.g. density=0.125 with m=32 keeps 4 of every 32)")
        n = round(float(density) * m)
        if abs(float(density) * m - n) > 1e-9 or n < 1:
            raise HyperparameterError(f"cabs density*m must be a whole number >= 1, got density={density!r}, m={m} "
                                      f"(density*m={float(density) * m:g}); use a multiple of 1/{m}, or set n")
    if int(n) != n or not 1 <= n <= m:
        raise HyperparameterError(f"cabs n is the number kept per block of m={m} and must satisfy 1 <= n <= m, "
                                  f"got n={n!r}")
    return int(n)


def task_order(order: Sequence[int] | None, k: int) -> list[int]:
    """The processing order: ``0..K−1`` by default, else a permutation of the K task indices."""
    if order is None:
        return list(range(k))
    order = [int(i) for i in order]
    if sorted(order) != list(range(k)):
        raise HyperparameterError(f"cabs order must be a permutation of the task indices 0..{k - 1} (K={k}), "
                                  f"got {order!r}; or null for the pool's order")
    return order


def block_quota(width: int, n: int, m: int) -> Tensor:
    """``Tensor[nb]``: entries kept per block of a row of ``width`` (``n``; ``ceil(n·r/m)`` for a last block of r)."""
    full, rest = divmod(width, m)
    quota = [n] * full + ([math.ceil(n * rest / m)] if rest else [])
    return torch.tensor(quota)


def nm_select(score: Tensor, n: int, m: int) -> Tensor:
    """n:m selection on ``score: Tensor[R, W]`` (``-inf`` = unavailable): ``BoolTensor[R, W]`` holding, in each
    block of ``m`` columns, the top-``quota`` available entries (ties by position: the stable sort)."""
    rows, width = score.shape
    nb = -(-width // m)
    padded = torch.full((rows, nb * m), -math.inf, dtype=score.dtype, device=score.device)
    padded[:, :width] = score
    blocks = padded.reshape(rows, nb, m)
    rank = blocks.argsort(dim=-1, descending=True, stable=True).argsort(dim=-1)
    keep = (rank < block_quota(width, n, m).to(score.device)[None, :, None]) & (blocks > -math.inf)
    return keep.reshape(rows, nb * m)[:, :width]


def cabs_sparsify(tv: Mapping[str, Tensor], density: float | None = None, n: int | None = None, m: int = 32,
                  order: Sequence[int] | None = None) -> TaskVectors:
    """CABS's CA + BS sparsification (Yang et al. 2025): disjoint n:m-pruned task vectors.

    For each task ``k`` in ``order``: ``avail = ¬(∪_{j before k} mask_j)``; ``mask_k`` = the top-``n`` of
    ``|τ_k|`` over ``avail`` in every block of ``m`` along each row; ``τ̂_k = τ_k ⊙ mask_k``.

    Args:
        tv: stacked task vectors ``{name: Tensor[K, *shape]}``.
        density: kept fraction ``n/m`` in ``(0, 1]`` (``density·m`` must be whole); or give ``n`` instead.
        n: entries kept per block, ``1 ≤ n ≤ m``.
        m: block length along the input dimension (32 by default: divides the CLIP/mini8 widths).
        order: the order tasks are pruned in (a permutation of ``0..K−1``); ``None``: the pool's order.
    Returns:
        ``{name: Tensor[K, *shape]}`` whose K supports are pairwise disjoint; K = 1 is plain n:m pruning.
    """
    n = nm_counts(n, m, density)
    tasks = task_order(order, num_tasks(tv))
    out = {}
    for name, t in tv.items():
        rows = t.reshape(t.shape[0], t.shape[1], -1) if t.dim() > 2 else t.reshape(t.shape[0], 1, -1)
        mag = rows.abs().double()
        claimed = torch.zeros_like(rows[0], dtype=torch.bool)
        keep = torch.zeros_like(rows, dtype=torch.bool)
        for k in tasks:
            keep[k] = nm_select(mag[k].masked_fill(claimed, -math.inf), n, m)
            claimed |= keep[k] & (mag[k] > 0)  # a zero entry holds nothing: it leaves its position free
        out[name] = (rows * keep).reshape(t.shape)
    return out
