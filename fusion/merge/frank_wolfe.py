"""FW-Merging (Chen et al., ICCV 2025, "FW-Merging: Scaling Model Merging with Frank-Wolfe Optimization").

Frank–Wolfe (conditional gradient) over the convex hull of the candidate task vectors ``C = conv{c_1..c_M}``
(``c_m = scale·τ_m``: the pool's experts *and* any distractors), written in update space ``θ = θ0 + δ``:

1. ``g_t = ∇_θ L(θ0 + δ_t)`` (the caller's objective; cross-entropy on a few labeled samples per task is the
   paper's "hard" variant).
2. Linear-minimisation oracle (paper Alg. 1, line "s_t = argmin_{s ∈ C} ⟨g_t, s⟩"): the vertex with the most
   negative alignment with ``g_t`` — per parameter tensor (``granularity="layer"``) or for the whole model
   (``"model"``: per-tensor scores summed, as FusionBench's ``frank_wolfe_selection``).
3. ``δ_{t+1} = (1 − γ_t) δ_t + γ_t s_t`` with ``γ_t = min(1, 2/(t+2) · step_size)``.

Matching FusionBench ``fw_hard`` (``merge_fn=task_arithmetic``): its step ``merged + γ(θ_sel − merged)`` is this
convex step in weight space, hence the same in δ space; its ``γ_t = 2/(t+2)·step_size·scaling_factor`` is ours with
``step_size`` = their product. Deviations: (a) alignment is measured against the task vectors, not the full
checkpoints θ_k (``"inner"``, the default, is the exact LMO ⟨g, s⟩; ``"cosine"`` is FusionBench's per-tensor cosine);
(b) a tensor (or, model-wise, the model) whose Frank–Wolfe gap ``⟨g, δ − s⟩`` is ≤ 0 is left unchanged, since
no vertex descends there — FusionBench always steps. Shapes: ``grad``/``delta`` ``{name: Tensor[*shape]}``,
``candidates`` ``{name: Tensor[M, *shape]}``.
"""
from __future__ import annotations

from collections.abc import Callable, Mapping

import torch
from torch import Tensor

from fusion.merge.task_vectors import HyperparameterError, StateDict

GRANULARITIES = ("layer", "model")
ALIGNMENTS = ("inner", "cosine")


def check_fw_hyperparameters(iterations: int, step_size: float, granularity: str, alignment: str) -> None:
    """One :class:`HyperparameterError` naming the first bad key, its value, the valid range and the fix."""
    if int(iterations) != iterations or iterations < 1:
        raise HyperparameterError(f"fw iterations must be an integer ≥ 1, got {iterations}; FW-Merging uses 10")
    if not step_size > 0:
        raise HyperparameterError(f"fw step_size must be > 0 (γ_t = min(1, 2/(t+2)·step_size)), got {step_size}; "
                                  "1.0 is the classic Frank–Wolfe schedule")
    if granularity not in GRANULARITIES:
        raise HyperparameterError(f"fw granularity must be one of {GRANULARITIES}, got {granularity!r}")
    if alignment not in ALIGNMENTS:
        raise HyperparameterError(f"fw alignment must be one of {ALIGNMENTS}, got {alignment!r}")


def alignment_scores(grad: Mapping[str, Tensor], candidates: Mapping[str, Tensor],
                     alignment: str = "inner") -> dict[str, Tensor]:
    """``{name: Tensor[M]}``: ``⟨g^l, c_m^l⟩`` or its cosine (0 where a norm is 0) for every tensor ``l``."""
    out = {}
    for name, c in candidates.items():
        dtype = torch.promote_types(torch.promote_types(c.dtype, grad[name].dtype), torch.float32)
        g, flat = grad[name].flatten().to(dtype), c.flatten(1).to(dtype)  # bfloat16 vectors are scored in float32
        s = flat @ g
        if alignment == "cosine":
            denom = flat.norm(dim=1) * g.norm()
            s = torch.where(denom > 0, s / denom.clamp_min(torch.finfo(s.dtype).tiny), torch.zeros_like(s))
        out[name] = s
    return out


