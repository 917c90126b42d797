"""Batched, seeded geometric augmentation for small image benchmarks (one ``affine_grid`` per batch)."""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor


def random_affine(x: Tensor, generator: torch.Generator | None = None, *, degrees: float = 10.0,
                  scale: tuple[float, float] = (0.9, 1.1), shift: float = 0.08) -> Tensor:
    """Rotate by U(−degrees, degrees), scale by U(scale), shift by U(−shift, shift)·size, per image.

    ``x``: ``[B, C, H, W]`` normalised images; the border is filled with the image minimum (background).
    """
    b = x.shape[0]

    def u(lo: float, hi: float) -> Tensor:
        return torch.rand(b, generator=generator) * (hi - lo) + lo

    angle = u(-degrees, degrees) * math.pi / 180
    s = u(*scale)
    tx, ty = u(-shift, shift) * 2, u(-shift, shift) * 2
    cos, sin = torch.cos(angle) / s, torch.sin(angle) / s
    theta = torch.stack([torch.stack([cos, -sin, tx], 1), torch.stack([sin, cos, ty], 1)], 1).to(x)
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    background = x.amin(dim=(1, 2, 3), keepdim=True)
    out = F.grid_sample(x - background, grid, align_corners=False, padding_mode="zeros")
    return out + background
