"""Fisher merging (Matena & Raffel, NeurIPS 2022, "Merging Models with Fisher-Weighted Averaging", Eq. 3–4).

``θ* = Σ_k F̃_k ⊙ θ_k / Σ_k F̃_k`` per coordinate, with a diagonal Fisher ``F̂_k = E_x E_{y~p_θk(·|x)}[(∇ log
p_θk(y|x))²]`` (Eq. 4), estimated per *example* and averaged (:func:`diagonal_fisher`).

Weights (FusionBench ``merging_with_fisher_weights``): ``F̃_k = c_k·(F̂_k + floor)`` with ``floor = 1e-6``; with
``normalize=True`` the per-model factor is ``c_k ∝ 1/(‖F̂_k‖₂ + floor)`` normalised to ``Σ_k c_k = 1``, where
``‖F̂_k‖₂`` is the L2 norm of model k's whole Fisher (so models whose Fisher is larger overall do not dominate);
with ``normalize=False``, ``c_k = 1``. Equal Fishers give the simple average.

Deviation from FusionBench's estimator: FusionBench squares the gradient of a *batch-summed* expectation
``Σ_n Σ_c sqrt(p_c) log p_c`` (a cheap approximation); we square per-example gradients of ``log p(y_n|x_n)`` with
``y_n`` sampled from the model's own predictive distribution (seeded), or the given labels (empirical Fisher).
"""
from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence

import torch
from torch import Tensor, nn
from torch.func import functional_call, grad, vmap

from fusion.merge.task_vectors import StateDict

Stacked = Mapping[str, Tensor] | Sequence[Mapping[str, Tensor]]


def _stacked(x: Stacked, name: str) -> Tensor:
    """``Tensor[K, *shape]`` for ``name`` from a list of state dicts or already-stacked tensors."""
    return x[name] if isinstance(x, Mapping) else torch.stack([d[name] for d in x])


def model_coefficients(fishers: Stacked, names: Iterable[str], floor: float = 1e-6) -> Tensor:
    """``c_k = (1/(‖F_k‖ + floor)) / Σ_j 1/(‖F_j‖ + floor)``: ``Tensor[K]`` (FusionBench's L2 normalisation)."""
    sq = sum(_stacked(fishers, n).double().flatten(1).pow(2).sum(1) for n in names)
    inv = 1.0 / (sq.sqrt() + floor)
    return inv / inv.sum()


def fisher_weights(fishers: Stacked, name: str, coef: Tensor | None, floor: float = 1e-6) -> Tensor:
    """``F̃_k = c_k·(F̂_k + floor)`` of parameter ``name`` in float64: ``Tensor[K, *shape]`` (``c_k = 1`` when
    ``coef`` is None; ``coef`` from :func:`model_coefficients`)."""
    w = _stacked(fishers, name).double() + floor
    return w if coef is None else w * coef.to(w.device).reshape(-1, *([1] * (w.dim() - 1)))


def fisher_merge(pretrained: Mapping[str, Tensor], experts_params: Stacked, fishers: Stacked, *,
                 floor: float = 1e-6, normalize: bool = True) -> StateDict:
    """Fisher-weighted average of expert parameters (Matena & Raffel 2022, Eq. 3; FusionBench weights).

    Args:
        pretrained: θ0; its non-float entries are returned unchanged.
        experts_params: the K experts' parameters, a list of state dicts or ``{name: Tensor[K, *shape]}``.
        fishers: diagonal Fishers in the same layout, for a subset of the float names; float names without a
            Fisher are simply averaged over the experts.
        floor: added to every Fisher entry (and to the norms) against division by zero.
        normalize: scale each model's Fisher by ``c_k ∝ 1/‖F_k‖`` (module docstring).
    Returns:
        merged parameters ``{name: Tensor[*shape]}`` for every key of ``pretrained``.
    """
    names = list(fishers.keys() if isinstance(fishers, Mapping) else fishers[0].keys())
    coef = model_coefficients(fishers, names, floor) if normalize else None
    out = {}
    for name, theta0 in pretrained.items():
        if not theta0.is_floating_point():
            out[name] = theta0
            continue
        theta = _stacked(experts_params, name).double()
        if name not in names:
            out[name] = theta.mean(0).to(theta0.dtype)
            continue
        w = fisher_weights(fishers, name, coef, floor)
        out[name] = ((w * theta).sum(0) / w.sum(0)).to(theta0.dtype)
    return out


def fisher_merge_delta(pretrained: Mapping[str, Tensor], experts_params: Stacked, fishers: Stacked, *,
                       floor: float = 1e-6, normalize: bool = True) -> StateDict:
    """:func:`fisher_merge` as an update ``δ = θ* − θ0`` over the float parameters."""
    merged = fisher_merge(pretrained, experts_params, fishers, floor=floor, normalize=normalize)
    return {n: merged[n] - t for n, t in pretrained.items() if t.is_floating_point()}


