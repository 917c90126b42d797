"""FW-Merging (Chen et al., ICCV 2025): Frank–Wolfe over the pool's candidate task vectors (experts and any
distractors), driven by the gradient of an objective on a few samples per task (:mod:`fusion.merge.frank_wolfe`).

The "hard" variant (the default): cross-entropy on ``num_samples`` labeled *val* examples per task; the unlabeled
variant: ``method/objective=entropy`` (with ``split: test`` it adapts on the evaluation images, transductively). The
paper's "soft" variant (AdaMerging over the selected set after each step) is not implemented.
"""
from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from torch.func import functional_call

from fusion.errors import ConfigError
from fusion.merge.frank_wolfe import candidate_weights, check_fw_hyperparameters, frank_wolfe
from fusion.merge.task_vectors import StateDict
from fusion.methods.base import MergeOutcome, RunContext
from fusion.methods.data_merges import sample_labeled_batches
from fusion.methods.static import grid_accuracy, merged_encoder
from fusion.train.objectives import CrossEntropy, Objective, token_rows


def objective_gradient(encoder, heads, theta0: StateDict, batches: Mapping[str, list], objective: Objective
                       ) -> Callable[[StateDict], StateDict]:
    """``δ -> ∇_θ L(θ0 + δ)`` with ``L`` the mean over tasks of the mean ``objective`` over each task's samples
    (FusionBench divides each sample's loss by ``dataset_size · K``: the same mean), through
    ``torch.func.functional_call`` on ``encoder`` (its own weights are untouched)."""
    counts = {t: sum(int(x.shape[0]) for x, _ in bs) for t, bs in batches.items()}

    def gradient(delta: StateDict) -> StateDict:
        params = {n: (theta0[n] + delta[n].to(theta0[n].dtype)).detach().requires_grad_() for n in delta}
        grads = {n: torch.zeros_like(p) for n, p in params.items()}
        with torch.enable_grad():
            for task, task_batches in batches.items():
                for x, y in task_batches:
                    logits = heads(functional_call(encoder, params, (x,)), task)
                    rows = token_rows(logits, y, x, objective.needs_labels)
                    loss = objective(*rows) * (x.shape[0] / (counts[task] * len(batches)))
                    parts = torch.autograd.grad(loss, list(params.values()), allow_unused=True)
                    for n, g in zip(params, parts):
                        if g is not None:
                            grads[n] += g
        return grads

    return gradient


