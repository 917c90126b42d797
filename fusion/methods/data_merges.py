"""Static merges that read a few unlabeled task inputs: Fisher merging, RegMean, RegMean++ and MaTS.

Both draw ``num_samples`` images per task from the task's *train* split (seeded; labels unused) — the
FusionBench protocol (256 per task) — and never touch the test split.
"""
from __future__ import annotations

import functools
import logging
from collections.abc import Iterator

import torch

from fusion.data.contract import check_task_dataset
from fusion.errors import ConfigError
from fusion.merge.fisher import diagonal_fisher, fisher_merge_delta
from fusion.merge.mats import mats_fisher, mats_regmean
from fusion.merge.regmean import default_linear_names, gram_matrices, regmean_delta
from fusion.merge.regmean_plusplus import regmean_plusplus
from fusion.methods.base import MergeOutcome, RunContext
from fusion.methods.static import StaticMerge, merged_encoder
from fusion.pools.pool import require_no_distractors
from fusion.train.objectives import token_rows

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


def expert_fishers(pool, taskpool, ctx: RunContext, num_samples: int, batch_size: int) -> list[dict]:
    """Each expert's diagonal Fisher ``{name: Tensor[*shape]}`` over its float parameters, from ``num_samples``
    unlabeled train inputs of its task (labels sampled from its own predictions, seeded by ``ctx.seed + k``; a causal
    LM's: one sampled next token at each prompt position, :func:`token_rows`, an example's log-likelihood the sum
    over its rows)."""
    fishers = []
    for i, task in enumerate(pool.tasks):
        model = pool.expert_encoder(task)
        batches = sample_batches(taskpool, task, num_samples, batch_size, ctx.seed + i, device=ctx.device)
        params = {n: p for n, p in model.named_parameters() if p.is_floating_point()}
        forward = lambda m, x, t=task: token_rows(pool.heads(m(x), t), None, x, labeled=False)[0]  # noqa: E731
        fishers.append(fisher_of(model, params, forward, batches, ctx.seed + i))
    return fishers


def fisher_of(model, params, forward, batches: list, seed: int) -> dict:
    """:func:`diagonal_fisher` with per-example gradients by ``vmap``; a model whose forward ``vmap`` cannot batch
    (data-dependent control flow, e.g. HF transformers' attention-mask construction) is looped over example by
    example instead, the same estimate, with a warning that says so."""
    try:
        return diagonal_fisher(model, params, forward, batches, seed=seed)
    except RuntimeError as err:
        if not str(err).startswith("vmap"):
            raise
        log.warning("Fisher: vmap cannot batch the per-example gradients of %s (data-dependent control flow in its "
                    "forward); looping over the examples instead (the same estimate, slower)", type(model).__name__)
        return diagonal_fisher(model, params, forward, batches, seed=seed, vectorize=False)


def expert_grams(pool, taskpool, ctx: RunContext, num_samples: int, batch_size: int) -> list[dict]:
    """Each expert's input Gram matrices ``{module: Tensor[in, in]}`` of its ``nn.Linear`` layers
    (:func:`default_linear_names`), from ``num_samples`` unlabeled train images of its task run through it."""
    grams = []
    for i, task in enumerate(pool.tasks):
        model = pool.expert_encoder(task)
        batches = sample_batches(taskpool, task, num_samples, batch_size, ctx.seed + i, device=ctx.device)
        grams.append(gram_matrices(model, lambda m, x: m(x), batches, default_linear_names(model)))
    return grams


class FisherMerge:
    """Fisher merging (Matena & Raffel, 2022): ``θ = Σ_k F̂_k θ_k / Σ_k F̂_k`` with diagonal Fishers estimated
    on ``num_samples`` unlabeled train images per task, labels sampled from the model's own predictions."""

    def __init__(self, name: str = "fisher_merging", num_samples: int = 256, batch_size: int = 32,
                 floor: float = 1e-6, normalize: bool = True):
        self.name, self.num_samples, self.batch_size = name, num_samples, batch_size
        self.floor, self.normalize = floor, normalize

    def run(self, pool, taskpool, ctx: RunContext) -> MergeOutcome:
        require_no_distractors(pool, self.name)
        fishers = expert_fishers(pool, taskpool, ctx, self.num_samples, self.batch_size)
        experts = [pool.expert_state(task) for task in pool.tasks]
        delta = fisher_merge_delta(pool.pretrained_state(), experts, fishers, floor=self.floor,
                                   normalize=self.normalize)
        info = {"num_samples_per_task": self.num_samples, "floor": self.floor, "normalize": self.normalize}
        return MergeOutcome(merged_encoder(pool, delta), info,
                            f"Fisher merging: diagonal Fisher from {self.num_samples} unlabeled train inputs per task")


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
        grams = expert_grams(pool, taskpool, ctx, self.num_samples, self.batch_size)
        experts = [pool.expert_state(task) for task in pool.tasks]
        delta = regmean_delta(pool.pretrained_state(), experts, grams, self.alpha)
        info = {"num_samples_per_task": self.num_samples, "alpha": self.alpha, "regmean_layers": sorted(grams[0])}
        return MergeOutcome(merged_encoder(pool, delta), info,
                            f"RegMean: Gram matrices from {self.num_samples} unlabeled train inputs per task")


