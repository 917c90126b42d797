"""Does lower prediction entropy mean higher accuracy on this pool? (What limits entropy test-time adaptation.)

    python benchmarks/entropy_alignment.py [--lambdas 0.025 0.075 0.15 0.3] [--split val] \
        [--coefficients benchmarks/results/runs/adamerging_layer_wise/coefficients.json ...] [--threads 2] \
        [--trajectory 50 100 150 200 250 300]

AdaMerging, WEMoE and Concrete minimise the entropy of the task heads' predictions on unlabeled images, on the
premise (AdaMerging, Fig. 2) that merges with lower entropy are the more accurate ones. For task arithmetic at each
λ, and for learned coefficients (a run's ``coefficients.json``: ``θ0 + Σ_k λ_k^l τ_k^l``), this reports per task the
accuracy, the mean entropy of the softmax and the share of confident predictions (max probability > 0.9) that are
wrong, on a labeled split (``val`` by default: no test labels). Writes ``benchmarks/results/entropy_alignment.json``.

``--trajectory S1 S2 ...`` also follows one layer-wise AdaMerging run at its defaults: the run is made as a chain of
``fusion`` runs, each resuming the previous one's checkpoint (resumed runs end exactly where an uninterrupted run
would), so the coefficients at every ``S_i`` are those of the same trajectory; each is scored like the rows above.
If entropy is a good proxy, accuracy rises as the entropy falls along the trajectory.
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


def trajectory_coefficients(steps: list[int], out_root: Path, threads: int) -> list[Path]:
    """``coefficients.json`` of layer-wise AdaMerging (defaults) after each of ``steps`` optimizer steps, one
    resumed ``fusion`` run per step count (run directories under ``out_root``; kept and reused)."""
    import math

    from hydra import compose, initialize_config_dir

    from fusion.app import train

    every = math.gcd(*steps)
    paths, previous = [], None
    for step in steps:
        out = out_root / f"step{step:04d}"
        if not (out / "coefficients.json").is_file():
            with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
                cfg = compose("config", overrides=[
                    "method=adamerging_layer_wise", f"method.steps={step}", f"checkpoint_every={every}",
                    f"output_dir={out}", "logger=none", "print_table=false", "trainer.enable_progress_bar=false",
                    f"num_threads={threads}", *([f"resume={previous}"] if previous else [])])
            train(cfg)
        paths.append(out / "coefficients.json")
        previous = out
    return paths


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lambdas", type=float, nargs="+", default=[0.025, 0.075, 0.15, 0.3])
    parser.add_argument("--coefficients", nargs="*", default=[])
    parser.add_argument("--split", default="val")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--trajectory", type=int, nargs="*", default=[])
    parser.add_argument("--runs", default=str(ROOT / "benchmarks" / "results" / "runs" / "adamerging_trajectory"))
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "entropy_alignment.json"))
    args = parser.parse_args()

    from benchmarks import default_mini8_pool
    from fusion.data.taskpool import mini8_taskpool
    from fusion.utils import atomic_write_json, configure_threads

    configure_threads(args.threads)
    pool = default_mini8_pool()
    taskpool = mini8_taskpool()
    models = {f"task_arithmetic λ={lam}": (torch.full((len(pool.tasks),), lam), None) for lam in args.lambdas}
    along = trajectory_coefficients(sorted(args.trajectory), Path(args.runs), args.threads) if args.trajectory else []
    for path in [*args.coefficients, *along]:
        data = json.loads(Path(path).read_text())
        if data["tasks"] != pool.tasks:
            raise ValueError(f"{path}: tasks {data['tasks']} differ from the pool's {pool.tasks}")
        name = f"adamerging_layer_wise step {int(Path(path).parent.name[4:])}" if path in along \
            else str(Path(path).parent.name)
        models[name] = (torch.tensor(data["lambdas"]), data["tensor_names"])
    rows = {}
    for name, (lambdas, names) in models.items():
        encoder = merged_encoder(pool, lambdas, names)
        per_task = {t: task_stats(encoder, pool.heads, taskpool.dataset(t, args.split), t) for t in pool.tasks}
        mean = {k: sum(r[k] for r in per_task.values()) / len(per_task) for k in next(iter(per_task.values()))}
        rows[name] = {"per_task": per_task, "mean": mean}
        print(f"{name:48s} acc {100 * mean['accuracy']:.1f}  entropy {mean['entropy']:.3f}  "
              f"confident {100 * mean['confident_share']:.0f}% (wrong {100 * mean['confident_wrong_share']:.0f}%)",
              flush=True)
    result = {"split": args.split, "pool_hash": pool.manifest.get("pool_hash"), "models": rows}
    if along:  # the run starts at λ = 0.3 everywhere: task arithmetic at 0.3 is its step 0
        start = models.get("task_arithmetic λ=0.3") and rows["task_arithmetic λ=0.3"]["mean"]
        points = ([{"step": 0, **start}] if start else []) + [
            {"step": step, **rows[f"adamerging_layer_wise step {step}"]["mean"]} for step in sorted(args.trajectory)]
        falls = [b["entropy"] < a["entropy"] for a, b in zip(points, points[1:])]
        rises = [b["accuracy"] > a["accuracy"] for a, b in zip(points, points[1:])]
        result["trajectory"] = {"points": points, "entropy_falls": falls, "accuracy_rises": rises,
                                "aligned": all(r for f, r in zip(falls, rises) if f)}
        print("trajectory (step: val accuracy / entropy): " + ", ".join(
            f"{p['step']}: {100 * p['accuracy']:.1f} / {p['entropy']:.3f}" for p in points))
    atomic_write_json(args.out, result)


if __name__ == "__main__":
    main()
