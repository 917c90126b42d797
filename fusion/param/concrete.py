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
import json
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from fusion.merge.masks import (apply_mask, check_temperature, concrete_sample, expected_mask, hard_mask, is_binary,
                                kept_fraction, mask_task_vectors, pack_bits, unpack_bits)
from fusion.merge.task_vectors import num_tasks
from fusion.param.coefficients import Coefficients
from fusion.param.merged import MergedEncoder, NotShardableError

EVAL_MASKS = ("continuous", "expected", "hard")
LEARN_COEFFICIENTS = (False, "task_wise", "layer_wise")
MASK_FORMAT = "fusion-concrete-mask/1"


class NonFiniteLogitsError(ValueError):
    """A mask logit is NaN or infinite."""


def torch_dtype(name: str | torch.dtype | None) -> torch.dtype | None:
    """``"bfloat16"`` → ``torch.bfloat16`` (``None`` stays ``None``); only floating dtypes."""
    if name is None or isinstance(name, torch.dtype):
        return name
    dtype = getattr(torch, str(name), None)
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise ValueError(f"logits_dtype must be a floating torch dtype name (float32, bfloat16, float16), got {name!r}")
    return dtype


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
            raise ValueError(f"eval_mask must be one of {EVAL_MASKS}, got {eval_mask!r}")
        self.inner, self.names = inner, list(shapes)
        self.temperature = check_temperature(temperature)
        self.eval_temperature = check_temperature(temperature if eval_temperature is None else eval_temperature)
        self.eval_mask, self.seed, self.factorized = eval_mask, int(seed), bool(factorized)
        dtype = torch_dtype(logits_dtype) or torch.float32
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
        if not self.factorized or not hasattr(self.inner, "elementwise_split"):
            raise NotShardableError("trainer=fsdp needs a factorized Concrete mask over coefficients "
                                    "(concrete_merge builds one); use trainer=ddp")
        return self.inner, self.apply_masks

    # bi-level interface (fusion.train.bilevel): outer = mask logits, inner = the wrapped weighting
    def outer_parameters(self) -> list[nn.Parameter]:
        return list(self.logits)

    def inner_parameters(self) -> list[nn.Parameter]:
        return list(self.inner.parameters())

    def values(self) -> Tensor:
        """The inner coefficients λ (for LearnedMerge's coefficient heatmap)."""
        return self.inner.values()

    @torch.no_grad()
    def stats(self) -> dict[str, float]:
        total = sum(x.numel() for x in self.logits)
        sums = torch.stack([torch.stack([torch.sigmoid(x.float()).sum(), (x > 0).sum().float(), x.float().abs().sum()])
                            for x in self.logits]).sum(0) / total
        expected, hard, abs_mean = sums.tolist()  # one device sync
        inner = getattr(self.inner, "stats", None)
        return {"mask_expected_kept": expected, "mask_hard_kept": hard, "mask_logit_abs_mean": abs_mean,
                **(inner() if inner else {})}

    def describe(self) -> dict[str, Any]:
        """What results.json should record about the mask (``method_info.mask``)."""
        final = self.final_mask()
        total = sum(m.numel() for m in final.values())
        return {"eval_mask": self.eval_mask, "temperature": self.temperature,
                "eval_temperature": self.eval_temperature if self.eval_mask == "continuous" else None,
                "seed": self.seed, "logits_dtype": str(self.logits[0].dtype).removeprefix("torch."),
                "num_logits": total, "shared_by_tasks": True,
                "kept_fraction": sum(float(m.sum()) for m in final.values()) / total,
                "hard_kept_fraction": self.stats()["mask_hard_kept"]}

    def save_artifacts(self, out_dir: str | Path, suffix: str = "", title: str = "Concrete mask") -> dict[str, Any]:
        """Write ``mask{suffix}.safetensors`` (the evaluation mask) and, without suffix, ``mask_kept_fraction.png``.

        Returns :meth:`describe` plus the file names (for ``method_info.mask``). Call on rank zero only.
        """
        out = Path(out_dir)
        final, info = self.final_mask(), self.describe()
        meta = {k: json.dumps(v) for k, v in info.items()}
        info["file"] = save_mask(out / f"mask{suffix}.safetensors", final, meta).name
        if not suffix:
            hard = {n: hard_mask(x) for n, x in self.named_logits().items()}
            info["plot"] = plot_kept_fraction(final, hard, out / "mask_kept_fraction.png",
                                              title=f"{title} ({self.eval_mask} eval mask)").name
        return info


