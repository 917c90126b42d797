"""Run outputs: results.json, the console table, and plots (coefficient heatmaps)."""
from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from fusion.utils import atomic_write_bytes


def save_figure(fig, path: str | Path) -> Path:
    """Atomically write a matplotlib figure as PNG."""
    import io

    import matplotlib.pyplot as plt

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    plt.close(fig)
    return atomic_write_bytes(path, buf.getvalue())


def coefficient_heatmap(values: torch.Tensor, tasks: Sequence[str], path: str | Path,
                        title: str = "merge coefficients λ") -> Path:
    """Heatmap of ``values [K, L]`` (tasks × parameter tensors), or bars for ``[K]``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

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


def format_table(rows: Mapping[str, Mapping[str, float]], tasks: Sequence[str]) -> str:
    """A markdown table: one row per entry of ``rows`` (``{name: {task: acc}}``), accuracies in %, and the mean."""
    header = "| model | " + " | ".join(tasks) + " | mean |"
    lines = [header, "|" + "---|" * (len(tasks) + 2)]
    for name, per_task in rows.items():
        accs = [per_task[t] for t in tasks]
        cells = " | ".join(f"{100 * a:.1f}" for a in accs)
        lines.append(f"| {name} | {cells} | {100 * sum(accs) / len(accs):.1f} |")
    return "\n".join(lines)


def print_results(results: Mapping[str, Any]) -> None:
    """Print the per-task table (method beside the pretrained and individual references) with rich."""
    from rich.console import Console
    from rich.table import Table

    tasks = list(results["per_task"])
    table = Table(title=f"{results['method']} on {results['modelpool']} (test accuracy, %)")
    table.add_column("model")
    for t in tasks:
        table.add_column(t, justify="right")
    table.add_column("mean", justify="right", style="bold")
    rows = {name: ref["per_task"] for name, ref in results["reference"].items()}
    rows = {"pretrained": rows.get("pretrained"), results["method"]: results["per_task"],
            "individual": rows.get("individual")}
    for name, per_task in rows.items():
        if per_task:
            accs = [per_task[t] for t in tasks]
            table.add_row(name, *(f"{100 * a:.1f}" for a in accs), f"{100 * sum(accs) / len(accs):.1f}")
    Console().print(table)
