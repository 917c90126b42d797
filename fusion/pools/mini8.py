"""The mini8 model pool: recipe, cache and loader (the embedded default of every experiment).

A pool is built as users build CLIP pools: from a released pretrained CLIP (the one shipped in
``fusion/assets/mini8_clip``, :mod:`fusion.pools.mini8_base`) it derives the zero-shot heads and fine-tunes one
expert per task. The recipe (``conf/modelpool/mini8.yaml``) is hashed together with the data manifest's version
and the base's sha256; the pool is built once into ``<cache>/pools/mini8-<hash>`` (on CUDA when present) and
rebuilt only when the recipe, the base or the data change.
"""
from __future__ import annotations

import logging
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from fusion.data.cache import default_cache_dir
from fusion.errors import MissingFileError
from fusion.evaluate import evaluate, summarize
from fusion.pools import mini8_build as build
from fusion.pools.diagnostics import pool_diagnostics
from fusion.pools.mini8_base import RELEASE_DIR, load_base, read_card
from fusion.pools.openclip import CONFIG_NAME
from fusion.pools.pool import ModelPool, load_pool, save_pool
from fusion.utils import EtaLog, atomic_write_json, configure_threads, read_json, sha256_file, sha256_json

log = logging.getLogger(__name__)

POOL_VERSION = "mini8-pool-v4"


def base_dir(recipe: Mapping[str, Any]) -> Path:
    """The released CLIP a pool is built from: ``recipe["base"]``, or the shipped release when it is ``None``."""
    return Path(recipe["base"]) if recipe.get("base") else RELEASE_DIR


def pool_key(recipe: Mapping[str, Any], data_version: str) -> str:
    """The 12-hex-digit hash that names a pool built from ``recipe`` (and its base's weights) on ``data_version``."""
    base = read_card(base_dir(recipe))["sha256"]
    return sha256_json({"pool_version": POOL_VERSION, "data": data_version, "recipe": recipe, "base": base})[:12]


def build_pool(out_dir: Path, taskpool, recipe: Mapping[str, Any], data_manifest: Mapping[str, Any],
               accelerator: str | None = None) -> Path:
    """Build the pool of ``recipe`` from its base release into ``out_dir`` (see :func:`finetune_pool`)."""
    import open_clip

    base = base_dir(recipe)
    card = read_card(base)
    manifest = {"name": "mini8", "version": POOL_VERSION, "pool_hash": pool_key(recipe, data_manifest["version"]),
                "recipe": dict(recipe), "data_version": data_manifest["version"],
                "base": {"name": card["name"], "sha256": card["sha256"]}}
    return finetune_pool(load_base(base), open_clip.get_tokenizer(f"local-dir:{base}"),
                         read_json(base / CONFIG_NAME)["model_cfg"], out_dir, taskpool, recipe,
                         manifest, accelerator)


