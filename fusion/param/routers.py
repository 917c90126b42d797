"""Routers and the per-sample routed linear layer that WEMoE and SMEAR share (METHODS.md §2–3).

A router maps a block's MLP input ``x [B, T, d]`` (tokens after ``ln_2``) to one coefficient vector per sample,
``r(x) ∈ R^K``, that weights the K frozen task vectors: ``W(x) = W_0 + Σ_k r_k(x) τ_k``.

- :class:`WEMoERouter` (Tang et al., ICML 2024): ``r(h) = W_2 ReLU(W_1 h + b_1) + b_2`` applied to every token and
  averaged over tokens; ``W ~ N(0, 0.01²)``, ``b_1 = 0``, ``b_2 = λ_0``; no softmax, no clamp. Depth 1 is linear,
  depth 0 a constant vector (= partial AdaMerging).
- :class:`SMEARRouter` (Muqeeth et al., TMLR 2024): ``p = softmax(W LN(mean_t x) + b)`` with expert dropout in
  training, optionally times a learned global scale ``s`` (init ``0.3·K``: uniform routing is task arithmetic).

A router computes in its own parameters' dtype (float32 as built): tokens of a bfloat16 or float64 model are cast to
it, and the routed linears cast ``r`` back to the tokens' dtype.

Per-sample merge without a Python loop (:func:`routed_linear`). A linear layer is linear in its weights, so
``x W(x)ᵀ = x W_0ᵀ + Σ_k r_k(x) (x τ_kᵀ)`` exactly; the MLP's activation sits between two such layers, never inside
a sum of expert outputs. Two equal forms (tested against each other and a per-sample loop):

- ``"experts"``: ONE matmul of the stacked input ``[x, r_1 x, …, r_K x]`` with ``[W_0 | τ_1 | … | τ_K]``,
  ``(K+1)·B·T·out·in`` FLOPs, extra memory ``B·T·(K+1)·in`` (in chunks of the batch), never a weight per sample;
- ``"weights"``: ``W(x)`` per sample (one ``addmm`` per chunk of the batch) and ``torch.bmm``, ``B·(K+T)·out·in``
  FLOPs, extra memory one chunk of ``[c, out, in]``; with batch-reduced routing (one ``r`` for the batch) it builds
  a single ``W`` and is a plain linear.

``"auto"``: with a batch-reduced ``r`` (one per batch) ``"weights"``, i.e. a single merged ``W``. Per sample:
``"weights"`` on CUDA (chunks of up to 512 MiB; an H100, ViT-B/32, batch 256: 0.39× a plain model at K = 2, 4, 8
against 0.37×, 0.26×, 0.17× for expert outputs, ``benchmarks/results/routed_throughput_gpu.json``, measured before
the fused ``addmm`` build) and for CPU evaluation, where the chunk is cache-sized (:data:`MAX_WEIGHT_NUMEL`: built
per chunk of 4 mini8 samples, the weights are still in cache when ``bmm`` reads them; built for the whole batch
they went to DRAM and the form was the slowest). In CPU training (autograd recording) ``"experts"``: backward keeps
the stacked input instead of every sample's weight matrices. Pass ``form`` explicitly to override.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fusion.merge.sparsify import check_drop_rate
from fusion.merge.task_vectors import HyperparameterError

FORMS = ("auto", "experts", "weights")
# per-sample weight elements the "weights" form builds at once: on CUDA 512 MiB of fp32; on CPU 4 MiB, so that a
# chunk's weights are still in cache when bmm reads them (benchmarks/routed_throughput.py)
MAX_WEIGHT_NUMEL = {"cuda": 2 ** 27, "cpu": 2 ** 20}
MAX_STACKED_NUMEL = 2 ** 26  # elements of the "experts" form's stacked input per chunk (256 MiB of fp32)
ROUTER_INIT_STD = 0.01


def check_depth(depth: int) -> None:
    if depth not in (0, 1, 2):
        raise HyperparameterError(f"router depth must be 0 (a constant vector: partial AdaMerging), 1 (linear d→K) "
                                  f"or 2 (d→d→K with ReLU, the WEMoE default); got {depth!r} (set method.model.depth)")


def check_form(form: str) -> None:
    if form not in FORMS:
        raise HyperparameterError(f"form must be one of {FORMS} (how the per-sample routed linear is computed), "
                                  f"got {form!r}")


class WEMoERouter(nn.Module):
    """WEMoE's router: tokens ``[B, T, d]`` → ``r [B, K]`` (router applied per token, averaged over tokens).

    Args:
        dim: token width ``d``.
        init: ``Tensor[K]`` initial output (the output bias; WEMoE's ``init_lambda``).
        depth: 0 (constant), 1 (linear) or 2 (``d→d→K`` with ReLU).
    """

    def __init__(self, dim: int, init: Tensor, depth: int = 2):
        super().__init__()
        check_depth(depth)
        self.depth = depth
        k = init.numel()
        if depth == 0:
            self.constant = nn.Parameter(init.detach().clone().float())
            return
        layers: list[nn.Module] = []
        if depth == 2:
            layers += [nn.Linear(dim, dim), nn.ReLU()]
        layers.append(nn.Linear(dim, k))
        for layer in layers:
            if isinstance(layer, nn.Linear):
                nn.init.normal_(layer.weight, std=ROUTER_INIT_STD)
                nn.init.zeros_(layer.bias)
        with torch.no_grad():
            layers[-1].bias.copy_(init)
        self.net = nn.Sequential(*layers)

    def forward(self, x: Tensor) -> Tensor:
        if self.depth == 0:
            return self.constant[None].expand(x.shape[0], -1)
        return self.net(x.to(self.net[0].weight.dtype)).mean(1)


class GlobalScale(nn.Module):
    """One learned scalar ``s`` shared by every SMEAR router (init ``λ_0·K``)."""

    def __init__(self, init: float):
        super().__init__()
        self.value = nn.Parameter(torch.tensor(float(init)))

    def forward(self, p: Tensor) -> Tensor:
        return self.value * p


def expert_dropout(p: Tensor, rate: float) -> Tensor:
    """Zero each routing probability with probability ``rate`` and renormalise each row to sum 1.

    ``p [B, K]``. A row whose every entry was dropped keeps its original probabilities.
    """
    if rate == 0:
        return p
    dropped = p * (torch.rand_like(p) >= rate)
    total = dropped.sum(-1, keepdim=True)
    return torch.where(total > 0, dropped / total.clamp_min(torch.finfo(p.dtype).tiny), p)


class SMEARRouter(nn.Module):
    """SMEAR's router: ``p = softmax(W LN(mean_t x) + b)`` per sample, expert dropout in training, optional scale.

    Args:
        dim: token width ``d``; num_experts: ``K``; dropout: expert-dropout rate in ``[0, 1)``;
        scale: a shared :class:`GlobalScale` (``None``: the coefficients are the probabilities).
    """

    def __init__(self, dim: int, num_experts: int, dropout: float = 0.1, scale: GlobalScale | None = None):
        super().__init__()
        check_drop_rate(dropout, "expert_dropout")
        self.norm = nn.LayerNorm(dim)
        self.linear = nn.Linear(dim, num_experts)
        nn.init.normal_(self.linear.weight, std=ROUTER_INIT_STD)
        nn.init.zeros_(self.linear.bias)
        self.dropout, self.scale = float(dropout), scale

    def probabilities(self, x: Tensor) -> Tensor:
        """``softmax`` routing weights ``[B, K]`` (expert dropout applied in training)."""
        p = self.linear(self.norm(x.to(self.linear.weight.dtype).mean(1))).softmax(-1)
        return expert_dropout(p, self.dropout) if self.training else p

    def forward(self, x: Tensor) -> Tensor:
        p = self.probabilities(x)
        return self.scale(p) if self.scale is not None else p


def routed_bias(b0: Tensor | None, tb: Tensor | None, r: Tensor) -> Tensor | None:
    """``b_0 + Σ_k r_k τb_k`` as ``[B|1, out]`` (``None`` for a linear without bias)."""
    if tb is None:
        return None if b0 is None else b0.expand(r.shape[0], -1)
    return r @ tb if b0 is None else b0 + r @ tb


def experts_chunk(x: Tensor, tw: Tensor) -> int:
    """Samples per chunk of the ``"experts"`` form (its stacked input holds ≤ :data:`MAX_STACKED_NUMEL` elements)."""
    _, t, d_in = x.shape
    return max(1, MAX_STACKED_NUMEL // (t * (tw.shape[0] + 1) * d_in))


def routed_linear_experts(x: Tensor, w0: Tensor, b0: Tensor | None, tw: Tensor, tb: Tensor | None,
                          r: Tensor) -> Tensor:
    """``x W_0ᵀ + Σ_k r_k (x τ_kᵀ) + b(x)`` — the expert-output form, as ONE matmul per chunk of the batch.

    The input is stacked as ``[x, r_1 x, …, r_K x]`` (``[B, T, (K+1)·in]``) against ``[W_0 | τ_1 | … | τ_K]``
    (``[out, (K+1)·in]``), so the K+1 products and their weighted sum are one GEMM with no ``[B, T, K, out]``
    intermediate. Shapes: ``x [B, T, in]``, ``w0 [out, in]``, ``b0 [out]``, ``tw [K, out, in]``, ``tb [K, out]``,
    ``r [B|1, K]``; returns ``[B, T, out]``.
    """
    b, k, out = x.shape[0], tw.shape[0], tw.shape[1]
    r = r.expand(b, k)
    stacked = torch.cat([w0, tw.transpose(0, 1).reshape(out, -1)], 1)
    coef = torch.cat([r.new_ones(b, 1), r], 1)[:, None, :, None]  # [B, 1, K+1, 1]
    chunk = experts_chunk(x, tw)
    y = torch.cat([F.linear((xc[:, :, None, :] * cc).flatten(2), stacked)
                   for xc, cc in zip(x.split(chunk), coef.split(chunk))])
    bias = routed_bias(b0, tb, r)
    return y if bias is None else y + bias[:, None, :]


def weights_chunk(x: Tensor, w0: Tensor) -> int:
    """Samples per chunk of the ``"weights"`` form (≤ :data:`MAX_WEIGHT_NUMEL` weight elements on x's device)."""
    budget = MAX_WEIGHT_NUMEL["cuda" if x.is_cuda else "cpu"]
    return max(1, budget // w0.numel())


def routed_linear_weights(x: Tensor, w0: Tensor, b0: Tensor | None, tw: Tensor, tb: Tensor | None,
                          r: Tensor) -> Tensor:
    """``x W(x)ᵀ + b(x)``, ``W(x) = W_0 + Σ_k r_k τ_k`` built per sample (``[B, out, in]``), or once if ``r [1, K]``.

    Shapes as :func:`routed_linear_experts`. Per-sample weights are built for a chunk of the batch at a time
    (:func:`weights_chunk`): on CPU a cache-sized one, on CUDA up to 512 MiB.
    """
    bias = routed_bias(b0, tb, r)
    if r.shape[0] == 1:
        weight = w0 + torch.tensordot(r[0], tw, dims=1)
        return F.linear(x, weight, None if bias is None else bias[0])
    flat_w0, flat_tw = w0.reshape(1, -1), tw.reshape(tw.shape[0], -1)  # views: [1, out·in], [K, out·in]
    chunk = weights_chunk(x, w0)
    y = torch.cat([torch.bmm(xc, torch.addmm(flat_w0, rc, flat_tw).view(-1, *w0.shape).transpose(1, 2))
                   for xc, rc in zip(x.split(chunk), r.split(chunk))])
    return y if bias is None else y + bias[:, None, :]


def auto_form(x: Tensor, tw: Tensor, r: Tensor) -> str:
    """The form :func:`routed_linear` uses for ``form="auto"`` (see the module docstring)."""
    if r.shape[0] == 1 or x.is_cuda:
        return "weights"
    recording = torch.is_grad_enabled() and (x.requires_grad or r.requires_grad or tw.requires_grad)
    return "experts" if recording else "weights"


def routed_linear(x: Tensor, w0: Tensor, b0: Tensor | None, tw: Tensor, tb: Tensor | None, r: Tensor,
                  form: str = "auto") -> Tensor:
    """The per-sample routed linear in ``form`` (see the module docstring for the cost of each)."""
    if form == "auto":
        form = auto_form(x, tw, r)
    fn = routed_linear_experts if form == "experts" else routed_linear_weights
    return fn(x, w0, b0, tw, tb, r.to(x.dtype))
