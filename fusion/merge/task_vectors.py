"""Task vectors: extraction, validation and arithmetic (Ilharco et al., 2023).

``τ_k = θ_k − θ_0``. Stacked task vectors hold, for every parameter name, a tensor
of shape ``[K, *param_shape]`` (task ``k`` at index ``k``), so that a merge is an
operation over the leading dimension.
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from torch import Tensor

StateDict = dict[str, Tensor]
TaskVectors = dict[str, Tensor]  # name -> Tensor[K, *shape]


class PoolMismatchError(ValueError):
    """An expert does not match the pretrained model (keys, shapes or dtypes)."""


class HyperparameterError(ValueError):
    """A merge or parametrization hyperparameter outside its range: a config value, named in the message with its
    fix (the ``fusion`` entry point reports it as one message, see :mod:`fusion.errors`)."""


def floating_dtype(name: str | torch.dtype | None, key: str = "tv_dtype") -> torch.dtype | None:
    """``"bfloat16"`` → ``torch.bfloat16`` (``None`` stays ``None``); the one parser of dtype names in configs
    (``method.tv_dtype``, ``modelpool.tv_dtype``, ``method.model.logits_dtype``). Only floating dtypes."""
    if name is None or isinstance(name, torch.dtype):
        return name
    dtype = getattr(torch, str(name), None)
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise HyperparameterError(f"{key} must be a floating torch dtype name (float32, bfloat16, float16), "
                                  f"got {name!r}")
    return dtype


def validate_compatible(reference: Mapping[str, Tensor], other: Mapping[str, Tensor], *,
                        name: str = "expert", source: str = "<memory>") -> None:
    """Raise :class:`PoolMismatchError` naming the first key whose presence, shape or dtype differs.

    ``name`` and ``source`` (e.g. the expert's task and file) are put in the message.
    """
    missing = [k for k in reference if k not in other]
    extra = [k for k in other if k not in reference]
    if missing or extra:
        key = (missing or extra)[0]
        what = "is missing" if missing else "is unexpected (not in the pretrained model)"
        raise PoolMismatchError(
            f"{name} ({source}): key '{key}' {what}; {len(missing)} missing and {len(extra)} unexpected keys "
            "in total. The expert must be fine-tuned from the same architecture as the pretrained model.")
    for key, ref in reference.items():
        t = other[key]
        if t.shape != ref.shape or t.dtype != ref.dtype:
            raise PoolMismatchError(
                f"{name} ({source}): key '{key}' has shape {tuple(t.shape)} dtype {t.dtype}, but the pretrained "
                f"model has shape {tuple(ref.shape)} dtype {ref.dtype}. Check that the expert was fine-tuned "
                "from this pretrained model (and cast it with `.to(dtype)` if only the dtype differs).")
    check_finite(other, name=name, source=source)


def check_finite(state: Mapping[str, Tensor], *, name: str = "expert", source: str = "<memory>") -> None:
    """Raise :class:`PoolMismatchError` naming the first floating tensor of ``state`` with a NaN or inf."""
    for key, t in state.items():
        if t.is_floating_point() and not bool(torch.isfinite(t).all()):
            bad = int((~torch.isfinite(t)).sum())
            raise PoolMismatchError(
                f"{name} ({source}): key '{key}' holds {bad} non-finite value(s) (NaN/inf) of {t.numel()}; the "
                "checkpoint is corrupt or its fine-tuning diverged. Re-export it, or leave this task out of the pool")


def stack_task_vectors(pretrained: Mapping[str, Tensor], experts: Sequence[Mapping[str, Tensor]],
                       *, dtype: torch.dtype | None = None) -> TaskVectors:
    """Stack the task vectors of ``experts`` into ``{name: Tensor[K, *shape]}``.

    ``dtype`` (e.g. ``torch.bfloat16``) stores them compactly for large pools.
    """
    if not experts:
        raise ValueError("stack_task_vectors needs at least one expert, got none")
    out: TaskVectors = {}
    for name, theta0 in pretrained.items():
        if not theta0.is_floating_point():
            continue
        stacked = torch.stack([e[name].to(theta0.device) - theta0 for e in experts])
        out[name] = stacked if dtype is None else stacked.to(dtype)
    return out


def num_tasks(tv: Mapping[str, Tensor]) -> int:
    """The number ``K`` of stacked task vectors."""
    return next(iter(tv.values())).shape[0]


def add_delta(pretrained: Mapping[str, Tensor], delta: Mapping[str, Tensor]) -> StateDict:
    """``θ_0 + δ`` for the keys of ``delta``; other keys of ``pretrained`` are kept (cast back to their dtype)."""
    return {k: (v + delta[k].to(v.dtype)) if k in delta else v for k, v in pretrained.items()}


def flatten(tv: Mapping[str, Tensor]) -> Tensor:
    """Concatenate stacked task vectors into ``Tensor[K, P]`` (name order of the mapping)."""
    return torch.cat([t.reshape(t.shape[0], -1) for t in tv.values()], dim=1)


def unflatten(flat: Tensor, like: Mapping[str, Tensor]) -> TaskVectors:
    """Inverse of :func:`flatten`: split ``Tensor[K, P]`` back into the shapes of ``like``."""
    out, start = {}, 0
    for name, t in like.items():
        n = t[0].numel()
        out[name] = flat[:, start:start + n].reshape(t.shape)
        start += n
    return out
