"""Sharded task vectors: fully sharded data parallel for learned merges (``trainer=fsdp``).

A learned merge's memory is its ``K`` frozen task vectors (``K`` × the model); its trainable parameters are a few
coefficients (or one mask logit per weight). torch's FSDP shards *trainable* parameters, their gradients and optimizer
states, which here are small, and leaves the task-vector buffers whole on every rank. So fusion shards what holds
the memory:

- every ``τ_k^l`` is flattened, zero-padded to a multiple of ``N`` (the ranks) and cut into ``N`` equal chunks;
  rank ``r`` keeps chunk ``r`` of every task's every tensor, in one ``[K, Σ_l ⌈P_l/N⌉]`` buffer;
- the merge is elementwise in ``τ`` (``δ^l_j = Σ_k λ_k^l τ^l_{k,j}``), so each rank computes its chunk of ``δ``
  and ONE all-gather per merge assembles the full ``δ``;
- backward: the all-gather's adjoint is a reduce-scatter, so rank ``r`` receives ``Σ_ranks ∂L/∂δ`` on its chunk
  and its coefficient gradient is the partial inner product with its own ``τ`` chunk; one all-reduce of the
  (replicated, small) trainable gradients sums the partials and averages over ranks, which is DDP's mean gradient.

Per rank: ``θ_0`` + ``K/N`` task vectors + the merged state; per merge: one all-gather and one reduce-scatter of
the model's size, plus one all-reduce of the trainable gradients. The layout math is pure and tested without
processes; :func:`all_gather_rows` is the only collective.
"""
from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import Tensor



def rank_and_world(group=None) -> tuple[int, int]:
    """This process's rank and its process group's size; ``(0, 1)`` without a process group."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(group), dist.get_world_size(group)
    return 0, 1


def chunk_size(numel: int, world: int) -> int:
    """Elements per rank of a tensor of ``numel`` elements cut into ``world`` equal (padded) chunks."""
    return -(-numel // world)


@dataclass(frozen=True)
class ShardLayout:
    """Where rank ``rank`` of ``world`` keeps its chunk of each tensor inside one flat row of length ``width``."""

    names: tuple[str, ...]
    shapes: tuple[tuple[int, ...], ...]
    rank: int
    world: int

    @classmethod
    def of(cls, task_vectors: Mapping[str, Tensor], rank: int, world: int) -> ShardLayout:
        """The layout of stacked task vectors ``{name: Tensor[K, *shape]}``."""
        if not 0 <= rank < world:
            raise ValueError(f"rank must be in [0, world={world}), got {rank}")
        return cls(tuple(task_vectors), tuple(tuple(t.shape[1:]) for t in task_vectors.values()), rank, world)

    @property
    def chunks(self) -> list[int]:
        return [chunk_size(int(torch.Size(s).numel()), self.world) for s in self.shapes]

    @property
    def width(self) -> int:
        return sum(self.chunks)

    def shard(self, task_vectors: Mapping[str, Tensor]) -> Tensor:
        """This rank's chunks of every tensor, zero-padded, side by side: ``Tensor[K, width]`` (a copy)."""
        rows = []
        for t, c in zip(task_vectors.values(), self.chunks):
            flat = t.reshape(t.shape[0], -1)[:, self.rank * c:(self.rank + 1) * c]
            rows.append(torch.nn.functional.pad(flat, (0, c - flat.shape[1])))
        return torch.cat(rows, dim=1)

    def views(self, rows: Tensor) -> dict[str, Tensor]:
        """``{name: rows[..., chunk]}``: views of a ``[..., width]`` tensor, one per tensor."""
        return dict(zip(self.names, rows.split(self.chunks, dim=-1)))

    def flatten(self, chunks: Mapping[str, Tensor]) -> Tensor:
        """The inverse of :meth:`views` for one row: ``{name: Tensor[chunk]}`` → ``Tensor[width]``."""
        return torch.cat([chunks[n].reshape(-1) for n in self.names])

    def assemble(self, gathered: Tensor) -> dict[str, Tensor]:
        """Full tensors from every rank's row (``Tensor[world, width]``, rank order): ``{name: Tensor[*shape]}``."""
        out = {}
        for (name, part), shape in zip(self.views(gathered).items(), self.shapes):
            out[name] = part.reshape(-1)[:torch.Size(shape).numel()].reshape(shape)
        return out

    def describe(self, num_tasks: int) -> dict[str, int]:
        """Sizes for results.json: the task-vector elements this rank holds against the unsharded total."""
        full = sum(torch.Size(s).numel() for s in self.shapes)
        return {"world_size": self.world, "rank": self.rank, "task_vector_numel_per_rank": num_tasks * self.width,
                "task_vector_numel_unsharded": num_tasks * full}


# torch ≥ 2.14 names them *_single (the *_tensor names are deprecated there); torch 2.4 has only *_tensor
_all_gather_flat = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
_reduce_scatter_flat = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor


class _GatherRows(torch.autograd.Function):
    """All-gather of one row per rank; the backward reduce-scatters (sums the ranks' gradients of each row)."""

    @staticmethod
    def forward(ctx, row: Tensor, group) -> Tensor:
        ctx.group = group
        out = row.new_empty(dist.get_world_size(group) * row.numel())
        _all_gather_flat(out, row.contiguous(), group=group)
        return out.view(-1, row.numel())

    @staticmethod
    def backward(ctx, grad: Tensor):
        out = grad.new_empty(grad.shape[1])
        _reduce_scatter_flat(out, grad.contiguous().view(-1), group=ctx.group)
        return out, None


def all_gather_rows(row: Tensor, group=None) -> Tensor:
    """Every rank's ``row`` stacked in rank order (``Tensor[world, width]``); differentiable (the backward is a
    reduce-scatter summing the ranks' gradients); no collective with a single process."""
    if rank_and_world(group)[1] == 1:
        return row[None]
    return _GatherRows.apply(row, group)


def average_gradients_(params, group=None) -> None:
    """All-reduce the gradients of ``params`` (those that have one) in one flat buffer and divide by the ranks."""
    world = rank_and_world(group)[1]
    params = [p for p in params if p.grad is not None]
    if world == 1 or not params:
        return
    flat = torch.cat([p.grad.reshape(-1).float() for p in params])
    dist.all_reduce(flat, group=group)
    flat /= world
    for p, g in zip(params, flat.split([p.numel() for p in params])):
        p.grad.copy_(g.view_as(p.grad))
