"""``fusion-report <multirun dir>``: one table and one bar chart for a whole sweep.

    fusion -m method=task_arithmetic,ties,adamerging_layer_wise seed=0,1,2     # writes multirun/<time>/*/results.json
    fusion-report multirun/<time>                                             # report.md, report.csv, report.png

Every ``results.json`` under the directory is one run. Runs are grouped by method and *configuration*: the
settings that distinguish runs of one method, seed excluded — Hydra's overrides (``.hydra/overrides.yaml`` next
to results.json) when present, else the run's flattened ``config``; settings every run of that method shares are
left out. Each row gives mean ± sample std (n − 1) over its seeds. The three files are written atomically into
the sweep directory; the markdown table is also printed. No results → exit code 2 naming the directory.
"""
from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from fusion.report.plots import sweep_bar_chart
from fusion.report.sweeps import aggregate_runs, sweep_csv, sweep_markdown
from fusion.utils import atomic_write_bytes

log = logging.getLogger(__name__)

NOT_CONFIGURATION = {"seed", "method", "output_dir"}  # seeds are aggregated; the method is its own column


def flatten(config: Mapping[str, Any], prefix: str = "") -> dict[str, str]:
    """``{"a": {"b": 1}} -> {"a.b": "1"}`` (lists and scalars as JSON)."""
    flat = {}
    for key, value in config.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            flat |= flatten(value, f"{name}.")
        else:
            flat[name] = value if isinstance(value, str) else json.dumps(value)
    return flat


def run_settings(results_path: Path, results: Mapping[str, Any]) -> dict[str, str]:
    """The run's Hydra overrides as ``{key: value}``, else its flattened config (seed and method excluded)."""
    overrides = results_path.parent / ".hydra" / "overrides.yaml"
    if overrides.is_file():
        import yaml

        items = [o for o in yaml.safe_load(overrides.read_text()) or [] if "=" in o and not o.startswith("~")]
        settings = dict(o.lstrip("+").split("=", 1) for o in items)
    else:
        settings = flatten(results.get("config") or {})
    return {k: v for k, v in settings.items() if k not in NOT_CONFIGURATION}


def configurations(methods: Sequence[str], settings: Sequence[Mapping[str, str]]) -> list[str]:
    """For each run, ``"k=v, ..."`` over the settings that differ between runs of its method."""
    varying: dict[str, set[str]] = {}
    for method in set(methods):
        group = [s for m, s in zip(methods, settings) if m == method]
        keys = set().union(*group)
        varying[method] = {k for k in keys if len({s.get(k) for s in group}) > 1}
    return [", ".join(f"{k}={s.get(k, '—')}" for k in sorted(varying[m])) for m, s in zip(methods, settings)]


def load_runs(sweep_dir: Path) -> list[dict[str, Any]]:
    """Every readable results.json under ``sweep_dir`` as an :func:`fusion.report.sweeps.aggregate_runs` run."""
    found = []
    for path in sorted(sweep_dir.rglob("results.json")):
        try:
            results = json.loads(path.read_text())
            found.append((path, results, {k: results[k] for k in ("method", "seed", "per_task", "mean_accuracy")}))
        except (OSError, ValueError, KeyError) as err:
            log.warning("skipping %s: %s: %s", path, type(err).__name__, err)
    configs = configurations([run["method"] for _, _, run in found],
                             [run_settings(path, results) for path, results, _ in found])
    return [run | {"configuration": c} for (_, _, run), c in zip(found, configs)]


def write_report(sweep_dir: Path, rows: Sequence[Mapping[str, Any]]) -> str:
    """report.md, report.csv and report.png in ``sweep_dir``; returns the markdown."""
    markdown = sweep_markdown(rows, title=f"Sweep {sweep_dir}")
    atomic_write_bytes(sweep_dir / "report.md", markdown.encode())
    atomic_write_bytes(sweep_dir / "report.csv", sweep_csv(rows).encode())
    sweep_bar_chart(rows, sweep_dir / "report.png", title=f"mean test accuracy ({sweep_dir.name})")
    return markdown


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="fusion-report", description=__doc__.split("\n\n")[0])
    parser.add_argument("sweep_dir", type=Path, help="a Hydra multirun directory (or any folder of run directories)")
    args = parser.parse_args(argv)
    runs = load_runs(args.sweep_dir) if args.sweep_dir.is_dir() else []
    if not runs:
        parser.error(f"no results.json found under {args.sweep_dir} "
                     "(is it the multirun directory, and did its jobs finish?)")
    markdown = write_report(args.sweep_dir, aggregate_runs(runs))
    sys.stdout.write(markdown)
    return 0


if __name__ == "__main__":
    sys.exit(main())
