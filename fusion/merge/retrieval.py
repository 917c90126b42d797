"""Compression with per-task retrieval: one shared update plus small per-task parts; task ``k``'s model is
``θ_0 + Δ_k`` and needs the task id at inference (not a single merged model).

- :class:`MaskedTasks` — ``Δ_k = s_k · m_k ⊙ τ_shared`` with binary masks stored bit-packed (one bit per entry)
  and a scalar per task: TALL-mask compression (:func:`tall_mask_compression`, ``s_k = 1``) and EMR-Merging
  (:func:`fusion.merge.emr.emr`).
- Every compressed form honours :class:`TaskSpecific`: ``task_delta(k)`` rebuilds one task's update (only one
  at a time is materialised) and ``stored_bytes()`` says what it keeps, to compare with K task vectors.
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

import torch
from torch import Tensor

from fusion.merge.consensus import tall_masks
from fusion.merge.masks import pack_bits, unpack_bits
from fusion.merge.task_vectors import HyperparameterError, StateDict, num_tasks
from fusion.merge.ties import ties


@runtime_checkable
class TaskSpecific(Protocol):
    """What a task-id-at-inference method keeps: K task updates rebuilt on demand."""

    num_tasks: int

    def task_delta(self, k: int) -> StateDict:
        """Task ``k``'s update ``{name: Tensor[*shape]}`` (θ_k = θ_0 + it)."""

    def stored_bytes(self) -> dict[str, int]:
        """``{"shared": bytes, "per_task": bytes}`` of what is stored besides θ_0 (all K tasks' parts together)."""


def tensor_bytes(tensors: Mapping[str, Tensor]) -> int:
    """Bytes held by ``tensors`` at their dtype."""
    return sum(t.numel() * t.element_size() for t in tensors.values())


@dataclass
class MaskedTasks:
    """``Δ_k = scales[k] · unpack(masks[name][k]) ⊙ shared[name]``.

    Attributes:
        shared: ``{name: Tensor[*shape]}``, the one shared update (τ_MTL, τ_uni).
        masks: ``{name: [uint8[ceil(numel/8)] × K]}``, each task's binary mask bit-packed
            (:func:`fusion.merge.masks.pack_bits`).
        scales: ``Tensor[K]`` (float32), one rescaler per task (1 for TALL masks).
    """

    shared: StateDict
    masks: dict[str, list[Tensor]]
    scales: Tensor

    @classmethod
    def from_masks(cls, shared: Mapping[str, Tensor], masks: Mapping[str, Tensor],
                   scales: Tensor | None = None) -> "MaskedTasks":
        """From boolean masks ``{name: BoolTensor[K, *shape]}`` (packed here); ``scales`` default to ones."""
        k = num_tasks(masks)
        packed = {n: [pack_bits(m[i]) for i in range(k)] for n, m in masks.items()}
        scales = torch.ones(k) if scales is None else scales.detach().float().cpu()
        return cls(dict(shared), packed, scales)

    @property
    def num_tasks(self) -> int:
        return int(self.scales.numel())

    def mask(self, k: int) -> StateDict:
        """Task ``k``'s mask unpacked: ``{name: float32 Tensor[*shape]}`` of 0/1 on the shared update's device."""
        return {n: unpack_bits(self.masks[n][k], tuple(s.shape)).to(s.device) for n, s in self.shared.items()}

    def task_delta(self, k: int) -> StateDict:
        mask = self.mask(k)
        return {n: (float(self.scales[k]) * mask[n] * s).to(s.dtype) for n, s in self.shared.items()}

    def kept_fraction(self) -> list[float]:
        """The fraction of entries on in each task's mask."""
        total = sum(s.numel() for s in self.shared.values())
        return [sum(float(m.sum()) for m in self.mask(k).values()) / total for k in range(self.num_tasks)]

    def stored_bytes(self) -> dict[str, int]:
        per_task = sum(p.numel() for packs in self.masks.values() for p in packs) + self.scales.numel() * 4
        return {"shared": tensor_bytes(self.shared), "per_task": per_task}


def tall_mask_compression(tv: Mapping[str, Tensor], lambdas: float | Sequence[float] = 0.4, base: str = "ta",
                          ties_k: float = 0.2) -> MaskedTasks:
    """TALL-mask compression (Wang et al., ICML 2024, §5 "compression"; ``nik-dim/tall_masks``): store τ_MTL and
    one TALL mask per task (Eq. 3, :func:`fusion.merge.consensus.tall_masks`); task t's model is
    ``θ_0 + m_t ⊙ τ_MTL`` (scale 1, as the reference evaluates it).

    Args:
        tv: stacked task vectors ``{name: Tensor[K, *shape]}``, K ≥ 2.
        lambdas: the mask thresholds λ_t, one float or K floats (the paper picks each task's on its validation
            split from {0.2, …, 0.6}: ``tune`` with ``per_task`` in the config).
        base: ``"ta"`` (τ_MTL = Σ_t τ_t) or ``"ties"`` (the TIES sum-merge, top-``ties_k``, λ = 1).
    Returns:
        :class:`MaskedTasks` with τ_MTL shared and scales 1.
    """
    if num_tasks(tv) < 2:
        raise HyperparameterError(f"tall_mask_compression needs at least 2 task vectors, got K={num_tasks(tv)}; "
                                  "with one task its expert is the model")
    if base not in ("ta", "ties"):
        raise HyperparameterError(f"tall_mask_compression base must be 'ta' or 'ties', got {base!r}")
    mtl = ({n: t.sum(0) for n, t in tv.items()} if base == "ta" else ties(tv, k=ties_k, lam=1.0, aggregate="sum"))
    return MaskedTasks.from_masks(mtl, tall_masks(tv, mtl, lambdas))
