"""Does a model pool merge the way CLIP pools do? Three measurements, each on a labeled validation split.

- :func:`alpha_curves`: per task, the accuracy of ``θ0 + α·τ_k`` on task k along α. CLIP pools are close to linear
  there (half the task vector buys most of the expert's gain); towers that fine-tuning moved far are not.
- :func:`entropy_thirds`: per task, the accuracy of a merge's lowest- and highest-entropy thirds of predictions.
  Entropy minimisation (AdaMerging, WEMoE, Concrete) presumes that confident predictions are the right ones.
- :func:`prediction_stats` on the checkpoints of a learned run gives accuracy against entropy along it
  (``benchmarks/entropy_alignment.py``): accuracy must rise as entropy falls.
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from torch import Tensor

from fusion.data.contract import iterate_batches
from fusion.merge.combine import combine
from fusion.merge.task_vectors import add_delta
from fusion.pools.openclip import copy_with_state, freeze
from fusion.train.objectives import sample_entropy, token_rows


@torch.no_grad()
def predictions(encoder, heads, dataset, task: str, batch_size: int = 512) -> tuple[Tensor, Tensor]:
    """``(logits [N, C], labels [N])`` of ``heads(encoder(x), task)`` over ``dataset``, on the encoder's device (a
    causal LM's rows: every completion token, :func:`token_rows`)."""
    device = next(encoder.parameters()).device
    logits, labels = [], []
    for x, y in iterate_batches(dataset, batch_size):
        x = x.to(device)
        rows, target = token_rows(heads(encoder(x), task), y.to(device), x, labeled=True)
        logits.append(rows.float().cpu())
        labels.append(target.cpu())
    return torch.cat(logits), torch.cat(labels)


def thirds_by_entropy(logits: Tensor, labels: Tensor) -> dict[str, float]:
    """Accuracy of the lowest- and highest-entropy thirds of the predictions, and the mean entropy."""
    h = sample_entropy(logits)
    order = h.argsort(stable=True)
    n = len(order) // 3
    correct = (logits.argmax(-1) == labels).float()
    return {"low_entropy_accuracy": float(correct[order[:n]].mean()),
            "high_entropy_accuracy": float(correct[order[-n:]].mean()),
            "mean_entropy": float(h.mean()), "accuracy": float(correct.mean())}


def prediction_stats(encoder, heads, taskpool, split: str = "val", tasks: Sequence[str] | None = None
                     ) -> dict[str, dict[str, float]]:
    """Per task: accuracy, mean entropy and the accuracy of the lowest/highest-entropy thirds."""
    return {t: thirds_by_entropy(*predictions(encoder, heads, taskpool.dataset(t, split), t))
            for t in (tasks or taskpool.tasks)}


def coefficient_encoder(pool, tv: Mapping[str, Tensor], coefficients: Tensor):
    """A frozen copy of the pool's encoder holding ``θ0 + Σ_k c_k τ_k`` (``coefficients [K]``)."""
    delta = combine(tv, coefficients)
    return freeze(copy_with_state(pool.encoder, add_delta(pool.pretrained_state(), delta)))


def alpha_curves(pool, taskpool, alphas: Sequence[float] = (0.25, 0.5, 0.75, 1.0), split: str = "val"
                 ) -> dict[str, dict[str, float]]:
    """``{task: {α: accuracy of θ0 + α τ_task on task}}``; α = 0 is the pretrained model, 1 the expert."""
    tv = pool.task_vectors()
    out = {}
    for k, task in enumerate(pool.tasks):
        ds = taskpool.dataset(task, split)
        out[task] = {}
        for alpha in alphas:
            c = torch.zeros(len(pool.tasks))
            c[k] = alpha
            logits, labels = predictions(coefficient_encoder(pool, tv, c), pool.heads, ds, task)
            out[task][f"{alpha:g}"] = float((logits.argmax(-1) == labels).float().mean())
    return out


def linearity(curves: Mapping[str, Mapping[str, float]], zero_shot: Mapping[str, float]) -> dict[str, float]:
    """Per task, the share of the expert's gain over zero-shot that half its task vector buys (``α = 0.5``):
    1 would be a step at α = 0.5, 0.5 a straight line, below 0.5 a curve that needs most of τ first."""
    return {t: (c["0.5"] - zero_shot[t]) / max(c["1"] - zero_shot[t], 1e-9) for t, c in curves.items()}


TA_LAMBDAS = (0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.5, 1.0)  # = conf/method/task_arithmetic.yaml's tune grid


def task_arithmetic_on_val(pool, taskpool, lambdas: Sequence[float] = TA_LAMBDAS, split: str = "val"
                           ) -> tuple[float, dict[str, float], dict[str, dict[str, float]]]:
    """``(best λ, {λ: mean accuracy}, per-task prediction stats at the best λ)`` of ``θ0 + λ Σ_k τ_k``."""
    tv = pool.task_vectors()
    k = len(pool.tasks)
    stats = {f"{lam:g}": prediction_stats(coefficient_encoder(pool, tv, torch.full((k,), float(lam))), pool.heads,
                                          taskpool, split, pool.tasks) for lam in lambdas}
    means = {lam: sum(s["accuracy"] for s in st.values()) / k for lam, st in stats.items()}
    best = max(means, key=means.get)
    return float(best), means, stats[best]


def pool_diagnostics(pool, taskpool, zero_shot: Mapping[str, float], split: str = "val") -> dict:
    """The manifest's ``diagnostics``: α-curves with their linearity, and task arithmetic's val-tuned λ with the
    entropy thirds of its predictions (all on ``split``)."""
    curves = alpha_curves(pool, taskpool, split=split)
    best, means, stats = task_arithmetic_on_val(pool, taskpool, split=split)
    return {"split": split, "alpha_curves": curves, "linearity": linearity(curves, zero_shot),
            "task_arithmetic": {"lambda": best, "grid": means, "per_task": stats}}
