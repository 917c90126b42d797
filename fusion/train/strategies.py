"""``trainer=fsdp``: data-parallel training of a merge whose task vectors are sharded across the ranks.

Lightning's ``FSDPStrategy`` wraps the LightningModule in torch's FSDP, which shards the *trainable* parameters
(here a few λ) and rejects :class:`fusion.train.module.MergeTraining`, which runs backward inside the wrapped
forward. The memory of a merge is its frozen task vectors, so this strategy shards those instead
(:mod:`fusion.param.sharding`): it is Lightning's DDP set-up (launcher, process group, rank-sliced data, rank-0
logging) without the DDP wrapper; the merged model all-gathers its update and averages its own gradients.
"""
from __future__ import annotations

import logging

import pytorch_lightning as pl
from pytorch_lightning.strategies import DDPStrategy

from fusion.train.module import MergeTraining

log = logging.getLogger(__name__)


def shard_merge(module: MergeTraining) -> dict[str, int]:
    """Shard the task vectors of ``module.model`` (in place); merges that cannot be sharded (routed merges keep
    whole experts per sample) raise :class:`fusion.param.contract.NotShardableError` naming trainer=ddp."""
    return module.model.shard_task_vectors()


class ShardedMergeStrategy(DDPStrategy):
    """DDP without the wrapper: each rank keeps ``1/N`` of every task vector (``trainer=fsdp``)."""

    def setup(self, trainer: pl.Trainer) -> None:
        info = shard_merge(self.lightning_module)  # before the model moves to its device: only the chunks move
        log.info("rank %d holds %d of %d task-vector elements", info["rank"], info["task_vector_numel_per_rank"],
                 info["task_vector_numel_unsharded"])
        super().setup(trainer)

    def configure_ddp(self) -> None:
        """No DistributedDataParallel: the merged model averages its gradients itself (``reduce_gradients_``)."""
