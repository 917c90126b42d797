"""RegMean: dataless knowledge fusion by merging weights of language models (Jin et al., ICLR 2023, Eq. 2–3).

For a linear layer ``y = x Wᵀ`` (torch's ``nn.Linear``, ``W: [out, in]``) with task-k inputs ``X_k: [N_k, in]``,
RegMean minimises ``Σ_k ‖X_k Wᵀ − X_k W_kᵀ‖²``, so ``W*ᵀ = (Σ_k G̃_k)⁻¹ Σ_k G̃_k W_kᵀ`` with ``G_k = X_kᵀ X_k``
and ``G̃_k = α·G_k + (1−α)·diag(G_k)`` (off-diagonals scaled by α = 0.95, FusionBench's
``reduce_non_diagonal_ratio``). Every other parameter (biases, LayerNorms, embeddings, and any weight without a
Gram matrix) is averaged.

Robustness: the system is solved in float64. An optional ``ridge`` — and, if ``Σ G̃`` is numerically singular
(``λ_min/λ_max ≤ in·eps`` of the Grams' dtype, matrix_rank's tolerance), an automatic ridge of ``1e-6`` — adds
``ε·mean(diag Σ G̃)·(W̄ − W)`` to the objective, i.e. pulls the solution towards the simple average W̄ in the input
directions no task ever excites; a warning is logged when the automatic ridge is used.

open_clip: ``nn.MultiheadAttention`` keeps ``in_proj_weight`` as a bare parameter and calls
``F.multi_head_attention_forward`` with ``out_proj.weight`` directly, so no ``nn.Linear.forward`` runs for either
and no hook can see their inputs. :func:`default_linear_names` therefore lists the ``nn.Linear`` modules outside
``nn.MultiheadAttention`` (``mlp.c_fc``, ``mlp.c_proj``; for HF CLIP also ``q/k/v/out_proj``); the attention
projections of open_clip are averaged, and :func:`gram_matrices` refuses a name whose hook never fired.
"""
from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Mapping, Sequence

import torch
from torch import Tensor, nn

from fusion.merge.task_vectors import HyperparameterError, StateDict

log = logging.getLogger(__name__)

AUTO_RIDGE = 1e-6


def reduce_off_diagonal(gram: Tensor, alpha: float) -> Tensor:
    """``G̃ = α·G + (1−α)·diag(G)``: ``Tensor[in, in] -> Tensor[in, in]``."""
    return alpha * gram + (1 - alpha) * torch.diag(torch.diagonal(gram))


def _min_eig_ratio(a: Tensor) -> float:
    """``λ_min / λ_max`` of a symmetric PSD ``a`` (≤ 0 when singular)."""
    ev = torch.linalg.eigvalsh(a)
    return float(ev[0] / ev[-1]) if ev[-1] > 0 else 0.0


def _check_alpha(alpha: float) -> None:
    """α scales off-diagonals and must lie in [0, 1]."""
    if not 0.0 <= float(alpha) <= 1.0:
        raise HyperparameterError(f"regmean alpha scales the Gram matrices' off-diagonal entries and must lie in "
                                  f"[0, 1] (0.95 in FusionBench; 1 is plain RegMean, 0 a diagonal-weighted mean), "
                                  f"got {alpha!r}")


def regmean_system(weights: Sequence[Tensor], grams: Sequence[Tensor], alpha: float = 0.95, *,
                   ridge: float = 0.0) -> tuple[Tensor, Tensor] | None:
    """RegMean's normal equations for one linear layer (Jin et al. 2023, Eq. 3), in float64:
    ``A = Σ G̃_k + εm I`` and ``B = Σ G̃_k W_kᵀ + εm W̄ᵀ`` so that the merge solves ``A W*ᵀ = B``.

    Args:
        weights: K tensors ``W_k: [out, in]`` (torch ``nn.Linear`` layout), or their task vectors ``τ_k`` (the
            system is linear, so it then gives the update ``δ* = W* − W_0``).
        grams: K tensors ``G_k = X_kᵀ X_k: [in, in]``.
        alpha: off-diagonal scale of the Grams (0.95).
        ridge: ε ≥ 0, relative to ``m = mean(diag Σ G̃)``; raised to ``1e-6`` (with a warning) if the system is
            numerically singular. ``ε = 0`` is exact RegMean.
    Returns:
        ``(A: Tensor[in, in], B: Tensor[in, out])``, or ``None`` (with a warning) when every Gram is zero.
    """
    _check_alpha(alpha)
    if len(weights) != len(grams) or not weights:
        raise ValueError(f"regmean needs as many Gram matrices as weights (≥ 1), got {len(weights)} weights "
                         f"and {len(grams)} grams")
    eps = torch.finfo(grams[0].dtype).eps if grams[0].is_floating_point() else 1e-7
    g_t = [reduce_off_diagonal(g.double(), alpha) for g in grams]
    lhs = sum(g_t)
    rhs = sum(g @ w.double().T for g, w in zip(g_t, weights))
    mean_w = torch.stack([w.double() for w in weights]).mean(0)
    scale = float(torch.diagonal(lhs).mean())
    if scale <= 0:
        log.warning("regmean_merge: all Gram matrices are zero (the layer never saw an input); using the simple "
                    "average of the weights")
        return None
    eye = torch.eye(lhs.shape[0], dtype=lhs.dtype, device=lhs.device)
    ratio = _min_eig_ratio(lhs + ridge * scale * eye) if ridge < AUTO_RIDGE else 1.0
    if ratio <= lhs.shape[0] * eps:  # numerically singular at the Grams' precision (matrix_rank's tolerance)
        log.warning(f"regmean_merge: the summed Gram matrix ({lhs.shape[0]}x{lhs.shape[0]}) is singular "
                    f"(λ_min/λ_max = {ratio:.2e}); adding a ridge of {AUTO_RIDGE:g} x mean(diag) that pulls the "
                    "directions no input excites towards the average weight")
        ridge = AUTO_RIDGE
    return lhs + ridge * scale * eye, rhs + ridge * scale * mean_w.T