class ConcreteMergedEncoder(MergedEncoder):
    """:class:`MergedEncoder` whose ``merge_and_unload`` uses the evaluation mask even in training mode."""

    @torch.no_grad()
    def merge_and_unload(self) -> nn.Module:
        was_training = self.weighting.training
        self.weighting.eval()
        try:
            return super().merge_and_unload()
        finally:
            self.weighting.train(was_training)

    def artifacts(self, out_dir: str | Path, taskpool=None, tasks: Sequence[str] | None = None) -> dict[str, Any]:
        """``mask.safetensors`` + ``mask_kept_fraction.png`` in ``out_dir``; returns ``method_info.mask`` (rank 0)."""
        return self.weighting.save_artifacts(out_dir)


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
        raise ValueError(f"learn_coefficients must be one of {LEARN_COEFFICIENTS}, got {learn_coefficients!r}")
    k, n = num_tasks(task_vectors), len(task_vectors)
    inner = Coefficients(k, n if learn_coefficients == "layer_wise" else None, init, clamp)
    inner.lambdas.requires_grad_(bool(learn_coefficients))
    shapes = {name: tuple(t.shape[1:]) for name, t in task_vectors.items()}
    weighting = ConcreteMask(inner, shapes, temperature, eval_mask, eval_temperature, init_logit, logits_dtype,
                             seed, factorized=True)
    return ConcreteMergedEncoder(base, task_vectors, weighting)


def save_mask(path: str | Path, masks: Mapping[str, Tensor], metadata: Mapping[str, str] | None = None) -> Path:
    """Save a mask ``{name: Tensor[*shape]}``: bit-packed ``uint8`` when binary, else float32 (exact).

    The metadata records the format, the encoding, the tensor names and shapes, plus ``metadata``.
    """
    from fusion.utils import atomic_save_safetensors

    binary = all(is_binary(m) for m in masks.values())
    tensors = {n: pack_bits(m) if binary else m.detach().float() for n, m in masks.items()}
    meta = {**(metadata or {}), "format": MASK_FORMAT, "encoding": "packbits" if binary else "float32",
            "names": json.dumps(list(masks)), "shapes": json.dumps({n: list(m.shape) for n, m in masks.items()})}
    return atomic_save_safetensors(path, tensors, meta)


def load_mask(path: str | Path, task_vectors: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """A mask saved by :func:`save_mask`, checked against stacked task vectors ``{name: Tensor[K, *shape]}``.

    Raises ``ValueError`` naming the tensor and both shapes when the mask does not fit the pool.
    """
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no mask file at {path} (written as mask.safetensors in a Concrete run's directory)")
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata() or {}
        if meta.get("format") != MASK_FORMAT:
            raise ValueError(f"{path} is not a Concrete mask file (metadata format={meta.get('format')!r})")
        shapes = {n: tuple(s) for n, s in json.loads(meta["shapes"]).items()}
        missing, extra = [n for n in task_vectors if n not in shapes], [n for n in shapes if n not in task_vectors]
        if missing or extra:
            raise ValueError(f"mask {path} does not match the pool: {len(missing)} pool tensors missing "
                             f"(first {missing[:2]}), {len(extra)} unknown (first {extra[:2]})")
        for name, t in task_vectors.items():
            if shapes[name] != tuple(t.shape[1:]):
                raise ValueError(f"mask {path}: tensor '{name}' has shape {shapes[name]} but the pool's parameter has "
                                 f"shape {tuple(t.shape[1:])}; the mask was learned on a different architecture")
        raw = {n: f.get_tensor(n) for n in task_vectors}
    if meta["encoding"] == "packbits":
        return {n: unpack_bits(raw[n], shapes[n]) for n in task_vectors}
    return {n: raw[n].float().reshape(shapes[n]) for n in task_vectors}


def plot_kept_fraction(final: Mapping[str, Tensor], hard: Mapping[str, Tensor], path: str | Path,
                       title: str = "Concrete mask") -> Path:
    """Bars: the mean of the evaluation mask per parameter tensor; dots: the fraction with ``σ(x) > 0.5``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from fusion.report import save_figure

    names = list(final)
    fig, ax = plt.subplots(figsize=(min(24, 4 + 0.12 * len(names)), 3.5))
    ax.bar(range(len(names)), [kept_fraction(final[n]) for n in names], label="eval mask mean")
    ax.plot(range(len(names)), [kept_fraction(hard[n]) for n in names], "k.", label="σ(x) > 0.5")
    ax.set_ylim(0, 1)
    ax.set_xlabel("parameter tensor (model order)")
    ax.set_ylabel("kept fraction")
    if len(names) <= 40:
        ax.set_xticks(range(len(names)), names, rotation=90, fontsize=6)
    ax.legend(loc="lower right", fontsize=7)
    ax.set_title(title)
    return save_figure(fig, path)


__all__ = ["ConcreteMask", "ConcreteMergedEncoder", "NonFiniteLogitsError", "concrete_merge", "load_mask",
           "mask_task_vectors", "plot_kept_fraction", "save_mask"]
