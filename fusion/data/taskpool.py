"""Task pools: per task and split, a torch dataset of ``(image Tensor[3, H, W], label)``.

:class:`InMemoryTaskPool` keeps small benchmarks (mini8) as uint8 tensors and converts whole batches at
once (``__getitems__``), so loading costs nothing next to the model. Every pool exposes
``tasks``, ``dataset(task, split)``, ``classnames(task)`` and ``templates(task)``.
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset

SPLITS = ("train", "val", "test")


class EmptyDatasetError(ValueError):
    """A task split holds no examples."""


class ImageTensorDataset(Dataset):
    """uint8 images ``[N, C, H, W]`` (C = 1 or 3) and int64 labels; items are normalised float ``[3, H, W]``.

    Normalisation: ``(x / 255 − mean) / std`` per channel; grey images are repeated to 3 channels.
    """

    def __init__(self, images: Tensor, labels: Tensor, mean: float = 0.5, std: float = 0.5, name: str = "?"):
        if images.dtype != torch.uint8 or images.dim() != 4:
            raise ValueError(f"dataset '{name}': images must be uint8 [N, C, H, W], got {images.dtype} "
                             f"{tuple(images.shape)}")
        if len(images) == 0:
            raise EmptyDatasetError(f"dataset '{name}' is empty; rebuild the benchmark or check the split name")
        if len(images) != len(labels):
            raise ValueError(f"dataset '{name}': {len(images)} images but {len(labels)} labels")
        self.images, self.labels = images, labels.long()
        self.mean, self.std, self.name = mean, std, name

    def __len__(self) -> int:
        return len(self.images)

    def _convert(self, x: Tensor) -> Tensor:
        x = (x.float() / 255.0 - self.mean) / self.std
        return x.expand(*x.shape[:-3], 3, *x.shape[-2:]) if x.shape[-3] == 1 else x

    def __getitem__(self, i: int) -> tuple[Tensor, Tensor]:
        return self._convert(self.images[i]), self.labels[i]

    def __getitems__(self, indices: Sequence[int]) -> list[tuple[Tensor, Tensor]]:
        idx = torch.as_tensor(indices)
        x, y = self._convert(self.images[idx]).contiguous(), self.labels[idx]
        return [(x, y)]  # one pre-collated item, see collate_batched

    def batch(self, indices: Tensor) -> tuple[Tensor, Tensor]:
        """A normalised batch ``(Tensor[B, 3, H, W], Tensor[B])``."""
        return self._convert(self.images[indices]).contiguous(), self.labels[indices]


def collate_batched(items: list) -> tuple[Tensor, Tensor]:
    """Collate for datasets whose ``__getitems__`` already returns a single collated batch."""
    if len(items) == 1 and isinstance(items[0], tuple) and items[0][0].dim() == 4:
        return items[0]
    xs, ys = zip(*items)
    return torch.stack(xs), torch.as_tensor(ys)


@dataclass
class TaskInfo:
    classnames: tuple[str, ...]
    templates: tuple[str, ...]


class InMemoryTaskPool:
    """Tasks held in memory as uint8 tensors: ``{task: {split: (images, labels)}}`` plus class names."""

    def __init__(self, name: str, data: Mapping[str, Mapping[str, tuple[Tensor, Tensor]]],
                 info: Mapping[str, TaskInfo]):
        self.name, self._data, self._info = name, dict(data), dict(info)

    @property
    def tasks(self) -> list[str]:
        return list(self._data)

    def _check(self, task: str, split: str) -> None:
        if task not in self._data:
            raise KeyError(f"task pool '{self.name}' has no task '{task}'; tasks: {self.tasks}")
        if split not in self._data[task]:
            raise KeyError(f"task '{task}' has no split '{split}'; splits: {list(self._data[task])}")

    def dataset(self, task: str, split: str) -> ImageTensorDataset:
        self._check(task, split)
        images, labels = self._data[task][split]
        return ImageTensorDataset(images, labels, name=f"{self.name}/{task}/{split}")

    def classnames(self, task: str) -> tuple[str, ...]:
        return self._info[task].classnames

    def templates(self, task: str) -> tuple[str, ...]:
        return self._info[task].templates

    def select(self, tasks: Sequence[str] | None) -> "InMemoryTaskPool":
        if tasks is None:
            return self
        for t in tasks:
            self._check(t, "test")
        return InMemoryTaskPool(self.name, {t: self._data[t] for t in tasks}, {t: self._info[t] for t in tasks})


def loader(dataset: Dataset, batch_size: int, *, shuffle: bool = False, seed: int = 0,
           drop_last: bool = False) -> DataLoader:
    """A single-process loader (in-memory data needs no workers) with a seeded shuffle."""
    gen = torch.Generator().manual_seed(seed)
    return DataLoader(dataset, batch_size=batch_size, shuffle=shuffle, generator=gen, drop_last=drop_last,
                      collate_fn=collate_batched, num_workers=0)


def mini8_taskpool(root: str | None = None, tasks: Sequence[str] | None = None, build: bool = True,
                   fetch: bool = True) -> InMemoryTaskPool:
    """The mini8 benchmark as an :class:`InMemoryTaskPool` (built into the cache first when ``build``)."""
    from pathlib import Path

    from fusion.data.mini8 import build_mini8, load_mini8, read_manifest

    from fusion.data.mini8 import default_root

    path = Path(root) if root else default_root()
    if build:
        path = build_mini8(path, fetch=fetch)
    manifest = read_manifest(path)
    names = list(tasks) if tasks is not None else list(manifest["tasks"])
    tensors = _tensor_cache(path, names, lambda: load_mini8(path, tasks=names))
    data = {t: {s: (tensors[f"{t}/{s}/images"], tensors[f"{t}/{s}/labels"]) for s in SPLITS} for t in names}
    info = {t: TaskInfo(tuple(manifest["tasks"][t]["classnames"]), tuple(manifest["tasks"][t]["templates"]))
            for t in names}
    return InMemoryTaskPool("mini8", data, info)


def _tensor_cache(root, tasks: Sequence[str], load) -> dict[str, Tensor]:
    """uint8 image / int64 label tensors of every task split, decoded once and kept as safetensors."""
    from safetensors.torch import load_file

    from fusion.utils import atomic_save_safetensors

    path = root / "tensors.safetensors"
    if path.is_file():
        cached = load_file(str(path))
        if all(f"{t}/test/images" in cached for t in tasks):
            return cached
    out = {}
    for task, dd in load().items():
        for split in SPLITS:
            ds = dd[split].with_format("numpy")[:]
            images = torch.from_numpy(np.stack(ds["image"])).to(torch.uint8)
            out[f"{task}/{split}/images"] = images[:, None] if images.dim() == 3 else images
            out[f"{task}/{split}/labels"] = torch.from_numpy(np.asarray(ds["label"], dtype=np.int64))
    if tasks == list(read_all_tasks(root)):
        atomic_save_safetensors(path, out)
    return out


def read_all_tasks(root) -> list[str]:
    from fusion.data.mini8 import read_manifest

    return list(read_manifest(root)["tasks"])


def save_taskpool(pool: InMemoryTaskPool, directory) -> None:
    """Write an in-memory task pool as ``tensors.safetensors`` + ``tasks.json`` (atomic)."""
    from pathlib import Path

    from fusion.utils import atomic_save_safetensors, atomic_write_json

    directory = Path(directory)
    tensors = {}
    for task in pool.tasks:
        for split in SPLITS:
            ds = pool.dataset(task, split)
            tensors[f"{task}/{split}/images"], tensors[f"{task}/{split}/labels"] = ds.images, ds.labels
    atomic_save_safetensors(directory / "tensors.safetensors", tensors)
    atomic_write_json(directory / "tasks.json", {"name": pool.name, "tasks": {
        t: {"classnames": list(pool.classnames(t)), "templates": list(pool.templates(t))} for t in pool.tasks}})


def load_taskpool(directory, tasks: Sequence[str] | None = None) -> InMemoryTaskPool:
    """Read a task pool written by :func:`save_taskpool` (safetensors: nothing is unpickled)."""
    import json
    from pathlib import Path

    from safetensors.torch import load_file

    directory = Path(directory)
    meta_path = directory / "tasks.json"
    if not meta_path.is_file():
        raise FileNotFoundError(f"{meta_path} is missing: not a task pool written by fusion.data.taskpool.save_taskpool")
    meta = json.loads(meta_path.read_text())
    tensors = load_file(str(directory / "tensors.safetensors"))
    names = list(tasks) if tasks is not None else list(meta["tasks"])
    data = {t: {s: (tensors[f"{t}/{s}/images"], tensors[f"{t}/{s}/labels"]) for s in SPLITS} for t in names}
    info = {t: TaskInfo(tuple(meta["tasks"][t]["classnames"]), tuple(meta["tasks"][t]["templates"])) for t in names}
    return InMemoryTaskPool(meta["name"], data, info)
