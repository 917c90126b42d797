"""Frozen zero-shot classification heads and the backbone adapter ``(features, task) -> logits``.

CLIP recipe (Radford et al., 2021): each class's text embedding is the mean of the normalised embeddings
of its prompt templates, renormalised; logits are ``logit_scale · cos(image, class)``.
"""
from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class ZeroShotHeads(nn.Module):
    """Per-task frozen class-embedding matrices ``[C_t, D]``; ``forward(features, task) -> logits [B, C_t]``.

    The :class:`fusion.pools.contract.Heads` of every pool.
    """

    def __init__(self, heads: Mapping[str, Tensor], logit_scale: float):
        super().__init__()
        if not heads:
            raise ValueError("ZeroShotHeads needs at least one task head, got none")
        self.tasks = list(heads)
        for task, weight in heads.items():
            if weight.dim() != 2:
                raise ValueError(f"head for task '{task}' must be [num_classes, dim], got {tuple(weight.shape)}")
            self.register_buffer(f"head_{task}", F.normalize(weight.float(), dim=-1))
        self.logit_scale = float(logit_scale)

    def weight(self, task: str) -> Tensor:
        """The ``[C_t, D]`` class embeddings of ``task``."""
        if task not in self.tasks:
            raise KeyError(f"no zero-shot head for task '{task}'; this pool has heads for {self.tasks}")
        return getattr(self, f"head_{task}")

    def num_classes(self, task: str) -> int:
        return self.weight(task).shape[0]

    def forward(self, features: Tensor, task: str) -> Tensor:
        weight = self.weight(task)
        return self.logit_scale * F.normalize(features.float(), dim=-1) @ weight.to(features.device).T

    def state(self) -> dict[str, Tensor]:
        """The heads as ``{task: Tensor[C_t, D]}`` (for saving)."""
        return {t: self.weight(t) for t in self.tasks}


@torch.no_grad()
def class_embeddings(encode_text: Callable[[Tensor], Tensor], tokenize: Callable[[list[str]], Tensor],
                     classnames: Sequence[str], templates: Sequence[str]) -> Tensor:
    """``[C, D]``: per class, the renormalised mean of its normalised template embeddings."""
    captions = [t.format(c) for c in classnames for t in templates]
    emb = F.normalize(encode_text(tokenize(captions)).float(), dim=-1)
    emb = emb.reshape(len(classnames), len(templates), -1).mean(1)
    return F.normalize(emb, dim=-1)
