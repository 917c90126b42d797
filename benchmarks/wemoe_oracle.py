"""The ceiling of WEMoE on a pool: routing by the true task (an oracle), with the non-MLP weights at λ0.

    python benchmarks/wemoe_oracle.py [--lambdas 0.3 0.075 0.0] [--split test] [--threads 2]

WEMoE merges every non-MLP parameter by task arithmetic at λ0 and freezes it; only the MLPs are routed. With a
perfect router (one-hot on the sample's own task, which needs the task label, so it is a diagnostic, not a method)
each task is evaluated with θ0 + λ0 Σ_k τ_k outside the MLPs and expert k's MLP inside them. No learned router can
beat this: if the oracle is far below the experts, the frozen non-MLP merge, not the router or its training, is what
limits WEMoE on that pool. Writes ``benchmarks/results/wemoe_oracle.json``.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def oracle_accuracy(pool, taskpool, lam0: float, split: str) -> dict[str, float]:
    """``{task: accuracy}`` of WEMoE at ``lam0`` with every router fixed to the one-hot of the evaluated task."""
    from fusion.evaluate import task_accuracy
    from fusion.param.routed import wemoe

    model = wemoe(pool.encoder, pool.task_vectors(), init=lam0, depth=0).eval()
    routers = [m for n, m in model.named_modules() if n.endswith(".router")]
    out = {}
    for k, task in enumerate(pool.tasks):
        with torch.no_grad():
            for router in routers:
                router.constant.copy_(torch.nn.functional.one_hot(torch.tensor(k), len(pool.tasks)).float())
        out[task] = task_accuracy(model, pool.heads, taskpool.dataset(task, split), task, batch_size=512)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lambdas", type=float, nargs="+", default=[0.3, 0.075, 0.0])
    parser.add_argument("--split", default="test")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "wemoe_oracle.json"))
    args = parser.parse_args()

    from benchmarks import default_mini8_pool
    from fusion.data.taskpool import mini8_taskpool
    from fusion.evaluate import summarize
    from fusion.utils import atomic_write_json, configure_threads

    configure_threads(args.threads)
    pool = default_mini8_pool()
    taskpool = mini8_taskpool()
    rows = {}
    for lam0 in args.lambdas:
        acc = oracle_accuracy(pool, taskpool, lam0, args.split)
        rows[str(lam0)] = summarize(acc)
        print(f"λ0 = {lam0}: oracle-routed WEMoE {100 * rows[str(lam0)]['mean_accuracy']:.1f} "
              + " ".join(f"{t} {100 * a:.1f}" for t, a in acc.items()), flush=True)
    atomic_write_json(args.out, {"split": args.split, "pool_hash": pool.manifest.get("pool_hash"),
                                 "note": "routers fixed to the one-hot of the true task (needs labels: a ceiling, "
                                         "not a method); non-MLP parameters at θ0 + λ0 Σ τ_k", "lambda0": rows})


if __name__ == "__main__":
    main()
