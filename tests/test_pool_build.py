"""The mini8 pool builder's contrastive loss against an explicit per-concept computation."""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from fusion.pools.mini8_build import concept_contrastive_loss


def _reference(logits: torch.Tensor, concept: torch.Tensor) -> tuple[float, float]:
    """(image→caption, caption→image) losses with Python loops over images and concepts."""
    b = logits.shape[0]
    i2t = sum(-math.log(math.exp(logits[i, concept[i]]) / sum(math.exp(v) for v in logits[i].tolist()))
              for i in range(b)) / b
    present = sorted(set(concept.tolist()))
    t2i = 0.0
    for c in present:
        col = logits[:, c].tolist()
        denom = sum(math.exp(v) for v in col)
        t2i += -math.log(sum(math.exp(col[i]) for i in range(b) if concept[i] == c) / denom)
    return i2t, t2i / len(present)


def test_concept_contrastive_loss_matches_loops() -> None:
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(12, 7, generator=gen, dtype=torch.float64) * 3
    concept = torch.tensor([0, 3, 3, 1, 0, 6, 3, 1, 1, 0, 6, 2])
    i2t, t2i = _reference(logits, concept)
    assert math.isclose(float(concept_contrastive_loss(logits, concept)), i2t, rel_tol=1e-12)
    sym = float(concept_contrastive_loss(logits, concept, symmetric=True))
    assert math.isclose(sym, 0.5 * (i2t + t2i), rel_tol=1e-12)
    assert abs(sym - i2t) > 1e-3  # the caption->image term changes the loss


def test_symmetric_loss_gradient_pulls_positives_together() -> None:
    logits = torch.zeros(4, 3, dtype=torch.float64, requires_grad=True)
    concept = torch.tensor([0, 0, 1, 2])
    concept_contrastive_loss(logits, concept, symmetric=True).backward()
    pos = logits.grad[torch.arange(4), concept]
    assert (pos < 0).all()  # descending the loss raises every image's score for its own concept
    assert torch.isfinite(logits.grad).all()
    assert (logits.grad[~F.one_hot(concept, 3).bool()] > 0).all()  # and lowers every negative
