"""Shared tiny, offline fixtures: a synthetic task pool and a tiny open_clip pool built by the real builder."""
from __future__ import annotations

import os

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(1)

from fusion.data.taskpool import InMemoryTaskPool, TaskInfo, save_taskpool  # noqa: E402

TINY_TASKS = ("alpha", "beta", "gamma")
TINY_BASE_RECIPE = {  # pretraining of the tiny base release (fusion.pools.mini8_pretrain.pretrain_base)
    "model": "fusion-tiny-vit", "seed": 0, "steps": 15, "batch_size": 32, "lr": 3e-3, "weight_decay": 0.0,
    "warmup": 0.1, "ssl_weight": 0.5, "ssl_temperature": 0.2, "caption_fractions": {t: 0.5 for t in TINY_TASKS},
    "amp": False,
}
TINY_RECIPE = {  # the pool recipe over that base ("base" is filled in by the tiny_dirs fixture)
    "base": None, "seed": 0, "logit_scale": 30.0,
    "finetune": {"steps": {"alpha": 25, "beta": 15, "gamma": 10}, "batch_size": 32, "lr": 3e-3,
                 "weight_decay": 0.0, "warmup": 0.1, "augment": False},
}


def synthetic_taskpool(tasks=TINY_TASKS, num_classes: int = 4, sizes=(96, 48, 48), image_size: int = 16,
                       seed: int = 0) -> InMemoryTaskPool:
    """Each class is a fixed random uint8 pattern plus noise, so tiny models learn it in a few steps."""
    gen = torch.Generator().manual_seed(seed)
    data, info = {}, {}
    for t, task in enumerate(tasks):
        patterns = torch.randint(0, 256, (num_classes, 1, image_size, image_size), generator=gen).float()
        data[task] = {}
        for split, n in zip(("train", "val", "test"), sizes):
            labels = torch.arange(n) % num_classes
            noise = torch.randn(n, 1, image_size, image_size, generator=gen) * 60
            data[task][split] = ((patterns[labels] + noise).clamp(0, 255).to(torch.uint8), labels)
        info[task] = TaskInfo(tuple(f"{task} thing {c}" for c in range(num_classes)),
                              (f"a photo of a {{}}.", f"an image of the {{}} from {task}."))
    return InMemoryTaskPool("tiny", data, info)


@pytest.fixture(scope="session")
def tiny_taskpool() -> InMemoryTaskPool:
    return synthetic_taskpool()


@pytest.fixture(scope="session")
def tiny_dirs(tmp_path_factory, tiny_taskpool, tiny_base):
    """``(pool_dir, taskpool_dir)``: a tiny CLIP pool built by the mini8 builder on the synthetic tasks."""
    from fusion.pools.mini8 import build_pool

    root = tmp_path_factory.mktemp("tiny")
    save_taskpool(tiny_taskpool, root / "tasks")
    build_pool(root / "pool", tiny_taskpool, {**TINY_RECIPE, "base": str(tiny_base)}, {"version": "synthetic"})
    return root / "pool", root / "tasks"


@pytest.fixture(scope="session")
def tiny_base(tmp_path_factory, tiny_taskpool):
    """A tiny CLIP release pretrained by the mini8 pretraining code (SLIP) on the synthetic tasks."""
    from fusion.pools.mini8_pretrain import pretrain_base

    root = tmp_path_factory.mktemp("tiny-base")
    pretrain_base(TINY_BASE_RECIPE, root / "release", work_dir=root / "work", taskpool=tiny_taskpool,
                  data_version="synthetic")
    return root / "release"


@pytest.fixture(scope="session")
def tiny_pool(tiny_dirs):
    from fusion.pools.pool import load_pool

    return load_pool(tiny_dirs[0])


@pytest.fixture(scope="session")
def other_tiny_taskpool() -> InMemoryTaskPool:
    """The tiny pool's task names and class names over other images (another dataset with the same names)."""
    return synthetic_taskpool(seed=7)