def regmean_merge(weights: Sequence[Tensor], grams: Sequence[Tensor], alpha: float = 0.95, *,
                  ridge: float = 0.0) -> Tensor:
    """RegMean for one linear layer (Jin et al. 2023, Eq. 3): ``W*ᵀ = (Σ G̃_k + εm I)⁻¹ (Σ G̃_k W_kᵀ + εm W̄ᵀ)``,
    solving :func:`regmean_system` directly (arguments as there). Returns ``Tensor[out, in]`` in the dtype of
    ``weights[0]``; the simple average when every Gram is zero."""
    system = regmean_system(weights, grams, alpha, ridge=ridge)
    if system is None:
        return torch.stack([w.double() for w in weights]).mean(0).to(weights[0].dtype)
    return torch.linalg.solve(*system).T.to(weights[0].dtype)


def default_linear_names(model: nn.Module) -> list[str]:
    """Names of the ``nn.Linear`` modules whose ``forward`` runs, i.e. those outside ``nn.MultiheadAttention``."""
    mha = [n for n, m in model.named_modules() if isinstance(m, nn.MultiheadAttention)]
    return [n for n, m in model.named_modules()
            if isinstance(m, nn.Linear) and not any(n.startswith(f"{a}.") for a in mha)]


def _gram_hook(store: dict[str, Tensor], name: str, dtype: torch.dtype):
    """A forward hook adding ``XᵀX`` of the module's input (flattened over all leading dims) to ``store[name]``."""
    def hook(module: nn.Module, inputs: tuple, output: Tensor) -> None:
        x = inputs[0].detach().reshape(-1, inputs[0].shape[-1]).to(dtype)
        store[name] = store.get(name, 0) + x.T @ x
    return hook


def gram_matrices(model: nn.Module, forward: Callable[[nn.Module, Tensor], object], batches: Iterable[Tensor],
                  linear_names: Sequence[str] | None = None, *,
                  dtype: torch.dtype = torch.float32) -> dict[str, Tensor]:
    """``G = Σ_n X_nᵀ X_n`` of each named ``nn.Linear``'s input, summed over all examples and tokens.

    Args:
        model: the network (left in its current train/eval mode; run under ``torch.no_grad``).
        forward: ``forward(model, batch)``; its result is ignored.
        batches: input batches.
        linear_names: module names (``model.named_modules()``); ``None`` uses :func:`default_linear_names`.
        dtype: accumulation dtype.
    Returns:
        ``{module_name: Tensor[in, in]}``.
    """
    names = default_linear_names(model) if linear_names is None else list(linear_names)
    modules = dict(model.named_modules())
    for n in names:
        if not isinstance(modules.get(n), nn.Linear):
            raise ValueError(f"gram_matrices: '{n}' is not an nn.Linear of the model (got "
                             f"{type(modules.get(n)).__name__}); see default_linear_names(model)")
    store: dict[str, Tensor] = {}
    handles = [modules[n].register_forward_hook(_gram_hook(store, n, dtype)) for n in names]
    try:
        with torch.no_grad():
            for batch in batches:
                forward(model, batch)
    finally:
        for h in handles:
            h.remove()
    silent = [n for n in names if n not in store]
    if silent:
        raise ValueError(f"gram_matrices: the forward hook of '{silent[0]}' never fired ({len(silent)} such layers). "
                         "Either `batches` was empty or it is used without calling its forward (e.g. the out_proj "
                         "of nn.MultiheadAttention); leave it out of linear_names so its weight is averaged")
    return store


def regmean(pretrained: Mapping[str, Tensor], experts: Sequence[Mapping[str, Tensor]],
            grams: Sequence[Mapping[str, Tensor]], alpha: float = 0.95, *, ridge: float = 0.0) -> StateDict:
    """RegMean over a whole model: :func:`regmean_merge` for every ``<module>.weight`` whose module has a Gram in
    ``grams`` (one ``{module_name: Tensor[in, in]}`` per expert), the mean of the experts for the other float
    parameters, θ0 for non-float entries. Returns merged parameters ``{name: Tensor[*shape]}``."""
    if len(experts) != len(grams) or not experts:
        raise ValueError(f"regmean needs one Gram dict per expert, got {len(experts)} experts and {len(grams)}")
    if any(set(g) != set(grams[0]) for g in grams):
        raise ValueError("regmean: the experts' Gram dicts cover different layers; compute them with the same "
                         "linear_names for every expert")
    out = {}
    for name, theta0 in pretrained.items():
        module = name[: -len(".weight")] if name.endswith(".weight") else None
        if not theta0.is_floating_point():
            out[name] = theta0
        elif module in grams[0] and theta0.dim() == 2:
            out[name] = regmean_merge([e[name] for e in experts], [g[module] for g in grams], alpha, ridge=ridge)
        else:
            out[name] = torch.stack([e[name] for e in experts]).mean(0)
    return out


def regmean_delta(pretrained: Mapping[str, Tensor], experts: Sequence[Mapping[str, Tensor]],
                  grams: Sequence[Mapping[str, Tensor]], alpha: float = 0.95, *, ridge: float = 0.0) -> StateDict:
    """:func:`regmean` as an update ``δ = θ* − θ0`` over the float parameters."""
    merged = regmean(pretrained, experts, grams, alpha, ridge=ridge)
    return {n: merged[n] - t for n, t in pretrained.items() if t.is_floating_point()}
