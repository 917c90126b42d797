"""Routed merging: WEMoE, sparse WEMoE (E-WEMoE) and SMEAR on one module (METHODS.md §2–3).

Construction (WEMoE, Tang et al. ICML 2024, ``scripts/clip_dictmoe.py``), on a deep copy of the base encoder:

1. every parameter outside the MLPs' linears is merged by task arithmetic, ``θ = θ_0 + λ_0 Σ_k τ_k``
   (``λ_0 = init``, 0.3), and frozen;
2. each transformer block's MLP (a module whose path matches ``mlp_pattern`` and that holds at least two
   ``nn.Linear`` descendants) becomes a :class:`RoutedMLP`: a trainable router reads the MLP's input tokens once per
   forward, and every linear inside the MLP (direct or nested: ``c_fc``/``c_proj``, ``fc1``/``fc2``, Llama's
   ``gate_proj``/``up_proj``/``down_proj``, T5's ``wi``/``wo`` or ``wi_0``/``wi_1``/``wo``) holds the *pretrained*
   weights ``θ_0`` and the K frozen task vectors: per sample ``W(x) = θ_0 + Σ_k r_k(x) τ_k``
   (:class:`RoutedLinear`). The MLP's own forward (activation, gating, dropout) runs unchanged around them.

The pattern: the method's ``mlp_pattern`` if set, else the one the model pool declares
(:attr:`fusion.pools.contract.Backbone.mlp_pattern`, e.g. GPT-2's ``h.<i>.mlp``), else :data:`MLP_PATTERN`
(open_clip and HF CLIP); :func:`resolve_mlp_pattern`.

WEMoE: unnormalised 2-layer router (:class:`~fusion.param.routers.WEMoERouter`); E-WEMoE (Shen et al., arXiv
2410.21804): MLP task vectors magnitude-pruned per tensor to ``keep`` (0.1) and one router shared by all blocks;
SMEAR (Muqeeth et al., TMLR 2024): softmax router over ``LN(mean_t x)`` with expert dropout and a learned global scale
(:class:`~fusion.param.routers.SMEARRouter`). The routed model is input-dependent: ``merge_and_unload`` refuses,
:meth:`RoutedEncoder.record` exports it (a run writes ``routed_model/``, :func:`routed_from_spec`
rebuilds it). Per-sample merging without a loop: :func:`routers.routed_linear`.
"""
from __future__ import annotations

import contextlib
import copy
import math
import re
import sys
from collections import defaultdict
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from fusion.merge.combine import combine
from fusion.merge.sparsify import check_drop_rate, check_fraction
from fusion.merge.task_vectors import HyperparameterError, TaskVectors, num_tasks
from fusion.param.coefficients import initial_values
from fusion.param.contract import InputDependentError, MergeRecord, ParametrizationBase
from fusion.param.merged import freeze_
from fusion.param.routers import GlobalScale, SMEARRouter, WEMoERouter, check_depth, check_form, routed_linear

MLP_PATTERN = r"(^|\.)(resblocks|layers)\.\d+\.mlp$"  # open_clip `transformer.resblocks.<i>.mlp`, HF `layers.<i>.mlp`
NOT_ONE_MODULE = ("A backbone whose MLP is not one module (BERT/RoBERTa: intermediate.dense and output.dense with the "
                  "residual LayerNorm between them) cannot be routed; use a merge of whole task vectors "
                  "(task_arithmetic, ties, adamerging_layer_wise, ...) on it.")


def resolve_mlp_pattern(mlp_pattern: str | None, pool_mlp_pattern: str | None) -> str:
    """The MLP pattern a routed model uses: the method's (``method.model.mlp_pattern``) if set, else the model
    pool's declared one (:attr:`fusion.pools.contract.Backbone.mlp_pattern`), else :data:`MLP_PATTERN`."""
    for pattern in (mlp_pattern, pool_mlp_pattern):
        if pattern is not None:
            return pattern
    return MLP_PATTERN


def prune_per_tensor(tv: Mapping[str, Tensor], keep: float = 0.1) -> TaskVectors:
    """Keep the ``ceil(keep·n)`` largest-magnitude entries of each task's tensor (n = its size); zero the rest.

    E-WEMoE's per-tensor magnitude pruning (FusionBench ``tv_prune_ratio = 1 − keep``). ``tv``: ``{name: [K, *shape]}``.
    """
    check_fraction(keep, "keep")
    out = {}
    for name, t in tv.items():
        flat = t.reshape(t.shape[0], -1)
        n_keep = max(1, math.ceil(keep * flat.shape[1] - 1e-9))
        idx = flat.abs().topk(n_keep, dim=1).indices
        mask = torch.zeros(flat.shape, dtype=torch.bool, device=t.device).scatter_(1, idx, True)
        out[name] = (flat * mask).reshape(t.shape)
    return out


