"""WUDI merging (Cheng et al., ICML 2025, "Whoever Started the Interference Should End It: Guiding Data-Free Model
Merging via Task Vectors"; reference ``nathanielyvo/WUDI-Merging:vit/wudi_main.py``, FusionBench ``wudi``).

A linear layer's task vector ``τ_k: [out, in]`` approximately spans the inputs of task k, so its rows serve as proxy
inputs: the merged update ``τ_m`` of each linear weight minimises the interference

    L(τ_m) = Σ_k w_k ‖(τ_m − τ_k) τ_kᵀ‖²_F,   w_k = 1/‖τ_k‖²_F,

by Adam from the task-arithmetic sum ``τ_m = Σ_k τ_k`` (reference: lr 1e-5, weight decay 0, 300 iterations
(``--iter``; FusionBench's config uses 400), float32). ``L`` is quadratic,
``∇L = 2(τ_m A − B)`` with ``A = Σ_k w_k G_k``, ``B = Σ_k w_k τ_k G_k``, ``G_k = τ_kᵀ τ_k: [in, in]``, so the solver
precomputes A and B once and each step costs one ``[out, in]·[in, in]`` product (the reference back-propagates
through ``K`` products ``[out, in]·[in, out]`` per step; the iterates are the same up to rounding).
``solver="closed_form"`` solves ``∇L = 0``: ``τ_m = B A⁻¹``, which is RegMean (Jin et al. 2023) with the proxy
inputs ``√w_k τ_k`` and is delegated to :func:`fusion.merge.regmean.regmean_merge` (α = 1; when A is numerically
singular it adds a ridge of 1e-6·mean(diag A), which pulls the unexcited input directions towards the mean τ, and
logs a warning saying so).

Which parameters: as in the reference, only the blocks' linear weights are solved (:func:`block_linear`: the 2-D
tensors inside a transformer block, :func:`fusion.merge.lines.block_index`, except embeddings; for open_clip exactly
``attn.in_proj_weight``, ``attn.out_proj.weight``, ``mlp.c_fc.weight``, ``mlp.c_proj.weight``; GPT-2's Conv1D weights
are solved as the ``[out, in]`` linears the text pools make of them); every
other parameter gets no update (``others="zero"``, the reference), or the mean task vector (``others="mean"``,
FusionBench, which also solves every other 2-D weight). ``δ = λ·τ_m`` with λ = 1 (the paper uses no rescaling).
A task with ``τ_k = 0`` gets ``w_k = 0`` (the reference would divide by zero).
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from torch import Tensor

from fusion.merge.iso import for_svd
from fusion.merge.lines import block_index
from fusion.merge.regmean import regmean_merge
from fusion.merge.task_vectors import HyperparameterError, StateDict

NOT_LINEAR = ("embed", "relative_attention_bias")  # 2-D tables inside blocks (T5's relative position buckets)
SOLVERS = ("adam", "closed_form")
OTHERS = ("zero", "mean")


def wudi_weights(t: Tensor) -> Tensor:
    """``w_k = 1/‖τ_k‖²_F`` of ``t: Tensor[K, out, in] -> Tensor[K]`` (0 for a zero task vector)."""
    sq = t.reshape(t.shape[0], -1).square().sum(1)
    return torch.where(sq > 0, 1.0 / sq.clamp_min(torch.finfo(sq.dtype).tiny), torch.zeros_like(sq))


def wudi_loss(tau_m: Tensor, t: Tensor) -> Tensor:
    """The interference ``Σ_k w_k ‖(τ_m − τ_k) τ_kᵀ‖²_F`` of ``tau_m: [out, in]`` against ``t: [K, out, in]``."""
    return (wudi_weights(t) * ((tau_m - t) @ t.transpose(1, 2)).square().sum((1, 2))).sum()


def wudi_adam(t: Tensor, steps: int = 300, lr: float = 1e-5) -> Tensor:
    """Adam on :func:`wudi_loss` from ``Σ_k τ_k`` with the analytic gradient ``2(τ_m A − B)``:
    ``Tensor[K, out, in] -> Tensor[out, in]`` in float32/float64."""
    t = for_svd(t)
    w = wudi_weights(t)
    a = torch.zeros(t.shape[2], t.shape[2], dtype=t.dtype, device=t.device)
    b = torch.zeros_like(t[0])
    for wk, tk in zip(w, t):
        gram = tk.T @ tk
        a += wk * gram
        b += wk * (tk @ gram)
    tau_m = torch.nn.Parameter(t.sum(0))
    opt = torch.optim.Adam([tau_m], lr=lr, weight_decay=0.0)
    for _ in range(steps):
        tau_m.grad = 2 * (tau_m.detach() @ a - b)
        opt.step()
    return tau_m.detach()


def wudi_closed_form(t: Tensor, ridge: float = 0.0) -> Tensor:
    """The minimiser ``τ_m = B A⁻¹`` of :func:`wudi_loss` (``Tensor[K, out, in] -> Tensor[out, in]``), solved as
    RegMean with Grams ``w_k τ_kᵀ τ_k``; ``ridge`` ≥ 0 relative to mean(diag A), raised with a warning if singular."""
    w = wudi_weights(for_svd(t))
    return regmean_merge(list(t), [wk * (tk.T @ tk) for wk, tk in zip(w, for_svd(t))], alpha=1.0, ridge=ridge)


def _check(solver: str, steps: int, lr: float, ridge: float, lam: float, others: str) -> None:
    """One message per bad hyperparameter: key, value, valid range, default."""
    if solver not in SOLVERS:
        raise HyperparameterError(f"wudi solver must be one of {list(SOLVERS)} ('adam' is the paper's), got {solver!r}")
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise HyperparameterError(f"wudi steps is the number of Adam iterations and must be an integer ≥ 1 (300 in "
                                  f"the reference), got {steps!r}")
    for key, value, default in (("lr", lr, "1e-5"), ("lam", lam, "1.0")):
        if not float(value) > 0:
            raise HyperparameterError(f"wudi {key} must be > 0 ({default} in the reference), got {value!r}")
    if not float(ridge) >= 0:
        raise HyperparameterError(f"wudi ridge must be ≥ 0 (0 = exact closed form), got {ridge!r}")
    if others not in OTHERS:
        raise HyperparameterError(f"wudi others must be one of {list(OTHERS)} ('zero' leaves non-linear parameters "
                                  f"at θ0 as the reference does, 'mean' averages them), got {others!r}")


def block_linear(name: str, t: Tensor) -> bool:
    """Whether the stacked ``t: [K, out, in]`` named ``name`` is a linear weight inside a transformer block: 2-D per
    task, in a block (:func:`fusion.merge.lines.block_index`), not an embedding table."""
    return t.dim() == 3 and block_index(name) is not None and not any(s in name for s in NOT_LINEAR)


def wudi(tv: Mapping[str, Tensor], solver: str = "adam", steps: int = 300, lr: float = 1e-5, ridge: float = 0.0,
         lam: float = 1.0, others: str = "zero", linear: Sequence[str] | None = None) -> StateDict:
    """WUDI's update ``λ·τ_m`` for every block linear weight (:func:`block_linear`; or, given ``linear``, every
    2-D weight whose name ends with one of those suffixes); ``others`` elsewhere.

    Args:
        tv: stacked task vectors ``{name: Tensor[K, *shape]}``; the ``linear`` ones must be 2-D ``[out, in]``.
        solver: ``"adam"`` (the paper: ``steps`` iterations at ``lr``) or ``"closed_form"`` (with ``ridge``).
        lam: final scale (1.0); others: ``"zero"`` (reference) or ``"mean"`` for the remaining parameters.
    Returns:
        ``{name: Tensor[*shape]}`` in the task vectors' dtype.
    """
    _check(solver, steps, lr, ridge, lam, others)
    out = {}
    for name, t in tv.items():
        solved = block_linear(name, t) if linear is None else name.endswith(tuple(linear)) and t.dim() == 3
        if solved:
            merged = wudi_adam(t, steps, lr) if solver == "adam" else wudi_closed_form(t, ridge)
        else:
            merged = for_svd(t).mean(0) if others == "mean" else torch.zeros_like(t[0])
        out[name] = (lam * merged).to(t.dtype)
    return out
