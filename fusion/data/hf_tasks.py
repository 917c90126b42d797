"""Task pools over HuggingFace ``datasets``: the CLIP benchmarks (TA8, TALL14, TALL20) and any other.

Each task is an :class:`HFTaskSpec`: where the data is (a hub id, loaded with ``datasets.load_dataset``, or a
local ``save_to_disk`` folder, loaded with ``datasets.load_from_disk``), which splits, columns, class names and
prompt templates it has. The transform is CLIP's validation preprocessing
(``open_clip.image_transform(224, is_train=False)`` unless one is passed in). A split is decoded once with it into
the decoded cache (:mod:`fusion.data.decoded`) and served as an :class:`~fusion.data.taskpool.ImageTensorDataset`:
batches by index, bit-identical to applying the transform image by image.
The shipped specs are in :mod:`fusion.data.clip_task_specs`.

Offline (``HF_HUB_OFFLINE=1``, or no network), a hub dataset must already be in the HF cache; otherwise
:class:`DatasetUnavailableError` says how to ``save_to_disk`` it elsewhere and point ``path`` at the copy.
"""
from __future__ import annotations

import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from fusion.data.clip_task_specs import SPECS
from fusion.data.decoded import decode_split, split_transform
from fusion.data.taskpool import SPLITS, EmptyDatasetError, ImageTensorDataset
from fusion.errors import ConfigError
from fusion.utils import sha256_json

_LIKELY_IMAGE = ("image", "img", "jpg", "png", "pixel_values")
_LIKELY_LABEL = ("label", "labels", "fine_label", "cls", "target")


class DatasetUnavailableError(ConnectionError):
    """A hub dataset is neither cached nor reachable."""


class DatasetSpecError(ValueError):
    """A dataset does not match its task spec (columns, number of classes, splits)."""


@dataclass(frozen=True)
class HFTaskSpec:
    """Where one task's data is and how to read it.

    ``splits`` maps ``train`` / ``val`` / ``test`` to the dataset's split names; a ``None`` val split is carved
    from train (``val_fraction`` of it, seeded). ``classnames=None`` reads them from the label's ``ClassLabel``
    feature (``clean`` turns ``_`` and ``/`` into spaces).
    """

    task: str
    hf: str | None = None
    config: str | None = None
    path: str | None = None
    splits: Mapping[str, str | None] = field(default_factory=lambda: {"train": "train", "val": None, "test": "test"})
    image_column: str = "image"
    label_column: str = "label"
    classnames: tuple[str, ...] | None = None
    clean: bool = False
    templates: tuple[str, ...] = ("a photo of a {}.",)
    val_fraction: float = 0.1
    seed: int = 0

    @property
    def source(self) -> str:
        return self.path or f"{self.hf}" + (f" ({self.config})" if self.config else "")


def task_spec(task: str, **overrides: Any) -> HFTaskSpec:
    """The shipped spec of ``task`` (see :mod:`fusion.data.clip_task_specs`) with ``overrides`` applied."""
    shipped = dict(SPECS.get(task, {}))
    if not shipped and "hf" not in overrides and "path" not in overrides:
        raise KeyError(f"no shipped spec for task '{task}' (known: {sorted(SPECS)}); give at least `hf` or `path` "
                       f"under overrides.{task}")
    test = shipped.pop("test", "test")
    shipped.setdefault("splits", {"train": "train", "val": None, "test": test})
    merged = {**shipped, **{k: v for k, v in overrides.items() if v is not None or k == "classnames"}}
    if "splits" in overrides:
        merged["splits"] = {**shipped["splits"], **overrides["splits"]}
    for key in ("classnames", "templates"):
        if merged.get(key) is not None:
            merged[key] = tuple(merged[key])
    return HFTaskSpec(task=task, **merged)


