"""Evolutionary coefficient search in the spirit of MERGE^3 (Mencattini et al., 2025, "MERGE^3: Efficient
Evolutionary Merging on Consumer-grade GPUs"): CMA-ES (Hansen's ``cma`` package) over task-wise λ (K values) or
layer-wise λ (K × L, L = the task-vector tensors, the grouping of layer-wise AdaMerging in
:mod:`fusion.param.coefficients`), maximising a cheap fitness estimate: the mean accuracy of
``θ_0 + Σ_k λ_k^l τ_k^l`` (:func:`fusion.merge.combine.combine`, the merge task arithmetic and AdaMerging use) on a
small seeded random subset of the labeled *val* split.

Deviations from MERGE^3: the paper estimates fitness with IRT-based ability estimators on an IRT-selected
subset; here the subset is a plain seeded random sample of ``subset_size`` val images per task and the estimate is
the plain subset accuracy. The evolutionary optimiser is CMA-ES over the merge coefficients (the issue's choice),
not the paper's own evolutionary setup. The reliability of the estimate is reported: results.json
``method_info.search.estimate`` lists, for the chosen λ, CMA-ES's final mean and the initial point, the subset
fitness, the full-val score and ``|subset − full|``.
"""
from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from fusion.errors import ConfigError
from fusion.evaluate import random_subset, task_accuracy
from fusion.merge.combine import combine
from fusion.methods.base import MergeOutcome, RunContext
from fusion.methods.static import merged_encoder

log = logging.getLogger(__name__)


@dataclass
class SearchResult:
    """What :func:`cma_search` found: the best point, its fitness, the evaluations spent, every evaluated point's
    fitness (in order), and CMA-ES's final mean (its recommended point, ``xfavorite``)."""

    best: np.ndarray
    best_fitness: float
    evaluations: int
    generations: int
    final_mean: np.ndarray
    history: list[float] = field(default_factory=list)


def check_search(dim: int, evaluations: int, popsize: int | None, sigma0: float,
                 bounds: Sequence[float]) -> tuple[float, float]:
    """Clear errors for a budget < 1, a population larger than the budget, bad bounds, σ0 ≤ 0 or dim < 2."""
    if int(evaluations) != evaluations or evaluations < 1:
        raise ConfigError(f"method.evaluations is the fitness-evaluation budget, an integer >= 1, got "
                          f"{evaluations!r} (e.g. 100)")
    if popsize is not None and not 2 <= popsize <= evaluations:
        raise ConfigError(f"method.popsize must lie in [2, evaluations={evaluations}], got {popsize!r}; lower it, "
                          "raise method.evaluations, or set popsize: null for CMA-ES's default 4+3·ln(dim)")
    low, high = (float(b) for b in bounds)
    if not low < high:
        raise ConfigError(f"method.bounds must be [low, high] with low < high, got {list(bounds)!r} (e.g. [0, 1])")
    if not sigma0 > 0:
        raise ConfigError(f"method.sigma0 is CMA-ES's initial step size and must be > 0, got {sigma0!r} "
                          "(e.g. a quarter of the bounds' width)")
    if dim < 2:
        raise ConfigError(f"CMA-ES searches >= 2 coefficients, but this pool gives {dim} (one task, task-wise): "
                          "use method=task_arithmetic's λ grid for a single task, or the layer-wise search")
    return low, high


def cma_search(fitness: Callable[[np.ndarray], float], x0: np.ndarray, *, evaluations: int, sigma0: float = 0.2,
               bounds: Sequence[float] = (0.0, 1.0), popsize: int | None = None, seed: int = 0) -> SearchResult:
    """Maximise ``fitness`` over ``x ∈ [low, high]^d`` with CMA-ES (``cma``'s bound transform), spending exactly
    ``evaluations`` calls: full generations are told to CMA-ES; a last partial one is evaluated but not told.

    ``seed`` seeds ``cma`` (which reseeds NumPy's global generator; ``cma`` treats 0 as "from the clock", so it
    receives ``seed + 1``). ``x0`` is clipped into the bounds.
    """
    import cma

    x0 = np.asarray(x0, dtype=float).ravel()
    low, high = check_search(x0.size, evaluations, popsize, sigma0, bounds)
    opts = {"bounds": [low, high], "seed": int(seed) + 1, "verbose": -9, "maxfevals": np.inf}
    if popsize is not None:
        opts["popsize"] = int(popsize)
    es = cma.CMAEvolutionStrategy(np.clip(x0, low, high).tolist(), float(sigma0), opts)
    best, best_fit, history, generations = None, -np.inf, [], 0
    while len(history) < evaluations:
        points = [np.clip(np.asarray(x, dtype=float), low, high) for x in es.ask()]
        points = points[:evaluations - len(history)]
        scores = [float(fitness(x)) for x in points]
        history += scores
        i = int(np.argmax(scores))
        if scores[i] > best_fit:
            best, best_fit = points[i].copy(), scores[i]
        if len(points) == es.popsize:
            es.tell(points, [-s for s in scores])
            generations += 1
    final_mean = np.clip(np.asarray(es.result.xfavorite, dtype=float), low, high)
    return SearchResult(best, best_fit, len(history), generations, final_mean, history)


def subset_fitness(pool, tv, subsets: dict, shape: tuple[int, ...], ctx: RunContext):
    """``λ ↦ mean_t acc_t(θ_0 + combine(τ, λ.reshape(shape)))`` on the fixed ``subsets`` (``{task: dataset}``)."""

    def fitness(x: np.ndarray) -> float:
        encoder = merged_encoder(pool, combine(tv, coefficients(x, shape, tv)))
        accs = [task_accuracy(encoder, pool.heads, data, task, batch_size=ctx.eval_batch_size, device=ctx.device)
                for task, data in subsets.items()]
        return sum(accs) / len(accs)

    return fitness


