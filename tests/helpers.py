"""Test helpers without fixtures: a 4-layer MLP "encoder" with seeded experts, frozen linear heads, batches, and the
loop (MergeTraining) with a plain backward so it runs without a Trainer."""
from __future__ import annotations

import torch
from torch import nn

from fusion.train.bilevel import BilevelTraining
from fusion.train.module import MergeTraining

K = 3


def tiny_encoder(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(6, 8), nn.GELU(), nn.LayerNorm(8), nn.Linear(8, 5))


def experts_of(base: nn.Module, k: int = K, scale: float = 0.3) -> list[dict[str, torch.Tensor]]:
    gen = torch.Generator().manual_seed(1)
    return [{n: p.detach() + scale * torch.randn(p.shape, generator=gen) for n, p in base.state_dict().items()}
            for _ in range(k)]


class TinyHeads(nn.Module):
    """Per-task linear heads over 5-d features (frozen)."""

    def __init__(self, tasks):
        super().__init__()
        torch.manual_seed(3)
        self.w = nn.ParameterDict({t: nn.Parameter(torch.randn(4, 5), requires_grad=False) for t in tasks})

    def forward(self, features, task):
        return features @ self.w[task].T


def batches(k: int = K, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    return {f"t{i}": (torch.randn(8, 6, generator=gen), None) for i in range(k)}


class Harness(MergeTraining):
    """MergeTraining with manual_backward = plain backward (no Trainer attached)."""

    def manual_backward(self, loss, *args, **kwargs):
        loss.backward(*args, **kwargs)


class BilevelHarness(BilevelTraining):
    manual_backward = Harness.manual_backward
