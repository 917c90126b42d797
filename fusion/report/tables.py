"""Result tables: markdown (the README's, :func:`format_table`) and the console table of a run."""
from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from typing import Any


def format_table(rows: Mapping[str, Mapping[str, float]], tasks: Sequence[str]) -> str:
    """A markdown table: one row per entry of ``rows`` (``{name: {task: acc}}``), accuracies in %, and the mean."""
    header = "| model | " + " | ".join(tasks) + " | mean |"
    lines = [header, "|" + "---|" * (len(tasks) + 2)]
    for name, per_task in rows.items():
        accs = [per_task[t] for t in tasks]
        cells = " | ".join(f"{100 * a:.1f}" for a in accs)
        lines.append(f"| {name} | {cells} | {100 * sum(accs) / len(accs):.1f} |")
    return "\n".join(lines)


def reference_label(name: str, row: Mapping[str, Any]) -> str:
    """A column header for a reference row: ``zero-shot``, ``experts``, or the merge with its tuned
    hyperparameters (``task_arithmetic λ=0.05``)."""
    if name in ("pretrained", "individual"):
        return {"pretrained": "zero-shot", "individual": "experts"}[name]
    hparams = row.get("hyperparameters") or {}
    shown = " ".join(f"{'λ' if k == 'lam' else k}={v}" for k, v in hparams.items() if not isinstance(v, (list, dict)))
    return f"{name} {shown}".strip()


def table_columns(results: Mapping[str, Any]) -> dict[str, Mapping[str, float]]:
    """``{column header: {task: accuracy}}``: zero-shot, the static references, the method, the experts."""
    refs = results.get("reference", {})
    static = {reference_label(n, r): r["per_task"] for n, r in refs.items() if n not in ("pretrained", "individual")}
    columns = {"zero-shot": refs.get("pretrained", {}).get("per_task"), **static,
               results["method"]: results["per_task"], "experts": refs.get("individual", {}).get("per_task")}
    return {label: per_task for label, per_task in columns.items() if per_task}


def wrap_header(label: str, width: int = 14) -> str:
    """``label`` broken into lines of at most ``width`` characters after ``_`` or at spaces (a word longer than
    ``width`` keeps its own line): ``concrete_adamerging_layer_wise`` → ``concrete_\nadamerging_\nlayer_wise``."""
    lines = [""]
    for word in re.findall(r"[^_ ]*_+|[^_ ]+", label):  # "task_", "arithmetic", "λ=0.05"
        glue = "" if not lines[-1] or lines[-1].endswith("_") else " "
        if lines[-1] and len(lines[-1]) + len(glue) + len(word) > width:
            lines.append(word)
        else:
            lines[-1] += glue + word
    return "\n".join(lines)


def results_table(results: Mapping[str, Any]):
    """A rich table of test accuracy (%): one row per task and the mean, one column per model; headers fold, so it
    stays readable at 80 columns with any number of tasks."""
    from rich import box
    from rich.table import Table

    tasks, columns = list(results["per_task"]), table_columns(results)
    mode = " — task id at inference, not one model" if results.get("inference") == "task id" else ""
    table = Table(title=f"{results['method']} on {results['modelpool']}: test accuracy (%){mode}", box=box.SIMPLE_HEAD)
    table.add_column("task", overflow="fold", max_width=14)
    for label in columns:
        table.add_column(wrap_header(label), justify="right", overflow="fold", max_width=14,
                         style="bold" if label == results["method"] else None)
    for task in tasks:
        table.add_row(task, *(f"{100 * acc[task]:.1f}" for acc in columns.values()))
    table.add_section()
    table.add_row("mean", *(f"{100 * sum(acc[t] for t in tasks) / len(tasks):.1f}" for acc in columns.values()))
    return table


def print_results(results: Mapping[str, Any], width: int | None = None) -> None:
    """Print :func:`results_table` (at most 80 columns wide unless ``width`` says otherwise)."""
    from rich.console import Console

    console = Console(width=width)
    console.width = min(console.width, width or 80)
    console.print(results_table(results))
