"""Task pools held as decoded tensors (the synthetic test pools, a saved directory) and the mini8 benchmark.

Every pool here honours :class:`fusion.data.contract.TaskPool`; its datasets are :class:`ImageTensorDataset`
(decoded ``uint8`` images normalised per batch). mini8 is an :class:`fusion.data.hf_tasks.HFTaskPool` over its
``save_to_disk`` folders — the same HF-datasets code, decoded cache included, as the real CLIP benchmarks.
"""
from __future__ import annotations

import hashlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import Dataset

SPLITS = ("train", "val", "test")


class EmptyDatasetError(ValueError):
    """A task split holds no examples."""


class ImageTensorDataset(Dataset):
    """Decoded images and int64 labels of one task split; :meth:`batch` gives normalised ``float32 [B, 3, H, W]``.

    ``images`` is ``uint8 [N, C, H, W]`` (C = 1 or 3; a tensor, or a memory-mapped array of the decoded cache)
    normalised per batch as ``ToTensor`` + ``Normalize`` do: ``(x / 255 − mean) / std`` (per channel when
    ``mean`` is a tuple); grey images are repeated to 3 channels. ``float32`` images are taken as they are.
    Implements :class:`fusion.data.contract.TaskDataset`.
    """

    def __init__(self, images: Tensor | np.ndarray, labels: Tensor | np.ndarray,
                 mean: float | Sequence[float] = 0.5, std: float | Sequence[float] = 0.5, name: str = "?"):
        images, labels = torch.as_tensor(images), torch.as_tensor(labels)
        if images.dtype not in (torch.uint8, torch.float32) or images.dim() != 4:
            raise ValueError(f"dataset '{name}': images must be uint8 (or float32) [N, C, H, W], got {images.dtype} "
                             f"{tuple(images.shape)}")
        if len(images) == 0:
            raise EmptyDatasetError(f"dataset '{name}' is empty; rebuild the benchmark or check the split name")
        if len(images) != len(labels):
            raise ValueError(f"dataset '{name}': {len(images)} images but {len(labels)} labels")
        self.images, self.labels = images, labels.long()
        self.mean, self.std, self.name = mean, std, name
        scalar = isinstance(mean, (int, float)) and isinstance(std, (int, float))
        # per-channel statistics as tensors on the images' device, made once (not per batch)
        self._norm = None if scalar else tuple(torch.as_tensor(v, dtype=torch.float32, device=images.device)
                                                .view(-1, 1, 1) for v in (mean, std))

    def __len__(self) -> int:
        return len(self.images)

    @property
    def device(self) -> torch.device:
        return self.images.device

    def _convert(self, x: Tensor) -> Tensor:
        if x.dtype == torch.uint8:
            if self._norm is None:
                x = (x.float() / 255.0 - self.mean) / self.std
            else:  # torchvision's ToTensor + Normalize, operation for operation
                x = x.float().div(255).sub(self._norm[0]).div(self._norm[1])
        return x.expand(*x.shape[:-3], 3, *x.shape[-2:]) if x.shape[-3] == 1 else x

    def __getitem__(self, i: int) -> tuple[Tensor, Tensor]:
        return self._convert(self.images[i]), self.labels[i]

    def __getitems__(self, indices: Sequence[int]) -> list[tuple[Tensor, Tensor]]:
        return [self.batch(torch.as_tensor(indices))]  # one pre-collated item, see collate_batched

    def batch(self, indices: Tensor) -> tuple[Tensor, Tensor]:
        """A normalised batch ``(Tensor[B, 3, H, W], Tensor[B])`` on :attr:`device`."""
        idx = torch.as_tensor(indices, device=self.images.device)
        return self._convert(self.images[idx]).contiguous(), self.labels[idx.to(self.labels.device)]

    def to(self, device: str | torch.device) -> "ImageTensorDataset":
        """The same split with its images resident on ``device`` (one copy; batches are made there)."""
        device = torch.device(device)
        if device == self.images.device:
            return self
        return ImageTensorDataset(self.images.to(device), self.labels.to(device), self.mean, self.std, self.name)


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
        self._fingerprint: str | None = None

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

    def fingerprint(self) -> str:
        """sha256 of every tensor's bytes, the class names and templates (computed once)."""
        if self._fingerprint is None:
            h = hashlib.sha256()
            for task in self.tasks:
                h.update(repr((task, self._info[task].classnames, self._info[task].templates)).encode())
                for split in sorted(self._data[task]):
                    for tensor in self._data[task][split]:
                        h.update(tensor.contiguous().cpu().numpy().tobytes())
            self._fingerprint = h.hexdigest()[:16]
        return self._fingerprint


MINI8_MEAN_STD = (0.5, 0.5)


def mini8_transform():
    """mini8's preprocessing: the 32×32 grey image as it is, ``(x / 255 − 0.5) / 0.5``, repeated to 3 channels."""
    from torchvision import transforms as T

    return T.Compose([T.ToTensor(), T.Normalize((MINI8_MEAN_STD[0],), (MINI8_MEAN_STD[1],))])


def mini8_taskpool(root: str | None = None, tasks: Sequence[str] | None = None, build: bool = True,
                   fetch: bool = True, decoded_cache: str | None = None):
    """The mini8 benchmark as an :class:`~fusion.data.hf_tasks.HFTaskPool` over its ``save_to_disk`` folders
    (built into the cache first when ``build``)."""
    from pathlib import Path

    from fusion.data.hf_tasks import HFTaskPool, HFTaskSpec
    from fusion.data.mini8 import build_mini8, default_root, load_mini8, read_manifest

    path = Path(root) if root else default_root()
    if build:
        path = build_mini8(path, fetch=fetch)
    names = list(tasks) if tasks is not None else None
    load_mini8(path, tasks=names)  # raises Mini8NotBuiltError naming the build command when a task is missing
    manifest = read_manifest(path)
    specs = {t: HFTaskSpec(task=t, path=str(path / t), splits={s: s for s in SPLITS},
                           classnames=tuple(manifest["tasks"][t]["classnames"]),
                           templates=tuple(manifest["tasks"][t]["templates"]))
             for t in (names if names is not None else manifest["tasks"])}
    return HFTaskPool(specs, mini8_transform(), name="mini8", decoded_cache=decoded_cache)


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
    from pathlib import Path

    from fusion.errors import MissingFileError
    from fusion.utils import read_json, read_safetensors

    directory = Path(directory)
    meta_path = directory / "tasks.json"
    if not meta_path.is_file():
        raise MissingFileError(f"{meta_path} is missing: not a task pool written by "
                               "fusion.data.taskpool.save_taskpool")
    meta = read_json(meta_path)
    tensors = read_safetensors(directory / "tensors.safetensors")
    names = list(tasks) if tasks is not None else list(meta["tasks"])
    data = {t: {s: (tensors[f"{t}/{s}/images"], tensors[f"{t}/{s}/labels"]) for s in SPLITS} for t in names}
    info = {t: TaskInfo(tuple(meta["tasks"][t]["classnames"]), tuple(meta["tasks"][t]["templates"])) for t in names}
    return InMemoryTaskPool(meta["name"], data, info)
