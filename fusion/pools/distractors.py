"""Distractor experts: experts fine-tuned on *shuffled* labels, candidates with no task of their own.

FW-Merging's setting is a large pool where many checkpoints are irrelevant. A distractor is fine-tuned by the
pool's own expert recipe (:func:`fusion.pools.mini8_build.finetune_expert`: the same steps, batch size and learning
rate as the real expert of its source task) on that task's train images with a seeded permutation of the labels,
so it moves the weights as much as a real expert does but learns no task. Distractor ``i`` uses task
``tasks[i mod K]`` and is saved as ``shuffled-<task>-<i>.safetensors``; the directory's ``manifest.json`` records
the recipe and file hashes, and :func:`fusion.pools.pool.load_pool` (``distractors=DIR``) appends them to a pool.
"""
from __future__ import annotations

import logging
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from fusion.data.taskpool import ImageTensorDataset
from fusion.errors import ConfigError
from fusion.pools import mini8_build as build
from fusion.utils import atomic_save_safetensors, atomic_write_json, sha256_file, sha256_json

log = logging.getLogger(__name__)

DISTRACTOR_VERSION = "shuffled-labels-v1"


class ShuffledLabels:
    """``taskpool`` whose ``task`` train split has its labels permuted by ``seed`` (images unchanged)."""

    def __init__(self, taskpool, task: str, seed: int):
        self.taskpool, self.task, self.seed = taskpool, task, seed

    def dataset(self, task: str, split: str) -> ImageTensorDataset:
        ds = self.taskpool.dataset(task, split)
        if task != self.task or split != "train":
            return ds
        perm = torch.randperm(len(ds.labels), generator=torch.Generator().manual_seed(self.seed))
        return ImageTensorDataset(ds.images, ds.labels[perm], ds.mean, ds.std, f"{ds.name} (shuffled labels)")


def distractor_key(pool_hash: str, count: int, seed: int) -> str:
    """The 12-hex-digit hash naming the distractors of a pool (its hash covers the recipe, base and data)."""
    return sha256_json({"version": DISTRACTOR_VERSION, "pool": pool_hash, "count": count, "seed": seed})[:12]


def build_distractors(out_dir: Path, pool, taskpool, finetune: Mapping[str, Any], count: int, seed: int,
                      accelerator: str | None = None) -> Path:
    """Fine-tune ``count`` shuffled-label experts from ``pool``'s θ0 with the ``finetune`` recipe into ``out_dir``."""
    if count < 1:
        raise ConfigError(f"modelpool.distractors.count must be ≥ 1, got {count}; drop `distractors` for no padding")
    accelerator = accelerator or ("gpu" if torch.cuda.is_available() else "cpu")
    start, files = time.time(), {}
    tasks = list(pool.tasks)
    for i in range(count):
        task = tasks[i % len(tasks)]
        state = build.finetune_expert(
            pool.encoder, pool.heads, ShuffledLabels(taskpool, task, seed + i), task,
            steps=int(finetune["steps"][task]), batch_size=finetune["batch_size"], lr=finetune["lr"],
            weight_decay=finetune["weight_decay"], warmup=finetune["warmup"], augment=finetune["augment"],
            seed=seed + 1000 + i, accelerator=accelerator, layer_decay=float(finetune.get("layer_decay", 1.0)))
        path = Path(out_dir) / f"shuffled-{task}-{i}.safetensors"
        atomic_save_safetensors(path, state, {"task": task, "labels": "shuffled", "seed": str(seed + i)})
        files[path.name] = sha256_file(path)
        log.info("distractor %d/%d (%s, shuffled labels) in %.0f s", i + 1, count, task, time.time() - start)
    atomic_write_json(Path(out_dir) / "manifest.json",
                      {"version": DISTRACTOR_VERSION, "pool_hash": pool.pool_hash, "count": count, "seed": seed,
                       "finetune": dict(finetune), "files": files, "build_seconds": round(time.time() - start, 1)})
    return Path(out_dir)
