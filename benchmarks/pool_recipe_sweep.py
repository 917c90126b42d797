"""Sweep mini8 pool recipes (on a GPU if present) and report how each pool merges.

    python benchmarks/pool_recipe_sweep.py --data DIR_WITH_MINI8 --out results.json

For each recipe variant: pretrained zero-shot, experts, simple average, task arithmetic and TIES with λ (and k)
chosen on val — test accuracy. Used to choose the mini8 recipe (decisions on val-tuned merges; see README).
Variants are overrides of the recipe in conf/modelpool/mini8.yaml at run time: the recorded sweep
(benchmarks/results/pool_recipe_sweep.json) ran them on recipe v1, and stores each variant's full recipe.
"""
from __future__ import annotations

import argparse
import copy
import json
import sys
import tempfile
import time
from functools import partial
from pathlib import Path

import torch
import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

NOAUG = {"pretrain.augment": False}
VARIANTS = {
    "base": {},
    "noaug400": {**NOAUG, "pretrain.steps": 400},
    "noaug400_ft6e-4": {**NOAUG, "pretrain.steps": 400, "finetune.lr": 6e-4},
    "noaug400_f2_ft6e-4": {**NOAUG, "pretrain.steps": 400, "frac_scale": 2, "finetune.lr": 6e-4},
    "noaug400_f2_ft1e-3": {**NOAUG, "pretrain.steps": 400, "frac_scale": 2, "finetune.lr": 1e-3},
    "noaug400_f3_ft6e-4": {**NOAUG, "pretrain.steps": 400, "frac_scale": 3, "finetune.lr": 6e-4},
    "noaug400_f2_lr1e-3_ft6e-4": {**NOAUG, "pretrain.steps": 400, "frac_scale": 2, "pretrain.lr": 1e-3,
                                  "finetune.lr": 6e-4},
    "noaug400_f2_sym_ft6e-4": {**NOAUG, "pretrain.steps": 400, "frac_scale": 2, "pretrain.symmetric": True,
                               "finetune.lr": 6e-4},
    "noaug800_f2_ft6e-4": {**NOAUG, "pretrain.steps": 800, "frac_scale": 2, "finetune.lr": 6e-4},
}
SYM = {**NOAUG, "pretrain.steps": 400, "pretrain.symmetric": True}
B64 = {"finetune.batch_size": 64, "ft_scale": 2}
VARIANTS.update({
    "lr1e-3_sym_f1_ft1e-3": {**SYM, "pretrain.lr": 1e-3, "finetune.lr": 1e-3},
    "lr1e-3_sym_f2_ft1e-3": {**SYM, "pretrain.lr": 1e-3, "frac_scale": 2, "finetune.lr": 1e-3},
    "lr5e-4_sym_f2_ft1e-3": {**SYM, "pretrain.lr": 5e-4, "frac_scale": 2, "finetune.lr": 1e-3},
    "lr1e-3_sym_f2_ft6e-4_b64x2": {**SYM, "pretrain.lr": 1e-3, "frac_scale": 2, "finetune.lr": 6e-4, **B64},
    "lr1e-3_sym_f1_ft1e-3_b64x2": {**SYM, "pretrain.lr": 1e-3, "finetune.lr": 1e-3, **B64},
    "lr1e-3_sym_f2_ft1e-3_b64x2": {**SYM, "pretrain.lr": 1e-3, "frac_scale": 2, "finetune.lr": 1e-3, **B64},
    "lr5e-4_sym_f1_ft1e-3_b64x2": {**SYM, "pretrain.lr": 5e-4, "finetune.lr": 1e-3, **B64},
    "lr1e-3_sym_f1_ft6e-4_b64x2": {**SYM, "pretrain.lr": 1e-3, "finetune.lr": 6e-4, **B64},
    "lr1e-3_sym_f1.5_ft6e-4_b64x2": {**SYM, "pretrain.lr": 1e-3, "frac_scale": 1.5, "finetune.lr": 6e-4, **B64},
    "lr1e-3_sym_f1.5_ft6e-4_b64x3": {**SYM, "pretrain.lr": 1e-3, "frac_scale": 1.5, "finetune.lr": 6e-4,
                                     "finetune.batch_size": 64, "ft_scale": 3},
    "lr1e-3_sym_f1_ft8e-4_b64x3": {**SYM, "pretrain.lr": 1e-3, "finetune.lr": 8e-4, "finetune.batch_size": 64,
                                   "ft_scale": 3},
})


