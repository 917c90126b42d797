"""Objectives: what a learned merge minimises, ``(logits [B, C], labels [B] | None) -> scalar``.

The math is in two pure functions: :func:`entropy` is AdaMerging's test-time-adaptation loss
``H(x) = −Σ_c p_c log p_c`` averaged over the batch (Yang et al., ICLR 2024, Eq. 5; computed with ``log_softmax``,
which is stable; FusionBench adds ε = 1e-8 inside the log instead); :func:`cross_entropy` needs labels (a labeled
split, e.g. validation; SMEAR's protocol). :class:`Entropy` and :class:`CrossEntropy` are the Hydra targets
(``conf/method/objective/``): they honour :class:`Objective`, which declares whether labels are read, so the runner
can refuse an unlabeled split before training.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Protocol, runtime_checkable

import torch.nn.functional as F
from torch import Tensor


@runtime_checkable
class Objective(Protocol):
    """A training objective: its name (the logged key ``train/<name>``), whether it reads labels, and the loss."""

    name: str
    needs_labels: bool

    def __call__(self, logits: Tensor, labels: Tensor | None = None) -> Tensor:
        """A scalar loss of ``logits [B, C]`` (``labels [B]``, or ``None`` on unlabeled data)."""


def sample_entropy(logits: Tensor) -> Tensor:
    """``[N]``: the Shannon entropy ``−Σ_c p_c log p_c`` of each row's ``softmax(logits)``."""
    logp = F.log_softmax(logits.float(), dim=-1)
    return -(logp.exp() * logp).sum(-1)


def entropy(logits: Tensor, labels: Tensor | None = None) -> Tensor:
    """Mean Shannon entropy of ``softmax(logits)``; ``labels`` are ignored (unsupervised)."""
    return sample_entropy(logits).mean()


def cross_entropy(logits: Tensor, labels: Tensor | None = None, label_smoothing: float = 0.0) -> Tensor:
    """Mean cross-entropy against ``labels`` (required)."""
    if labels is None:
        raise ValueError("cross_entropy needs labels: train on a labeled split (method/data=val_labeled)")
    return F.cross_entropy(logits.float(), labels, label_smoothing=label_smoothing)


@dataclass(frozen=True)
class Entropy:
    """Entropy minimisation on unlabeled images (:func:`entropy`)."""

    name: ClassVar[str] = "entropy"
    needs_labels: ClassVar[bool] = False

    def __call__(self, logits: Tensor, labels: Tensor | None = None) -> Tensor:
        return entropy(logits)


@dataclass(frozen=True)
class CrossEntropy:
    """Cross-entropy against the labels, with optional label smoothing (:func:`cross_entropy`)."""

    label_smoothing: float = 0.0
    name: ClassVar[str] = "cross_entropy"
    needs_labels: ClassVar[bool] = True

    def __call__(self, logits: Tensor, labels: Tensor | None = None) -> Tensor:
        return cross_entropy(logits, labels, self.label_smoothing)
