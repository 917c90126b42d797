"""The model pool: the frozen pretrained encoder θ0, the experts θ_k and the per-task heads.

The encoder maps the model's input tensor (images for CLIP, packed tokens ``[B, 2, T]`` for a text backbone,
:mod:`fusion.pools.hf_text`) to features; the heads (CLIP's zero-shot heads, or each text expert's own classifier)
map features to a task's logits.

A pool on disk (written by :func:`save_pool`, read by :func:`load_pool`)::

    <dir>/pretrained/       open_clip local-dir model (config + safetensors), the whole CLIP
    <dir>/experts/<task>.safetensors   the fine-tuned image encoder of each task (keys of ``model.visual``)
    <dir>/heads.safetensors            {task: Tensor[C_t, D]}, metadata ``logit_scale``
    <dir>/manifest.json                recipe, seed, accuracies, hashes, task-vector statistics

*Distractors* (``load_pool(..., distractors=DIR)``, ``DIR/<name>.safetensors``, e.g. mini8 experts fine-tuned on
shuffled labels, :func:`fusion.pools.distractors.build_distractors`) are extra candidate experts with no task of
their own: validated like experts, their task vectors follow the ``K`` task experts' in :meth:`ModelPool.task_vectors`
(:attr:`ModelPool.candidates` names them all), while :attr:`ModelPool.tasks` (evaluation, heads) is unchanged.
Methods that pair expert ``k`` with task ``k``'s data call :func:`require_no_distractors`.
"""
from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from fusion.errors import ConfigError, MissingFileError
from fusion.merge.task_vectors import StateDict, TaskVectors, check_finite, stack_task_vectors, validate_compatible
from fusion.pools.heads import ZeroShotHeads
from fusion.pools.openclip import copy_with_state, freeze, load_clip_dir, save_clip_dir
from fusion.pools.tied import untied_state
from fusion.utils import atomic_save_safetensors, atomic_write_json, read_json, read_safetensors, sha256_json

log = logging.getLogger(__name__)


@dataclass
class ModelPool:
    """A frozen encoder, one fine-tuned state dict per task, and frozen per-task heads.

    ``encoder(x) -> features`` (``x``: images, or packed tokens for a text pool); ``heads(features, task) -> logits``. Experts are validated against
    the encoder's keys, shapes and dtypes when the pool is built.
    """

    name: str
    encoder: nn.Module
    experts: dict[str, StateDict]
    heads: ZeroShotHeads
    manifest: dict[str, Any] = field(default_factory=dict)
    sources: dict[str, str] = field(default_factory=dict)  # task -> where its expert came from
    clip_dir: str | None = None  # an open_clip local-dir of the whole pretrained CLIP, for exporting merges
    distractors: dict[str, StateDict] = field(default_factory=dict)  # candidate experts with no task (see above)
    mlp_pattern: str | None = None  # regex of the encoder's transformer-MLP module paths (routed methods' default)
    exporter: Callable[[dict[str, Tensor], Path], dict[str, str]] | None = None  # merged encoder state -> HF dirs

    def __post_init__(self) -> None:
        freeze(self.encoder)
        reference = self.pretrained_state()
        check_finite(reference, name=f"pool '{self.name}': the pretrained model", source=self.clip_dir or "<memory>")
        for task, state in self.experts.items():
            validate_compatible(reference, state, name=f"expert '{task}'", source=self.sources.get(task, "<memory>"))
        clash = sorted(set(self.distractors) & set(self.experts))
        if clash:
            raise ValueError(f"pool '{self.name}': distractors {clash} have the names of task experts; rename them")
        for name, state in self.distractors.items():
            validate_compatible(reference, state, name=f"distractor '{name}'", source=self.sources.get(name, "<memory>"))
            check_finite(state, name=f"distractor '{name}'", source=self.sources.get(name, "<memory>"))
        missing = [t for t in self.experts if t not in self.heads.tasks]
        if missing:
            raise ValueError(f"pool '{self.name}': experts {missing} have no head; heads: {self.heads.tasks}")

    @property
    def tasks(self) -> list[str]:
        return list(self.experts)

    @property
    def candidates(self) -> list[str]:
        """The names of the stacked task vectors: the tasks, then the distractors."""
        return self.tasks + list(self.distractors)

    def select(self, tasks: Sequence[str] | None) -> "ModelPool":
        """The same pool restricted to ``tasks`` (in that order); ``None`` keeps all."""
        if tasks is None:
            return self
        unknown = [t for t in tasks if t not in self.experts]
        if unknown:
            raise KeyError(f"pool '{self.name}' has no experts for {unknown}; it has {self.tasks}")
        keep = list(tasks) + list(self.distractors)
        return dataclasses.replace(self, experts={t: self.experts[t] for t in tasks},
                                   sources={t: self.sources.get(t, "<memory>") for t in keep})

    def to(self, device: str | torch.device) -> "ModelPool":
        """Move θ0 and the heads to ``device`` (in place): task vectors, expert encoders and merges are then made
        there. The experts stay in host memory and are copied one at a time (a sharded run keeps 1/N of them)."""
        device = torch.device(device)
        self.encoder.to(device)
        self.heads.to(device)
        return self

    def expert_state(self, task: str) -> StateDict:
        """``task``'s expert weights on the pool's device."""
        device = self.device
        return {k: v.to(device) for k, v in self.experts[task].items()}

    @property
    def device(self) -> torch.device:
        return next(self.encoder.parameters()).device

    def pretrained_state(self) -> StateDict:
        """θ0: the encoder's state dict with each tied tensor once, under its first name (:mod:`fusion.pools.tied`);
        experts' states, task vectors and merges use the same keys."""
        return untied_state(self.encoder)

    def task_vectors(self, dtype: torch.dtype | None = None, device: str | torch.device | None = None) -> TaskVectors:
        """Stacked ``{name: Tensor[K + M, *shape]}`` in the order of :attr:`candidates` (the ``K`` tasks, then the
        ``M`` distractors), on ``device`` (default: the pool's)."""
        device = torch.device(device) if device is not None else self.device
        theta0 = {k: v.to(device) for k, v in self.pretrained_state().items()}
        states = [self.experts[t] for t in self.tasks] + list(self.distractors.values())
        return stack_task_vectors(theta0, states, dtype=dtype)

    def expert_encoder(self, task: str) -> nn.Module:
        """A frozen copy of the encoder holding ``task``'s expert weights."""
        return freeze(copy_with_state(self.encoder, self.experts[task]))

    def content_key(self) -> str:
        """A hash of what the pool's weights are: the manifest's file hashes, else each source file's size and
        modification time (so a replaced expert file is a new pool for every cache keyed by this)."""
        files = self.manifest.get("files")
        if not files:
            files = {t: _stat(src) for t, src in sorted(self.sources.items())}
        key = [self.pool_hash, files, self.tasks]
        if self.distractors:
            key.append({n: _stat(self.sources.get(n, "<memory>")) for n in self.distractors})
        return sha256_json(key)[:16]

    @property
    def pool_hash(self) -> str:
        return self.manifest.get("pool_hash") or sha256_json(self.manifest)[:16]


