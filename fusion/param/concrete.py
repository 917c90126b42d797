"""Concrete subspace masks (Tang et al., "Concrete Subspace Learning based Interference Elimination for Multi-task
Model Fusion", arXiv 2312.06173, §3, Eq. 5–7).

One mask logit ``x_j`` per element of every merged parameter, initialised to 0 and SHARED by all tasks. In training
each call draws a binary Concrete sample ``m̂ = σ((log u − log(1−u) + x)/T)`` (T = 0.5) and the inner weighting
combines the rescaled masked task vectors ``τ̃_k = τ_k ⊙ m̂ / mean(m̂)`` (mean per tensor):

- Concrete Task Arithmetic: ``θ = θ_0 + 0.3 Σ_k τ̃_k`` (fixed λ; only the logits learn).
- Concrete AdaMerging: ``θ^l = θ_0^l + Σ_k λ_k^l τ̃_k^l`` (λ task- or layer-wise, learned bi-level; see
  :mod:`fusion.train.bilevel` and :class:`fusion.methods.concrete.ConcreteAdaMerging`).

In eval mode (and in :meth:`ConcreteMergedEncoder.merge_and_unload`) the *evaluation mask* is used: a continuous
sample from a generator seeded with ``seed`` (FusionBench's ``eval_mask_type: continuous``; deterministic for given
logits), the expected mask ``σ(x)``, or the hard mask ``1[σ(x) > 0.5]``. The math is in :mod:`fusion.merge.masks`.
"""
from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import replace
from typing import Any

import torch
from torch import Tensor, nn

from fusion.merge.masks import (apply_mask, check_temperature, concrete_sample, expected_mask, hard_mask,
                                mask_task_vectors)
from fusion.merge.task_vectors import HyperparameterError, floating_dtype, num_tasks
from fusion.param.coefficients import Coefficients
from fusion.param.contract import MergeRecord, NotShardableError
from fusion.param.merged import MergedEncoder

EVAL_MASKS = ("continuous", "expected", "hard")
LEARN_COEFFICIENTS = (False, "task_wise", "layer_wise")


class NonFiniteLogitsError(ValueError):
    """A mask logit is NaN or infinite."""


