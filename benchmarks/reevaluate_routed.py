"""Re-evaluate the routed models saved by mini8 runs under a chosen routed-linear form; compare with results.json.

    python benchmarks/reevaluate_routed.py [--form auto|experts|weights] [--threads 2] [--runs-dir DIR] [run ...]

Each run directory under ``--runs-dir`` (default ``benchmarks/results/runs``) with a ``routed_model/`` (WEMoE,
sparse WEMoE, SMEAR) is rebuilt over the mini8 pool (:func:`fusion.report.merge_files.read_routed`) and scored on the test
splits (:func:`fusion.evaluate.evaluate`). Both forms compute the same per-sample merge, so the accuracies must equal
the recorded ones up to float ties; this checks it on the trained routers, not only on the random ones of the tests.
Prints one line per run; writes nothing.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
RUNS = ROOT / "benchmarks" / "results" / "runs"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", nargs="*", help="run directory names (default: every run with a routed_model/)")
    parser.add_argument("--form", default="auto", choices=("auto", "experts", "weights"))
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--runs-dir", type=Path, default=RUNS, help="the folder of run directories")
    args = parser.parse_args()
    runs = args.runs_dir

    from benchmarks import default_mini8_pool
    from fusion.data.taskpool import mini8_taskpool
    from fusion.evaluate import evaluate
    from fusion.report.merge_files import read_routed
    from fusion.utils import configure_threads

    configure_threads(args.threads)
    names = args.runs or sorted(d.name for d in runs.iterdir() if (d / "routed_model").is_dir())
    missing = [n for n in names if not (runs / n / "routed_model").is_dir()]
    if missing:
        raise SystemExit(f"no {runs}/<run>/routed_model for {missing}; runs with one: "
                         f"{sorted(d.name for d in runs.iterdir() if (d / 'routed_model').is_dir())}")
    pool = default_mini8_pool()
    taskpool, tv = mini8_taskpool(), pool.task_vectors()
    worst = 0.0
    for name in names:
        recorded = json.loads((runs / name / "results.json").read_text())
        model = read_routed(runs / name / "routed_model", pool.encoder, tv)
        for block in model.blocks().values():
            block.form = args.form
        acc = evaluate(model, pool.heads, taskpool, split="test", tasks=pool.tasks)
        diff = max(abs(acc[t] - recorded["per_task"][t]) for t in acc)
        worst = max(worst, diff)
        print(f"{name}: {100 * sum(acc.values()) / len(acc):.2f} (recorded {100 * recorded['mean_accuracy']:.2f}); "
              f"largest per-task difference {100 * diff:.2f} points", flush=True)
    print(f"form={args.form}: largest per-task difference over {len(names)} runs {100 * worst:.2f} points")


if __name__ == "__main__":
    main()