PAIRS_DATA = "pairs each expert with its own task's data"


def require_no_distractors(pool, method: str, reason: str = PAIRS_DATA) -> None:
    """:class:`ConfigError` when ``pool`` has distractors and ``method`` needs one task per expert (``reason``:
    it pairs expert ``k`` with task ``k``'s data, or its records label one row per task)."""
    extra = [n for n in pool.candidates if n not in pool.tasks]
    if extra:
        raise ConfigError(f"method '{method}' {reason}, but the model pool has distractors {extra} with no task "
                          "(modelpool.distractors); run it on a pool without distractors, or use a method over all "
                          "task vectors (task_arithmetic, ties, fw_merging, ...)")


def _stat(source: str) -> list:
    path = Path(source).expanduser()
    if not path.exists():
        return [source]
    files = sorted(path.rglob("*")) if path.is_dir() else [path]
    return [source] + [[f.name, f.stat().st_size, f.stat().st_mtime_ns] for f in files if f.is_file()]


def save_pool(directory: str | Path, clip: nn.Module, model_cfg: dict[str, Any], experts: dict[str, StateDict],
              heads: ZeroShotHeads, manifest: dict[str, Any]) -> Path:
    """Write a pool: the whole CLIP (open_clip local-dir), each expert encoder, the heads, the manifest last."""
    directory = Path(directory)
    save_clip_dir(clip, directory / "pretrained", model_cfg,
                  {"size": model_cfg["vision_cfg"]["image_size"], "mean": [0.5] * 3, "std": [0.5] * 3})
    for task, state in experts.items():
        atomic_save_safetensors(directory / "experts" / f"{task}.safetensors", state, {"task": task})
    atomic_save_safetensors(directory / "heads.safetensors", heads.state(),
                            {"logit_scale": repr(heads.logit_scale)})
    atomic_write_json(directory / "manifest.json", manifest)
    return directory


def load_distractors(directory: str | Path) -> tuple[dict[str, StateDict], dict[str, str]]:
    """``({name: state}, {name: file})`` of every ``DIR/<name>.safetensors``, in name order."""
    files = sorted(Path(directory).glob("*.safetensors"))
    if not files:
        raise MissingFileError(f"modelpool.distractors={directory}: no <name>.safetensors expert files there "
                               "(build them with fusion-build-mini8 --distractors N, or fix the path)")
    return {f.stem: read_safetensors(f) for f in files}, {f.stem: str(f) for f in files}


def load_pool(directory: str | Path, name: str | None = None, tasks: Sequence[str] | None = None,
              distractors: str | Path | None = None) -> ModelPool:
    """Read a pool written by :func:`save_pool` (safetensors only: nothing is unpickled); ``distractors``: a
    directory of extra expert files appended as task-less candidates (see the module docstring)."""
    directory = Path(directory)
    manifest_path = directory / "manifest.json"
    if not manifest_path.is_file():
        raise MissingFileError(f"{manifest_path} is missing: {directory} is not a complete fusion model pool "
                               "(a build may have been interrupted; rebuild it)")
    manifest = read_json(manifest_path)
    clip = load_clip_dir(directory / "pretrained")
    heads_path = directory / "heads.safetensors"
    logit_scale = float(read_safetensors(heads_path, metadata=True)["logit_scale"])
    heads = ZeroShotHeads(read_safetensors(heads_path), logit_scale)
    order = list(tasks) if tasks is not None else manifest.get("tasks") or heads.tasks
    experts, sources = {}, {}
    for task in order:
        path = directory / "experts" / f"{task}.safetensors"
        if not path.is_file():
            raise MissingFileError(f"expert for task '{task}' not found at {path}; available: "
                                   f"{sorted(p.stem for p in (directory / 'experts').glob('*.safetensors'))}")
        experts[task], sources[task] = read_safetensors(path), str(path)
    extra: dict[str, StateDict] = {}
    if distractors is not None:
        extra, extra_sources = load_distractors(distractors)
        sources.update(extra_sources)
    return ModelPool(name or manifest.get("name", directory.name), clip.visual, experts, heads, manifest, sources,
                     str(directory / "pretrained"), extra)