def coefficients(x: np.ndarray, shape: tuple[int, ...], tv) -> torch.Tensor:
    """The flat search point as ``Tensor[K]`` or ``Tensor[K, L]`` (float64 for float64 task vectors)."""
    dtype = torch.float64 if next(iter(tv.values())).dtype == torch.float64 else torch.float32
    return torch.as_tensor(np.asarray(x).reshape(shape), dtype=dtype)


class EvolutionarySearch:
    """CMA-ES over task-wise (``layer_wise=False``) or layer-wise λ with a subset-of-val fitness (module docstring).

    Args:
        name: the method's name in results.json.
        layer_wise: search K × L coefficients (one per task and task-vector tensor) instead of K.
        evaluations: the fitness-evaluation budget (each: one merge + ``subset_size`` images per task).
        popsize: CMA-ES population (``None``: ``cma``'s default ``4 + ⌊3 ln d⌋``).
        sigma0: initial step size; init: the starting λ for every coefficient; bounds: ``[low, high]``.
        subset_size: val images per task in the fitness subset; split: the labeled split searched on (``val``).
        seed: seeds the subset and CMA-ES.
    """

    def __init__(self, name: str, layer_wise: bool = False, evaluations: int = 100, popsize: int | None = None,
                 sigma0: float = 0.2, init: float = 0.3, bounds: Sequence[float] = (0.0, 1.0),
                 subset_size: int = 32, split: str = "val", seed: int = 0):
        if split == "test":
            raise ConfigError("method.split='test' would search on test labels; use the validation split ('val')")
        if int(subset_size) != subset_size or subset_size < 1:
            raise ConfigError(f"method.subset_size is the val inputs per task in the fitness, an integer >= 1, "
                              f"got {subset_size!r} (e.g. 32)")
        check_search(2, evaluations, popsize, sigma0, bounds)
        self.name, self.layer_wise, self.evaluations, self.popsize = name, layer_wise, int(evaluations), popsize
        self.sigma0, self.init, self.bounds = float(sigma0), float(init), [float(b) for b in bounds]
        self.subset_size, self.split, self.seed = int(subset_size), split, int(seed)

    def search(self, pool, taskpool, ctx: RunContext) -> tuple[torch.Tensor, dict[str, Any]]:
        """``(λ: Tensor[K] or Tensor[K, L], record)``: run CMA-ES and measure the estimate's error on full val."""
        tv = pool.task_vectors()
        shape = (len(pool.tasks), len(tv)) if self.layer_wise else (len(pool.tasks),)
        subsets = {t: random_subset(taskpool.dataset(t, self.split), self.subset_size, self.seed).to(ctx.device)
                   for t in pool.tasks}
        fitness = subset_fitness(pool, tv, subsets, shape, ctx)
        x0 = np.full(int(np.prod(shape)), self.init)
        result = cma_search(fitness, x0, evaluations=self.evaluations, sigma0=self.sigma0, bounds=self.bounds,
                            popsize=self.popsize, seed=self.seed)
        log.info("%s: best %s-subset fitness %.4f after %d evaluations", self.name, self.split,
                 result.best_fitness, result.evaluations)
        estimate = [self.reliability(name, x, fit, pool, taskpool, tv, shape, fitness, ctx) for name, x, fit in
                    (("best", result.best, result.best_fitness), ("final_mean", result.final_mean, None),
                     ("init", x0, None))]
        record = {"on": f"{self.subset_size} seeded random {self.split} inputs per task (fitness); full {self.split} "
                        "split (estimate check)",
                  "evaluations": result.evaluations, "budget": self.evaluations, "generations": result.generations,
                  "dimension": int(np.prod(shape)), "popsize": self.popsize, "sigma0": self.sigma0,
                  "bounds": self.bounds, "best_fitness": result.best_fitness, "best_full": estimate[0]["full"],
                  "best_abs_error": estimate[0]["abs_error"], "estimate": estimate,
                  "extra_evaluations": "2 subset + 3 full-split evaluations for the estimate check, outside the budget",
                  "fitness_history": [round(f, 6) for f in result.history]}
        return coefficients(result.best, shape, tv), record

    def reliability(self, name: str, x: np.ndarray, fit: float | None, pool, taskpool, tv, shape, fitness,
                    ctx: RunContext) -> dict[str, Any]:
        """One candidate's subset fitness, full-split score and ``|subset − full|``."""
        fit = fitness(x) if fit is None else fit
        encoder = merged_encoder(pool, combine(tv, coefficients(x, shape, tv)))
        acc = ctx.evaluate(encoder, pool.heads, taskpool, self.split)
        full = sum(acc.values()) / len(acc)
        return {"candidate": name, "subset": fit, "full": full, "abs_error": abs(fit - full),
                "lambda_mean": float(np.mean(x))}

    def run(self, pool, taskpool, ctx: RunContext) -> MergeOutcome:
        lam, record = self.search(pool, taskpool, ctx)
        encoder = merged_encoder(pool, combine(pool.task_vectors(), lam))
        info = {"lambdas": lam.tolist(), "search": record}
        return MergeOutcome(encoder, info, protocol=f"merge coefficients searched by CMA-ES on a labeled "
                                                    f"{self.split}-split subset ({self.subset_size} per task)")

    def initial_coefficient(self, pool, taskpool, ctx: RunContext) -> tuple[list, dict[str, Any]]:
        """The searched λ (K values, or K × L for the layer-wise search) to start a learned merge from."""
        lam, record = self.search(pool, taskpool, ctx)
        return lam.tolist(), record