def apply(recipe: dict, overrides: dict) -> dict:
    r = copy.deepcopy(recipe)
    for key, value in overrides.items():
        if key == "frac_scale":
            r["pretrain"]["fractions"] = {t: min(1.0, v * value) for t, v in r["pretrain"]["fractions"].items()}
        elif key == "ft_scale":
            r["finetune"]["steps"] = {t: int(v * value) for t, v in r["finetune"]["steps"].items()}
        elif "." in key:
            a, b = key.split(".")
            r[a][b] = value
        else:
            r[key] = value
    return r


def merges(pool, taskpool, device):
    """Simple average, and task arithmetic and TIES with λ (and k) tuned on val (:class:`StaticMerge`, the library's
    static merges): test accuracies and the val grids."""
    from fusion.evaluate import summarize
    from fusion.merge.combine import simple_average, task_arithmetic
    from fusion.merge.ties import ties
    from fusion.methods.base import RunContext
    from fusion.methods.static import StaticMerge

    ctx = RunContext(output_dir=Path(tempfile.gettempdir()), device=torch.device(device))

    def test(method: StaticMerge) -> tuple[dict, dict | None]:
        outcome = method.run(pool, taskpool, ctx)
        return summarize(ctx.evaluate(outcome.encoder, pool.heads, taskpool, "test")), outcome.info["tuning"]

    average, _ = test(StaticMerge(simple_average))
    ta, ta_tuning = test(StaticMerge(partial(task_arithmetic, lam=0.3), tune={"lam": [0.05, 0.1, 0.15, 0.2, 0.3, 0.5]}))
    tied, ties_tuning = test(StaticMerge(partial(ties, k=0.2, lam=0.3),
                                         tune={"lam": [0.1, 0.2, 0.3, 0.5, 0.7], "k": [0.1, 0.2]}))
    return {"simple_average": average["mean_accuracy"],
            "ta_val_grid": {s["lam"]: s["mean_accuracy"] for s in ta_tuning["scores"]},
            "ta_best_lam": ta_tuning["best"]["lam"], "ta_test": (ta["mean_accuracy"], ta["per_task"]),
            "ties_best": (ties_tuning["best"]["lam"], ties_tuning["best"]["k"]), "ties_test": tied["mean_accuracy"]}


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--data", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--variants", nargs="*", default=list(VARIANTS))
    p.add_argument("--smoke", action="store_true", help="a few steps per stage (checks the script runs)")
    args = p.parse_args()
    from fusion.data.taskpool import mini8_taskpool
    from fusion.pools.mini8 import build_pool
    from fusion.pools.pool import load_pool

    gpu = torch.cuda.is_available()
    device = "cuda" if gpu else "cpu"
    taskpool = mini8_taskpool(root=args.data, build=False)
    base = yaml.safe_load((ROOT / "conf/modelpool/mini8.yaml").read_text())["recipe"]
    results = {}
    for name in args.variants:
        recipe = apply(base, VARIANTS[name])
        if args.smoke:
            recipe = apply(recipe, {"pretrain.steps": 2, "ft_scale": 0.05})
        start = time.time()
        with tempfile.TemporaryDirectory() as tmp:
            build_pool(Path(tmp) / "pool", taskpool, recipe, {"version": "mini8-v1"},
                       accelerator="gpu" if gpu else "cpu")
            pool = load_pool(Path(tmp) / "pool")
            acc = pool.manifest["accuracy"]["test"]
            row = {"recipe": recipe, "zero_shot": acc["pretrained"]["mean_accuracy"],
                   "experts": acc["individual"]["mean_accuracy"],
                   "experts_per_task": acc["individual"]["per_task"], "zs_per_task": acc["pretrained"]["per_task"],
                   "tv_norms": pool.manifest["task_vectors"]["relative_norm"], **merges(pool, taskpool, device),
                   "seconds": round(time.time() - start, 1)}
        results[name] = row
        print(name, json.dumps({k: row[k] for k in ("zero_shot", "experts", "simple_average", "ta_best_lam",
                                                   "ties_test", "seconds")}),
              "TA", round(row["ta_test"][0], 4), flush=True)
        Path(args.out).write_text(json.dumps(results, indent=1, default=str))


if __name__ == "__main__":
    main()
