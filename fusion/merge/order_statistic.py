"""The exact k-th largest magnitude of each task over a whole model, seen one parameter at a time.

TIES' trim (:func:`fusion.merge.sparsify.magnitude_trim`) keeps each task's ``n = ceil(k·P)`` largest float32
magnitudes over the flattened model. A streamed merge (:mod:`fusion.stream`) never holds the model, so it finds
that threshold by a two-pass radix select over the float32 bit patterns, which for non-negative finite floats are
ordered as the values are:

1. pass 1 counts, per task, the magnitudes by their high 16 bits (a ``[K, 2^15]`` histogram; the sign bit is 0);
   the bucket ``b`` holding the n-th largest is where the count from the top reaches ``n``;
2. pass 2 counts the low 16 bits of the magnitudes whose high bits equal ``b`` (``[K, 2^16]``); the n-th largest
   is found there exactly.

Memory: the two histograms (``K × 98304`` int64) and a chunk of ``2^22`` entries, whatever ``P``; each pass
reads every tensor once. The result
equals ``torch.topk(|τ|, n).values[:, -1]`` bit for bit (ties included).
"""
from __future__ import annotations

from collections.abc import Iterator

import torch
from torch import Tensor

HIGH_BINS, LOW_BINS, CHUNK = 1 << 15, 1 << 16, 1 << 22


def chunks(t: Tensor, size: int = CHUNK) -> Iterator[tuple[int, Tensor]]:
    """``(task k, |τ_k| chunk as int64 float32-bits)`` over ``t: Tensor[K, *shape]``, ``size`` entries at a time
    (the int64 copies of a large embedding would otherwise be 2× its stacked float32 size)."""
    flat = t.detach().reshape(t.shape[0], -1)
    for k in range(flat.shape[0]):
        for start in range(0, flat.shape[1], size):
            yield k, flat[k, start:start + size].abs().float().view(torch.int32).long()


def high_histogram(t: Tensor) -> Tensor:
    """Pass 1 for one parameter ``t: Tensor[K, *shape]``: ``Tensor[K, 2^15]`` counts of the high 16 bits."""
    out = torch.zeros(t.shape[0], HIGH_BINS, dtype=torch.int64)
    for k, bits in chunks(t):
        out[k] += torch.bincount(bits >> 16, minlength=HIGH_BINS).cpu()
    return out


def low_histogram(t: Tensor, bucket: Tensor) -> Tensor:
    """Pass 2 for one parameter: ``Tensor[K, 2^16]`` counts of the low 16 bits of the magnitudes whose high bits
    equal task k's ``bucket[k]`` (``bucket: Tensor[K]`` from :func:`select_bucket`)."""
    out = torch.zeros(t.shape[0], LOW_BINS, dtype=torch.int64)
    for k, bits in chunks(t):
        out[k] += torch.bincount(bits[(bits >> 16) == int(bucket[k])] & 0xFFFF, minlength=LOW_BINS).cpu()
    return out


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