def linear_paths(module: nn.Module) -> list[str]:
    """The paths (relative to ``module``) of every ``nn.Linear`` below it, direct or nested, in module order."""
    return [p for p, m in module.named_modules() if p and isinstance(m, nn.Linear)]


def find_mlps(model: nn.Module, pattern: str = MLP_PATTERN) -> dict[str, list[str]]:
    """``{module path: [its nn.Linear descendants]}`` for every module whose path matches ``pattern`` and that holds
    at least two linears (a transformer MLP: up and down projections, maybe a gate)."""
    found, matched = {}, []
    for path, module in model.named_modules():
        if re.search(pattern, path):
            matched.append(path)
            linears = linear_paths(module)
            if len(linears) >= 2:
                found[path] = linears
    nested = [(p, q) for p in found for q in found if q.startswith(f"{p}.")]
    if nested:
        raise HyperparameterError(
            f"mlp_pattern={pattern!r} matches module {nested[0][1]!r} inside the matched module {nested[0][0]!r}: "
            "a routed MLP cannot hold another; set method.model.mlp_pattern to a regex that matches only the "
            "transformer MLP modules (e.g. ending in 'mlp$').")
    if not found:
        paths = [p for p, _ in model.named_modules() if p]
        raise HyperparameterError(
            f"no transformer MLP blocks found in {type(model).__name__}: no module path matches mlp_pattern="
            f"{pattern!r} and holds at least two nn.Linear layers. Matching paths without them: {matched[:10]}; "
            f"module paths seen: {paths[:30]}{' ...' if len(paths) > 30 else ''}."
            " Set method.model.mlp_pattern to a regex matching the MLP module paths (or declare the pool's "
            r"mlp_pattern; HF GPT-2 in a text pool declares '(^|\.)h\.\d+\.mlp$'). " + NOT_ONE_MODULE)
    return found


def tokens_batch_first(model: nn.Module, path: str) -> bool:
    """``batch_first`` of the nearest ancestor of ``path`` declaring one (open_clip's Transformer); else True."""
    parts = path.split(".")
    for i in range(len(parts) - 1, -1, -1):
        owner = model.get_submodule(".".join(parts[:i]))
        if hasattr(owner, "batch_first"):
            return bool(owner.batch_first)
    return True


def add_task_arithmetic_(model: nn.Module, tv: Mapping[str, Tensor], lam: Tensor) -> None:
    """``θ ← θ + Σ_k λ_k τ_k`` in place for the parameters named in ``tv`` (:func:`fusion.merge.combine.combine`)."""
    params = dict(model.named_parameters())
    unknown = [n for n in tv if n not in params]
    if unknown:
        raise KeyError(f"task-vector keys {unknown[:3]} are not parameters of the base encoder "
                       f"(first base keys: {list(params)[:3]})")
    if tv:
        with torch.no_grad():
            for name, delta in combine(tv, lam).items():
                params[name].add_(delta.to(params[name].dtype))


class RoutingRecorder:
    """Collects the routing weights ``r [B, K]`` of every block while active (see ``collect_routing``)."""

    def __init__(self):
        self.weights: dict[str, list[Tensor]] = defaultdict(list)

    def add(self, block: str, r: Tensor) -> None:
        self.weights[block].append(r.detach().float().cpu())

    def clear(self) -> None:
        self.weights.clear()

    def per_block(self) -> dict[str, Tensor]:
        """``{block: Tensor[N, K]}`` over every recorded sample."""
        return {b: torch.cat(ws) for b, ws in self.weights.items()}

    def mean(self) -> Tensor:
        """``Tensor[K]``: the mean routing weight over samples, then over blocks."""
        return torch.stack([w.mean(0) for w in self.per_block().values()]).mean(0)