class HFTaskPool:
    """The task-pool contract (:class:`fusion.data.contract.TaskPool`) over HF datasets.

    Each split is opened lazily (first ``dataset`` / ``classnames`` call) and validated then; ``dataset`` decodes
    it once into ``decoded_cache`` (default ``<fusion cache>/decoded``) with ``decode_workers`` processes
    (``None``: up to 8 for splits of more than 2,000 images, else in this process).
    """

    def __init__(self, specs: Mapping[str, HFTaskSpec], transform: Callable | None = None,
                 cache_dir: str | None = None, name: str = "hf", decoded_cache: str | None = None,
                 decode_workers: int | None = None):
        self.specs, self.name, self.cache_dir = dict(specs), name, cache_dir
        self.transform = transform if transform is not None else default_transform()
        self.decoded_cache, self.decode_workers = decoded_cache, decode_workers
        self._opened: dict[tuple[str, str], Any] = {}

    @property
    def tasks(self) -> list[str]:
        return list(self.specs)

    def _spec(self, task: str) -> HFTaskSpec:
        if task not in self.specs:
            raise KeyError(f"task pool '{self.name}' has no task '{task}'; tasks: {self.tasks}")
        return self.specs[task]

    def dataset(self, task: str, split: str) -> ImageTensorDataset:
        """``split`` of ``task`` decoded with the pool's transform (cached on disk, memory-mapped)."""
        spec, data = self._spec(task), self._split(task, split)
        name = f"{self.name}/{task}/{split}"
        if len(data) == 0:
            raise EmptyDatasetError(f"dataset '{name}' ({spec.source}) is empty; check the split names of the task "
                                    f"spec (`overrides.{task}.splits`)")
        cut = split_transform(self.transform)
        images, labels = decode_split(data, spec.image_column, spec.label_column, cut, self._decoded_dir(), name,
                                      self._workers(len(data)))
        return ImageTensorDataset(images, labels, cut.mean, cut.std, name)  # float32 (whole transform): as is

    def classnames(self, task: str) -> tuple[str, ...]:
        spec = self._spec(task)
        if spec.classnames is not None:
            return spec.classnames
        feature = self._split(task, "test").features[spec.label_column]
        return tuple(clean_classname(n) if spec.clean else n for n in feature.names)

    def templates(self, task: str) -> tuple[str, ...]:
        return self._spec(task).templates

    def select(self, tasks: Sequence[str] | None) -> "HFTaskPool":
        if tasks is None:
            return self
        pool = HFTaskPool({t: self._spec(t) for t in tasks}, self.transform, self.cache_dir, self.name,
                          self.decoded_cache, self.decode_workers)
        pool._opened = {k: d for k, d in self._opened.items() if k[0] in tasks}
        return pool

    def fingerprint(self) -> str:
        """Hash of every task's test-split fingerprint, columns, class names, templates and the transform."""
        parts = [repr(self.transform)]
        for task in self.tasks:
            spec, data = self._spec(task), self._split(task, "test")
            parts.append([task, getattr(data, "_fingerprint", len(data)), spec.image_column, spec.label_column,
                          list(self.classnames(task)), list(spec.templates)])
        return sha256_json(parts)[:16]

    def _decoded_dir(self) -> Path:
        from fusion.data.cache import default_cache_dir

        return Path(self.decoded_cache).expanduser() if self.decoded_cache else default_cache_dir() / "decoded"

    def _workers(self, n: int) -> int:
        import os

        if self.decode_workers is not None:
            return int(self.decode_workers)
        return min(8, max(0, len(os.sched_getaffinity(0)) - 1)) if n > 2000 else 0

    def _split(self, task: str, split: str):
        """The HF dataset of one split, opened on first use and validated against the spec."""
        return opened_split(self._opened, task, split, self._spec, self.cache_dir, validate)


def clean_classname(name: str) -> str:
    """``'/a/airplane_cabin'`` → ``'airplane cabin'``: drop a SUN-style ``/x/`` prefix, ``_`` and ``/`` to spaces."""
    return re.sub(r"[_/]+", " ", re.sub(r"^/[a-z]/", "", name)).strip()


