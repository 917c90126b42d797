"""Shared task-vector masks of Concrete subspace learning (Tang et al., arXiv 2312.06173, §3).

- :func:`concrete_sample` — a binary Concrete (relaxed Bernoulli) sample
  ``m̂ = σ((log u − log(1−u) + x) / T)``, ``u ~ U(0, 1)`` (Maddison et al., 2017; the paper's Eq. 5), the same
  draw as ``torch.distributions.RelaxedBernoulli(T, logits=x).rsample()``; differentiable in the logits ``x``.
- :func:`expected_mask`, :func:`hard_mask` — ``σ(x)`` and ``1[σ(x) > 0.5]`` (evaluation masks).
- :func:`apply_mask` — ``τ̃_k = τ_k ⊙ m / mean(m)``, rescaled per tensor (``src/concrete_mask.py:_apply_mask``);
  :func:`mask_task_vectors` does it for stacked task vectors with one mask per tensor, shared by all tasks.
- :func:`pack_bits` / :func:`unpack_bits` — a binary mask stored at one bit per element.
"""
from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import Tensor

from fusion.merge.task_vectors import HyperparameterError, TaskVectors

_BIT_WEIGHTS = torch.tensor([128, 64, 32, 16, 8, 4, 2, 1], dtype=torch.uint8)  # numpy.packbits order (big-endian)


def check_temperature(temperature: float) -> float:
    """``temperature`` as a float; raise a clear error unless it is a finite number > 0."""
    t = float(temperature)
    if not (t > 0.0 and t < float("inf")):
        raise HyperparameterError(f"the Concrete temperature must be a finite number > 0, got {temperature!r} "
                                  "(0.5 is the paper's value; use eval_mask=hard for a binary mask, not temperature=0)")
    return t


def concrete_sample(logits: Tensor, temperature: float, generator: torch.Generator | None = None) -> Tensor:
    """A relaxed-Bernoulli sample in ``(0, 1)`` with the shape of ``logits`` (computed in float32 at least).

    Args:
        logits: ``x``, any shape; the sample is differentiable in it.
        temperature: ``T > 0``; as ``T → 0`` the sample becomes a Bernoulli(σ(x)) draw of 0/1 values.
        generator: the source of ``u`` (default: torch's global generator, as ``RelaxedBernoulli`` uses).
    """
    t = check_temperature(temperature)
    dtype = torch.promote_types(logits.dtype, torch.float32)
    u = torch.rand(logits.shape, generator=generator, dtype=dtype, device=logits.device)
    eps = torch.finfo(dtype).eps
    u = u.clamp(eps, 1 - eps)  # torch.distributions.utils.clamp_probs
    return torch.sigmoid((u.log() - (-u).log1p() + logits.to(dtype)) / t)


def expected_mask(logits: Tensor) -> Tensor:
    """``E[m] = σ(x)`` (float32 at least)."""
    return torch.sigmoid(logits.to(torch.promote_types(logits.dtype, torch.float32)))


def hard_mask(logits: Tensor) -> Tensor:
    """``1[σ(x) > 0.5] = 1[x > 0]`` as float32 (logits exactly 0, i.e. never updated, are dropped)."""
    return (logits > 0).to(torch.float32)


def apply_mask(tv: Tensor, mask: Tensor) -> Tensor:
    """``τ ⊙ m / mean(m)`` — the paper's rescaled mask, shared by every task.

    Args:
        tv: ``Tensor[K, *shape]`` stacked task vectors of one parameter tensor (or ``Tensor[*shape]``).
        mask: ``Tensor[*shape]`` in ``[0, 1]``. An all-zero mask gives a zero update (not 0/0).
    Returns:
        The masked tensor in the promoted dtype of ``tv`` and ``mask``; differentiable in ``mask``.
    """
    if tuple(mask.shape) != tuple(tv.shape[-mask.dim():] if mask.dim() else ()):
        raise ValueError(f"mask of shape {tuple(mask.shape)} does not match the task vector's trailing shape "
                         f"{tuple(tv.shape[1:])}")
    mean = mask.mean()
    return tv * (mask / mean.clamp_min(torch.finfo(mean.dtype).tiny))


def mask_task_vectors(tv: Mapping[str, Tensor], masks: Mapping[str, Tensor]) -> TaskVectors:
    """:func:`apply_mask` for every tensor of stacked task vectors ``{name: Tensor[K, *shape]}``.

    ``masks`` holds ``{name: Tensor[*shape]}`` for every name of ``tv`` (extra names are an error).
    The result keeps the dtype of ``tv`` (e.g. bfloat16 task vectors stay bfloat16).
    """
    missing, extra = [n for n in tv if n not in masks], [n for n in masks if n not in tv]
    if missing or extra:
        raise KeyError(f"the mask does not cover the task vectors: missing {missing[:3]}, unexpected {extra[:3]}")
    return {n: apply_mask(t, masks[n].to(t.device)).to(t.dtype) for n, t in tv.items()}


def kept_fraction(mask: Tensor) -> float:
    """The mean of a mask in ``[0, 1]`` (for a binary mask, the fraction of entries kept)."""
    return float(mask.float().mean())


def is_binary(mask: Tensor) -> bool:
    """Whether every entry of ``mask`` is exactly 0 or 1."""
    return bool(((mask == 0) | (mask == 1)).all())


def pack_bits(mask: Tensor) -> Tensor:
    """A binary mask as ``uint8[ceil(numel / 8)]``, 8 entries per byte, most significant bit first."""
    if not is_binary(mask):
        raise ValueError("pack_bits needs a binary (0/1) mask")
    flat = mask.detach().flatten().to(torch.uint8).cpu()
    flat = torch.cat([flat, flat.new_zeros(-flat.numel() % 8)])
    return (flat.view(-1, 8) * _BIT_WEIGHTS).sum(1, dtype=torch.uint8)


def unpack_bits(packed: Tensor, shape: tuple[int, ...]) -> Tensor:
    """Inverse of :func:`pack_bits`: a float32 0/1 mask of ``shape``."""
    n = 1
    for s in shape:
        n *= int(s)
    bits = (packed.to(torch.uint8)[:, None] & _BIT_WEIGHTS).ne(0).flatten()
    if bits.numel() < n or bits.numel() - n >= 8:
        raise ValueError(f"{packed.numel()} packed bytes cannot hold a mask of shape {tuple(shape)} ({n} entries)")
    return bits[:n].reshape(shape).to(torch.float32)
