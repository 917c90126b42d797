"""Sparsifiers: the first stage of the sparsify → consensus → scale family (:mod:`fusion.merge.family`).

Each maps stacked task vectors ``{name: Tensor[K, *shape]}`` to stacked task vectors of the same shapes.

- :func:`magnitude_trim` — TIES (Yadav et al., NeurIPS 2023) step 1: keep each task's top-``k`` fraction of
  entries by magnitude over the flattened model.
- :func:`dare_drop` — DARE (Yu et al., ICML 2024, Eq. 1–2): drop each entry with probability ``p``, rescale the
  survivors by ``1/(1−p)``; the expectation is unchanged.
- :func:`magprune_drop` — DELLA's MAGPRUNE (Deep et al., 2024, §3): within each row, drop probabilities spread
  linearly over ``[p̄ − ε/2, p̄ + ε/2]`` by magnitude rank (larger entries are dropped less), survivors rescaled by
  ``1/(1−p_i)``; the expectation is unchanged.
"""
from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import Tensor

from fusion.merge.task_vectors import HyperparameterError, TaskVectors, flatten


def check_fraction(k: float, name: str = "k") -> None:
    """Raise a clear error unless ``0 < k ≤ 1``."""
    if not 0.0 < float(k) <= 1.0:
        raise HyperparameterError(f"{name} is the kept fraction and must lie in (0, 1], got {k!r} "
                                  f"(e.g. {name}=0.2 keeps 20%)")


def check_drop_rate(p: float, name: str = "p") -> None:
    """Raise a clear error unless ``0 ≤ p < 1`` (survivors are rescaled by ``1/(1−p)``)."""
    if not 0.0 <= float(p) < 1.0:
        raise HyperparameterError(f"{name} is a drop probability and must lie in [0, 1), got {p!r} "
                                  f"(survivors are rescaled by 1/(1-{name}); e.g. {name}=0.5 drops half)")


def keep_count(k: float, total: int) -> int:
    """``max(1, ceil(k·P))``: how many of a task's ``P`` entries TIES' trim keeps (the one place this is computed,
    so that a streamed merge, :mod:`fusion.stream`, counts exactly as the in-memory one)."""
    check_fraction(k)
    return max(1, int(torch.ceil(torch.tensor(k * total)).item()))


def trim_below(tv: Mapping[str, Tensor], threshold: Tensor) -> TaskVectors:
    """Zero the entries of task ``k`` whose float32 magnitude is below ``threshold[k]`` (ties kept).

    Args:
        tv: stacked task vectors ``{name: Tensor[K, *shape]}``.
        threshold: ``Tensor[K]``, each task's smallest kept magnitude.
    """
    out = {}
    for name, t in tv.items():
        thr = threshold.to(device=t.device, dtype=torch.float32).reshape(-1, *([1] * (t.dim() - 1)))
        out[name] = t * (t.abs().float() >= thr)
    return out


def magnitude_trim(tv: Mapping[str, Tensor], k: float = 0.2, threshold: Tensor | None = None) -> TaskVectors:
    """Keep each task's ``ceil(k·P)`` largest-magnitude entries over the flattened model; zero the rest.

    TIES-Merging step 1 ("trim"). Ties at the threshold are kept. Returns stacked task vectors of the same shapes.
    ``threshold`` (``Tensor[K]``, the ``ceil(k·P)``-th largest float32 magnitude of each task over the *whole*
    model) is given by a streamed merge that sees one parameter at a time (:mod:`fusion.stream`); ``None``
    computes it from ``tv``.
    """
    check_fraction(k)
    if threshold is None:
        flat = flatten(tv)
        mag = flat.abs().float()
        threshold = torch.topk(mag, keep_count(k, flat.shape[1]), dim=1, sorted=True).values[:, -1]  # [K]
    return trim_below(tv, threshold)


magnitude = magnitude_trim  # mergekit's name for the same sparsifier


def _uniform(shape: torch.Size, generator: torch.Generator, device: torch.device) -> Tensor:
    """``U[0, 1)`` noise drawn on the CPU from ``generator`` (so results do not depend on the device)."""
    return torch.rand(shape, generator=generator, dtype=torch.float64).to(device)