@dataclass(frozen=True)
class LinearRoute:
    """What a :class:`RoutedLinear` computes with during one forward of its :class:`RoutedMLP`.

    ``w0 [out, in]``, ``b0 [out]`` (or ``None``): the pretrained linear; ``tw [K, out, in]``, ``tb [K, out]`` (or
    ``None``): its task vectors; ``r [B|1, K]``: the block's routing weights; ``form``: the routed-linear form;
    ``batch_first``: the token layout the MLP runs in (``[B, T, d]``, else ``[T, B, d]``).
    """

    w0: Tensor
    b0: Tensor | None
    tw: Tensor
    tb: Tensor | None
    r: Tensor
    form: str
    batch_first: bool


class RoutedLinear(nn.Module):
    """The place of one ``nn.Linear`` inside a routed MLP: ``y = x W(x)ᵀ + b(x)``, ``W = θ_0 + Σ_k r_k τ_k``.

    Holds no tensors: its :class:`RoutedMLP` owns them and hands them over with ``r`` for each forward
    (:attr:`route`), so the MLP's own forward calls it like the linear it replaced. ``weight`` is the pretrained
    weight during that forward (modules that read ``self.<linear>.weight.dtype``, T5's ``wo``, keep working).
    Inputs are tokens ``[B, T, in]`` (``[T, B, in]`` when not ``batch_first``).
    """

    def __init__(self, linear: nn.Linear, path: str):
        super().__init__()
        self.in_features, self.out_features, self.path = linear.in_features, linear.out_features, path
        self.route: LinearRoute | None = None

    def current(self) -> LinearRoute:
        if self.route is None:
            raise RuntimeError(f"the routed linear {self.path!r} runs only inside its RoutedMLP's forward, which "
                               "hands it the routing weights of the batch")
        return self.route

    @property
    def weight(self) -> Tensor:
        return self.current().w0

    def forward(self, x: Tensor) -> Tensor:
        route = self.current()
        if x.dim() != 3:
            raise ValueError(f"the routed linear {self.path!r} takes tokens [B, T, {self.in_features}] (one routing "
                             f"vector per sample), got {tuple(x.shape)}: this MLP reshapes its tokens, so it cannot "
                             "be routed per sample")
        h = x if route.batch_first else x.transpose(0, 1)
        cast = [None if t is None else t.to(x.dtype) for t in (route.w0, route.b0, route.tw, route.tb)]
        y = routed_linear(h, *cast, route.r, route.form)
        return y if route.batch_first else y.transpose(0, 1)

    def extra_repr(self) -> str:
        return f"{self.path}: in_features={self.in_features}, out_features={self.out_features}"


class RoutedMLP(nn.Module):
    """A transformer MLP whose every linear has the weights ``θ_0 + Σ_k r_k(x) τ_k`` per sample.

    The router reads the MLP's input once per forward; each ``nn.Linear`` under ``mlp`` is replaced (in place) by a
    :class:`RoutedLinear` and the MLP's own forward runs unchanged (``mlp``'s other parameters stay as they are).

    Args:
        mlp: the MLP module (its linears still hold the pretrained weights, which move into frozen buffers).
        linears: the paths of its linears, in module order; the ``i``-th (from 1) owns buffers ``w0_i``, ``b0_i``,
            ``tw_i``, ``tb_i`` (pretrained weight and bias, their task vectors; non-persistent).
        tau: ``{"<linear path>.weight": [K, out, in], "<linear path>.bias": [K, out]}``.
        router: ``tokens [B, T, d] -> r [B, K]`` (possibly shared between blocks).
        batch_reduce: in training, average ``r`` over the batch (FusionBench's TTA); evaluation is per sample.
        form: how :func:`~fusion.param.routers.routed_linear` computes the per-sample linear.
        batch_first: the token layout, ``[B, T, d]`` (else ``[T, B, d]``).
    """

    def __init__(self, mlp: nn.Module, linears: Sequence[str], tau: Mapping[str, Tensor], router: nn.Module,
                 batch_reduce: bool = False, form: str = "auto", batch_first: bool = True):
        super().__init__()
        self.linears = list(linears)
        for i, path in enumerate(self.linears, 1):
            linear = mlp.get_submodule(path)
            self.register_buffer(f"w0_{i}", linear.weight.detach(), persistent=False)
            self.register_buffer(f"b0_{i}", None if linear.bias is None else linear.bias.detach(), persistent=False)
            self.register_buffer(f"tw_{i}", tau[f"{path}.weight"], persistent=False)
            self.register_buffer(f"tb_{i}", tau.get(f"{path}.bias"), persistent=False)
            parent, _, name = path.rpartition(".")
            setattr(mlp.get_submodule(parent), name, RoutedLinear(linear, path))
        self.width = mlp.get_submodule(self.linears[0]).in_features
        self.mlp, self.router = freeze_(mlp), router
        self.batch_reduce, self.form, self.batch_first = bool(batch_reduce), form, batch_first
        self.path, self.recorder, self.last_weights = "", None, None

    def weights(self, x: Tensor) -> Tensor:
        """Routing weights ``[B, K]`` (``[1, K]`` when batch-reduced in training) for tokens ``x [B, T, d]``."""
        r = self.router(x)
        return r.mean(0, keepdim=True) if self.batch_reduce and self.training else r

    @contextlib.contextmanager
    def routing(self, r: Tensor) -> Iterator[None]:
        """Hand every :class:`RoutedLinear` its tensors and ``r`` for one forward; take them back after."""
        slots = [self.mlp.get_submodule(p) for p in self.linears]
        for i, slot in enumerate(slots, 1):
            slot.route = LinearRoute(*(getattr(self, f"{n}_{i}") for n in ("w0", "b0", "tw", "tb")), r, self.form,
                                     self.batch_first)
        try:
            yield
        finally:
            for slot in slots:
                slot.route = None

    def forward(self, x: Tensor) -> Tensor:
        tokens = x if self.batch_first else x.transpose(0, 1)
        if tokens.shape[-1] != self.width:
            raise ValueError(f"the routed MLP {self.path!r} receives tokens of width {tokens.shape[-1]}, but its "
                             f"router was built for {self.width}, the in_features of its first linear "
                             f"{self.linears[0]!r}: the first linear in module order must read the MLP's input")
        r = self.weights(tokens)
        self.last_weights = r.detach()
        if self.recorder is not None:
            self.recorder.add(self.path, r.expand(tokens.shape[0], -1))
        with self.routing(r):
            return self.mlp(x)