def _lazy_batches(taskpool, task: str, num_samples: int, batch_size: int, seed: int,
                  device: str | torch.device) -> Iterator[torch.Tensor]:
    """:func:`sample_batches`, drawn only when iterated (one task's images in memory at a time)."""
    yield from sample_batches(taskpool, task, num_samples, batch_size, seed, device=device)


class RegMeanPlusPlusMerge:
    """RegMean++ (Nguyen et al., 2025): RegMean merged block by block, each block's Gram matrices computed from
    the inputs it receives in the already-merged model (:mod:`fusion.merge.regmean_plusplus`), on the same
    ``num_samples`` unlabeled train images per task as RegMean; ``alpha`` scales the Grams' off-diagonals.

    ``blocks`` names the encoder's ``nn.ModuleList`` of blocks (``None``: found automatically).
    """

    def __init__(self, name: str = "regmean_plusplus", num_samples: int = 256, batch_size: int = 32,
                 alpha: float = 0.95, blocks: str | None = None):
        if not 0.0 <= alpha <= 1.0:
            raise ConfigError(f"regmean_plusplus alpha scales the Gram off-diagonals and must lie in [0, 1], "
                              f"got {alpha}")
        self.name, self.num_samples, self.batch_size, self.alpha = name, num_samples, batch_size, alpha
        self.blocks = blocks

    def run(self, pool, taskpool, ctx: RunContext) -> MergeOutcome:
        require_no_distractors(pool, self.name)
        batches = [_lazy_batches(taskpool, task, self.num_samples, self.batch_size, ctx.seed + i, ctx.device)
                   for i, task in enumerate(pool.tasks)]
        merged, grams = regmean_plusplus(pool.encoder, [pool.experts[t] for t in pool.tasks], batches,
                                         alpha=self.alpha, blocks=self.blocks)
        delta = {n: merged[n] - t for n, t in pool.pretrained_state().items() if t.is_floating_point()}
        info = {"num_samples_per_task": self.num_samples, "alpha": self.alpha, "regmean_layers": sorted(grams[0])}
        return MergeOutcome(merged_encoder(pool, delta), info,
                            f"RegMean++: Gram matrices from {self.num_samples} unlabeled train inputs per task, "
                            "propagated through the merged earlier blocks")


class MaTSMerge:
    """MaTS (Tam, Bansal & Raffel, TMLR 2024): conjugate gradient on ``Σ_k C_k δ = Σ_k C_k τ_k`` from task
    arithmetic ``δ_0 = lam·Σ_k τ_k`` (:mod:`fusion.merge.mats`), ``C_k`` each expert's RegMean Gram
    (``curvature='regmean'``) or diagonal Fisher (``'fisher'``) on ``num_samples`` unlabeled train images per task.

    The statistics are computed once; ``tune`` (a grid over ``alpha``, ``lam``, ``iters``, ``tol``) then re-solves
    and scores each point on the labeled validation split through :class:`StaticMerge`.
    """

    CURVATURES = {"regmean": ("alpha", "lam", "iters", "tol"), "fisher": ("lam", "iters", "tol")}

    def __init__(self, name: str = "mats", curvature: str = "regmean", num_samples: int = 256, batch_size: int = 32,
                 alpha: float = 1.0, lam: float = 0.3, iters: int = 100, tol: float = 1e-5, floor: float = 1e-6,
                 normalize: bool = True, tune: dict | None = None):
        if curvature not in self.CURVATURES:
            raise ConfigError(f"mats curvature must be one of {sorted(self.CURVATURES)}, got {curvature!r}")
        unknown = sorted(set(tune or {}) - set(self.CURVATURES[curvature]))
        if unknown:
            raise ConfigError(f"mats tune keys {unknown} do not apply to curvature={curvature} (tunable: "
                              f"{list(self.CURVATURES[curvature])}); set method.tune=null or tune those keys")
        self.name, self.curvature, self.num_samples, self.batch_size = name, curvature, num_samples, batch_size
        self.hyperparameters = ({"alpha": alpha, "lam": lam, "iters": iters, "tol": tol} if curvature == "regmean"
                                else {"lam": lam, "iters": iters, "tol": tol, "floor": floor, "normalize": normalize})
        self.tune = tune

    def run(self, pool, taskpool, ctx: RunContext) -> MergeOutcome:
        require_no_distractors(pool, self.name)
        if self.curvature == "regmean":
            grams = expert_grams(pool, taskpool, ctx, self.num_samples, self.batch_size)
            solve = functools.partial(lambda tv, **h: mats_regmean(tv, grams, **h), **self.hyperparameters)
        else:
            fishers = expert_fishers(pool, taskpool, ctx, self.num_samples, self.batch_size)
            solve = functools.partial(lambda tv, **h: mats_fisher(tv, fishers, **h), **self.hyperparameters)
        outcome = StaticMerge(solve, name=self.name, tune=self.tune).run(pool, taskpool, ctx)
        info = {**outcome.info, "curvature": self.curvature, "num_samples_per_task": self.num_samples}
        tuned = "; hyperparameters tuned on the labeled val split" if info["tuning"] else ""
        return MergeOutcome(outcome.encoder, info,
                            f"MaTS: {self.curvature} curvature from {self.num_samples} unlabeled train inputs per "
                            f"task, conjugate gradient from task arithmetic{tuned}")