def dare_drop(tv: Mapping[str, Tensor], p: float = 0.5, seed: int = 0,
              generator: torch.Generator | None = None) -> TaskVectors:
    """DARE's drop-and-rescale (Yu et al., 2024, Eq. 1–2): ``τ̂ = m ⊙ τ / (1 − p)``, ``m ~ Bernoulli(1 − p)``.

    Args:
        tv: stacked task vectors ``{name: Tensor[K, *shape]}``; every entry of every task is dropped independently.
        p: drop probability in ``[0, 1)``; ``p = 0`` returns the input unchanged.
        seed: seeds a ``torch.Generator`` (names are visited in mapping order), so equal seeds give equal masks.
        generator: a CPU generator to draw from instead (``seed`` is then unused): a streamed merge passes one
            generator, seeded once, to its calls on one name at a time, which gives the masks of one call on all.
    Returns:
        ``{name: Tensor[K, *shape]}`` whose survivors equal ``τ / (1 − p)`` exactly and whose expectation is ``τ``.
    """
    check_drop_rate(p)
    g = generator if generator is not None else torch.Generator().manual_seed(int(seed))
    out = {}
    for name, t in tv.items():
        keep = _uniform(t.shape, g, t.device) >= p
        out[name] = t * keep / (1.0 - p)
    return out


def magprune_keep_probabilities(t: Tensor, density: float, epsilon: float) -> Tensor:
    """MAGPRUNE's per-entry keep probabilities ``1 − p_i`` for one stacked tensor (DELLA, Deep et al. 2024, §3).

    Rows are the output rows of each task's tensor (``t[k, i]`` flattened) for ≥2-D parameters and the whole tensor
    for 1-D/0-D ones. Within a row of ``n`` entries, the entry of magnitude rank ``r ∈ {0..n−1}`` (0 = smallest) gets
    drop probability ``p_i = p̄ + ε/2 − ε·r/(n−1)`` with ``p̄ = 1 − density`` (a 1-entry row gets ``p̄``).

    Args:
        t: ``Tensor[K, *shape]``.
    Returns:
        ``Tensor[K, *shape]`` (float64) of keep probabilities in ``[1 − p̄ − ε/2, 1 − p̄ + ε/2]``.
    """
    rows = t.reshape(t.shape[0], t.shape[1], -1) if t.dim() > 2 else t.reshape(t.shape[0], 1, -1)
    n = rows.shape[-1]
    rank = rows.abs().argsort(dim=-1, stable=True).argsort(dim=-1).to(torch.float64)
    rel = rank / (n - 1) if n > 1 else torch.full_like(rank, 0.5)
    drop = (1.0 - density) + epsilon / 2 - epsilon * rel
    return (1.0 - drop).reshape(t.shape)


def check_magprune(density: float, epsilon: float) -> None:
    """Raise unless ``density ∈ (0, 1]``, ``ε ≥ 0`` and every drop probability lies in ``[0, 1)``."""
    check_fraction(density, "density")
    p_bar = 1.0 - float(density)
    if epsilon < 0 or p_bar - epsilon / 2 < 0 or p_bar + epsilon / 2 >= 1:
        raise HyperparameterError(f"magprune drop probabilities span [1-density-epsilon/2, 1-density+epsilon/2] = "
                                  f"[{p_bar - epsilon / 2:g}, {p_bar + epsilon / 2:g}] for density={density!r}, "
                                  f"epsilon={epsilon!r}; they must lie in [0, 1): choose "
                                  f"0 <= epsilon <= 2*min(1-density, density) (e.g. density=0.5, epsilon=0.1)")


def magprune_drop(tv: Mapping[str, Tensor], density: float = 0.5, epsilon: float = 0.1,
                  seed: int = 0, generator: torch.Generator | None = None) -> TaskVectors:
    """DELLA's MAGPRUNE (Deep et al., 2024, §3, Eq. 1–3): magnitude-ranked stochastic drop with rescaling.

    Each entry is kept with probability ``q_i = 1 − p_i`` from :func:`magprune_keep_probabilities` (larger
    magnitude → larger ``q_i``) and the kept entries are rescaled by ``1/q_i``, so ``E[τ̂] = τ``.

    Args:
        tv: stacked task vectors ``{name: Tensor[K, *shape]}``.
        density: ``1 − p̄``, the mean kept fraction, in ``(0, 1]``.
        epsilon: the width of the drop-probability range; ``p̄ ± ε/2`` must lie in ``[0, 1)``.
        seed: seeds a ``torch.Generator`` (names visited in mapping order).
        generator: a CPU generator to draw from instead of seeding one (see :func:`dare_drop`).
    Returns:
        ``{name: Tensor[K, *shape]}``.
    """
    check_magprune(density, epsilon)
    g = generator if generator is not None else torch.Generator().manual_seed(int(seed))
    out = {}
    for name, t in tv.items():
        q = magprune_keep_probabilities(t, density, epsilon).to(t.device)
        keep = _uniform(t.shape, g, t.device) < q
        out[name] = (t * keep / q).to(t.dtype)
    return out
