"""The contract every merge parametrization honours: what the loop, the runner and the report call on it.

A *parametrization* is an ``nn.Module`` over a frozen base encoder and frozen task vectors whose trainable
parameters ``φ`` define the merged weights (task-/layer-wise λ, Concrete masks, WEMoE/SMEAR routers). Who calls what:

- the loop (:class:`fusion.train.module.MergeTraining`): :meth:`~Parametrization.prepare` once per step, the forward
  per task, :meth:`~Parametrization.reduce_gradients_` after the backward, :meth:`~Parametrization.stats` on logged
  steps; bi-level training (:mod:`fusion.train.bilevel`) adds :meth:`~Parametrization.inner_parameters`,
  :meth:`~Parametrization.outer_parameters` and :meth:`~Parametrization.outer_detached`;
- ``trainer=fsdp`` (:mod:`fusion.train.strategies`): :meth:`~Parametrization.shard_task_vectors`;
- the runner (:class:`fusion.methods.learned.LearnedMerge`): :meth:`~Parametrization.export` for the encoder it
  evaluates, :meth:`~Parametrization.record` for what the report writes (:mod:`fusion.report.merge_files`),
  :meth:`~Parametrization.sharding_info`; for input-dependent models the evaluate layer measures the routing with
  :meth:`~Parametrization.collect_routing`.

A capability that only some parametrizations have is declared here with its default in :class:`ParametrizationBase`
(sharding refuses, one-level training, no routing); nobody asks an object what it can do with ``hasattr``.
:func:`check_parametrization` is the boundary check the runner applies to what a config built;
``tests/test_contract.py`` runs the behavioural contract over every learned config in ``conf/method/``.
"""
from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

from torch import Tensor, nn


class InputDependentError(TypeError):
    """``merge_and_unload`` on a model whose weights depend on its input (a router)."""


class NotShardableError(TypeError):
    """``trainer=fsdp`` with a merge whose task vectors cannot be sharded."""


class ContractError(TypeError):
    """An object given as a parametrization does not offer what the contract declares."""


@dataclass
class MergeRecord:
    """What a trained parametrization learned, as data; :func:`fusion.report.merge_files.write_merge_record` writes it.

    Attributes:
        tensor_names: the merged parameter tensors, in model order (the columns of layer-wise λ); ``[]`` for routers.
        trainable: ``{name: tensor}`` of every trainable parameter (``<parameters_file>.safetensors``).
        parameters_file: the stem of the file ``trainable`` is written to.
        title: what the plots are titled by (the method's name).
        coefficients: λ as used in the merge, ``[K]`` or ``[K, L]`` (``coefficients.json`` and its heatmap).
        mask: the Concrete evaluation mask ``{name: Tensor[*shape]}`` (before the ``/mean`` rescale).
        mask_logits: the mask's logits ``{name: Tensor[*shape]}`` (the same tensors as in ``trainable``, by name).
        mask_info: the mask's summary (kept fractions, temperatures) for results.json.
        routers: the router parameters of an input-dependent model (``routed_model/routers.safetensors``).
        routed_spec: the construction config that rebuilds the routed model (``routed_model/routed_config.json``).
        routing: ``Tensor[tasks, K]``, the mean routing weight per expert on each task's test images (measured by
            the runner with :func:`fusion.evaluate.routing_matrix`; ``routing.json`` and its heatmap).
    """

    tensor_names: list[str]
    trainable: dict[str, Tensor]
    parameters_file: str = "merge_parameters"
    title: str = ""
    coefficients: Tensor | None = None
    mask: dict[str, Tensor] | None = None
    mask_logits: dict[str, Tensor] | None = None
    mask_info: dict[str, Any] = field(default_factory=dict)
    routers: dict[str, Tensor] | None = None
    routed_spec: dict[str, Any] | None = None
    routing: Tensor | None = None


@runtime_checkable
class Weighting(Protocol):
    """The trainable part ``δ_φ`` of :class:`fusion.param.merged.MergedEncoder`: stacked task vectors → update."""

    def __call__(self, task_vectors: Mapping[str, Tensor]) -> dict[str, Tensor]:
        """``{name: Tensor[*shape]}``, the update ``δ`` for stacked ``{name: Tensor[K, *shape]}``."""

    def stats(self) -> dict[str, float]:
        """Scalars to log (e.g. ``lambda_mean``)."""

    def coefficients(self) -> Tensor | None:
        """λ as used in the merge (``[K]`` or ``[K, L]``), or ``None`` when the weighting has none."""

    def elementwise_split(self) -> tuple[Callable, Callable | None]:
        """``(elementwise, finish)``: the part that runs on chunks of τ and the rest on the gathered ``δ``
        (``trainer=fsdp``); :class:`NotShardableError` when the weighting is not elementwise in τ."""


