"""The mini8 model pool: recipe, cache and loader (the embedded default of every experiment).

The recipe (``conf/modelpool/mini8.yaml``) is hashed together with the data manifest's version; the pool is
built once into ``<cache>/pools/mini8-<hash>`` and rebuilt only when the recipe or the data change.
"""
from __future__ import annotations

import logging
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from fusion.data.cache import default_cache_dir
from fusion.evaluate import evaluate, summarize
from fusion.pools import mini8_build as build
from fusion.pools.openclip import create_clip, model_config
from fusion.pools.pool import ModelPool, load_pool, save_pool
from fusion.utils import configure_threads, sha256_file, sha256_json

log = logging.getLogger(__name__)

POOL_VERSION = "mini8-pool-v3"


def pool_key(recipe: Mapping[str, Any], data_version: str) -> str:
    """The 12-hex-digit hash that names a pool built from ``recipe`` on data ``data_version``."""
    return sha256_json({"pool_version": POOL_VERSION, "data": data_version, "recipe": recipe})[:12]


def build_pool(out_dir: Path, taskpool, recipe: Mapping[str, Any], data_manifest: Mapping[str, Any],
               accelerator: str = "cpu") -> Path:
    """Pretrain, derive heads, fine-tune one expert per task, evaluate, and save the pool to ``out_dir``."""
    import open_clip

    start = time.time()
    seed, pre, ft = int(recipe["seed"]), recipe["pretrain"], recipe["finetune"]
    torch.manual_seed(seed)
    clip = create_clip(recipe["model"])
    tokenize = open_clip.get_tokenizer(recipe["model"])
    build.pretrain_clip(clip, taskpool, tokenize, seed=seed, accelerator=accelerator, **pre)
    heads = build.zero_shot_heads(clip, taskpool, tokenize, float(recipe["max_logit_scale"]))
    encoder = clip.visual.eval()
    experts = {}
    for i, task in enumerate(taskpool.tasks):
        log.info("fine-tuning expert %s (%d steps)", task, ft["steps"][task])
        experts[task] = build.finetune_expert(
            encoder, heads, taskpool, task, steps=int(ft["steps"][task]), batch_size=ft["batch_size"], lr=ft["lr"],
            weight_decay=ft["weight_decay"], warmup=ft["warmup"], augment=ft["augment"], seed=seed + 1 + i,
            accelerator=accelerator)
    manifest = {
        "name": "mini8", "version": POOL_VERSION, "pool_hash": pool_key(recipe, data_manifest["version"]),
        "recipe": dict(recipe), "seed": seed, "tasks": taskpool.tasks, "data_version": data_manifest["version"],
        "logit_scale": heads.logit_scale,
    }
    save_pool(out_dir, clip, model_config(recipe["model"]), experts, heads, manifest)
    pool = load_pool(out_dir)
    manifest.update(pool_report(pool, taskpool, "cuda" if accelerator == "gpu" else "cpu"))
    manifest["build_seconds"] = round(time.time() - start, 1)
    manifest["files"] = {str(p.relative_to(out_dir)): sha256_file(p) for p in sorted(out_dir.rglob("*.safetensors"))}
    from fusion.utils import atomic_write_json

    atomic_write_json(out_dir / "manifest.json", manifest)
    log.info("mini8 pool built in %.0f s at %s", manifest["build_seconds"], out_dir)
    return out_dir


def pool_report(pool: ModelPool, taskpool, device: str = "cpu") -> dict[str, Any]:
    """Accuracies (pretrained zero-shot and each expert on its task, val and test) and task-vector statistics."""
    experts = {t: pool.expert_encoder(t).to(device) for t in pool.tasks}
    pool.heads.to(device)
    acc = {}
    for split in ("val", "test"):
        acc[split] = {"pretrained": summarize(evaluate(pool.encoder.to(device), pool.heads, taskpool, split=split,
                                                       device=device)),
                      "individual": summarize(evaluate(experts, pool.heads, taskpool, split=split, device=device))}
    pool.encoder.cpu(), pool.heads.cpu()
    stats = build.task_vector_stats(pool.pretrained_state(), pool.experts)
    acc["taskpool_fingerprint"] = taskpool.fingerprint()  # the reference rows hold for this task pool only
    return {"accuracy": acc, "task_vectors": stats}


def mini8_pool(recipe: Mapping[str, Any], root: str | None = None, build_if_missing: bool = True,
               tasks: list[str] | None = None, taskpool=None, num_threads: int | None = None) -> ModelPool:
    """Load the mini8 pool for ``recipe`` from the cache, building it (and the data) first if needed.

    ``num_threads``: set torch's threads first; ``None`` keeps the current setting (the app sets it from the
    top-level ``num_threads``; resetting it here would undo a user's ``num_threads=1``).
    """
    from omegaconf import DictConfig, OmegaConf

    from fusion.data.mini8 import build_mini8, read_manifest
    from fusion.data.taskpool import mini8_taskpool

    if num_threads is not None:
        configure_threads(num_threads)
    if isinstance(recipe, DictConfig):
        recipe = OmegaConf.to_container(recipe, resolve=True)
    data_root = build_mini8(fetch=True) if build_if_missing else None
    from fusion.data.mini8 import default_root

    data_manifest = read_manifest(data_root or default_root())
    if data_manifest is None:
        raise FileNotFoundError("the mini8 data is not built; run `fusion-build-mini8 --fetch` first")
    out_dir = Path(root) if root else default_cache_dir() / "pools" / f"mini8-{pool_key(recipe, data_manifest['version'])}"
    if not (out_dir / "manifest.json").is_file():
        if not build_if_missing:
            raise FileNotFoundError(f"no mini8 pool at {out_dir} for this recipe; run `fusion` with "
                                    "modelpool.build_if_missing=true (about 14 minutes on 2 cores)")
        log.info("building the mini8 pool into %s (once; cached)", out_dir)
        build_pool(out_dir, taskpool or mini8_taskpool(), recipe, data_manifest)
    return load_pool(out_dir, name="mini8", tasks=tasks)