def validate(data, spec: HFTaskSpec) -> None:
    """Columns present, class names matching the label feature's ``num_classes``."""
    columns = list(data.column_names)
    for key, column, likely in (("image_column", spec.image_column, _LIKELY_IMAGE),
                                ("label_column", spec.label_column, _LIKELY_LABEL)):
        if column not in columns:
            guess = [f" (probably '{c}')" for c in columns if c in likely][:1]
            raise DatasetSpecError(
                f"dataset {spec.source} (task '{spec.task}') has no column '{column}'; its columns are {columns}. "
                f"Set `overrides.{spec.task}.{key}` in the task-pool config" + "".join(guess))
    feature = data.features[spec.label_column]
    num_classes = getattr(feature, "num_classes", None)
    if spec.classnames is None and num_classes is None:
        raise DatasetSpecError(f"dataset {spec.source} (task '{spec.task}'): column '{spec.label_column}' is not a "
                               f"ClassLabel ({feature}); give the class names as `overrides.{spec.task}.classnames`")
    if spec.classnames is not None and num_classes is not None and len(spec.classnames) != num_classes:
        raise DatasetSpecError(f"task '{spec.task}': {len(spec.classnames)} class names given, but the label "
                               f"feature of {spec.source} has num_classes={num_classes}; fix "
                               f"`overrides.{spec.task}.classnames` (or set it to null to use the dataset's names)")


def opened_split(opened: dict, task: str, split: str, spec_of: Callable, cache_dir: str | None,
                 validate: Callable) -> Any:
    """The HF dataset of ``split`` of ``task``, opened on first use into ``opened`` (keyed ``(task, split)``) and
    checked by ``validate(data, spec)``; a task without a val split gets train and val carved together. ``spec_of``:
    ``task -> spec`` (the pool's, which names the pool's tasks when one is missing)."""
    if split not in SPLITS:
        raise KeyError(f"split must be one of {SPLITS}, got '{split}'")
    if (task, split) not in opened:
        spec = spec_of(task)
        if split != "test" and spec.splits.get("val") is None:  # train and val both come from the carve
            train, val = carve(open_split(spec, "train", cache_dir), spec.val_fraction, spec.seed)
            opened[(task, "train")], opened[(task, "val")] = train, val
        else:
            opened[(task, split)] = open_split(spec, split, cache_dir)
        validate(opened[(task, split)], spec)
    return opened[(task, split)]


def open_split(spec: HFTaskSpec, split: str, cache_dir: str | None = None):
    """The HF dataset of ``spec``'s ``split`` (``train``/``val``/``test``, mapped to the dataset's split name)."""
    import datasets

    name = spec.splits.get(split)
    if name is None:
        raise KeyError(f"task '{spec.task}' names no dataset split for '{split}'")
    if not spec.path:
        return _load_hub(spec, name, cache_dir)
    whole = datasets.load_from_disk(str(Path(spec.path).expanduser()))
    if not isinstance(whole, datasets.DatasetDict):
        raise DatasetSpecError(f"{spec.path} (task '{spec.task}') holds a single split; save a DatasetDict "
                               f"(with a '{name}' split) with save_to_disk")
    if name not in whole:
        raise DatasetSpecError(f"{spec.path} (task '{spec.task}') has splits {list(whole)}, not '{name}'; set "
                               f"`overrides.{spec.task}.splits.{split}`")
    return whole[name]


def carve(train, fraction: float, seed: int):
    """Split ``train`` into ``(train, val)`` with a seeded permutation; val gets ``round(fraction · n)`` rows."""
    n = len(train)
    order = np.random.default_rng(seed).permutation(n)
    n_val = max(1, int(round(fraction * n))) if n > 1 else 0
    return train.select(np.sort(order[n_val:])), train.select(np.sort(order[:n_val]))


