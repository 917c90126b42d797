"""Periodic, atomic checkpoints of a learned merge, and resuming a run from its directory.

A checkpoint (``<run dir>/checkpoints/last.ckpt``) holds what cannot be rebuilt from the pool: the trainable merge
parameters (:meth:`fusion.train.module.MergeTraining.on_save_checkpoint` drops the frozen experts), the optimizer
and scheduler states, Lightning's loop progress (``global_step``), the RNG state, and ``fusion: {method,
pool_hash, stage}`` so that a checkpoint is never resumed into another method or pool. ``fusion ...
resume=<run dir>`` validates it (:func:`resume_checkpoint`) and puts it in the run context, whose ``fit`` continues
the training stage that wrote it (a two-phase method re-runs, seeded, the phases before it); the DataModule then
skips the ``global_step`` batches already consumed, so a resumed run sees the data an uninterrupted one would
(tests/test_operations.py).
"""
from __future__ import annotations

import logging
import os
import pickle
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch

from fusion.errors import ConfigError, CorruptFileError, MissingFileError

log = logging.getLogger(__name__)

LAST = Path("checkpoints") / "last.ckpt"


def rng_states() -> dict[str, Any]:
    states = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        states["cuda"] = torch.cuda.get_rng_state_all()
    return states


def set_rng_states(states: dict[str, Any]) -> None:
    torch.set_rng_state(states["torch"])
    if "cuda" in states and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["cuda"])


@dataclass(frozen=True)
class Resume:
    """A validated checkpoint to continue from, and the training stage (the runner's name) that wrote it."""

    path: Path
    stage: str


class PeriodicCheckpoint(pl.Callback):
    """Every ``every_n_steps`` optimizer steps, write ``dirpath/last.ckpt`` atomically; restores the data position
    and RNG when ``trainer.fit`` loads a checkpoint.

    Atomic: ``trainer.save_checkpoint`` writes a temporary file (every rank calls it; rank 0 writes), which rank 0
    fsyncs and renames over ``last.ckpt`` with ``os.replace``, so a run killed at any moment leaves either the
    previous or the new checkpoint, never a partial file.

    Args:
        dirpath: the folder of ``last.ckpt`` (``<run dir>/checkpoints``).
        every_n_steps: checkpoint period in optimizer steps; 0 = never write.
        method, pool_hash: recorded in the checkpoint and checked by :func:`resume_checkpoint`.
        stage: the training stage of this Trainer (the runner's name), recorded for :class:`Resume`.
    """

    def __init__(self, dirpath: str | Path, every_n_steps: int, method: str, pool_hash: str, stage: str | None = None):
        if every_n_steps < 0:
            raise ConfigError(f"checkpoint_every must be ≥ 0 (0 = off), got {every_n_steps}")
        self.path = Path(dirpath) / LAST.name
        self.every_n_steps, self.method, self.pool_hash = int(every_n_steps), method, pool_hash
        self.stage = stage or method
        self._rng_to_restore: dict | None = None

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, *args: Any) -> None:
        step = trainer.global_step
        if self.every_n_steps and step > 0 and step % self.every_n_steps == 0:
            self.save(trainer)

    def save(self, trainer: pl.Trainer) -> Path:
        """Write ``last.ckpt`` through a temporary file and ``os.replace`` (call on every rank)."""
        tmp = self.path.with_name(f".{self.path.name}.tmp")
        trainer.save_checkpoint(tmp, weights_only=False)  # collective: rank 0 writes, then every rank passes a barrier
        if trainer.is_global_zero:
            with open(tmp, "rb+") as f:
                os.fsync(f.fileno())
            os.replace(tmp, self.path)
            log.debug("checkpoint at step %d written to %s", trainer.global_step, self.path)
        return self.path

    def on_save_checkpoint(self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict) -> None:
        checkpoint["fusion"] = {"method": self.method, "pool_hash": self.pool_hash, "stage": self.stage,
                                "rng": rng_states()}

    def on_load_checkpoint(self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict) -> None:
        """Skip the consumed batches (before Lightning builds the dataloader) and restore the RNG at the next step."""
        from fusion.train.datamodule import MultiTaskDataModule

        datamodule = trainer.datamodule
        if not isinstance(datamodule, MultiTaskDataModule):
            raise TypeError(f"resuming needs the MultiTaskDataModule (it skips consumed batches), got "
                            f"{type(datamodule)}")
        datamodule.start = int(checkpoint["global_step"])
        self._rng_to_restore = checkpoint.get("fusion", {}).get("rng")

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, *args: Any) -> None:
        if self._rng_to_restore is not None:
            set_rng_states(self._rng_to_restore)
            self._rng_to_restore = None


def read_checkpoint(path: str | Path) -> dict:
    """A fusion checkpoint as saved (trusted local file: tensors and plain types only); a file that cannot be read
    is a :class:`fusion.errors.CorruptFileError` naming it."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except (RuntimeError, EOFError, OSError, ValueError, pickle.UnpicklingError) as err:
        raise CorruptFileError(f"{path}: not a readable checkpoint ({type(err).__name__}: {err}); it may be a "
                               "partial copy: resume from another run directory or start afresh") from err


def resume_checkpoint(run_dir: str | Path, method: str, pool_hash: str) -> Resume:
    """``<run_dir>/checkpoints/last.ckpt`` and its stage, after checking it was written by ``method`` on the pool
    ``pool_hash`` (checkpoints without a stage were written by one-stage methods: their stage is the method)."""
    path = Path(run_dir) / LAST
    if not path.is_file():
        raise MissingFileError(f"resume={run_dir}: no checkpoint at {path} (checkpoints are written every "
                                "checkpoint_every steps of a learned method; was it 0, or did the run stop earlier?)")
    saved = read_checkpoint(path).get("fusion") or {}
    wanted = {"method": method, "pool_hash": pool_hash}
    mismatches = [f"{key} '{saved.get(key)}' in the checkpoint vs '{value}' in this run"
                  for key, value in wanted.items() if saved.get(key) != value]
    if mismatches:
        raise ConfigError(f"cannot resume from {path}: " + "; ".join(mismatches) +
                          ". Resume with the same method and model pool, or start a fresh run without resume=")
    return Resume(path, saved.get("stage") or method)


def with_callbacks(trainer: Callable[..., pl.Trainer], callbacks: Sequence[pl.Callback]) -> Callable[..., pl.Trainer]:
    """The Trainer factory ``trainer`` (a ``_partial_`` from conf/trainer) with ``callbacks`` added to its own."""
    configured = list(trainer.keywords.get("callbacks") or [])
    return partial(trainer, callbacks=configured + list(callbacks))
