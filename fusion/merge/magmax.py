"""MagMax (Marczak et al., ECCV 2024, "MagMax: Leveraging Model Merging for Seamless Continual Learning";
reference ``danielm1405/magmax``, FusionBench ``magmax``).

Maximum-magnitude selection (the paper's merging step): for every parameter entry j, keep the task-vector entry
of largest magnitude, sign included, ``τ_max[j] = τ_{k*}[j]`` with ``k* = argmax_k |τ_k[j]|``; then
``θ = θ0 + λ·τ_max``. Applied to every parameter alike (weights, biases, LayerNorms, embeddings). Ties go to the
*later* task, as in the reference's ``merge_max_abs`` (``>=`` when folding the tasks in order). λ = 1.0 is the
paper's default (FusionBench's 8-task script uses 0.5 for independently fine-tuned experts).
"""
from __future__ import annotations

from collections.abc import Mapping

from torch import Tensor

from fusion.merge.task_vectors import HyperparameterError, StateDict


def max_magnitude(t: Tensor) -> Tensor:
    """``τ_{k*}[j]`` with ``k* = argmax_k |τ_k[j]|`` (last task on ties): ``Tensor[K, *shape] -> Tensor[*shape]``."""
    k = t.shape[0]
    last = k - 1 - t.abs().flip(0).argmax(0, keepdim=True)  # argmax returns the first maximum; flip → the last
    return t.gather(0, last).squeeze(0)


def magmax(tv: Mapping[str, Tensor], lam: float = 1.0) -> StateDict:
    """MagMax's update ``λ·τ_max`` for every parameter.

    Args:
        tv: stacked task vectors ``{name: Tensor[K, *shape]}``.
        lam: the final scale (> 0; 1.0 in the paper).
    Returns:
        ``{name: Tensor[*shape]}`` in the task vectors' dtype.
    """
    if not float(lam) > 0:
        raise HyperparameterError(f"magmax lam scales the selected task vector and must be > 0 (1.0 in the paper, "
                                  f"0.5 in FusionBench's 8-task script), got {lam!r}")
    return {name: (lam * max_magnitude(t)).to(t.dtype) for name, t in tv.items()}
