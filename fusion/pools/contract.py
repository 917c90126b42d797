"""The model-pool contract: the backbone (a frozen encoder and its experts) and its heads.

A **model pool** (:class:`Backbone`) is what every method receives: the pretrained encoder ``θ_0`` (``x -> features``,
``x`` the model's input tensor as the task data's batches give it: images ``[B, 3, H, W]`` for CLIP, packed token
ids and attention mask ``[B, 2, T]`` int64 for a text backbone), the experts ``θ_k`` as state dicts, stacked task
vectors, and the **heads**, the backbone adapter that turns features and a task into logits
(``heads(features, task)``; CLIP's zero-shot heads, :class:`fusion.pools.heads.ZeroShotHeads`; each text expert's own
classifier, :class:`fusion.pools.hf_text.ClassifierHeads`; a causal LM's next-token logits ``[B, T, V]`` passed through,
:class:`fusion.pools.hf_causal_lm.NextTokenHeads`, whose rows :func:`fusion.train.objectives.token_rows` picks). Only
the encoder is merged: the heads stay per task.
:class:`fusion.pools.pool.ModelPool` (mini8, a saved directory, open_clip and HF CLIP checkpoints, HF
sequence-classification checkpoints) honours it;
:func:`check_model_pool` enforces it where ``conf/modelpool`` is instantiated, naming what an object lacks.
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Protocol, runtime_checkable

import torch
from torch import Tensor, nn

from fusion.utils import missing_members


class PoolContractError(TypeError):
    """A model pool or its heads do not offer a member of the contract."""


@runtime_checkable
class Heads(Protocol):
    """The backbone adapter: frozen per-task classifiers over encoder features (never merged)."""

    tasks: list[str]

    def __call__(self, features: Tensor, task: str) -> Tensor:
        """Logits ``[B, C_task]`` of features ``[B, D]``."""

    def num_classes(self, task: str) -> int: ...

    def to(self, device: str | torch.device) -> Any: ...


@runtime_checkable
class Backbone(Protocol):
    """A model pool: a frozen encoder, its experts and heads (see the module docstring)."""

    name: str
    encoder: nn.Module
    heads: Heads
    manifest: dict
    mlp_pattern: str | None  # regex of the encoder's transformer-MLP module paths (routed methods' default); None:
    # the pool declares none (fusion.param.routed.MLP_PATTERN, open_clip's and HF CLIP's, applies)
    exporter: Any  # (merged encoder state, directory) -> {name: directory written} (export_model=true), or None

    @property
    def tasks(self) -> list[str]: ...

    @property
    def candidates(self) -> list[str]:
        """The names of the stacked task vectors: :attr:`tasks`, then any distractors (experts with no task)."""

    @property
    def pool_hash(self) -> str: ...

    def to(self, device: str | torch.device) -> "Backbone": ...

    def task_vectors(self, dtype: torch.dtype | None = None,
                     device: str | torch.device | None = None) -> dict[str, Tensor]:
        """Stacked ``{name: Tensor[K + M, *shape]}`` in the order of :attr:`candidates`."""

    def pretrained_state(self) -> dict[str, Tensor]: ...

    def expert_state(self, task: str) -> dict[str, Tensor]: ...

    def expert_encoder(self, task: str) -> nn.Module: ...

    def content_key(self) -> str:
        """A hash of the weights (for caches of measured results)."""


POOL_MEMBERS: Sequence[str] = ("name", "encoder", "heads", "manifest", "mlp_pattern", "exporter", "tasks",
                               "candidates", "pool_hash", "to", "task_vectors", "pretrained_state", "expert_state",
                               "expert_encoder", "content_key")
HEADS_MEMBERS: Sequence[str] = ("tasks", "__call__", "num_classes", "to")


def check_model_pool(pool: object, source: str = "modelpool") -> Backbone:
    """``pool`` if it and its heads honour the contract, else :class:`PoolContractError` naming what they lack."""
    cls = f"{type(pool).__module__}.{type(pool).__qualname__}"
    missing = missing_members(pool, POOL_MEMBERS)
    if missing:
        raise PoolContractError(f"{source}: {cls} is not a model pool: it lacks {missing} (the contract is "
                                f"fusion.pools.contract.Backbone: {list(POOL_MEMBERS)})")
    missing = missing_members(pool.heads, HEADS_MEMBERS)
    if missing:
        raise PoolContractError(f"{source}: the heads of {cls} lack {missing} (the contract is "
                                f"fusion.pools.contract.Heads: {list(HEADS_MEMBERS)})")
    return pool  # type: ignore[return-value]