class ConcreteMask(nn.Module):
    """A shared Concrete mask over the task vectors, wrapping an ``inner`` weighting (``τ̃ -> δ``).

    Args:
        inner: the weighting applied to the masked task vectors (fixed or learnable :class:`Coefficients`).
        shapes: ``{name: shape}`` of every merged parameter (one logit per element).
        temperature: ``T`` of the training samples (> 0).
        eval_mask: ``continuous`` (a seeded sample at ``eval_temperature``), ``expected`` (``σ(x)``) or
            ``hard`` (``1[σ(x) > 0.5]``); used in eval mode and by ``merge_and_unload``.
        eval_temperature: temperature of the continuous evaluation sample (default ``temperature``; the
            original code evaluates at 0.001, i.e. a Bernoulli draw).
        init_logit: initial ``x`` (0: keep probability 0.5).
        logits_dtype: storage dtype of the logits (e.g. ``torch.bfloat16``); samples are computed in float32.
        seed: seed of the continuous evaluation sample.
        factorized: the inner weighting is linear per element in τ (``δ^l = Σ_k c_k^l τ_k^l``, true for
            :class:`Coefficients`), so ``inner(τ ⊙ m̃) = inner(τ) ⊙ m̃`` is computed without a K×P masked copy.
    """

    def __init__(self, inner: nn.Module, shapes: Mapping[str, Sequence[int]], temperature: float = 0.5,
                 eval_mask: str = "continuous", eval_temperature: float | None = None, init_logit: float = 0.0,
                 logits_dtype: torch.dtype | str | None = None, seed: int = 0, factorized: bool = False):
        super().__init__()
        if eval_mask not in EVAL_MASKS:
            raise HyperparameterError(f"method.model.eval_mask must be one of {EVAL_MASKS}, got {eval_mask!r}")
        self.inner, self.names = inner, list(shapes)
        self.temperature = check_temperature(temperature)
        self.eval_temperature = check_temperature(temperature if eval_temperature is None else eval_temperature)
        self.eval_mask, self.seed, self.factorized = eval_mask, int(seed), bool(factorized)
        dtype = floating_dtype(logits_dtype, "method.model.logits_dtype") or torch.float32
        self.logits = nn.ParameterList([nn.Parameter(torch.full(tuple(s), float(init_logit), dtype=dtype))
                                        for s in shapes.values()])
        self._detached = False

    def named_logits(self) -> dict[str, Tensor]:
        return dict(zip(self.names, self.logits))

    def check_finite(self) -> None:
        """Raise :class:`NonFiniteLogitsError` naming the first tensor whose logits are NaN/inf."""
        bad = torch.stack([(~torch.isfinite(x)).sum() for x in self.logits]).tolist()  # one device sync
        for name, count in zip(self.names, bad):
            if count:
                raise NonFiniteLogitsError(f"mask logits of '{name}' contain {count} non-finite value(s) (NaN/inf); "
                                           "lower the learning rate, or reload the last good mask")

    def sample(self) -> dict[str, Tensor]:
        """A training sample per tensor (differentiable in the logits unless inside :meth:`detached_mask`)."""
        with torch.no_grad() if self._detached else contextlib.nullcontext():
            return {n: concrete_sample(x, self.temperature) for n, x in self.named_logits().items()}

    @torch.no_grad()
    def final_mask(self) -> dict[str, Tensor]:
        """The evaluation mask (before the ``/mean`` rescale), detached; deterministic for given logits."""
        self.check_finite()
        logits = self.named_logits()
        if self.eval_mask == "expected":
            return {n: expected_mask(x) for n, x in logits.items()}
        if self.eval_mask == "hard":
            return {n: hard_mask(x) for n, x in logits.items()}
        gen = torch.Generator(device=self.logits[0].device).manual_seed(self.seed)
        return {n: concrete_sample(x, self.eval_temperature, gen) for n, x in logits.items()}

    def masks(self) -> dict[str, Tensor]:
        """A fresh sample in training mode, the evaluation mask in eval mode."""
        if not self.training:
            return self.final_mask()
        self.check_finite()
        return self.sample()

    @contextlib.contextmanager
    def detached_mask(self) -> Iterator[None]:
        """Samples drawn inside carry no gradient to the logits (the inner step of the bi-level problem)."""
        previous, self._detached = self._detached, True
        try:
            yield
        finally:
            self._detached = previous

    def forward(self, task_vectors: Mapping[str, Tensor]) -> dict[str, Tensor]:
        if list(task_vectors) != self.names:
            raise KeyError(f"the mask covers {len(self.names)} tensors (first {self.names[:2]}) but got task vectors "
                           f"for {len(task_vectors)} (first {list(task_vectors)[:2]})")
        if self.factorized:
            return self.apply_masks(self.inner(task_vectors))
        masks = self.masks()
        return self.inner({n: apply_mask(t, masks[n]) for n, t in task_vectors.items()})

    def apply_masks(self, delta: Mapping[str, Tensor]) -> dict[str, Tensor]:
        """``δ ⊙ m̂ / mean(m̂)`` per tensor with a fresh mask (factorized: ``inner(τ ⊙ m̃) = inner(τ) ⊙ m̃``)."""
        masks = self.masks()
        return {n: apply_mask(delta[n], masks[n]) for n in self.names}

    def elementwise_split(self):
        """``(inner, apply_masks)``: the inner weighting runs on task-vector chunks; the mask, whose rescale needs
        the mean over a whole tensor, on the all-gathered ``δ`` (``trainer=fsdp``). Factorized masks only."""
        if not self.factorized:
            raise NotShardableError("trainer=fsdp needs a factorized Concrete mask over coefficients "
                                    "(concrete_merge builds one); use trainer=ddp")
        elementwise, finish = self.inner.elementwise_split()
        if finish is not None:
            raise NotShardableError(f"trainer=fsdp: the Concrete mask's inner weighting {type(self.inner).__name__} "
                                    "is not elementwise in τ; use trainer=ddp")
        return elementwise, self.apply_masks

    def coefficients(self) -> Tensor | None:
        """The inner coefficients λ as used in the merge."""
        return self.inner.coefficients()

    @torch.no_grad()
    def stats(self) -> dict[str, float]:
        total = sum(x.numel() for x in self.logits)
        sums = torch.stack([torch.stack([torch.sigmoid(x.float()).sum(), (x > 0).sum().float(), x.float().abs().sum()])
                            for x in self.logits]).sum(0) / total
        expected, hard, abs_mean = sums.tolist()  # one device sync
        return {"mask_expected_kept": expected, "mask_hard_kept": hard, "mask_logit_abs_mean": abs_mean,
                **self.inner.stats()}

    def describe(self, final: Mapping[str, Tensor] | None = None) -> dict[str, Any]:
        """What results.json records about the mask (``final``: the evaluation mask, computed when not given)."""
        final = self.final_mask() if final is None else final
        total = sum(m.numel() for m in final.values())
        return {"eval_mask": self.eval_mask, "temperature": self.temperature,
                "eval_temperature": self.eval_temperature if self.eval_mask == "continuous" else None,
                "seed": self.seed, "logits_dtype": str(self.logits[0].dtype).removeprefix("torch."),
                "num_logits": total, "shared_by_tasks": True,
                "kept_fraction": sum(float(m.sum()) for m in final.values()) / total,
                "hard_kept_fraction": self.stats()["mask_hard_kept"]}


