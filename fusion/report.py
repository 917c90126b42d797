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


# ---- sweep aggregation (fusion-report, fusion/sweep.py) ----

def mean_std(values: Sequence[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (``n − 1`` in the denominator; 0 for a single value)."""
    n = len(values)
    mean = sum(values) / n
    var = sum((v - mean) ** 2 for v in values) / (n - 1) if n > 1 else 0.0
    return mean, var ** 0.5


def aggregate_runs(runs: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """One row per (method, configuration) with mean ± std over its runs (seeds).

    Args:
        runs: ``{"method", "configuration", "seed", "per_task": {task: acc}, "mean_accuracy"}`` each.

    Returns:
        rows in first-seen order: ``{"method", "configuration", "seeds", "mean_accuracy": (mean, std),
        "per_task": {task: (mean, std)}}``; a task missing from some runs averages over those that have it.
    """
    groups: dict[tuple[str, str], list[Mapping[str, Any]]] = {}
    for run in runs:
        groups.setdefault((run["method"], run["configuration"]), []).append(run)
    rows = []
    for (method, configuration), members in groups.items():
        tasks = list(dict.fromkeys(t for r in members for t in r["per_task"]))
        rows.append({
            "method": method, "configuration": configuration, "seeds": sorted(r["seed"] for r in members),
            "mean_accuracy": mean_std([r["mean_accuracy"] for r in members]),
            "per_task": {t: mean_std([r["per_task"][t] for r in members if t in r["per_task"]]) for t in tasks},
        })
    return rows


def sweep_tasks(rows: Sequence[Mapping[str, Any]]) -> list[str]:
    return list(dict.fromkeys(t for row in rows for t in row["per_task"]))


def sweep_markdown(rows: Sequence[Mapping[str, Any]], title: str) -> str:
    """Markdown table of :func:`aggregate_runs` rows: accuracies in % as mean ± std over seeds."""
    tasks = sweep_tasks(rows)

    def cell(ms: tuple[float, float] | None) -> str:
        return "—" if ms is None else f"{100 * ms[0]:.1f} ± {100 * ms[1]:.1f}"

    lines = [f"# {title}", "", "Test accuracy (%), mean ± sample std over seeds.", "",
             "| method | configuration | seeds | " + " | ".join(tasks) + " | mean |",
             "|" + "---|" * (len(tasks) + 4)]
    for row in rows:
        cells = [cell(row["per_task"].get(t)) for t in tasks]
        lines.append(f"| {row['method']} | {row['configuration'] or '—'} | {len(row['seeds'])} | "
                     + " | ".join(cells) + f" | {cell(row['mean_accuracy'])} |")
    return "\n".join(lines) + "\n"


def sweep_csv(rows: Sequence[Mapping[str, Any]]) -> str:
    """CSV of :func:`aggregate_runs` rows: accuracies as fractions, ``<name>_mean`` and ``<name>_std`` columns."""
    import csv
    import io

    tasks = sweep_tasks(rows)
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(["method", "configuration", "n_seeds", "seeds", "mean_accuracy_mean", "mean_accuracy_std"]
                    + [f"{t}_{s}" for t in tasks for s in ("mean", "std")])
    for row in rows:
        per_task = [v for t in tasks for v in row["per_task"].get(t, ("", ""))]
        writer.writerow([row["method"], row["configuration"], len(row["seeds"]), " ".join(map(str, row["seeds"])),
                         *row["mean_accuracy"], *per_task])
    return buf.getvalue()


def sweep_bar_chart(rows: Sequence[Mapping[str, Any]], path: str | Path, title: str = "mean test accuracy") -> Path:
    """Bars of mean accuracy (%) per row with sample-std error bars."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

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
