"""Objectives: functions ``(logits [B, C], labels [B] | None) -> scalar``.

``entropy`` is AdaMerging's test-time-adaptation loss ``H(x) = −Σ_c p_c log p_c`` averaged over the batch
(computed with ``log_softmax``, which is stable; FusionBench adds ε = 1e-8 inside the log instead).
``cross_entropy`` needs labels (a labeled split, e.g. validation).
"""
from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor


def entropy(logits: Tensor, labels: Tensor | None = None) -> Tensor:
    """Mean Shannon entropy of ``softmax(logits)``; ``labels`` are ignored (unsupervised)."""
    logp = F.log_softmax(logits.float(), dim=-1)
    return -(logp.exp() * logp).sum(-1).mean()


entropy.needs_labels = False  # type: ignore[attr-defined]


def cross_entropy(logits: Tensor, labels: Tensor | None = None, label_smoothing: float = 0.0) -> Tensor:
    """Mean cross-entropy against ``labels`` (required)."""
    if labels is None:
        raise ValueError("cross_entropy needs labels: train on a labeled split (data.labeled=true, e.g. split=val)")
    return F.cross_entropy(logits.float(), labels, label_smoothing=label_smoothing)


cross_entropy.needs_labels = True  # type: ignore[attr-defined]


def needs_labels(objective) -> bool:
    """Whether ``objective`` (a function or a ``functools.partial`` of one) uses labels."""
    return bool(getattr(getattr(objective, "func", objective), "needs_labels", True))


def objective_name(objective) -> str:
    return getattr(getattr(objective, "func", objective), "__name__", "loss")