class RoutedEncoder(ParametrizationBase):
    """A deep copy of ``base`` with TA-merged frozen parameters and routed MLPs; only the routers train.

    Args:
        base: the pretrained encoder (shared and frozen; it is copied, never modified).
        task_vectors: stacked ``{name: Tensor[K, *shape]}`` over ``base``'s parameters.
        make_router: ``dim -> router`` (called once per block, or once if ``shared_router``).
        init: ``λ_0`` for the task-arithmetic merge of the non-MLP parameters (float or one per task).
        keep: if set, the MLP task vectors are magnitude-pruned per tensor to this kept fraction.
        spec: ``{"factory": dotted name, "kwargs": ...}`` that rebuilds this model (for :func:`routed_from_spec`).
    """

    input_dependent = True

    def __init__(self, base: nn.Module, task_vectors: Mapping[str, Tensor], make_router: Callable[[int], nn.Module],
                 init: float | Sequence[float] = 0.3, *, keep: float | None = None, shared_router: bool = False,
                 batch_reduce: bool = False, mlp_pattern: str = MLP_PATTERN, form: str = "auto",
                 spec: dict | None = None):
        super().__init__()
        check_form(form)
        if keep is not None:
            check_fraction(keep, "keep")
        self.num_experts, self.spec = num_tasks(task_vectors), spec or {}
        self.encoder = freeze_(copy.deepcopy(base))
        mlps = find_mlps(self.encoder, mlp_pattern)
        routed = {f"{p}.{lin}.{n}": p for p, linears in mlps.items() for lin in linears
                  for n, _ in self.encoder.get_submodule(f"{p}.{lin}").named_parameters()}
        missing = [n for n in routed if n not in task_vectors]
        if missing:
            raise KeyError(f"the task vectors have no entry for the MLP parameters {missing[:3]}")
        add_task_arithmetic_(self.encoder, {n: t for n, t in task_vectors.items() if n not in routed},
                             initial_values(init, self.num_experts))
        mlp_tv = {n: task_vectors[n] for n in routed}
        mlp_tv = prune_per_tensor(mlp_tv, keep) if keep is not None else mlp_tv
        self.block_paths = list(mlps)
        routers = self.make_routers(mlps, make_router, shared_router)
        for path, linears in mlps.items():
            tau = {n.removeprefix(f"{path}."): t for n, t in mlp_tv.items() if routed[n] == path}
            block = RoutedMLP(self.encoder.get_submodule(path), linears, tau, routers[path], batch_reduce, form,
                              tokens_batch_first(self.encoder, path))
            block.path = path
            parent, _, name = path.rpartition(".")
            setattr(self.encoder.get_submodule(parent), name, block)
        self.train()

    def make_routers(self, mlps: Mapping[str, Sequence[str]], make_router: Callable[[int], nn.Module],
                     shared: bool) -> dict[str, nn.Module]:
        """One router per MLP path, or one router object for all of them (``shared``; equal widths required). A
        router reads the MLP's input: its width is the ``in_features`` of the MLP's first linear."""
        dims = {p: self.encoder.get_submodule(f"{p}.{linears[0]}").in_features for p, linears in mlps.items()}
        if not shared:
            return {p: make_router(d) for p, d in dims.items()}
        if len(set(dims.values())) > 1:
            raise HyperparameterError(f"shared_router needs every MLP to have the same input width; got {dims}")
        router = make_router(next(iter(dims.values())))
        return {p: router for p in dims}

    def blocks(self) -> dict[str, RoutedMLP]:
        return {p: self.encoder.get_submodule(p) for p in self.block_paths}

    def router_state(self) -> dict[str, Tensor]:
        """The routers' parameters by name (a shared router or scale appears once)."""
        return {n: p for n, p in self.named_parameters() if ".router." in n}

    def prepare(self) -> dict[str, Tensor]:
        """Nothing to build once per step: the weights depend on each input (routers get gradients directly)."""
        return {}

    def forward(self, images: Tensor, state: Mapping[str, Tensor] | None = None) -> Tensor:
        return self.encoder(images)

    def merge_and_unload(self) -> nn.Module:
        raise InputDependentError(
            f"{type(self).__name__} routes every input to its own merged MLP weights θ_0 + Σ_k r_k(x) τ_k, so no "
            "single static model exists: use the routed model itself as the encoder (in eval mode: export()); "
            "a run writes it to routed_model/ (fusion.report.merge_files.read_routed reloads it)")

    @contextlib.contextmanager
    def collect_routing(self) -> Iterator[RoutingRecorder]:
        """``with model.collect_routing() as rec: model(x)`` records every block's ``r(x)`` (``rec.per_block()``)."""
        rec = RoutingRecorder()
        for block in self.blocks().values():
            block.recorder = rec
        try:
            yield rec
        finally:
            for block in self.blocks().values():
                block.recorder = None

    def stats(self) -> dict[str, float]:
        """Mean / min / max routing weight of the last forward (per block, averaged over the batch); SMEAR's scale."""
        last = [b.last_weights.float().mean(0) for b in self.blocks().values() if b.last_weights is not None]
        out = {}
        if last:
            w = torch.stack(last)
            out = {"routing_mean": float(w.mean()), "routing_min": float(w.min()), "routing_max": float(w.max())}
        for module in self.modules():
            if isinstance(module, GlobalScale):
                out["routing_scale"] = float(module.value.detach())
                break
        return out

    def record(self) -> MergeRecord:
        """The trainable routers and what rebuilds the routed model (:func:`routed_from_spec`)."""
        return MergeRecord(tensor_names=[], trainable=self.trainable_state(),
                           routers={n: p.detach() for n, p in self.router_state().items()},
                           routed_spec={"format": 1, **self.spec, "num_experts": self.num_experts,
                                        "blocks": self.block_paths})