class ConcreteMergedEncoder(MergedEncoder):
    """:class:`MergedEncoder` over a :class:`ConcreteMask`: ``merge_and_unload`` uses the evaluation mask even in
    training mode; bi-level training sees the mask logits as the outer variables and the inner λ as the inner ones;
    :meth:`record` adds the evaluation mask and its logits."""

    weighting: ConcreteMask

    @torch.no_grad()
    def merge_and_unload(self) -> nn.Module:
        was_training = self.weighting.training
        self.weighting.eval()
        try:
            return super().merge_and_unload()
        finally:
            self.weighting.train(was_training)

    def inner_parameters(self) -> list[nn.Parameter]:
        return list(self.weighting.inner.parameters())

    def outer_parameters(self) -> list[nn.Parameter]:
        return list(self.weighting.logits)

    def outer_detached(self) -> contextlib.AbstractContextManager:
        return self.weighting.detached_mask()

    def record(self) -> MergeRecord:
        """:meth:`MergedEncoder.record` plus the evaluation mask, its summary and the logits by tensor name."""
        final = self.weighting.final_mask()
        logits = {n: x.detach().float() for n, x in self.weighting.named_logits().items()}
        return replace(super().record(), mask=final, mask_logits=logits, mask_info=self.weighting.describe(final))


def concrete_merge(base: nn.Module, task_vectors: Mapping[str, Tensor], init: float | Sequence[float] = 0.3,
                   learn_coefficients: bool | str = False, temperature: float = 0.5, eval_mask: str = "continuous",
                   eval_temperature: float | None = None, logits_dtype: str | None = None,
                   clamp: tuple[float, float] | None = None, seed: int = 0,
                   init_logit: float = 0.0) -> ConcreteMergedEncoder:
    """The Concrete-masked merged encoder ``θ = θ_0 + inner(τ ⊙ m̂ / mean(m̂))``.

    ``learn_coefficients``: ``False`` — Concrete Task Arithmetic, λ fixed at ``init`` (task-wise, frozen);
    ``"task_wise"`` / ``"layer_wise"`` — Concrete AdaMerging's learnable λ (``clamp`` as in AdaMerging).
    """
    learn_coefficients = learn_coefficients or False  # YAML null / false
    if learn_coefficients not in LEARN_COEFFICIENTS:
        raise HyperparameterError(f"method.model.learn_coefficients must be one of {LEARN_COEFFICIENTS}, got "
                                  f"{learn_coefficients!r}")
    k, n = num_tasks(task_vectors), len(task_vectors)
    inner = Coefficients(k, n if learn_coefficients == "layer_wise" else None, init, clamp)
    if not learn_coefficients and not bool(inner.lambdas.detach().ne(0).any()):
        raise HyperparameterError("Concrete Task Arithmetic keeps λ fixed at method.init, and λ = 0 leaves nothing "
                                  "for the mask to select (a merged-vector init starts λ at 0); use a λ init, e.g. "
                                  "method/init=task_arithmetic or method.init=0.3")
    inner.lambdas.requires_grad_(bool(learn_coefficients))
    shapes = {name: tuple(t.shape[1:]) for name, t in task_vectors.items()}
    weighting = ConcreteMask(inner, shapes, temperature, eval_mask, eval_temperature, init_logit, logits_dtype,
                             seed, factorized=True)
    return ConcreteMergedEncoder(base, task_vectors, weighting)


__all__ = ["ConcreteMask", "ConcreteMergedEncoder", "NonFiniteLogitsError", "concrete_merge", "mask_task_vectors"]
