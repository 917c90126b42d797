"""Plots of a run and of a sweep: learned coefficients, Concrete masks, routing, sweep bars (PNG, written atomically)."""
from __future__ import annotations

import io
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from torch import Tensor

from fusion.merge.masks import kept_fraction
from fusion.utils import atomic_write_bytes


def pyplot():
    """matplotlib's pyplot on the file-only Agg backend."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_figure(fig, path: str | Path) -> Path:
    """Atomically write a matplotlib figure as PNG."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    pyplot().close(fig)
    return atomic_write_bytes(path, buf.getvalue())


def coefficient_heatmap(values: Tensor, tasks: Sequence[str], path: str | Path,
                        title: str = "merge coefficients λ") -> Path:
    """Heatmap of ``values [K, L]`` (tasks × parameter tensors), or bars for ``[K]``."""
    plt = pyplot()
    v = values.detach().float().cpu()
    if v.dim() == 1:
        fig, ax = plt.subplots(figsize=(max(4, len(tasks) * 0.7), 3))
        ax.bar(range(len(tasks)), v.numpy())
        ax.set_xticks(range(len(tasks)), tasks, rotation=45, ha="right")
        ax.set_ylabel("λ")
    else:
        fig, ax = plt.subplots(figsize=(min(24, 4 + v.shape[1] * 0.12), 1.5 + 0.35 * len(tasks)))
        im = ax.imshow(v.numpy(), aspect="auto", cmap="viridis")
        ax.set_yticks(range(len(tasks)), tasks)
        ax.set_xlabel("parameter tensor (model order)")
        fig.colorbar(im, ax=ax, label="λ")
    ax.set_title(title)
    return save_figure(fig, path)


def mask_kept_fraction(final: Mapping[str, Tensor], hard: Mapping[str, Tensor], path: str | Path,
                       title: str = "Concrete mask") -> Path:
    """Bars: the mean of the evaluation mask per parameter tensor; dots: the fraction with ``σ(x) > 0.5``."""
    plt = pyplot()
    names = list(final)
    fig, ax = plt.subplots(figsize=(min(24, 4 + 0.12 * len(names)), 3.5))
    ax.bar(range(len(names)), [kept_fraction(final[n]) for n in names], label="eval mask mean")
    ax.plot(range(len(names)), [kept_fraction(hard[n]) for n in names], "k.", label="σ(x) > 0.5")
    ax.set_ylim(0, 1)
    ax.set_xlabel("parameter tensor (model order)")
    ax.set_ylabel("kept fraction")
    if len(names) <= 40:
        ax.set_xticks(range(len(names)), names, rotation=90, fontsize=6)
    ax.legend(loc="lower right", fontsize=7)
    ax.set_title(title)
    return save_figure(fig, path)


def routing_heatmap(matrix: Tensor, tasks: Sequence[str], path: str | Path,
                    experts: Sequence[str] | None = None) -> Path:
    """Heatmap PNG of ``matrix [tasks, K]`` (rows: whose test data; columns: experts)."""
    plt = pyplot()
    m = matrix.detach().float().cpu()
    experts = list(experts or (tasks if len(tasks) == m.shape[1] else [f"expert {k}" for k in range(m.shape[1])]))
    fig, ax = plt.subplots(figsize=(2 + 0.7 * m.shape[1], 1.5 + 0.5 * m.shape[0]))
    im = ax.imshow(m.numpy(), aspect="auto", cmap="viridis")
    for (i, k), v in zip(((i, k) for i in range(m.shape[0]) for k in range(m.shape[1])), m.flatten().tolist()):
        ax.text(k, i, f"{v:.2f}", ha="center", va="center", color="w", fontsize=7)
    ax.set_xticks(range(m.shape[1]), experts, rotation=45, ha="right")
    ax.set_yticks(range(m.shape[0]), tasks)
    ax.set_xlabel("expert (task vector)")
    ax.set_ylabel("test data of")
    fig.colorbar(im, ax=ax, label="mean routing weight")
    ax.set_title("mean routing weight r_k(x)")
    return save_figure(fig, path)


def sweep_bar_chart(rows: Sequence[Mapping[str, Any]], path: str | Path, title: str = "mean test accuracy") -> Path:
    """Bars of mean accuracy (%) per row with sample-std error bars."""
    plt = pyplot()
    several = {r["method"] for r in rows if sum(o["method"] == r["method"] for o in rows) > 1}
    labels = [r["method"] + (f"\n{r['configuration']}" if r["method"] in several else "") for r in rows]
    means = [100 * r["mean_accuracy"][0] for r in rows]
    stds = [100 * r["mean_accuracy"][1] for r in rows]
    fig, ax = plt.subplots(figsize=(max(4.0, 0.8 * len(rows) + 1), 3.5))
    ax.bar(range(len(rows)), means, yerr=stds, capsize=4)
    ax.set_xticks(range(len(rows)), labels, rotation=45, ha="right", fontsize=8)
    ax.set_ylabel("test accuracy (%)")
    ax.set_title(title)
    return save_figure(fig, path)
