"""RegMean++ (Nguyen, Huu-Tien, Suzuki & Nguyen, 2025, "RegMean++: Enhancing Effectiveness and Generalization of
Regression Mean for Model Merging", arXiv 2508.03121).

RegMean's closed form (:func:`fusion.merge.regmean.regmean_merge`) per linear layer, with one change in where the
Gram matrices come from: the input ``X_k^(l)`` of block ``l`` for task k is computed by the *merged* model, whose
blocks ``< l`` are already merged (``X_k^(l) = f_M^(l−1)(X_k^(l−1))``), instead of by expert k's own earlier
blocks. So the merge runs block by block:

1. parameters outside the blocks (patch/class/positional embeddings, ``ln_pre``, ``ln_post``, ``proj``) are
   averaged, as RegMean does; task k's images go through the merged stem to the input of block 0;
2. for each block ``l``: expert k's block ``l`` runs on task k's merged-model inputs and hooks collect the Grams
   of its ``nn.Linear`` layers (inside a block the later linears thus see expert k's own earlier sublayers, as in
   FusionBench's ``regmean_plusplus``); the block is merged with :func:`fusion.merge.regmean.regmean` (linear
   weights by RegMean, everything else averaged); task k's inputs go through the *merged* block to block ``l+1``.

open_clip's attention projections are not ``nn.Linear`` calls (see :mod:`fusion.merge.regmean`) and are averaged,
as in RegMean. Deviation from FusionBench: it keeps the pretrained ``post_layernorm`` (HF CLIP); here every
parameter outside the blocks is averaged, as our RegMean does. The blocks are the encoder's ``nn.ModuleList``
(open_clip ``transformer.resblocks``; :func:`find_blocks`), applied in sequence as ``x ← block(x, *rest)`` with the
same ``rest`` (e.g. ``attn_mask``) for every block, which is how open_clip and HF CLIP encoders call them.
"""
from __future__ import annotations

import copy
import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from fusion.merge.regmean import default_linear_names, gram_matrices, regmean
from fusion.merge.task_vectors import HyperparameterError, StateDict
from fusion.pools.tied import untied_state, with_aliases

log = logging.getLogger(__name__)


@dataclass
class BlockInput:
    """The positional and keyword arguments one block received for one batch."""

    args: tuple
    kwargs: dict[str, Any]

    def replay(self, block: nn.Module) -> Tensor:
        """``block``'s output on these arguments (the first element when it returns a tuple, as HF layers do)."""
        out = block(*self.args, **self.kwargs)
        return out[0] if isinstance(out, tuple) else out

    def next(self, block: nn.Module) -> "BlockInput":
        """The next block's input: ``block``'s output in place of the first argument, the rest unchanged."""
        return BlockInput((self.replay(block), *self.args[1:]), self.kwargs)


class _Reached(Exception):
    """Raised by a forward pre-hook to stop the forward once the block's input is known."""

    def __init__(self, args: tuple, kwargs: dict):
        super().__init__()
        self.inputs = BlockInput(args, kwargs)


def find_blocks(model: nn.Module) -> str:
    """Name of the model's sequence of blocks: its non-empty ``nn.ModuleList`` holding the most parameters
    (open_clip's ``transformer.resblocks``, HF CLIP's ``encoder.layers``, GPT-2's ``h``, Llama's ``layers``). A model
    with two stacks of blocks (T5's ``encoder.block`` and ``decoder.block``) is refused: its stacks are not one chain."""
    lists = [(n, m) for n, m in model.named_modules() if isinstance(m, nn.ModuleList) and len(m) > 0]
    if not lists:
        raise HyperparameterError(f"regmean_plusplus merges block by block but {type(model).__name__} has no "
                                  "nn.ModuleList of blocks; set the method's `blocks` to the name of the module "
                                  "sequence its forward runs in order, or use method=regmean")
    size = {n: sum(p.numel() for p in m.parameters()) for n, m in lists}
    stacks = [n for n in size if size[n] > 0.1 * max(size.values())
              and not any(n.startswith(f"{other}.") for other in size)]
    if len(stacks) > 1:
        raise HyperparameterError(f"regmean_plusplus merges one chain of blocks, each fed by the merged previous "
                                  f"one, but {type(model).__name__} has {len(stacks)} stacks {stacks} (an encoder-"
                                  "decoder; T5's blocks also pass position biases between them); use method=regmean")
    return max(size, key=size.get)


