"""The Hydra entry point ``fusion``: build pool → method → (train) → evaluate → write results.json.

    fusion                                   # the default experiment on mini8
    fusion method=ties                       # any file in conf/method/
    fusion -m method=task_arithmetic,ties    # a sweep (local, or hydra/launcher=slurm)
"""
from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

import hydra
import torch
from hydra.core.hydra_config import HydraConfig
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from fusion.evaluate import evaluate, summarize
from fusion.methods.base import RunContext
from fusion.report import print_results
from fusion.utils import atomic_write_json, configure_threads

log = logging.getLogger("fusion")


def reference_rows(pool, taskpool, batch_size: int) -> dict[str, Any]:
    """Pretrained (zero-shot) and individual-expert test accuracies: from the pool manifest, else measured."""
    cached = pool.manifest.get("accuracy", {}).get("test", {})
    rows = {}
    for name in ("pretrained", "individual"):
        per_task = cached.get(name, {}).get("per_task", {})
        if all(t in per_task for t in pool.tasks):
            rows[name] = summarize({t: per_task[t] for t in pool.tasks})
            continue
        encoder = pool.encoder if name == "pretrained" else {t: pool.expert_encoder(t) for t in pool.tasks}
        rows[name] = summarize(evaluate(encoder, pool.heads, taskpool, split="test", batch_size=batch_size))
    return rows


def output_dir(cfg: DictConfig) -> Path:
    if cfg.get("output_dir"):
        return Path(cfg.output_dir)
    return Path(HydraConfig.get().runtime.output_dir)


def train(cfg: DictConfig) -> dict[str, Any]:
    """Run one experiment described by ``cfg``; returns the results dict (also written to results.json)."""
    start = time.time()
    configure_threads(cfg.get("num_threads"))
    torch.manual_seed(cfg.seed)
    out = output_dir(cfg)
    out.mkdir(parents=True, exist_ok=True)
    pool = instantiate(cfg.modelpool)
    taskpool = instantiate(cfg.taskpool).select(pool.tasks)
    method = instantiate(cfg.method)
    ctx = RunContext(output_dir=out, seed=int(cfg.seed), trainer=instantiate(cfg.trainer),
                     loggers=[instantiate(c) for c in (cfg.get("logger") or {}).values()],
                     eval_batch_size=int(cfg.eval_batch_size))
    outcome = method.run(pool, taskpool, ctx)
    merged = summarize(evaluate(outcome.encoder, pool.heads, taskpool, split="test", batch_size=ctx.eval_batch_size))
    results = {
        "method": cfg.method.get("name") or method.__class__.__name__, "modelpool": pool.name,
        **merged, "reference": reference_rows(pool, taskpool, ctx.eval_batch_size),
        "protocol": outcome.protocol, "seed": int(cfg.seed), "pool_hash": pool.pool_hash,
        "method_info": outcome.info, "wall_time_s": round(time.time() - start, 2),
        "config": OmegaConf.to_container(cfg, resolve=False),
    }
    atomic_write_json(out / "results.json", results)
    for lg in ctx.loggers:
        lg.log_metrics({f"test/acc/{t}": a for t, a in merged["per_task"].items()} |
                       {"test/acc/mean": merged["mean_accuracy"]})
        lg.finalize("success")
    if cfg.get("print_table", True):
        print_results(results)
    log.info("results written to %s", out / "results.json")
    return results


@hydra.main(config_path="../conf", config_name="config", version_base="1.3")
def main(cfg: DictConfig) -> float:
    """Console entry point; returns the mean test accuracy (for Hydra sweepers)."""
    return train(cfg)["mean_accuracy"]


if __name__ == "__main__":
    main()