def _spec(name: str, **kwargs) -> dict:
    return {"factory": f"{__name__}.{name}", "kwargs": kwargs}


def _json_init(init, lam: Tensor):
    return float(init) if isinstance(init, (int, float)) else lam.tolist()


def wemoe(base: nn.Module, task_vectors: Mapping[str, Tensor], init: float | Sequence[float] = 0.3, depth: int = 2,
          batch_reduce: bool = True, keep: float | None = None, shared_router: bool = False,
          mlp_pattern: str | None = None, form: str = "auto", pool_mlp_pattern: str | None = None) -> RoutedEncoder:
    """WEMoE (Tang et al., ICML 2024): ``W^mlp(x) = θ_0^mlp + Σ_k r_k(x) τ_k^mlp``, router depth 0/1/2, b_2 = init.

    ``keep``/``shared_router`` give E-WEMoE (see :func:`sparse_wemoe`). ``batch_reduce`` applies in training only.
    ``mlp_pattern`` (``None``: ``pool_mlp_pattern``, the pool's declared one, else :data:`MLP_PATTERN`;
    :func:`resolve_mlp_pattern`) selects the MLPs; the resolved pattern is what the saved spec records.
    """
    check_depth(depth)
    mlp_pattern = resolve_mlp_pattern(mlp_pattern, pool_mlp_pattern)
    lam = initial_values(init, num_tasks(task_vectors))
    spec = _spec("wemoe", init=_json_init(init, lam), depth=depth, batch_reduce=batch_reduce, keep=keep,
                 shared_router=shared_router, mlp_pattern=mlp_pattern, form=form)
    return RoutedEncoder(base, task_vectors, lambda dim: WEMoERouter(dim, lam, depth), lam, keep=keep,
                         shared_router=shared_router, batch_reduce=batch_reduce, mlp_pattern=mlp_pattern, form=form,
                         spec=spec)