def block_inputs(model: nn.Module, block: nn.Module, forward: Callable[[nn.Module, Tensor], object],
                 batches: Sequence[Tensor]) -> list[BlockInput]:
    """What ``block`` (a submodule of ``model``) receives when ``forward(model, batch)`` runs, per batch; the
    forward stops at the block (run under ``torch.no_grad``)."""
    def stop(module: nn.Module, args: tuple, kwargs: dict) -> None:
        raise _Reached(args, kwargs)

    captured = []
    handle = block.register_forward_pre_hook(stop, with_kwargs=True)
    try:
        for batch in batches:
            try:
                forward(model, batch)
            except _Reached as reached:
                captured.append(reached.inputs)
            else:
                raise ValueError(f"block_inputs: the model's forward never called the block {type(block).__name__}")
    finally:
        handle.remove()
    return captured


def _average(experts: Sequence[Mapping[str, Tensor]], reference: Mapping[str, Tensor]) -> StateDict:
    """The experts' mean for float entries, ``reference``'s value for the others."""
    return {n: torch.stack([e[n] for e in experts]).mean(0) if t.is_floating_point() else t
            for n, t in reference.items()}


def _block_grams(block: nn.Module, states: Sequence[StateDict], inputs: Sequence[list[BlockInput]],
                 dtype: torch.dtype) -> list[dict]:
    """Per task k: the Grams of ``block``'s linears with expert k's block weights ``states[k]`` on ``inputs[k]``."""
    scratch, linears = copy.deepcopy(block), default_linear_names(block)
    grams = []
    for state, task_inputs in zip(states, inputs):
        scratch.load_state_dict(state)
        grams.append(gram_matrices(scratch, lambda m, inp: inp.replay(m), task_inputs, linears, dtype=dtype))
    return grams


@torch.no_grad()
def regmean_plusplus(model: nn.Module, experts: Sequence[Mapping[str, Tensor]], batches: Sequence[Sequence[Tensor]],
                     forward: Callable[[nn.Module, Tensor], object] = lambda m, x: m(x), alpha: float = 0.95, *,
                     blocks: str | None = None, ridge: float = 0.0,
                     gram_dtype: torch.dtype = torch.float32) -> tuple[StateDict, list[dict[str, Tensor]]]:
    """RegMean++: RegMean merged block by block on inputs propagated through the merged model (module docstring).

    Args:
        model: the architecture (e.g. the pool's θ0 encoder); it is copied, not changed.
        experts: K state dicts ``θ_k`` of ``model``.
        batches: K sequences of input batches; ``batches[k]`` are task k's (unlabeled) inputs.
        forward: ``forward(model, batch)``; its result is ignored.
        alpha, ridge: RegMean's off-diagonal scale (0.95) and ridge (:func:`fusion.merge.regmean.regmean_merge`).
        blocks: name of the ``nn.ModuleList`` of blocks; ``None`` uses :func:`find_blocks`.
        gram_dtype: accumulation dtype of the Grams (float32, as :class:`RegMeanMerge`).
    Returns:
        ``(θ*, grams)``: the merged state dict ``{name: Tensor}`` and, per task, the Grams the merge used,
        ``{module name: Tensor[in, in]}`` for every ``nn.Linear`` inside the blocks.
    """
    if len(experts) != len(batches) or not experts:
        raise ValueError(f"regmean_plusplus needs one batch list per expert, got {len(experts)} experts and "
                         f"{len(batches)} batch lists")
    merged = copy.deepcopy(model)
    merged.load_state_dict(with_aliases(merged, _average(experts, untied_state(merged))))
    name = blocks if blocks is not None else find_blocks(merged)
    sequence = merged.get_submodule(name)
    outside = [n for n in default_linear_names(merged) if not n.startswith(f"{name}.")]
    if outside:
        log.warning(f"regmean_plusplus: {len(outside)} nn.Linear layers lie outside the blocks '{name}' "
                    f"(e.g. '{outside[0]}') and are averaged, not fitted")
    inputs = [block_inputs(merged, sequence[0], forward, task_batches) for task_batches in batches]
    grams: list[dict[str, Tensor]] = [{} for _ in experts]
    for i, block in enumerate(sequence):
        prefix = f"{name}.{i}."
        device = next(iter(block.state_dict().values())).device
        local = [{n[len(prefix):]: v.to(device) for n, v in e.items() if n.startswith(prefix)} for e in experts]
        local_grams = _block_grams(block, local, inputs, gram_dtype)
        block.load_state_dict(regmean(block.state_dict(), local, local_grams, alpha, ridge=ridge))
        for task_grams, block_grams in zip(grams, local_grams):
            task_grams.update({prefix + n: g for n, g in block_grams.items()})
        if i + 1 < len(sequence):
            inputs = [[inp.next(block) for inp in task_inputs] for task_inputs in inputs]
    return untied_state(merged), grams
