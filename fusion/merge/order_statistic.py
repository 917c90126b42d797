"""The exact k-th largest magnitude of each task over a whole model, seen one parameter at a time.

TIES' trim (:func:`fusion.merge.sparsify.magnitude_trim`) keeps each task's ``n = ceil(k·P)`` largest float32
magnitudes over the flattened model. A streamed merge (:mod:`fusion.stream`) never holds the model, so it finds
that threshold by a two-pass radix select over the float32 bit patterns, which for non-negative finite floats are
ordered as the values are:

1. pass 1 counts, per task, the magnitudes by their high 16 bits (a ``[K, 2^15]`` histogram; the sign bit is 0);
   the bucket ``b`` holding the n-th largest is where the count from the top reaches ``n``;
2. pass 2 counts the low 16 bits of the magnitudes whose high bits equal ``b`` (``[K, 2^16]``); the n-th largest
   is found there exactly.

Memory: the two histograms (``K × 98304`` int64), whatever ``P``; each pass reads every tensor once. The result
equals ``torch.topk(|τ|, n).values[:, -1]`` bit for bit (ties included).
"""
from __future__ import annotations

import torch
from torch import Tensor

HIGH_BINS, LOW_BINS = 1 << 15, 1 << 16


def magnitude_bits(t: Tensor) -> Tensor:
    """``|t|`` in float32 viewed as int32 bits, one row per task: ``Tensor[K, *shape] -> Tensor[K, N]`` (int64)."""
    return t.detach().abs().float().reshape(t.shape[0], -1).view(torch.int32).long()


def _bincount_rows(values: Tensor, bins: int, mask: Tensor | None = None) -> Tensor:
    """Per-row histogram of ``values: Tensor[K, N]`` (ints in ``[0, bins)``) over the entries where ``mask``."""
    k = values.shape[0]
    offset = values + bins * torch.arange(k, device=values.device).unsqueeze(1)
    flat = offset.reshape(-1) if mask is None else offset[mask]
    return torch.bincount(flat, minlength=k * bins).reshape(k, bins).cpu()


def high_histogram(t: Tensor) -> Tensor:
    """Pass 1 for one parameter ``t: Tensor[K, *shape]``: ``Tensor[K, 2^15]`` counts of the high 16 bits."""
    return _bincount_rows(magnitude_bits(t) >> 16, HIGH_BINS)


def low_histogram(t: Tensor, bucket: Tensor) -> Tensor:
    """Pass 2 for one parameter: ``Tensor[K, 2^16]`` counts of the low 16 bits of the magnitudes whose high bits
    equal task k's ``bucket[k]`` (``bucket: Tensor[K]`` from :func:`select_bucket`)."""
    bits = magnitude_bits(t)
    inside = (bits >> 16) == bucket.to(bits.device).unsqueeze(1)
    return _bincount_rows(bits & 0xFFFF, LOW_BINS, inside)


def select_bucket(histogram: Tensor, n: int | Tensor) -> tuple[Tensor, Tensor]:
    """The bucket holding each row's ``n``-th largest entry and the rank left inside it.

    Args:
        histogram: ``Tensor[K, B]`` counts (bucket order = value order).
        n: the rank from the top (1 = the largest), an int or ``Tensor[K]``; at most the row's total.
    Returns:
        ``(bucket: Tensor[K], rank_inside: Tensor[K])``: the n-th largest is the ``rank_inside``-th largest of
        the bucket.
    """
    above = histogram.flip(1).cumsum(1).flip(1)  # [K, B]: how many entries lie in this bucket or higher
    n = torch.as_tensor(n, dtype=above.dtype).expand(histogram.shape[0])
    bucket = (above >= n.unsqueeze(1)).sum(1) - 1
    higher = torch.where(bucket + 1 < histogram.shape[1],
                         above.gather(1, (bucket + 1).clamp(max=histogram.shape[1] - 1).unsqueeze(1)).squeeze(1),
                         torch.zeros_like(bucket))
    return bucket, n - higher


def threshold_from_buckets(high: Tensor, low: Tensor) -> Tensor:
    """The float32 magnitude whose bits are ``high << 16 | low`` (``Tensor[K]`` each) → ``Tensor[K]``."""
    return ((high << 16) | low).to(torch.int32).view(torch.float32)
