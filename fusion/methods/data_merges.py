"""Static merges that read a few unlabeled task inputs: Fisher merging and RegMean.

Both draw ``num_samples`` images per task from the task's *train* split (seeded; labels unused) — the
FusionBench protocol (256 per task) — and never touch the test split.
"""
from __future__ import annotations

import logging

import torch

from fusion.data.contract import check_task_dataset
from fusion.errors import ConfigError
from fusion.merge.fisher import diagonal_fisher, fisher_merge_delta
from fusion.merge.regmean import default_linear_names, gram_matrices, regmean_delta
from fusion.methods.base import MergeOutcome, RunContext
from fusion.methods.static import merged_encoder
from fusion.pools.pool import require_no_distractors

log = logging.getLogger(__name__)


def sample_labeled_batches(taskpool, task: str, num_samples: int, batch_size: int, seed: int, split: str = "train",
                           device: str | torch.device = "cpu") -> list[tuple[torch.Tensor, torch.Tensor]]:
    """``num_samples`` seeded examples of ``task``'s ``split`` as ``([B, 3, H, W], [B])`` batches on ``device``."""
    if num_samples < 1 or batch_size < 1:
        raise ConfigError(f"num_samples and batch_size must be ≥ 1, got {num_samples} and {batch_size}")
    ds = check_task_dataset(taskpool.dataset(task, split), f"task '{task}' ({split})")
    idx = torch.randperm(len(ds), generator=torch.Generator().manual_seed(seed))[:num_samples]
    return [tuple(t.to(device) for t in ds.batch(idx[i:i + batch_size])) for i in range(0, len(idx), batch_size)]


def sample_batches(taskpool, task: str, num_samples: int, batch_size: int, seed: int, split: str = "train",
                   device: str | torch.device = "cpu") -> list[torch.Tensor]:
    """The images of :func:`sample_labeled_batches` (the same seeded draw): ``[B, 3, H, W]`` batches."""
    return [x for x, _ in sample_labeled_batches(taskpool, task, num_samples, batch_size, seed, split, device)]


class FisherMerge:
    """Fisher merging (Matena & Raffel, 2022): ``θ = Σ_k F̂_k θ_k / Σ_k F̂_k`` with diagonal Fishers estimated
    on ``num_samples`` unlabeled train images per task, labels sampled from the model's own predictions."""

    def __init__(self, name: str = "fisher_merging", num_samples: int = 256, batch_size: int = 32,
                 floor: float = 1e-6, normalize: bool = True):
        self.name, self.num_samples, self.batch_size = name, num_samples, batch_size
        self.floor, self.normalize = floor, normalize

    def run(self, pool, taskpool, ctx: RunContext) -> MergeOutcome:
        require_no_distractors(pool, self.name)
        fishers, experts = [], []
        for i, task in enumerate(pool.tasks):
            model = pool.expert_encoder(task)
            batches = sample_batches(taskpool, task, self.num_samples, self.batch_size, ctx.seed + i,
                                     device=ctx.device)
            params = {n: p for n, p in model.named_parameters() if p.is_floating_point()}
            fishers.append(diagonal_fisher(model, params, lambda m, x, t=task: pool.heads(m(x), t), batches,
                                           seed=ctx.seed + i))
            experts.append(pool.expert_state(task))
        delta = fisher_merge_delta(pool.pretrained_state(), experts, fishers, floor=self.floor,
                                   normalize=self.normalize)
        info = {"num_samples_per_task": self.num_samples, "floor": self.floor, "normalize": self.normalize}
        return MergeOutcome(merged_encoder(pool, delta), info,
                            f"Fisher merging: diagonal Fisher from {self.num_samples} unlabeled train images per task")


class RegMeanMerge:
    """RegMean (Jin et al., ICLR 2023): per linear layer ``W* = (Σ G̃_k)⁻¹ Σ G̃_k W_k`` from the Gram matrices of
    its inputs on ``num_samples`` train images per task (off-diagonals × ``alpha``); other parameters averaged.

    open_clip's attention projections are not ``nn.Linear`` calls, so they are averaged (see fusion.merge.regmean).
    """

    def __init__(self, name: str = "regmean", num_samples: int = 256, batch_size: int = 32, alpha: float = 0.95):
        if not 0.0 <= alpha <= 1.0:
            raise ConfigError(f"regmean alpha scales the Gram off-diagonals and must lie in [0, 1], got {alpha}")
        self.name, self.num_samples, self.batch_size, self.alpha = name, num_samples, batch_size, alpha

    def run(self, pool, taskpool, ctx: RunContext) -> MergeOutcome:
        require_no_distractors(pool, self.name)
        grams, experts = [], []
        for i, task in enumerate(pool.tasks):
            model = pool.expert_encoder(task)
            batches = sample_batches(taskpool, task, self.num_samples, self.batch_size, ctx.seed + i,
                                     device=ctx.device)
            grams.append(gram_matrices(model, lambda m, x: m(x), batches, default_linear_names(model)))
            experts.append(pool.expert_state(task))
        delta = regmean_delta(pool.pretrained_state(), experts, grams, self.alpha)
        info = {"num_samples_per_task": self.num_samples, "alpha": self.alpha, "regmean_layers": sorted(grams[0])}
        return MergeOutcome(merged_encoder(pool, delta), info,
                            f"RegMean: Gram matrices from {self.num_samples} unlabeled train images per task")