def _load_hub(spec: HFTaskSpec, split: str, cache_dir: str | None):
    import datasets

    try:
        return datasets.load_dataset(spec.hf, spec.config, split=split, cache_dir=cache_dir)
    except Exception as e:
        if not _is_unreachable(e):
            raise
        args = f"'{spec.hf}'" + (f", '{spec.config}'" if spec.config else "")
        raise DatasetUnavailableError(
            f"dataset '{spec.hf}' (task '{spec.task}', split '{split}') is not in the HF cache and the Hub cannot be "
            f"reached ({type(e).__name__}: {e}). With HF_HUB_OFFLINE=1 / HF_DATASETS_OFFLINE=1 only cached "
            "datasets load. On a machine with network run\n"
            f"    python -c \"import datasets; datasets.load_dataset({args}).save_to_disk('/data/{spec.task}')\"\n"
            f"copy the folder here and set `taskpool.overrides.{spec.task}.path=/data/{spec.task}` (or "
            f"`taskpool.data_root=/data`, one folder per task)") from e


def _is_unreachable(e: BaseException) -> bool:
    """A connection / offline-mode / not-cached error of datasets or huggingface_hub (not a data error)."""
    names = {c.__name__ for c in type(e).__mro__}
    return isinstance(e, (ConnectionError, TimeoutError)) or bool(names & {
        "OfflineModeIsEnabled", "LocalEntryNotFoundError", "DatasetNotFoundError", "ConnectError", "ConnectTimeout"})


def default_transform(image_size: int = 224) -> Callable:
    """CLIP's validation preprocessing (resize, center crop, RGB, OpenAI mean/std)."""
    import open_clip

    return open_clip.image_transform(image_size, is_train=False)



def task_specs(make_spec: Callable[..., Any], tasks: Sequence[str], overrides: Mapping[str, Any] | None,
               data_root: str | None, val_fraction: float, seed: int) -> dict[str, Any]:
    """``{task: make_spec(task, **extra)}``: each task's ``overrides`` over the split settings, and its folder under
    ``data_root`` (a ``save_to_disk`` copy named by task) as ``path`` when there is one; the image and text task
    pools build their specs this way. Overrides for a task not in ``tasks`` are a :class:`ConfigError`."""
    overrides = {k: dict(v or {}) for k, v in (overrides or {}).items()}
    unknown = sorted(set(overrides) - set(tasks))
    if unknown:
        raise ConfigError(f"taskpool.overrides given for {unknown}, which are not in tasks {list(tasks)}")
    specs = {}
    for task in tasks:
        extra = {"val_fraction": val_fraction, "seed": seed, **overrides.get(task, {})}
        if data_root and "path" not in extra and (Path(data_root).expanduser() / task).is_dir():
            extra["path"] = str(Path(data_root).expanduser() / task)
        specs[task] = make_spec(task, **extra)
    return specs

def hf_taskpool(tasks: Sequence[str], overrides: Mapping[str, Mapping[str, Any]] | None = None,
                data_root: str | None = None, transform: Callable | None = None, image_size: int = 224,
                cache_dir: str | None = None, val_fraction: float = 0.1, seed: int = 0,
                name: str = "hf", decoded_cache: str | None = None, decode_workers: int | None = None) -> HFTaskPool:
    """An :class:`HFTaskPool` of ``tasks`` from the shipped specs.

    Args:
        overrides: ``{task: {key: value}}`` over the spec (``path``, ``hf``, ``splits``, ``image_column``,
            ``label_column``, ``classnames``, ``templates``, ...); a task without a shipped spec needs ``hf`` or
            ``path``.
        data_root: a folder of ``save_to_disk`` copies named by task; used for tasks that have a folder there.
        transform: image → ``Tensor[3, H, W]`` (default: CLIP's validation preprocessing at ``image_size``).
        decoded_cache, decode_workers: where and with how many processes splits are decoded (see HFTaskPool).
    """
    specs = task_specs(task_spec, tasks, overrides, data_root, val_fraction, seed)
    return HFTaskPool(specs, transform if transform is not None else default_transform(image_size), cache_dir, name,
                      decoded_cache, decode_workers)
