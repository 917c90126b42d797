"""Does lower prediction entropy mean higher accuracy on this pool? (What limits entropy test-time adaptation.)

    python benchmarks/entropy_alignment.py [--lambdas 0.025 0.075 0.15 0.3] [--split val] \
        [--coefficients benchmarks/results/runs/adamerging_layer_wise/coefficients.json ...] [--threads 2]

AdaMerging, WEMoE and Concrete minimise the entropy of the task heads' predictions on unlabeled images, on the
premise (AdaMerging, Fig. 2) that merges with lower entropy are the more accurate ones. For task arithmetic at each
λ, and for learned coefficients (a run's ``coefficients.json``: ``θ0 + Σ_k λ_k^l τ_k^l``), this reports per task the
accuracy, the mean entropy of the softmax and the share of confident predictions (max probability > 0.9) that are
wrong, on a labeled split (``val`` by default: no test labels). Writes ``benchmarks/results/entropy_alignment.json``.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


@torch.no_grad()
def task_stats(encoder, heads, dataset, task: str, batch_size: int = 512) -> dict[str, float]:
    """Accuracy, mean entropy (nats, :func:`fusion.train.objectives.entropy`) and the wrong share of confident
    (p_max > 0.9) predictions."""
    from fusion.data.contract import iterate_batches
    from fusion.train.objectives import entropy

    correct = total_entropy = confident = confident_wrong = n = 0
    for x, y in iterate_batches(dataset, batch_size):
        logits = heads(encoder(x), task)
        pmax, pred = logits.softmax(-1).max(-1)
        correct += int((pred == y).sum())
        total_entropy += float(entropy(logits)) * len(y)
        sure = pmax > 0.9
        confident += int(sure.sum())
        confident_wrong += int((sure & (pred != y)).sum())
        n += len(y)
    return {"accuracy": correct / n, "entropy": total_entropy / n, "confident_share": confident / n,
            "confident_wrong_share": confident_wrong / max(confident, 1)}


def merged_encoder(pool, lambdas: torch.Tensor, names: list[str] | None = None):
    """``θ0 + Σ_k λ_k τ_k`` (``lambdas [K]``) or layer-wise (``lambdas [K, tensors]`` in the order of ``names``)."""
    from fusion.merge.combine import combine
    from fusion.methods.static import merged_encoder

    tv = pool.task_vectors()
    if lambdas.dim() == 2:
        lambdas = lambdas[:, [names.index(key) for key in tv]]
    return merged_encoder(pool, combine(tv, lambdas))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lambdas", type=float, nargs="+", default=[0.025, 0.075, 0.15, 0.3])
    parser.add_argument("--coefficients", nargs="*", default=[])
    parser.add_argument("--split", default="val")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "entropy_alignment.json"))
    args = parser.parse_args()

    from benchmarks import default_mini8_pool
    from fusion.data.taskpool import mini8_taskpool
    from fusion.utils import atomic_write_json, configure_threads

    configure_threads(args.threads)
    pool = default_mini8_pool()
    taskpool = mini8_taskpool()
    models = {f"task_arithmetic λ={lam}": (torch.full((len(pool.tasks),), lam), None) for lam in args.lambdas}
    for path in args.coefficients:
        data = json.loads(Path(path).read_text())
        if data["tasks"] != pool.tasks:
            raise ValueError(f"{path}: tasks {data['tasks']} differ from the pool's {pool.tasks}")
        models[str(Path(path).parent.name)] = (torch.tensor(data["lambdas"]), data["tensor_names"])
    rows = {}
    for name, (lambdas, names) in models.items():
        encoder = merged_encoder(pool, lambdas, names)
        per_task = {t: task_stats(encoder, pool.heads, taskpool.dataset(t, args.split), t) for t in pool.tasks}
        mean = {k: sum(r[k] for r in per_task.values()) / len(per_task) for k in next(iter(per_task.values()))}
        rows[name] = {"per_task": per_task, "mean": mean}
        print(f"{name:48s} acc {100 * mean['accuracy']:.1f}  entropy {mean['entropy']:.3f}  "
              f"confident {100 * mean['confident_share']:.0f}% (wrong {100 * mean['confident_wrong_share']:.0f}%)",
              flush=True)
    atomic_write_json(args.out, {"split": args.split, "pool_hash": pool.manifest.get("pool_hash"), "models": rows})


if __name__ == "__main__":
    main()