def sparse_wemoe(base: nn.Module, task_vectors: Mapping[str, Tensor], init: float | Sequence[float] = 0.3,
                 depth: int = 2, batch_reduce: bool = True, keep: float = 0.1, shared_router: bool = True,
                 mlp_pattern: str | None = None, form: str = "auto",
                 pool_mlp_pattern: str | None = None) -> RoutedEncoder:
    """E-WEMoE (Shen et al., arXiv 2410.21804): WEMoE, MLP task vectors pruned to ``keep`` per tensor, one router."""
    return wemoe(base, task_vectors, init, depth, batch_reduce, keep, shared_router, mlp_pattern, form,
                 pool_mlp_pattern)


def smear(base: nn.Module, task_vectors: Mapping[str, Tensor], init: float | Sequence[float] = 0.3,
          expert_dropout: float = 0.1, learn_scale: bool = True, batch_reduce: bool = False,
          keep: float | None = None, mlp_pattern: str | None = None, form: str = "auto",
          pool_mlp_pattern: str | None = None) -> RoutedEncoder:
    """SMEAR applied to task vectors (Muqeeth et al., TMLR 2024; METHODS.md §2): ``θ_0 + s Σ_k p_k(x) τ_k``.

    ``p = softmax(W LN(mean_t x) + b)`` per block; ``s`` is learned from ``Σ_k init_k`` (0.3·K) when ``learn_scale``,
    else 1 (a convex combination of the experts' MLPs). ``mlp_pattern``/``pool_mlp_pattern`` as :func:`wemoe`.
    """
    check_drop_rate(expert_dropout, "expert_dropout")
    mlp_pattern = resolve_mlp_pattern(mlp_pattern, pool_mlp_pattern)
    lam = initial_values(init, num_tasks(task_vectors))
    scale = GlobalScale(float(lam.sum())) if learn_scale else None
    spec = _spec("smear", init=_json_init(init, lam), expert_dropout=expert_dropout, learn_scale=learn_scale,
                 batch_reduce=batch_reduce, keep=keep, mlp_pattern=mlp_pattern, form=form)
    return RoutedEncoder(base, task_vectors, lambda dim: SMEARRouter(dim, lam.numel(), expert_dropout, scale), lam,
                         keep=keep, batch_reduce=batch_reduce, mlp_pattern=mlp_pattern, form=form, spec=spec)


def routed_from_spec(spec: Mapping, base: nn.Module, task_vectors: Mapping[str, Tensor],
                     routers: Mapping[str, Tensor], where: str = "routed model") -> RoutedEncoder:
    """Rebuild a routed model from ``MergeRecord.routed_spec`` and its router weights over ``base`` and the same
    task vectors; returned in eval mode (:func:`fusion.report.merge_files.read_routed` reads both from disk)."""
    module, _, name = str(spec.get("factory")).rpartition(".")
    if module != __name__ or name not in ("wemoe", "sparse_wemoe", "smear"):
        raise ValueError(f"{where}: factory {spec.get('factory')!r} is not a routed-merge factory")
    if num_tasks(task_vectors) != spec["num_experts"]:
        raise ValueError(f"{where} was saved with {spec['num_experts']} experts but {num_tasks(task_vectors)} "
                         "task vectors were given")
    model = getattr(sys.modules[__name__], name)(base, task_vectors, **spec["kwargs"])
    own = model.router_state()
    if set(routers) != set(own):
        raise KeyError(f"{where}: router keys differ from the rebuilt model's: missing "
                       f"{sorted(set(own) - set(routers))[:3]}, unexpected {sorted(set(routers) - set(own))[:3]}")
    with torch.no_grad():
        for n, p in own.items():
            p.copy_(routers[n])
    return model.eval()