@runtime_checkable
class Parametrization(Protocol):
    """A learned merge over frozen task vectors (see the module docstring for who calls what)."""

    input_dependent: bool  # routers: the merged weights depend on each input, so no single static model exists

    def prepare(self) -> dict[str, Tensor]:
        """The merged parameters of this step (differentiable in φ); ``{}`` when they depend on each input."""

    def forward(self, images: Tensor, state: Mapping[str, Tensor] | None = None) -> Tensor:
        """Features of ``images`` under ``state`` (from :meth:`prepare`; fresh when ``None``)."""

    def merge_and_unload(self) -> nn.Module:
        """A plain frozen encoder whose outputs equal this model's; :class:`InputDependentError` for routers."""

    def export(self) -> nn.Module:
        """The encoder to evaluate: :meth:`merge_and_unload`, or the model itself in eval mode (routers)."""

    def stats(self) -> dict[str, float]:
        """Scalars to log (e.g. ``lambda_mean``); read the device, so called only on logged steps."""

    def record(self) -> MergeRecord:
        """What was learned, for the report."""

    def reduce_gradients_(self) -> None:
        """After the backward: combine partial gradients across ranks (sharded task vectors); else nothing."""

    def shard_task_vectors(self, group: Any = None) -> dict[str, int]:
        """Keep this rank's chunk of the task vectors (``trainer=fsdp``); :class:`NotShardableError` if impossible."""

    def sharding_info(self) -> dict[str, int] | None:
        """What :meth:`shard_task_vectors` returned, or ``None`` when unsharded."""

    def inner_parameters(self) -> list[nn.Parameter]:
        """Bi-level training: the inner variables (Concrete AdaMerging's λ); ``[]`` for one-level merges."""

    def outer_parameters(self) -> list[nn.Parameter]:
        """Bi-level training: the outer variables (the mask logits); every trainable parameter otherwise."""

    def outer_detached(self) -> contextlib.AbstractContextManager:
        """Inside, no gradient reaches the outer variables (the inner step of bi-level training)."""

    def collect_routing(self) -> contextlib.AbstractContextManager:
        """Input-dependent models: ``with model.collect_routing() as rec`` records every block's routing weights
        (``rec.mean()``: ``Tensor[K]``, ``rec.clear()``)."""


class ParametrizationBase(nn.Module):
    """The declared defaults of :class:`Parametrization`; implementations subclass it and override what applies."""

    input_dependent = False

    def export(self) -> nn.Module:
        return self.eval() if self.input_dependent else self.merge_and_unload()

    def stats(self) -> dict[str, float]:
        return {}

    def trainable_state(self) -> dict[str, Tensor]:
        """``{name: detached float32 tensor}`` of every trainable parameter (what ``merge_parameters`` holds)."""
        return {n: p.detach().float() for n, p in self.named_parameters() if p.requires_grad}

    def record(self) -> MergeRecord:
        return MergeRecord(tensor_names=[], trainable=self.trainable_state())

    def reduce_gradients_(self) -> None:
        return None

    def shard_task_vectors(self, group: Any = None) -> dict[str, int]:
        raise NotShardableError(f"trainer=fsdp shards the task vectors of coefficient and Concrete merges; "
                                f"{type(self).__name__} cannot be sharded: use trainer=ddp (and method.tv_dtype="
                                "bfloat16 to halve the task vectors)")

    def sharding_info(self) -> dict[str, int] | None:
        return None

    def inner_parameters(self) -> list[nn.Parameter]:
        return []

    def outer_parameters(self) -> list[nn.Parameter]:
        return [p for p in self.parameters() if p.requires_grad]

    def outer_detached(self) -> contextlib.AbstractContextManager:
        return contextlib.nullcontext()

    @contextlib.contextmanager
    def collect_routing(self) -> Iterator[Any]:
        raise TypeError(f"{type(self).__name__} does not route its inputs (input_dependent is False)")
        yield  # pragma: no cover


MEMBERS = ("input_dependent", "prepare", "forward", "merge_and_unload", "export", "stats", "record",
           "reduce_gradients_", "shard_task_vectors", "sharding_info", "inner_parameters", "outer_parameters",
           "outer_detached", "collect_routing", "parameters", "train", "eval")


def check_parametrization(model: Any, where: str) -> Any:
    """``model`` if it offers every member of :class:`Parametrization` and has trainable parameters, else
    :class:`ContractError` naming ``where`` (e.g. the config key that built it) and what is missing.

    The one membership test of the package, at the boundary where a config's object enters the runner (as
    :func:`fusion.data.contract.check_task_pool` for task pools); past it, callers use the declared methods.
    """
    missing = [m for m in MEMBERS if not hasattr(model, m)]
    if missing:
        raise ContractError(f"{where}: {type(model).__name__} is not a merge parametrization: it lacks {missing} "
                            "(subclass fusion.param.contract.ParametrizationBase and implement prepare, forward and "
                            "merge_and_unload)")
    if not isinstance(model.input_dependent, bool):
        raise ContractError(f"{where}: {type(model).__name__}.input_dependent must be a bool, got "
                            f"{model.input_dependent!r}")
    if not any(p.requires_grad for p in model.parameters()):
        raise ContractError(f"{where}: {type(model).__name__} has no trainable parameters: nothing would be learned")
    return model