class FrankWolfeMerge:
    """FW-Merging: ``iterations`` Frank–Wolfe steps over ``scale · conv{τ_1..τ_M}`` (``M`` = tasks + distractors).

    Args:
        objective: cross-entropy (labeled ``split``; the paper's hard variant) or entropy (unlabeled).
        iterations, step_size, granularity, alignment: see :func:`fusion.merge.frank_wolfe.frank_wolfe`.
        scale: the vertices are ``scale · τ_m``; ``tune: {scale: [...]}`` picks it by mean accuracy on the labeled
            val split (one Frank–Wolfe run per value).
        init_lam: 0 starts at θ0 (FusionBench ``init_weight: base``); > 0 starts at task arithmetic
            ``init_lam · Σ_m τ_m`` over all candidates (FusionBench's default, 0.3), which is then also a vertex.
        num_samples, batch_size, split: the seeded samples per task the gradient is computed on (100, val).
    """

    def __init__(self, name: str = "fw_merging", objective: Objective | None = None, iterations: int = 10,
                 step_size: float = 1.0, scale: float = 1.0, granularity: str = "model", alignment: str = "inner",
                 init_lam: float = 0.0, num_samples: int = 100, batch_size: int = 50, split: str = "val",
                 tune: Mapping[str, Sequence[float]] | None = None):
        check_fw_hyperparameters(iterations, step_size, granularity, alignment)
        self.objective = objective or CrossEntropy()
        if self.objective.needs_labels and split == "test":
            raise ConfigError(f"fw_merging: objective '{self.objective.name}' reads labels and split='test' would "
                              "train on test labels; use split: val")
        if not scale > 0 or init_lam < 0:
            raise ConfigError(f"fw_merging: scale must be > 0 and init_lam ≥ 0, got scale={scale}, init_lam={init_lam}")
        unknown = sorted(set(tune or {}) - {"scale"})
        if unknown or any(not v > 0 for v in (tune or {}).get("scale", [1.0])):
            raise ConfigError(f"fw_merging: tune may only list positive 'scale' values, got {dict(tune or {})}")
        self.name, self.iterations, self.step_size, self.scale = name, int(iterations), step_size, scale
        self.granularity, self.alignment, self.init_lam = granularity, alignment, init_lam
        self.num_samples, self.batch_size, self.split = num_samples, batch_size, split
        self.tune = {"scale": list(tune["scale"])} if tune else {}

    def merge(self, pool, gradient, scale: float) -> tuple[StateDict, dict[str, Any]]:
        """One Frank–Wolfe run over ``scale · τ``; ``(δ, record)``."""
        tv = pool.task_vectors()
        names = list(pool.candidates)
        candidates = {n: scale * t for n, t in tv.items()}
        init = None
        if self.init_lam > 0:  # FusionBench's "initial" model: the TA start is also a vertex
            init = {n: self.init_lam * t.sum(0) for n, t in tv.items()}
            candidates = {n: torch.cat([c, init[n][None]]) for n, c in candidates.items()}
            names.append("initial")
        delta, history = frank_wolfe(candidates, gradient, self.iterations, self.step_size, self.granularity,
                                     self.alignment, init)
        tensors = list(candidates)
        w = candidate_weights(history, tensors, len(names))  # the last row: what stays on the starting point
        weights = {n: float(w[m].mean()) for m, n in enumerate(names)}
        start = "pretrained" if init is None else "initial"  # δ_0 = 0 (θ0) or the TA start, itself a vertex
        weights[start] = weights.get(start, 0.0) + float(w[-1].mean())
        record = {"mean_weight": weights,
                  "iterations": [{"gamma": h["gamma"], "gap": h["gap"],
                                  "chosen": _counts(names, [h["choice"][t] for t in tensors if h["moved"][t]])}
                                 for h in history]}
        return delta, record

    def select(self, pool, taskpool, ctx: RunContext) -> tuple[float, StateDict, dict[str, Any], dict | None]:
        """``(scale, δ, record, tuning)``: the Frank–Wolfe run at ``scale`` or, with ``tune``, at the scale with the
        best mean val accuracy (the gradient samples are drawn once and shared by every run)."""
        batches = {t: sample_labeled_batches(taskpool, t, self.num_samples, self.batch_size, ctx.seed + i,
                                             split=self.split, device=ctx.device) for i, t in enumerate(pool.tasks)}
        gradient = objective_gradient(pool.encoder, pool.heads, pool.pretrained_state(), batches, self.objective)
        scales = self.tune.get("scale", [self.scale])
        runs = {scale: self.merge(pool, gradient, scale) for scale in scales}
        if not self.tune:
            return self.scale, *runs[self.scale], None
        def accuracy(candidate):
            return ctx.evaluate(merged_encoder(pool, runs[candidate["scale"]][0]), pool.heads, taskpool, "val")

        scores = [{**candidate, "mean_accuracy": sum(acc.values()) / len(acc)}
                  for candidate, acc in grid_accuracy({"scale": scales}, accuracy, "fw_merging", "val")]
        pick = max(scores, key=lambda r: r["mean_accuracy"])
        return pick["scale"], *runs[pick["scale"]], {"on": "val", "grid": self.tune, "scores": scores, "best": pick}

    def run(self, pool, taskpool, ctx: RunContext) -> MergeOutcome:
        scale, delta, record, tuning = self.select(pool, taskpool, ctx)
        info = {"hyperparameters": {"iterations": self.iterations, "step_size": self.step_size, "scale": scale,
                                    "granularity": self.granularity, "alignment": self.alignment,
                                    "init_lam": self.init_lam, "num_samples_per_task": self.num_samples,
                                    "objective": self.objective.name, "split": self.split},
                "tuning": tuning, "candidates": list(pool.candidates), **record}
        data = "labeled" if self.objective.needs_labels else "unlabeled"
        return MergeOutcome(merged_encoder(pool, delta), info,
                            f"FW-Merging: {self.objective.name} gradients from {self.num_samples} {data} "
                            f"{self.split} examples per task over {len(pool.candidates)} candidate task vectors"
                            + ("; scale tuned on the labeled val split" if tuning else ""))

    def initial_coefficient(self, pool, taskpool, ctx: RunContext) -> tuple[list[float], dict[str, Any]]:
        """One λ per task vector for a learned merge (``method/init=fw_merging``): model-wise, the result is
        ``δ = Σ_m λ_m τ_m`` with ``λ_m = scale·w_m + init_lam·w_initial`` (the convex weights of the run)."""
        if self.granularity != "model":
            raise ConfigError("fw_merging as an init gives one λ per task only model-wise; layer-wise weights differ "
                              "per tensor. Set method.init.granularity=model")
        scale, _, record, tuning = self.select(pool, taskpool, ctx)
        w = record["mean_weight"]
        lam = [scale * w[n] + self.init_lam * w.get("initial", 0.0) for n in pool.candidates]
        return lam, {"fw_merging": {"scale": scale, "mean_weight": w}, "tuning": tuning}


def _counts(names: list[str], picks: list[int]) -> dict[str, int]:
    """``{candidate: how many tensors chose it}`` (only the chosen ones)."""
    out: dict[str, int] = {}
    for m in picks:
        out[names[m]] = out.get(names[m], 0) + 1
    return out
