"""Objectives: what a learned merge minimises, ``(logits [B, C], labels [B] | None) -> scalar``.

The math is in two pure functions: :func:`entropy` is AdaMerging's test-time-adaptation loss
``H(x) = −Σ_c p_c log p_c`` averaged over the batch (Yang et al., ICLR 2024, Eq. 5; computed with ``log_softmax``,
which is stable; FusionBench adds ε = 1e-8 inside the log instead); :func:`cross_entropy` needs labels (a labeled
split, e.g. validation; SMEAR's protocol). :class:`Entropy` and :class:`CrossEntropy` are the Hydra targets
(``conf/method/objective/``): they honour :class:`Objective`, which declares whether labels are read, so the runner
can refuse an unlabeled split before training.

:func:`token_rows` is where logits meet labels for every consumer (the training loop, evaluation, Fisher,
FW-Merging, diagnostics): classification logits ``[B, C]`` pass through; a causal LM's next-token logits
``[B, T, V]`` (:mod:`fusion.pools.hf_causal_lm`) become the rows an objective or a metric reads.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Protocol, runtime_checkable

import torch.nn.functional as F
from torch import Tensor

from fusion.pools.causal_inputs import IGNORE_INDEX, PROMPT


@runtime_checkable
class Objective(Protocol):
    """A training objective: its name (the logged key ``train/<name>``), whether it reads labels, and the loss."""

    name: str
    needs_labels: bool

    def __call__(self, logits: Tensor, labels: Tensor | None = None) -> Tensor:
        """A scalar loss of ``logits [B, C]`` (``labels [B]``, or ``None`` on unlabeled data)."""


def token_rows(logits: Tensor, labels: Tensor | None, inputs: Tensor, labeled: bool) -> tuple[Tensor, Tensor | None]:
    """The prediction rows ``(logits [N, C], labels [N] | None)`` an objective or a metric reads.

    2-D logits ``[B, C]`` (one prediction per example: every classification pool) pass through unchanged with
    ``labels``. 3-D next-token logits ``[B, T, V]`` of a causal LM, ``inputs: [B, 3, T]`` (ids, mask, role;
    :mod:`fusion.pools.causal_inputs`):

    * ``labeled``: the rows whose label is not ``IGNORE_INDEX`` (``labels: [B, T]``, the next token at every
      position whose next token is a completion token): teacher-forced accuracy and cross-entropy of completions;
    * not ``labeled``: the rows at prompt positions (role ``PROMPT``), each the next-token distribution given prompt
      tokens only (causal attention), so a label-free objective (entropy, Fisher's sampled labels) never reads a
      completion token; the labels are ``None``.

    Rows are in row-major ``(b, t)`` order: each example's rows are contiguous.
    """
    if logits.dim() == 2:
        return logits, labels
    if labeled:
        if labels is None:
            raise ValueError("token_rows: labeled rows of next-token logits need labels [B, T]; train or evaluate "
                             "on a labeled split")
        keep = labels != IGNORE_INDEX
        return logits[keep], labels[keep]
    return logits[inputs[:, 2] == PROMPT], None


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
