"""Run methods on mini8 one after another and write the README's results table.

    python benchmarks/mini8_table.py                       # every README row: each method, each experiment
    python benchmarks/mini8_table.py ties adamerging_layer_wise "adamerging_layer_wise method/init=task_arithmetic"
    python benchmarks/mini8_table.py --threads 1 dare pcb  # torch threads per run (not part of the row's name)
    python benchmarks/mini8_table.py --table-only          # rewrite mini8.md from mini8.json

Each argument is a method name followed by optional Hydra overrides (quoted). Several invocations may run at once
(e.g. two with ``--threads 1`` on a 2-core machine): each row is merged into mini8.json under a file lock, and the
table refuses rows from different pools. Runs go to benchmarks/results/runs/<slug>/ and the table to benchmarks/results/mini8.md (+ mini8.json). Test accuracy of the
merged model; hyperparameters tuned on val where the method tunes; TTA methods adapt on unlabeled test images.
"""
from __future__ import annotations

import contextlib
import fcntl
import json
import re
import sys
import time
from pathlib import Path

from hydra import compose, initialize_config_dir

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from fusion.app import train  # noqa: E402
from fusion.report.tables import format_table  # noqa: E402
from fusion.utils import atomic_write_bytes, atomic_write_json  # noqa: E402



def readme_rows() -> list[str]:
    """Every README row: each conf/method/ config at its defaults, then the row each conf/experiment/ file names
    in its ``# README row:`` line (``fusion experiment=<file>`` runs the same config)."""
    methods = sorted(p.stem for p in (ROOT / "conf" / "method").glob("*.yaml"))
    experiments = sorted((ROOT / "conf" / "experiment").glob("*.yaml"))
    return methods + [re.search(r"^# README row: (.+)$", p.read_text(), re.M).group(1).strip() for p in experiments]


def row_label(spec: str, row: dict) -> str:
    """The table's name of a row: the spec, marked when the method needs the task id at inference (not one model)."""
    return f"{spec} (task id at inference)" if row.get("inference") == "task id" else spec


def slug(spec: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", spec.replace(" ", "__"))[:120]


def run(spec: str, out_root: Path, threads: int | None = None) -> dict:
    method, *overrides = spec.split()
    out = out_root / "runs" / slug(spec)
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = compose("config", overrides=[f"method={method}", *overrides, f"output_dir={out}", "logger=none",
                                           "print_table=false", "trainer.enable_progress_bar=false",
                                           *([f"num_threads={threads}"] if threads else [])])
    start = time.time()
    results = train(cfg)
    results["bench_seconds"] = round(time.time() - start, 1)
    return results


@contextlib.contextmanager
def locked(path: Path):
    """An exclusive lock on ``path`` + ``.lock`` (rows written by concurrent invocations are merged, not lost)."""
    with open(path.with_suffix(path.suffix + ".lock"), "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def read_rows(path: Path) -> dict:
    return json.loads(path.read_text()) if path.is_file() else {}


def main(argv: list[str]) -> None:
    out_root = ROOT / "benchmarks" / "results"
    threads = None
    if "--threads" in argv:  # --threads N: torch threads per run (not part of the row's name)
        i = argv.index("--threads")
        threads, argv = int(argv[i + 1]), argv[:i] + argv[i + 2:]
    table_only = "--table-only" in argv
    specs = [] if table_only else ([a for a in argv if a != "--table-only"] or readme_rows())
    table_path = out_root / "mini8.json"
    for spec in specs:
        res = run(spec, out_root, threads)
        row = {"per_task": res["per_task"], "mean_accuracy": res["mean_accuracy"], "protocol": res["protocol"],
               "method_info": res["method_info"], "seconds": res["bench_seconds"], "threads": threads,
               "reference": res["reference"], "pool_hash": res["pool_hash"], "inference": res["inference"],
               "normalized_accuracy": res["normalized_accuracy"]}
        with locked(table_path):
            rows = read_rows(table_path)
            rows[spec] = row
            atomic_write_json(table_path, rows)
        print(f"{spec}: {100 * res['mean_accuracy']:.1f} ({res['bench_seconds']} s)", flush=True)
    with locked(table_path):
        rows = read_rows(table_path)
    if not rows:
        raise SystemExit(f"no rows in {table_path}: run some methods first")
    hashes = {r["pool_hash"] for r in rows.values()}
    if len(hashes) > 1:
        stale = {spec: r["pool_hash"] for spec, r in rows.items()}
        raise SystemExit(f"{table_path} mixes rows from pools {sorted(hashes)}: {stale}; delete the stale rows "
                         "(or the file) and re-run them on one pool")
    first = next(iter(rows.values()))
    tasks = list(first["per_task"])
    table = {"pretrained (zero-shot)": first["reference"]["pretrained"]["per_task"]}
    table.update({row_label(spec, r): r["per_task"] for spec, r in rows.items()})
    table["individual experts"] = first["reference"]["individual"]["per_task"]
    atomic_write_bytes(out_root / "mini8.md", (format_table(table, tasks) + "\n").encode())
    print(format_table(table, tasks))


if __name__ == "__main__":
    main(sys.argv[1:])