def lmo_select(grad: Mapping[str, Tensor], candidates: Mapping[str, Tensor], granularity: str = "layer",
               alignment: str = "inner") -> dict[str, int]:
    """The linear-minimisation oracle: ``{name: m}``, the candidate with the lowest score per tensor (``"layer"``)
    or one ``m`` for every tensor, minimising the summed per-tensor scores (``"model"``). Ties: lowest ``m``."""
    check_fw_hyperparameters(1, 1.0, granularity, alignment)
    scores = alignment_scores(grad, candidates, alignment)
    if granularity == "layer":
        return {name: int(s.argmin()) for name, s in scores.items()}
    best = int(torch.stack(list(scores.values())).sum(0).argmin())
    return {name: best for name in scores}


def fw_gamma(t: int, step_size: float) -> float:
    """``γ_t = min(1, 2/(t+2) · step_size)`` (the Frank–Wolfe schedule, scaled as FusionBench's ``step_size``)."""
    return min(1.0, 2.0 / (t + 2) * step_size)


def fw_step(delta: Mapping[str, Tensor], grad: Mapping[str, Tensor], candidates: Mapping[str, Tensor],
            choice: Mapping[str, int], gamma: float,
            granularity: str = "layer") -> tuple[StateDict, float, dict[str, bool]]:
    """``(δ', gap, moved)``: ``δ' = (1 − γ) δ + γ s`` with ``s^l = c_{choice[l]}^l``, skipped per tensor
    (``"layer"``) or for the model (``"model"``) where the Frank–Wolfe gap ``⟨g, δ − s⟩`` is ≤ 0; ``gap`` is the total
    gap and ``moved[l]`` whether tensor ``l`` stepped."""
    gaps = {n: float((grad[n].to(delta[n].dtype) * (delta[n] - c[choice[n]].to(delta[n].dtype))).sum())
            for n, c in candidates.items()}
    move_model = sum(gaps.values()) > 0
    moved = {n: (g > 0 if granularity == "layer" else move_model) for n, g in gaps.items()}
    out = {n: (1 - gamma) * delta[n] + gamma * c[choice[n]].to(delta[n].dtype) if moved[n] else delta[n].clone()
           for n, c in candidates.items()}
    return out, sum(gaps.values()), moved


def candidate_weights(history: list[dict], names: list[str], num_candidates: int) -> Tensor:
    """``Tensor[M + 1, L]``: the convex weights of ``δ^l = w[M, l]·δ_0^l + Σ_m w[m, l] c_m^l`` that ``history``
    (of :func:`frank_wolfe`) produced; row ``M`` is the initial point's weight (1 before any step)."""
    w = torch.zeros(num_candidates + 1, len(names), dtype=torch.float64)
    w[num_candidates] = 1.0
    for step in history:
        for l, name in enumerate(names):
            if step["moved"][name]:
                w[:, l] *= 1 - step["gamma"]
                w[step["choice"][name], l] += step["gamma"]
    return w


def frank_wolfe(candidates: Mapping[str, Tensor], gradient: Callable[[StateDict], StateDict], iterations: int = 10,
                step_size: float = 1.0, granularity: str = "layer", alignment: str = "inner",
                init: Mapping[str, Tensor] | None = None) -> tuple[StateDict, list[dict]]:
    """Run ``iterations`` Frank–Wolfe steps from ``init`` (default ``δ = 0``, the pretrained model).

    Args:
        candidates: ``{name: Tensor[M, *shape]}``, the hull's vertices (already scaled).
        gradient: ``δ -> ∇L(θ0 + δ)`` as ``{name: Tensor[*shape]}``.
    Returns:
        ``(δ, history)``; ``history[t]`` holds ``gamma``, ``gap``, the chosen candidate per tensor and whether the
        tensor stepped (:func:`candidate_weights` turns it into the convex weights).
    """
    check_fw_hyperparameters(iterations, step_size, granularity, alignment)
    if not candidates:
        raise HyperparameterError("frank_wolfe needs at least one candidate tensor, got an empty mapping")
    dtype = {n: torch.promote_types(c.dtype, torch.float32) for n, c in candidates.items()}  # δ accumulates in ≥ fp32
    delta = {n: torch.zeros(c.shape[1:], dtype=dtype[n], device=c.device) if init is None else
             init[n].to(dtype[n]).clone() for n, c in candidates.items()}
    history = []
    for t in range(int(iterations)):
        grad = gradient(delta)
        choice = lmo_select(grad, candidates, granularity, alignment)
        gamma = fw_gamma(t, step_size)
        delta, gap, moved = fw_step(delta, grad, candidates, choice, gamma, granularity)
        history.append({"iteration": t, "gamma": gamma, "gap": gap, "choice": choice, "moved": moved})
    return delta, history
