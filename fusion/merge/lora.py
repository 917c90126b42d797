"""LoRA task vectors (Hu et al., ICLR 2022; peft's saved format).

A LoRA expert fine-tunes a target module's weight ``W0 ∈ R^{out×in}`` as ``W0 + s·B A`` with ``A ∈ R^{r×in}``,
``B ∈ R^{out×r}``; its task vector is therefore ``τ = s·B A`` on the target modules' weights and zero elsewhere.
``s = α/r`` (Hu et al., Eq. 4's ``α/r``) or ``α/√r`` with rank-stabilised LoRA (Kalajdzievski, 2023), as peft's
``LoraLayer.update_layer``. Modules stored ``[in, out]`` (GPT-2's ``Conv1D``, peft's ``fan_in_fan_out=True``) get
``(B A)ᵀ``. This equals peft's ``merge_and_unload()`` weight minus the base weight.
"""
from __future__ import annotations

import math

from torch import Tensor

from fusion.merge.task_vectors import HyperparameterError


def lora_scaling(alpha: float, r: int, use_rslora: bool = False) -> float:
    """``α/r``, or ``α/√r`` with rsLoRA (``r ≥ 1``)."""
    if int(r) < 1:
        raise HyperparameterError(f"LoRA rank r must be >= 1, got {r!r}")
    return float(alpha) / (math.sqrt(r) if use_rslora else r)


def lora_delta(a: Tensor, b: Tensor, scaling: float, fan_in_fan_out: bool = False) -> Tensor:
    """One module's task vector ``s·B A`` (transposed when ``fan_in_fan_out``), in float32.

    Args:
        a: ``lora_A.weight``, ``Tensor[r, in]``; b: ``lora_B.weight``, ``Tensor[out, r]``.
        scaling: ``s`` from :func:`lora_scaling`.
    Returns:
        ``Tensor[out, in]`` (``Tensor[in, out]`` when ``fan_in_fan_out``).
    """
    delta = (b.float() @ a.float()) * scaling
    return delta.T if fan_in_fan_out else delta
