"""Decode a task split once with the pool's own transform and keep it on disk, keyed by data and transform.

Test-time adaptation reads the same few thousand images hundreds of times; decoding and resizing each PIL image
at every step is what makes it slow (FusionBench: 725 s for 1000 AdaMerging steps on ViT-B/32, much of it in
the loader). Here a split is decoded **once**: the geometric part of the transform (resize, crop, RGB) runs on
every image and the result is stored as ``uint8 [N, C, H, W]`` in ``<cache>/decoded/<key>/images.npy``; the
``ToTensor`` + ``Normalize`` tail runs per batch, on whatever device the batch is on, and gives exactly what the
transform gives (the same float operations in the same order). ``key`` hashes the dataset's fingerprint, its
columns and the transform's ``repr``, so a different dataset or preprocessing never reads a stale cache.

A transform that does not end in ``ToTensor`` (+ ``Normalize``) is applied whole and stored as float32.
The arrays are memory-mapped: evaluation keeps one batch in memory, not the split.
"""
from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from fusion.utils import progress, sha256_json

log = logging.getLogger(__name__)
FORMAT = "fusion-decoded-v1"


@dataclass(frozen=True)
class SplitTransform:
    """A transform cut into a per-image ``geometric`` part (PIL → PIL) and a per-batch normalisation.

    ``geometric=None`` with ``whole`` set: the transform cannot be cut and is applied whole (stored as float32).
    """

    geometric: Callable | None
    mean: tuple[float, ...] | float = 0.0
    std: tuple[float, ...] | float = 1.0
    whole: Callable | None = None

    @property
    def key(self) -> str:
        return repr(self.geometric if self.whole is None else self.whole) + f"|{self.mean}|{self.std}"


def split_transform(transform: Callable) -> SplitTransform:
    """Cut a torchvision ``Compose(..., ToTensor(), [Normalize(mean, std)])`` at its ``ToTensor``."""
    from torchvision import transforms as T

    steps = list(getattr(transform, "transforms", [transform]))
    if steps and isinstance(steps[-1], T.Normalize) and len(steps) >= 2 and isinstance(steps[-2], T.ToTensor):
        norm = steps[-1]
        return SplitTransform(T.Compose(steps[:-2]), _floats(norm.mean), _floats(norm.std))
    if steps and isinstance(steps[-1], T.ToTensor):
        return SplitTransform(T.Compose(steps[:-1]))
    return SplitTransform(None, whole=transform)


def _floats(values: Any) -> tuple[float, ...] | float:
    values = tuple(float(v) for v in (values if isinstance(values, (list, tuple)) else [values]))
    return values[0] if len(values) == 1 else values


def _to_array(image: Any, cut: SplitTransform) -> np.ndarray:
    """One image as ``uint8 [C, H, W]`` (geometric part) or ``float32 [C, H, W]`` (whole transform)."""
    if cut.whole is not None:
        return np.asarray(cut.whole(image), dtype=np.float32)
    array = np.asarray(cut.geometric(image), dtype=np.uint8)
    return array[None] if array.ndim == 2 else np.ascontiguousarray(array.transpose(2, 0, 1))


class _Rows(torch.utils.data.Dataset):
    """``(array, label)`` of row ``i``: what the decode workers compute."""

    def __init__(self, data, image_column: str, label_column: str, cut: SplitTransform):
        self.data, self.image_column, self.label_column, self.cut = data, image_column, label_column, cut

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, i: int) -> tuple[np.ndarray, int]:
        row = self.data[int(i)]
        return _to_array(row[self.image_column], self.cut), int(row[self.label_column])


def cache_key(data, image_column: str, label_column: str, cut: SplitTransform) -> str:
    """Hash of the dataset fingerprint, its columns and the transform (what the decoded arrays depend on)."""
    fingerprint = getattr(data, "_fingerprint", None) or sha256_json([len(data), data.features.to_dict()])
    return sha256_json([FORMAT, fingerprint, image_column, label_column, cut.key])[:20]


def decode_split(data, image_column: str, label_column: str, cut: SplitTransform, cache_dir: Path,
                 name: str, workers: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """``(images, labels)`` of an HF split, decoded once into ``cache_dir/<key>`` and memory-mapped."""
    target = Path(cache_dir) / cache_key(data, image_column, label_column, cut)
    if not (target / "meta.json").is_file():
        _write(data, image_column, label_column, cut, target, name, workers)
    try:
        images = np.load(target / "images.npy", mmap_mode="c", allow_pickle=False)
        labels = np.load(target / "labels.npy", allow_pickle=False)
    except (OSError, ValueError) as err:
        raise OSError(f"decoded cache {target} of '{name}' is unreadable ({err}); delete the folder and rerun "
                      "(it is rebuilt from the dataset)") from err
    if len(images) != len(data) or len(labels) != len(data):
        raise OSError(f"decoded cache {target} of '{name}' holds {len(images)} images for a split of {len(data)}; "
                      "delete the folder and rerun")
    return images, labels


def _write(data, image_column: str, label_column: str, cut: SplitTransform, target: Path, name: str,
           workers: int) -> None:
    """Decode every row into a temp folder beside ``target``, then move it into place (atomic)."""
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}."))
    try:
        rows = torch.utils.data.DataLoader(_Rows(data, image_column, label_column, cut), batch_size=64,
                                           num_workers=workers, collate_fn=list)
        images, labels, n = None, np.empty(len(data), dtype=np.int64), 0
        for chunk in progress(rows, f"decoding {name}", total=len(rows)):
            for array, label in chunk:
                if images is None:
                    images = np.lib.format.open_memmap(tmp / "images.npy", mode="w+", dtype=array.dtype,
                                                       shape=(len(data), *array.shape))
                if array.shape != images.shape[1:]:
                    raise ValueError(f"'{name}': the transform gives images of shape {array.shape} and "
                                     f"{images.shape[1:]}; end it with a fixed-size crop (CenterCrop)")
                images[n], labels[n] = array, label
                n += 1
        images.flush()
        np.save(tmp / "labels.npy", labels, allow_pickle=False)
        (tmp / "meta.json").write_text(json.dumps({"format": FORMAT, "name": name, "n": n,
                                                   "shape": list(images.shape), "transform": cut.key}))
        try:
            os.replace(tmp, target)
        except OSError:  # another process (a DDP rank) finished first: keep its copy
            if not (target / "meta.json").is_file():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
