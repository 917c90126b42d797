"""LiNeS: Layer-increasing Network Scaling (Wang et al., ICLR 2025; ``wang-kee/LiNeS:src/eval/eval.py``).

Scale the merged update by depth (Eq. 2): residual block ``ℓ ∈ {0..L−1}`` gets ``α + β·ℓ/(L−1)``; parameters
outside the blocks (embeddings, final LayerNorm, projection) get ``α``. Shallow layers stay close to θ0 and keep
general features; deep layers keep the task-specific update.

For merging (§4.2), LiNeS is applied to the *unscaled* merged task vector τ_MTL (Σ_t τ_t for TA, the λ = 1 TIES
merge, or a Consensus merge) with ``α = (‖Σ_t τ_t‖ / ‖τ_MTL‖) / T`` (:func:`lines_alpha`, so that for TA the
first block gets the simple average 1/T) and β grid-searched on validation data. ``L`` is 12 for ViT-B and 24 for
ViT-L; here it is inferred from the parameter names.
"""
from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Mapping

import torch
from torch import Tensor

from fusion.merge.task_vectors import HyperparameterError, StateDict, TaskVectors, num_tasks

_BLOCK = re.compile(r"(?:^|\.)(?:resblocks|blocks|block|layers|layer|h)\.(\d+)\.")


def block_index(name: str) -> int | None:
    """The residual-block index of a parameter name (its first ``<list>.<i>.`` component), or ``None`` outside the
    blocks.

    Recognises the block lists of open_clip ViTs (``transformer.resblocks.<i>.``), timm (``blocks.<i>.``), HF CLIP,
    Llama, Qwen and Mistral (``layers.<i>.``), BERT/RoBERTa (``encoder.layer.<i>.``), GPT-2 (``h.<i>.``) and T5
    (``block.<i>.``; its encoder and decoder stacks are indexed separately).
    """
    match = _BLOCK.search(name)
    return int(match.group(1)) if match else None


def infer_num_blocks(names: Iterable[str]) -> int:
    """``1 + max block index`` over ``names`` (0 if no name is inside a block)."""
    indices = [i for i in map(block_index, names) if i is not None]
    return max(indices) + 1 if indices else 0


def lines_scale(delta: Mapping[str, Tensor], *, alpha: float, beta: float,
                num_blocks: int | None = None) -> StateDict:
    """LiNeS Eq. 2: ``δ_ℓ ← (α + β·ℓ/(L−1))·δ_ℓ`` inside block ℓ, ``α·δ`` elsewhere.

    Args:
        delta: ``{name: Tensor[*shape]}``, the (unscaled) merged update.
        alpha: the scale of the first block and of the non-block parameters.
        beta: the extra scale of the last block (``α + β``).
        num_blocks: ``L``; inferred from the names when ``None``.
    Returns:
        ``{name: Tensor[*shape]}``.
    """
    L = infer_num_blocks(delta) if num_blocks is None else int(num_blocks)
    indices = {n: block_index(n) for n in delta}
    if any(i is not None for i in indices.values()) and L < 2:
        raise HyperparameterError(f"lines_scale needs num_blocks >= 2 to spread the scale over depth, got {L}")
    too_deep = [n for n, i in indices.items() if i is not None and i >= L]
    if too_deep:
        raise ValueError(f"lines_scale: '{too_deep[0]}' is in block {indices[too_deep[0]]} but num_blocks={L}; "
                         "leave num_blocks=None to infer it")
    return {n: t * (alpha if indices[n] is None else alpha + beta * indices[n] / (L - 1)) for n, t in delta.items()}


def _norm(tensors: Iterable[Tensor]) -> Tensor:
    """Global L2 norm over a collection of tensors (float64)."""
    return torch.sqrt(sum(t.double().pow(2).sum() for t in tensors))


def lines_alpha(tv: Mapping[str, Tensor], merged_delta: Mapping[str, Tensor]) -> float:
    """LiNeS's merging α: ``(‖Σ_t τ_t‖ / ‖τ_MTL‖) / T`` with global L2 norms over all parameters."""
    summed = _norm(t.sum(0) for t in tv.values())
    merged = _norm(merged_delta[n] for n in tv)
    if merged == 0:
        raise ValueError("lines_alpha: the merged update τ_MTL is zero, so α = ‖Σ τ‖/‖τ_MTL‖/T is undefined")
    return float(summed / merged / num_tasks(tv))


def lines(tv: Mapping[str, Tensor], *, beta: float, base: Callable[[TaskVectors], StateDict] | None = None,
          alpha: float | None = None, num_blocks: int | None = None) -> StateDict:
    """LiNeS for multi-task merging (§4.2): ``lines_scale(τ_MTL, α, β)``.

    Args:
        tv: stacked task vectors ``{name: Tensor[K, *shape]}``.
        beta: grid-searched on validation data in the paper (no default).
        base: ``tv -> τ_MTL``, an UNSCALED merge (e.g. ``partial(ties, lam=1.0)``,
            ``partial(consensus_merge, lam=1.0)``); ``None`` means the TA sum ``Σ_t τ_t``.
        alpha: ``None`` uses :func:`lines_alpha`.
    Returns:
        ``{name: Tensor[*shape]}``; the caller adds θ0.
    """
    mtl = {n: t.sum(0) for n, t in tv.items()} if base is None else base(tv)
    a = lines_alpha(tv, mtl) if alpha is None else alpha
    return lines_scale(mtl, alpha=a, beta=beta, num_blocks=num_blocks)
