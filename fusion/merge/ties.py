"""TIES-Merging (Yadav et al., NeurIPS 2023): trim, elect sign, disjoint merge — a preset of
:func:`fusion.merge.family.sparse_consensus_merge`.

1. Trim: keep each τ_k's top-``k`` fraction of entries by magnitude over the *flattened model*.
2. Elect: ``γ = sign(Σ_k τ̂_k)`` per coordinate.
3. Disjoint merge: keep τ̂_k only where ``sign(τ̂_k) = γ``; aggregate by ``sum`` (AdaMerging, FusionBench)
   or ``mean`` over the agreeing, non-zero entries (the TIES paper).
4. ``θ = θ_0 + λ · merge``.

:func:`ties_disjoint` returns the processed, *unsummed* vectors (steps 1–3) that AdaMerging++ learns over.
"""
from __future__ import annotations

from collections.abc import Mapping
from functools import partial

from torch import Tensor

from fusion.merge.family import disjoint, elect_sign, sign_consensus, sparse_consensus_merge
from fusion.merge.sparsify import check_fraction, magnitude_trim
from fusion.merge.task_vectors import StateDict, TaskVectors

__all__ = ["check_fraction", "magnitude_trim", "elect_sign", "disjoint", "ties_disjoint", "ties"]


def ties_disjoint(tv: Mapping[str, Tensor], k: float = 0.2) -> TaskVectors:
    """TIES steps 1–3 without the sum: the task vectors AdaMerging++ learns coefficients over."""
    return sign_consensus(magnitude_trim(tv, k))


def ties(tv: Mapping[str, Tensor], k: float = 0.2, lam: float = 0.3, aggregate: str = "sum",
         threshold: Tensor | None = None) -> StateDict:
    """TIES-Merging's update ``λ · merge(τ̂)`` with ``aggregate`` ∈ {"sum", "mean"} (k = 0.2, λ = 0.3 for sum).

    ``threshold`` (``Tensor[K]``): each task's trim threshold over the whole model, given when ``tv`` holds only
    part of it (a streamed merge, :mod:`fusion.stream`); ``None`` computes it from ``tv``.
    """
    check_fraction(k)
    return sparse_consensus_merge(tv, sparsify=partial(magnitude_trim, k=k, threshold=threshold), consensus=True,
                                  lam=lam,
                                  aggregate=aggregate)
