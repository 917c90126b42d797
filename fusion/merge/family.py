"""One merge family: sparsify → (sign) consensus → aggregate and scale, as mergekit's
``GeneralizedTaskArithmeticMerge`` does it.

``δ = λ · agg_k( C( S(τ)_k ) )`` where ``S`` is an optional sparsifier (:mod:`fusion.merge.sparsify`), ``C`` is the
optional TIES sign consensus (elect ``γ = sign(Σ_k τ̂_k)``, zero entries that disagree; Yadav et al. 2023, §3 steps
2–3) and ``agg`` is a ``sum`` over tasks or a ``mean`` over the surviving (non-zero) entries.

Presets (each a plain function ``fn(tv, **hparams) -> δ``):

===================  ==================================  ===========  ======  ============================
preset               sparsifier                          consensus    agg     λ
===================  ==================================  ===========  ======  ============================
task arithmetic      —                                   no           sum     0.3  (``combine.task_arithmetic``)
TIES (``ties.py``)   magnitude top-k, k=0.2              yes          sum     0.3
DARE                 drop p=0.5, rescale                 no           sum     0.3  (FusionBench DARE-TA)
DARE + TIES          drop p=0.5, then top-k k=0.2        yes          sum     0.5  (FusionBench DARE-TIES)
DELLA                MAGPRUNE density=0.5, ε=0.1         yes          sum     0.3  (no CLIP default published)
CABS (``cabs.py``)   disjoint n:m, density=1/8, m=32     no           sum     1.0  (no CLIP default published)
===================  ==================================  ===========  ======  ============================
"""
from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from functools import partial

import torch
from torch import Tensor

from fusion.merge.cabs import cabs_sparsify
from fusion.merge.combine import combine
from fusion.merge.sparsify import dare_drop, magnitude_trim, magprune_drop
from fusion.merge.task_vectors import HyperparameterError, StateDict, TaskVectors, num_tasks

Sparsifier = Callable[[TaskVectors], TaskVectors]


def elect_sign(tv: Mapping[str, Tensor]) -> StateDict:
    """TIES step 2: ``γ = sign(Σ_k τ_k)`` per coordinate (0 where the sum is 0)."""
    return {n: torch.sign(t.sum(0)) for n, t in tv.items()}


def disjoint(tv: Mapping[str, Tensor], sign: Mapping[str, Tensor]) -> TaskVectors:
    """TIES step 3 (selection): zero every entry of τ_k whose sign disagrees with ``sign`` (zeros stay zero)."""
    return {n: t * (torch.sign(t) == sign[n]) * (sign[n] != 0) for n, t in tv.items()}


def sign_consensus(tv: Mapping[str, Tensor]) -> TaskVectors:
    """Elect signs and keep only the agreeing entries: ``disjoint(tv, elect_sign(tv))``."""
    return disjoint(tv, elect_sign(tv))


def aggregate_tasks(tv: Mapping[str, Tensor], lam: float, how: str = "sum") -> StateDict:
    """``λ Σ_k τ_k`` (``"sum"``, via :func:`combine`) or ``λ Σ_k τ_k / #{k: τ_k ≠ 0}`` (``"mean"``; TIES paper's
    disjoint mean, 0 where no task contributes). Returns ``{name: Tensor[*shape]}``."""
    if how == "sum":
        return combine(tv, torch.full((num_tasks(tv),), float(lam)))
    if how == "mean":
        return {n: lam * t.sum(0) / (t != 0).sum(0).clamp(min=1) for n, t in tv.items()}
    raise HyperparameterError(f"aggregate must be 'sum' or 'mean', got {how!r}")


def sparse_consensus_merge(tv: Mapping[str, Tensor], *, sparsify: Sparsifier | None = None,
                           consensus: bool = False, lam: float = 0.3, aggregate: str = "sum") -> StateDict:
    """The family's merged update ``λ · agg(C(S(τ)))`` (see the module docstring).

    Args:
        tv: stacked task vectors ``{name: Tensor[K, *shape]}``.
        sparsify: ``TaskVectors -> TaskVectors`` (e.g. ``partial(dare_drop, p=0.5)``) or ``None``.
        consensus: apply TIES sign election and disjoint selection after sparsifying.
        lam: the scale λ.
        aggregate: ``"sum"`` or ``"mean"``.
    Returns:
        ``{name: Tensor[*shape]}``; the caller adds θ0.
    """
    processed = dict(tv) if sparsify is None else sparsify(tv)
    if consensus:
        processed = sign_consensus(processed)
    return aggregate_tasks(processed, lam, aggregate)


