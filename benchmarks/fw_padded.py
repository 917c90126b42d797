"""FW-Merging against task arithmetic on mini8 and on mini8 padded with irrelevant (shuffled-label) experts.

    python benchmarks/fw_padded.py [--threads 2] [--out benchmarks/results/fw_padded.json]
        [--pool LABEL OVERRIDE ...] [--methods task_arithmetic fw_merging] [--override KEY=VALUE ...]

Each ``--pool`` is a label and the Hydra overrides that select it (default: ``mini8 modelpool=mini8`` and
``mini8_padded modelpool=mini8_padded``: the eight experts plus eight experts fine-tuned on shuffled labels, built
once and cached on first use). For every pool and method (their ``conf/method`` configs: TA's λ and FW's scale are
tuned on the labeled val split), the merge is made as the ``fusion`` CLI makes it and scored on test. The issue's
question: padding the pool with distractors degrades task arithmetic (their vectors enter the sum); does FW-Merging,
which picks candidates by their alignment with the val gradient, keep its accuracy? Rows are written to ``--out``
atomically after each run, with the command, seconds and each method's record (tuning, FW's weight per candidate).
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

DEFAULT_POOLS = [["mini8", "modelpool=mini8"], ["mini8_padded", "modelpool=mini8_padded"]]
KEPT_INFO = ("hyperparameters", "tuning", "candidates", "mean_weight", "iterations")


def compose(overrides: list[str]):
    from hydra import compose as hydra_compose, initialize_config_dir

    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base=None):
        return hydra_compose("config", overrides=overrides)


def run_pool(label: str, pool_overrides: list[str], methods: list[str], extra: list[str], device) -> dict:
    """``{method: row}`` for one pool: the merge of each method and its test accuracy."""
    from hydra.utils import instantiate

    from fusion.evaluate import summarize
    from fusion.methods.base import RunContext

    cfg = compose([f"method={methods[0]}"] + pool_overrides + extra)
    pool = instantiate(cfg.modelpool).to(device)
    taskpool = instantiate(cfg.taskpool).select(pool.tasks)
    rows = {}
    for name in methods:
        method_cfg = compose([f"method={name}"] + pool_overrides + extra)
        method = instantiate(method_cfg.method)
        start = time.time()
        with tempfile.TemporaryDirectory() as tmp:
            ctx = RunContext(output_dir=Path(tmp), seed=int(cfg.seed), eval_batch_size=int(cfg.eval_batch_size),
                             device=device)
            outcome = method.run(pool, taskpool, ctx)
            test = summarize(ctx.evaluate(outcome.encoder, pool.heads, taskpool, "test"))
        rows[name] = {"test": test, "seconds": round(time.time() - start, 1), "protocol": outcome.protocol,
                      "info": {k: outcome.info[k] for k in KEPT_INFO if k in outcome.info}}
        print(f"{label:>14} {name:>16}: test mean {test['mean_accuracy']:.4f} ({rows[name]['seconds']} s)", flush=True)
    return {"pool": pool.name, "pool_hash": pool.pool_hash, "tasks": pool.tasks, "candidates": pool.candidates,
            "overrides": pool_overrides, "methods": rows}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--pool", nargs="+", action="append", metavar=("LABEL", "OVERRIDE"), default=None)
    p.add_argument("--methods", nargs="+", default=["task_arithmetic", "fw_merging"])
    p.add_argument("--override", nargs="*", default=[], help="Hydra overrides for every run (e.g. taskpool=...)")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--device", default="cpu")
    p.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "fw_padded.json")
    args = p.parse_args(argv)

    import torch

    from fusion.utils import atomic_write_json, configure_threads

    configure_threads(args.threads)
    start = time.time()
    result = {"command": "python benchmarks/fw_padded.py " + " ".join(argv if argv is not None else sys.argv[1:]),
              "device": args.device, "split_for_tuning": "val", "scored_on": "test", "pools": {}}
    for label, *overrides in args.pool or DEFAULT_POOLS:
        result["pools"][label] = run_pool(label, overrides, args.methods, args.override, torch.device(args.device))
        result["seconds"] = round(time.time() - start, 1)
        atomic_write_json(args.out, result)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