class _Forward(nn.Module):
    """Wraps ``forward(model, x)`` as a module so ``functional_call`` can substitute ``model``'s parameters."""

    def __init__(self, model: nn.Module, forward: Callable[[nn.Module, Tensor], Tensor]):
        super().__init__()
        self.model, self._forward = model, forward

    def forward(self, x: Tensor) -> Tensor:
        return self._forward(self.model, x)


def _per_example_sq_grads(wrapped: _Forward, params: StateDict, x: Tensor, y: Tensor,
                          vectorize: bool) -> StateDict:
    """``Σ_n (∇_θ log p(y_n|x_n))²`` over one batch: ``{name: Tensor[*shape]}``.

    An example whose forward gives several rows (a causal LM's next-token predictions at its prompt positions,
    :func:`fusion.train.objectives.token_rows`) has the log-likelihood ``Σ_r log p(y_r|x)`` of its rows; ``y`` then
    holds every row's label, each example's rows contiguous, and the examples are looped over.
    """
    rows: list[int] = []  # the row count of each example the loop visits

    def log_lik(p: StateDict, xi: Tensor, yi: Tensor) -> Tensor:
        logits = functional_call(wrapped, {f"model.{n}": v for n, v in p.items()}, (xi.unsqueeze(0),))
        return torch.log_softmax(logits, dim=-1).gather(1, yi.reshape(-1, 1)).sum()

    def example_log_lik(p: StateDict, xi: Tensor) -> Tensor:
        """``Σ_r log p(y_r|x)`` over the rows of ``xi``, labelled by the next ``y`` rows (their count kept)."""
        logits = functional_call(wrapped, {f"model.{n}": v for n, v in p.items()}, (xi.unsqueeze(0),))
        start = sum(rows)
        rows.append(logits.shape[0])
        return torch.log_softmax(logits, dim=-1).gather(1, y[start:start + rows[-1]].reshape(-1, 1)).sum()

    if vectorize and len(y) == len(x):  # one row per example
        grads = vmap(grad(log_lik), in_dims=(None, 0, 0))(params, x, y)
        return {n: g.pow(2).sum(0) for n, g in grads.items()}
    out = {n: torch.zeros_like(v) for n, v in params.items()}
    for xi in x:
        for n, g in grad(example_log_lik)(params, xi).items():
            out[n] += g.pow(2)
    if sum(rows) != len(y):
        raise ValueError(f"diagonal_fisher: the examples' forwards gave {sum(rows)} rows but {len(y)} labels")
    return out


def diagonal_fisher(model: nn.Module, params: Mapping[str, Tensor], forward: Callable[[nn.Module, Tensor], Tensor],
                    batches: Iterable[Tensor], *, labels: Iterable[Tensor] | None = None, seed: int = 0,
                    vectorize: bool = True) -> StateDict:
    """Diagonal Fisher ``F̂ = (1/N) Σ_n (∇_θ log p_θ(y_n|x_n))²`` (Matena & Raffel 2022, Eq. 4).

    Args:
        model: the network; ``params`` are substituted into it with ``torch.func.functional_call``.
        params: ``{name: Tensor}`` of the parameters to differentiate (e.g. ``dict(model.named_parameters())``);
            the other parameters and buffers are taken from ``model``.
        forward: ``forward(model, x: Tensor[B, ...]) -> logits: Tensor[B, C]``, or ``Tensor[N, C]``: the rows of
            each example in turn (a causal LM's next-token rows; an example's log-likelihood is its rows' sum).
        batches: input batches.
        labels: label batches aligned with ``batches`` (empirical Fisher); ``None`` samples
            ``y_n ~ softmax(logits_n)`` with ``torch.multinomial`` and a ``torch.Generator`` seeded by ``seed``
            (one draw per row, batches in order; the true Fisher's Monte-Carlo estimate; for several rows per
            example, each row's next token is drawn given the real preceding tokens, not a sampled sequence).
        vectorize: ``vmap`` over the examples of a batch; ``False`` loops (for modules vmap cannot batch).
    Returns:
        ``{name: Tensor[*shape]}`` averaged over all N examples.
    """
    wrapped = _Forward(model, forward)
    params = {n: v.detach() for n, v in params.items()}
    g = torch.Generator().manual_seed(int(seed))
    total, count = {n: torch.zeros_like(v) for n, v in params.items()}, 0
    label_iter = iter(labels) if labels is not None else None
    for x in batches:
        if label_iter is None:
            with torch.no_grad():
                probs = torch.softmax(functional_call(wrapped, {f"model.{n}": v for n, v in params.items()}, (x,)), -1)
            y = torch.multinomial(probs.double().cpu(), 1, generator=g).squeeze(1).to(x.device)
        else:
            y = next(label_iter)
        for n, s in _per_example_sq_grads(wrapped, params, x, y, vectorize).items():
            total[n] += s
        count += x.shape[0]
    if count == 0:
        raise ValueError("diagonal_fisher got no examples: `batches` was empty")
    return {n: t / count for n, t in total.items()}
