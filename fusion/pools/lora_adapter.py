"""LoRA experts in peft's saved format: ``adapter_config.json`` + ``adapter_model.safetensors``.

Keys are ``base_model.model.<module>.lora_A.weight`` (``[r, in]``) and ``...lora_B.weight`` (``[out, r]``); the
base tensor they change is ``<module>.weight``. The task vector of one module is built only when a streamed merge
asks for that tensor (:func:`fusion.merge.lora.lora_delta`), so at most one module's τ exists at a time. Adapters
that change anything else (DoRA, biases, ``modules_to_save`` heads, embedding or convolution LoRA) are refused
with a message: their task vector is not ``s·B A`` on a matrix.
"""
from __future__ import annotations

import json
import re
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import torch
from torch import Tensor

from fusion.errors import ConfigError, MissingFileError
from fusion.merge.lora import lora_delta, lora_scaling
from fusion.merge.task_vectors import PoolMismatchError
from fusion.pools.hf_checkpoint import HFCheckpoint

ADAPTER_CONFIG, ADAPTER_WEIGHTS = "adapter_config.json", "adapter_model.safetensors"
PREFIX = "base_model.model."
KEY = re.compile(r"^base_model\.model\.(?P<module>.+)\.lora_(?P<part>[AB])\.weight$")


def pattern_value(patterns: dict, module: str, default):
    """peft's ``rank_pattern``/``alpha_pattern``: the value of the first pattern matching the end of ``module``."""
    for pattern, value in (patterns or {}).items():
        if re.fullmatch(rf"(.*\.)?{pattern}", module):
            return value
    return default


def read_adapter_config(directory: Path) -> dict:
    """``adapter_config.json``, refusing what is not plain LoRA on matrices (DoRA, trained biases)."""
    config = json.loads((directory / ADAPTER_CONFIG).read_text())
    if config.get("peft_type", "LORA") != "LORA":
        raise ConfigError(f"{directory / ADAPTER_CONFIG}: peft_type={config.get('peft_type')!r}; only LoRA adapters "
                          "are read (merge other adapters into their model and pass the directory)")
    if config.get("use_dora") or config.get("bias", "none") != "none":
        raise ConfigError(f"{directory / ADAPTER_CONFIG}: use_dora={config.get('use_dora')}, bias="
                          f"{config.get('bias')!r}; only plain LoRA (use_dora=false, bias='none') is a B·A task "
                          "vector: merge this adapter with peft's merge_and_unload(), save_pretrained the model, and "
                          "pass that directory as a full expert")
    return config


def lora_modules(weights: dict[str, Tensor], source: Path) -> dict[str, tuple[Tensor, Tensor]]:
    """``{module: (A, B)}`` from the adapter's tensors; any other key is refused with the fix."""
    parts: dict[str, dict[str, Tensor]] = {}
    for key, t in weights.items():
        match = KEY.match(key)
        if match is None or t.dim() != 2:
            raise ConfigError(f"{source}: key '{key}' (shape {tuple(t.shape)}) is not a LoRA matrix factor "
                              "(lora_A/lora_B.weight of a linear layer); adapters with modules_to_save, embedding or "
                              "convolution LoRA are not read: merge them with peft's merge_and_unload(), "
                              "save_pretrained, and pass that directory as a full expert")
        parts.setdefault(match["module"], {})[match["part"]] = t
    incomplete = [m for m, p in parts.items() if set(p) != {"A", "B"}]
    if incomplete:
        raise ConfigError(f"{source}: module '{incomplete[0]}' has only lora_{list(parts[incomplete[0]])[0]}; the "
                          "adapter file is incomplete, re-save it with save_pretrained")
    return {m: (p["A"], p["B"]) for m, p in parts.items()}


def saved_copies(weights: Mapping[str, Tensor], modules_to_save: Sequence[str] | None) -> list[str]:
    """The keys of ``weights`` that are peft's full copies of ``modules_to_save`` (not LoRA factors; a module path
    with a component named in the list, as peft matches them)."""
    names = set(modules_to_save or ())
    return [k for k in weights if KEY.match(k) is None and k.startswith(PREFIX)
            and names & set(k[len(PREFIX):].split(".")[:-1])]


