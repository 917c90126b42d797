"""Sweep aggregation for ``fusion-report`` (:mod:`fusion.sweep`): mean ± std over seeds, markdown and CSV."""
from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any


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
