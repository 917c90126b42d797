"""Routed merging: WEMoE, sparse WEMoE (E-WEMoE) and SMEAR on one module (METHODS.md §2–3).

Construction (WEMoE, Tang et al. ICML 2024, ``scripts/clip_dictmoe.py``), on a deep copy of the base encoder:

1. every parameter outside the MLPs' two linears is merged by task arithmetic, ``θ = θ_0 + λ_0 Σ_k τ_k``
   (``λ_0 = init``, 0.3), and frozen;
2. each transformer block's MLP (module paths matching ``mlp_pattern``, with ``c_fc``/``c_proj`` or ``fc1``/``fc2``
   linear children) becomes a :class:`RoutedMLP` holding the *pretrained* MLP weights ``θ_0^mlp``, the K frozen MLP
   task vectors and a trainable router: per sample ``W^mlp(x) = θ_0^mlp + Σ_k r_k(x) τ_k^mlp``.

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
LINEAR_PAIRS = (("c_fc", "c_proj"), ("fc1", "fc2"))


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


def find_mlps(model: nn.Module, pattern: str = MLP_PATTERN) -> dict[str, tuple[str, str]]:
    """``{module path: (first linear, second linear)}`` for every module matching ``pattern`` with such children."""
    found, matched = {}, []
    for path, module in model.named_modules():
        if re.search(pattern, path):
            matched.append(path)
            for a, b in LINEAR_PAIRS:
                if isinstance(getattr(module, a, None), nn.Linear) and isinstance(getattr(module, b, None), nn.Linear):
                    found[path] = (a, b)
    if not found:
        paths = [p for p, _ in model.named_modules() if p]
        raise HyperparameterError(
            f"no transformer MLP blocks found in {type(model).__name__}: no module path matches mlp_pattern="
            f"{pattern!r} and has Linear children {' or '.join('/'.join(p) for p in LINEAR_PAIRS)}. Matching paths "
            f"without such children: {matched[:10]}; module paths seen: {paths[:30]}"
            f"{' ...' if len(paths) > 30 else ''}."
            " Set method.model.mlp_pattern to a regex matching the MLP module paths (HF GPT-2 in a text pool: "
            r"'(^|\.)h\.\d+\.mlp$'). A backbone whose MLP is not one module (BERT/RoBERTa: intermediate.dense and "
            "output.dense with the residual LayerNorm between them) cannot be routed; use a merge of whole task "
            "vectors (task_arithmetic, ties, adamerging_layer_wise, ...) on it.")
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


class RoutedMLP(nn.Module):
    """``Linear → activation → Linear`` whose weights are ``θ_0 + Σ_k r_k(x) τ_k`` per sample.

    Args:
        first, second: the pretrained linears (their weights are copied into frozen buffers).
        activation: what runs between them (open_clip ``gelu``, HF ``activation_fn``), already merged.
        tau: ``{"first.weight": [K, out, in], "first.bias": [K, out], "second.weight": ..., "second.bias": ...}``.
        router: ``tokens [B, T, d] -> r [B, K]`` (possibly shared between blocks).
        batch_reduce: in training, average ``r`` over the batch (FusionBench's TTA); evaluation is per sample.
        form: how :func:`~fusion.param.routers.routed_linear` computes the per-sample linear.
        batch_first: the token layout, ``[B, T, d]`` (else ``[T, B, d]``).
    """

    def __init__(self, first: nn.Linear, second: nn.Linear, activation: nn.Module, tau: Mapping[str, Tensor],
                 router: nn.Module, batch_reduce: bool = False, form: str = "auto", batch_first: bool = True):
        super().__init__()
        for i, linear in (("1", first), ("2", second)):
            key = "first" if i == "1" else "second"
            self.register_buffer(f"w0_{i}", linear.weight.detach().clone(), persistent=False)
            bias = None if linear.bias is None else linear.bias.detach().clone()
            self.register_buffer(f"b0_{i}", bias, persistent=False)
            self.register_buffer(f"tw_{i}", tau[f"{key}.weight"], persistent=False)
            self.register_buffer(f"tb_{i}", tau.get(f"{key}.bias"), persistent=False)
        self.activation, self.router = freeze_(activation), router
        self.batch_reduce, self.form, self.batch_first = bool(batch_reduce), form, batch_first
        self.path, self.recorder, self.last_weights = "", None, None

    def weights(self, x: Tensor) -> Tensor:
        """Routing weights ``[B, K]`` (``[1, K]`` when batch-reduced in training) for tokens ``x [B, T, d]``."""
        r = self.router(x)
        return r.mean(0, keepdim=True) if self.batch_reduce and self.training else r

    def linear(self, x: Tensor, i: str, r: Tensor) -> Tensor:
        buf = {n: getattr(self, f"{n}_{i}") for n in ("w0", "b0", "tw", "tb")}
        cast = {n: None if t is None else t.to(x.dtype) for n, t in buf.items()}
        return routed_linear(x, cast["w0"], cast["b0"], cast["tw"], cast["tb"], r, self.form)

    def forward(self, x: Tensor) -> Tensor:
        x = x if self.batch_first else x.transpose(0, 1)
        r = self.weights(x)
        self.last_weights = r.detach()
        if self.recorder is not None:
            self.recorder.add(self.path, r.expand(x.shape[0], -1))
        y = self.linear(self.activation(self.linear(x, "1", r)), "2", r)
        return y if self.batch_first else y.transpose(0, 1)


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
        routed = {f"{p}.{c}.{n}": (p, c, n) for p, pair in mlps.items() for c in pair
                  for n, _ in self.encoder.get_submodule(f"{p}.{c}").named_parameters()}
        missing = [n for n in routed if n not in task_vectors]
        if missing:
            raise KeyError(f"the task vectors have no entry for the MLP parameters {missing[:3]}")
        add_task_arithmetic_(self.encoder, {n: t for n, t in task_vectors.items() if n not in routed},
                             initial_values(init, self.num_experts))
        mlp_tv = {n: task_vectors[n] for n in routed}
        mlp_tv = prune_per_tensor(mlp_tv, keep) if keep is not None else mlp_tv
        self.block_paths = list(mlps)
        routers = self.make_routers(mlps, make_router, shared_router)
        for path, (a, b) in mlps.items():
            mlp = self.encoder.get_submodule(path)
            tau = {("first" if c == a else "second") + f".{n}": mlp_tv[k]
                   for k, (p, c, n) in routed.items() if p == path}
            activation = nn.Sequential(*[m for n, m in mlp.named_children() if n not in (a, b)])
            block = RoutedMLP(getattr(mlp, a), getattr(mlp, b), activation, tau, routers[path], batch_reduce, form,
                              tokens_batch_first(self.encoder, path))
            block.path = path
            parent, _, name = path.rpartition(".")
            setattr(self.encoder.get_submodule(parent), name, block)
        self.train()

    def make_routers(self, mlps: Mapping[str, tuple[str, str]], make_router: Callable[[int], nn.Module],
                     shared: bool) -> dict[str, nn.Module]:
        """One router per MLP path, or one router object for all of them (``shared``; equal widths required)."""
        dims = {p: getattr(self.encoder.get_submodule(p), a).in_features for p, (a, _) in mlps.items()}
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
          mlp_pattern: str = MLP_PATTERN, form: str = "auto") -> RoutedEncoder:
    """WEMoE (Tang et al., ICML 2024): ``W^mlp(x) = θ_0^mlp + Σ_k r_k(x) τ_k^mlp``, router depth 0/1/2, b_2 = init.

    ``keep``/``shared_router`` give E-WEMoE (see :func:`sparse_wemoe`). ``batch_reduce`` applies in training only.
    """
    check_depth(depth)
    lam = initial_values(init, num_tasks(task_vectors))
    spec = _spec("wemoe", init=_json_init(init, lam), depth=depth, batch_reduce=batch_reduce, keep=keep,
                 shared_router=shared_router, mlp_pattern=mlp_pattern, form=form)
    return RoutedEncoder(base, task_vectors, lambda dim: WEMoERouter(dim, lam, depth), lam, keep=keep,
                         shared_router=shared_router, batch_reduce=batch_reduce, mlp_pattern=mlp_pattern, form=form,
                         spec=spec)


def sparse_wemoe(base: nn.Module, task_vectors: Mapping[str, Tensor], init: float | Sequence[float] = 0.3,
                 depth: int = 2, batch_reduce: bool = True, keep: float = 0.1, shared_router: bool = True,
                 mlp_pattern: str = MLP_PATTERN, form: str = "auto") -> RoutedEncoder:
    """E-WEMoE (Shen et al., arXiv 2410.21804): WEMoE, MLP task vectors pruned to ``keep`` per tensor, one router."""
    return wemoe(base, task_vectors, init, depth, batch_reduce, keep, shared_router, mlp_pattern, form)


def smear(base: nn.Module, task_vectors: Mapping[str, Tensor], init: float | Sequence[float] = 0.3,
          expert_dropout: float = 0.1, learn_scale: bool = True, batch_reduce: bool = False,
          keep: float | None = None, mlp_pattern: str = MLP_PATTERN, form: str = "auto") -> RoutedEncoder:
    """SMEAR applied to task vectors (Muqeeth et al., TMLR 2024; METHODS.md §2): ``θ_0 + s Σ_k p_k(x) τ_k``.

    ``p = softmax(W LN(mean_t x) + b)`` per block; ``s`` is learned from ``Σ_k init_k`` (0.3·K) when ``learn_scale``,
    else 1 (a convex combination of the experts' MLPs).
    """
    check_drop_rate(expert_dropout, "expert_dropout")
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