class LoRAExpert:
    """A peft LoRA adapter as an expert: ``τ = s·B A`` on each target module's weight, zero elsewhere.

    The factors are small (``r·(in + out)`` per module) and read at once; the dense τ of a module is built only
    when asked for.
    """

    def __init__(self, directory: str | Path, saved_modules: bool = False):
        """``saved_modules``: also read the full copies peft saves of the config's ``modules_to_save`` (a
        sequence-classification head) into :attr:`saved`; without it such an adapter is refused."""
        self.directory = Path(directory)
        self.source = str(self.directory)
        self.config = read_adapter_config(self.directory)
        weights_file = self.directory / ADAPTER_WEIGHTS
        if not weights_file.is_file():
            raise MissingFileError(f"{weights_file} is missing (a LoRA adapter saved by peft's save_pretrained has "
                                   f"{ADAPTER_CONFIG} and {ADAPTER_WEIGHTS}; adapter_model.bin is not read)")
        from safetensors.torch import load_file

        weights = load_file(str(weights_file))
        copies = saved_copies(weights, self.config.get("modules_to_save")) if saved_modules else {}
        self.saved = {key[len(PREFIX):]: weights.pop(key) for key in copies}
        self.modules = lora_modules(weights, weights_file)
        self.by_weight = {f"{m}.weight": m for m in self.modules}

    def scaling(self, module: str) -> float:
        """``s`` of ``module``: its ``alpha_pattern`` or ``lora_alpha`` over its rank (the rows of ``A``)."""
        alpha = pattern_value(self.config.get("alpha_pattern"), module, self.config.get("lora_alpha", 8))
        return lora_scaling(alpha, self.modules[module][0].shape[0], bool(self.config.get("use_rslora")))

    def delta_shape(self, module: str) -> tuple[int, int]:
        a, b = self.modules[module]
        shape = (b.shape[0], a.shape[1])
        return shape[::-1] if self.config.get("fan_in_fan_out") else shape

    def check_against(self, base: HFCheckpoint) -> None:
        """Each target module's weight exists in the base with the shape ``B·A`` gives (rank of A and B equal)."""
        for weight, module in sorted(self.by_weight.items()):
            if weight not in base.files:
                raise PoolMismatchError(
                    f"LoRA adapter {self.source}: module '{module}' has no weight '{weight}' in the base "
                    f"{base.directory}; the adapter was made for a different model (or one wrapped differently, "
                    f"e.g. a ...ForCausalLM vs the bare model): pass the base it was trained on")
            a, b = self.modules[module]
            if a.shape[0] != b.shape[1] or self.delta_shape(module) != base.shape(weight):
                raise PoolMismatchError(
                    f"LoRA adapter {self.source}: module '{module}' gives B·A of shape {self.delta_shape(module)} "
                    f"(A {tuple(a.shape)}, B {tuple(b.shape)}, fan_in_fan_out={self.config.get('fan_in_fan_out')}) "
                    f"but the base {base.files[weight]} has '{weight}' of shape {base.shape(weight)}; pass the "
                    f"base model the adapter was trained on")

    def task_vector(self, name: str, theta0: Tensor) -> Tensor:
        module = self.by_weight.get(name)
        if module is None:
            return torch.zeros(theta0.shape, dtype=torch.float32)
        a, b = self.modules[module]
        return lora_delta(a, b, self.scaling(module), bool(self.config.get("fan_in_fan_out")))


def lora_state(reference: Mapping[str, Tensor], expert: LoRAExpert, base: HFCheckpoint, key_of: Callable[[str], str],
               conv1d: Sequence[str] = ()) -> dict[str, Tensor]:
    """An in-memory pool's expert state from a peft LoRA adapter (checked against ``base``): ``θ_0 + s·B A`` on
    each target module, ``θ_0`` elsewhere. ``reference``: θ0 with the pool's keys, ``key_of(HF weight name)`` the
    pool's key of a weight; ``conv1d``: the modules the pool made ``nn.Linear`` from ``Conv1D`` (their ``B A`` is
    transposed)."""
    expert.check_against(base)
    state = {k: v.detach().clone() for k, v in reference.items()}
    for weight in expert.by_weight:
        key = key_of(weight)
        if key not in state:
            raise PoolMismatchError(f"LoRA adapter {expert.source}: '{weight}' is not a parameter of the pool's model (a "
                                    "tied weight is one tensor under its first name, e.g. the input embedding for a "
                                    "tied LM head: target that one, or untie them)")
        delta = expert.task_vector(weight, state[key])
        state[key] = state[key] + (delta.T if weight.rpartition(".")[0] in conv1d else delta).to(state[key].dtype)
    return state