def _then(first: Sparsifier, second: Sparsifier) -> Sparsifier:
    """Compose two sparsifiers: ``second(first(tv))``."""
    return lambda tv: second(first(tv))


def dare(tv: Mapping[str, Tensor], p: float = 0.5, lam: float | None = None, consensus: bool = False,
         k: float = 0.2, seed: int = 0, generator: torch.Generator | None = None,
         threshold: Tensor | None = None) -> StateDict:
    """DARE (Yu et al., ICML 2024, Eq. 1–2) followed by TA, or by TIES when ``consensus``.

    FusionBench defaults: ``p = 0.5``; with TA, λ = 0.3; with TIES (``consensus=True``) the dropped vectors are
    also trimmed to their top ``k = 0.2`` and λ = 0.5. ``lam=None`` picks 0.3 or 0.5 accordingly.
    ``generator`` and ``threshold`` (``Tensor[K]``, the trim threshold of the dropped vectors over the whole model)
    are given by a streamed merge, which calls this on one parameter at a time (:mod:`fusion.stream`).
    """
    drop = partial(dare_drop, p=p, seed=seed, generator=generator)
    if consensus:
        trim = partial(magnitude_trim, k=k, threshold=threshold)
        return sparse_consensus_merge(tv, sparsify=_then(drop, trim), consensus=True,
                                      lam=0.5 if lam is None else lam, aggregate="sum")
    return sparse_consensus_merge(tv, sparsify=drop, consensus=False, lam=0.3 if lam is None else lam)


def della(tv: Mapping[str, Tensor], density: float = 0.5, epsilon: float = 0.1, lam: float = 0.3,
          aggregate: str = "sum", seed: int = 0, generator: torch.Generator | None = None) -> StateDict:
    """DELLA-Merging (Deep et al., 2024): MAGPRUNE (§3) → elect signs → fuse → scale by λ.

    No CLIP default is published (the method is LLM-only). Defaults here: ``density = 0.5`` (the same expected
    drop rate as DARE's p = 0.5), ``ε = 0.1`` (low end of mergekit's examples, 0.1–0.25), ``sum`` fusion and
    λ = 0.3, the 8-task sum-convention default of TA/TIES (MAGPRUNE preserves the expectation, so the scale of
    the sum is that of TA). The DELLA paper fuses by the mean with λ ≈ 1: pass ``aggregate="mean", lam=1.0``.
    ``generator``: see :func:`dare`.
    """
    drop = partial(magprune_drop, density=density, epsilon=epsilon, seed=seed, generator=generator)
    return sparse_consensus_merge(tv, sparsify=drop, consensus=True, lam=lam, aggregate=aggregate)


def cabs(tv: Mapping[str, Tensor], density: float | None = 0.125, n: int | None = None, m: int = 32,
         order: Sequence[int] | None = None, lam: float = 1.0) -> StateDict:
    """CABS (Yang et al., ICML 2025): ``δ = λ Σ_k τ̂_k`` over the disjoint n:m-pruned vectors of
    :func:`fusion.merge.cabs.cabs_sparsify` (no sign consensus: the supports do not overlap).

    The paper scales each task by its own λ_k; here one λ (tuned on val) scales all tasks. No CLIP default is
    published (the paper is LLM/NLP): density 1/8 = 1/K for 8 tasks, so the K disjoint sets can fill each block,
    and λ = 1.0, since the kept entries are not summed over tasks (no 1/K dilution as in TA's 0.3).
    """
    sparsify = partial(cabs_sparsify, density=density, n=n, m=m, order=order)
    return sparse_consensus_merge(tv, sparsify=sparsify, consensus=False, lam=lam, aggregate="sum")
