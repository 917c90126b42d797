"""The packed input of a causal language model: one int64 tensor ``x: [B, 3, T]`` and next-token labels ``[B, T]``.

``x[:, 0]`` token ids, ``x[:, 1]`` attention mask, ``x[:, 2]`` each token's role: ``PADDING`` (0), ``PROMPT`` (1),
``COMPLETION`` (2). An example is ``prompt ⊕ completion ⊕ eos``, right-padded; the eos is a completion token (the
model learns to stop). Labels ``y[t] = ids[t + 1]`` at every position ``t`` whose next token is a completion token,
``IGNORE_INDEX`` (−100, torch's and transformers' ignore index) elsewhere. :mod:`fusion.data.instruction_tasks`
makes them; :class:`fusion.pools.hf_causal_lm.CausalLMEncoder` reads ids and mask;
:func:`fusion.train.objectives.token_rows` picks the rows an objective or metric reads (by labels or by role).
"""
from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

PADDING, PROMPT, COMPLETION = 0, 1, 2
IGNORE_INDEX = -100


def pack_example(prompt: Sequence[int], completion: Sequence[int], length: int, pad_id: int) -> Tensor | None:
    """``[3, length]`` int64 (ids, mask, role) of ``prompt ⊕ completion`` (the caller appends eos to the completion),
    the completion cut at ``length``; ``None`` when the prompt alone fills ``length`` (no completion token fits)."""
    if len(prompt) >= length:
        return None
    completion = list(completion)[:length - len(prompt)]
    ids = list(prompt) + completion
    out = torch.zeros(3, length, dtype=torch.long)
    out[0].fill_(pad_id)
    out[0, :len(ids)] = torch.as_tensor(ids, dtype=torch.long)
    out[1, :len(ids)] = 1
    out[2, :len(prompt)] = PROMPT
    out[2, len(prompt):len(ids)] = COMPLETION
    return out


def next_token_labels(x: Tensor) -> Tensor:
    """``[B, T]`` int64: ``x[:, 0, t + 1]`` where ``x[:, 2, t + 1]`` is ``COMPLETION``, else ``IGNORE_INDEX``."""
    ids, role = x[:, 0], x[:, 2]
    labels = torch.full_like(ids, IGNORE_INDEX)
    target = role[:, 1:] == COMPLETION
    labels[:, :-1] = torch.where(target, ids[:, 1:], labels[:, :-1])
    return labels