def finetune_pool(clip, tokenize, model_cfg: Mapping[str, Any], out_dir: Path, taskpool,
                  recipe: Mapping[str, Any], manifest: Mapping[str, Any], accelerator: str | None = None) -> Path:
    """Derive the zero-shot heads from ``clip``, fine-tune one expert per task (``recipe["finetune"]``), save the
    pool to ``out_dir`` and measure it (:func:`pool_report`) into its manifest.

    ``accelerator``: ``gpu`` or ``cpu``; ``None`` uses CUDA when it is present.
    """
    accelerator = accelerator or ("gpu" if torch.cuda.is_available() else "cpu")
    start = time.time()
    seed, ft = int(recipe["seed"]), recipe["finetune"]
    torch.manual_seed(seed)
    heads = build.zero_shot_heads(clip, taskpool, tokenize, recipe["logit_scale"])
    encoder = clip.visual.eval()
    experts = {}
    eta = EtaLog(sum(int(ft["steps"][t]) for t in taskpool.tasks), "mini8 experts", log)
    for i, task in enumerate(taskpool.tasks):
        experts[task] = build.finetune_expert(
            encoder, heads, taskpool, task, steps=int(ft["steps"][task]), batch_size=ft["batch_size"], lr=ft["lr"],
            weight_decay=ft["weight_decay"], warmup=ft["warmup"], augment=ft["augment"], seed=seed + 1 + i,
            accelerator=accelerator, layer_decay=float(ft.get("layer_decay", 1.0)))
        eta.advance(int(ft["steps"][task]), f"expert {task} ({i + 1}/{len(taskpool.tasks)})")
    manifest = {**manifest, "seed": seed, "tasks": taskpool.tasks, "logit_scale": heads.logit_scale}
    save_pool(out_dir, clip, dict(model_cfg), experts, heads, manifest)
    manifest["experts_seconds"] = round(time.time() - start, 1)
    pool = load_pool(out_dir)
    log.info("measuring the pool: zero-shot and experts on val and test, alpha curves, entropy thirds")
    manifest.update(pool_report(pool, taskpool, "cuda" if accelerator == "gpu" else "cpu"))
    manifest["build_seconds"] = round(time.time() - start, 1)
    manifest["files"] = {str(p.relative_to(out_dir)): sha256_file(p) for p in sorted(out_dir.rglob("*.safetensors"))}
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
    diagnostics = pool_diagnostics(pool.to(device), taskpool, acc["val"]["pretrained"]["per_task"])
    pool.to("cpu")
    acc["taskpool_fingerprint"] = taskpool.fingerprint()  # the reference rows hold for this task pool only
    return {"accuracy": acc, "task_vectors": stats, "diagnostics": diagnostics}


def mini8_pool(recipe: Mapping[str, Any], root: str | None = None, build_if_missing: bool = True,
               tasks: list[str] | None = None, taskpool=None, num_threads: int | None = None,
               distractors: Mapping[str, int] | None = None) -> ModelPool:
    """Load the mini8 pool for ``recipe`` from the cache, building it (and the data) first if needed.

    ``distractors``: ``{count, seed}`` pads the pool with ``count`` shuffled-label experts
    (:mod:`fusion.pools.distractors`), built once next to the pool (``<pool dir>-distractors-<hash>``) and cached.

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
        raise MissingFileError("the mini8 data is not built; run `fusion-build-mini8 --fetch` first")
    out_dir = Path(root) if root else default_cache_dir() / "pools" / f"mini8-{pool_key(recipe, data_manifest['version'])}"
    if not (out_dir / "manifest.json").is_file():
        if not build_if_missing:
            raise MissingFileError(f"no mini8 pool at {out_dir} for this recipe; run `fusion` with "
                                    "modelpool.build_if_missing=true (about 8 minutes on 2 CPU cores)")
        log.info("building the mini8 pool into %s (once; cached)", out_dir)
        build_pool(out_dir, taskpool or mini8_taskpool(), recipe, data_manifest)
    if not distractors:
        return load_pool(out_dir, name="mini8", tasks=tasks)
    padding = padded_dir(out_dir, distractors, taskpool or mini8_taskpool(), recipe, build_if_missing)
    return load_pool(out_dir, name=f"mini8+{int(distractors['count'])}shuffled", tasks=tasks, distractors=padding)


def padded_dir(out_dir: Path, distractors: Mapping[str, int], taskpool, recipe: Mapping[str, Any],
               build_if_missing: bool) -> Path:
    """The directory of the pool's distractors (:func:`fusion.pools.distractors.build_distractors`), built if
    missing: about as long as the pool's own experts (~6.5 min on 2 CPU cores for 8)."""
    from fusion.pools.distractors import build_distractors, distractor_key

    pool = load_pool(out_dir, name="mini8")
    count, seed = int(distractors["count"]), int(distractors.get("seed", 0))
    directory = out_dir.parent / f"{out_dir.name}-distractors-{distractor_key(pool.pool_hash, count, seed)}"
    if not (directory / "manifest.json").is_file():
        if not build_if_missing:
            raise MissingFileError(f"no distractors at {directory}; run with modelpool.build_if_missing=true")
        log.info("building %d shuffled-label distractors into %s (once; cached)", count, directory)
        build_distractors(directory, pool, taskpool, recipe["finetune"], count, seed)
    return directory
