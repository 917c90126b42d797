"""Tied parameters: one tensor reachable under several state-dict names (T5's shared embedding and, in T5 v1.0,
its LM head; GPT-2's and Llama's tied input/output embeddings).

``module.state_dict()`` lists such a tensor once per name, ``module.named_parameters()`` once (under its first
name). A model pool works in the second view (:meth:`fusion.pools.pool.ModelPool.pretrained_state`): each tied
tensor is ONE entry of θ0, of every expert and of every task vector — merged once, counted once by methods that rank
or normalise over all parameters (TIES, DARE, ...), and named as :func:`torch.func.functional_call` expects (it ties
the other names to it). Loading such a state back (:func:`with_aliases`) writes the tied tensor through every name,
so the ties of the module survive a merge.
"""
from __future__ import annotations

from collections.abc import Mapping

from torch import Tensor, nn


def tied_aliases(module: nn.Module) -> dict[str, str]:
    """``{alias: first name}`` of the state-dict entries of ``module`` that are the same tensor as an earlier
    entry (state-dict order, which is the order :meth:`nn.Module.named_parameters` keeps first names in)."""
    first: dict[int, str] = {}
    aliases = {}
    for name, tensor in module.state_dict(keep_vars=True).items():
        if id(tensor) in first:
            aliases[name] = first[id(tensor)]
        else:
            first[id(tensor)] = name
    return aliases


def untied_state(module: nn.Module) -> dict[str, Tensor]:
    """``module.state_dict()`` (detached) with each tied tensor under its first name only."""
    aliases = tied_aliases(module)
    return {k: v.detach() for k, v in module.state_dict().items() if k not in aliases}


def with_aliases(module: nn.Module, state: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """``state`` (as :func:`untied_state` gives it) completed with every alias of ``module``, for a strict
    ``load_state_dict``: an alias gets its first name's tensor."""
    return {**state, **{alias: state[name] for alias, name in tied_aliases(module).items() if name in state}}
