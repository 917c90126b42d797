"""Instruction task pools for causal language models over HF ``datasets``: prompt → completion pairs.

Each task is an :class:`InstructionTaskSpec`: where the data is (a hub id with a config, or a local ``save_to_disk``
folder), its prompt and completion columns (``prompt_column``/``completion_column``; or a ``template`` formatted
with ``str.format`` over the columns, e.g. ``"Question: {question}\\nAnswer:"``, as the prompt) and splits: ``test``
is the dataset's ``test`` split (``splits.test`` names another), ``val`` is carved from train (seeded) unless
``splits.val`` names one.

An example is tokenised as ``prompt ⊕ completion ⊕ eos`` (the prompt with the tokenizer's special tokens, e.g.
Llama's BOS; the completion without; tokenised apart, so the boundary is where the columns meet) into the packed
``x: [3, T]`` (ids, mask, role) and next-token labels ``[T]`` of :mod:`fusion.pools.causal_inputs`, right-padded to
``max_length``. A completion is cut at ``max_length``; an example whose prompt alone fills ``max_length`` is dropped
(one warning counts them per split); a split with nothing left is an :class:`EmptyDatasetError` naming
``taskpool.max_length``. Tokenised splits are cached like the text pools' (:func:`fusion.data.text_tasks.cached_tensors`
under ``<fusion cache>/tokenized``), keyed by the split's dataset fingerprint, the columns and template, the
tokenizer's identity and ``max_length``.

Task-pool contract (:class:`fusion.data.contract.TaskPool`) for a task that is not classification:
``classnames(task)`` is empty (the classes are the model's vocabulary; the heads say ``num_classes = V``),
``templates(task)`` is the task's prompt template (``"{<prompt_column>}"`` without one). Every split is labeled (the
completions); label-free objectives read only the prompt positions (:func:`fusion.train.objectives.token_rows`).
"""
from __future__ import annotations

import dataclasses
import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from fusion.data.hf_tasks import DatasetSpecError, task_specs
from fusion.data.taskpool import EmptyDatasetError
from fusion.data.text_tasks import (TextTensorDataset, TokenizedTaskPool, cached_tensors, fill_template,
                                    template_columns, template_source, tokenizer_key)
from fusion.errors import ConfigError
from fusion.pools.causal_inputs import next_token_labels, pack_example
from fusion.utils import sha256_json

log = logging.getLogger(__name__)

FORMAT = "prompt+completion+eos/v1"  # part of the cache key: a change of the packing is another file


@dataclass(frozen=True)
class InstructionTaskSpec:
    """Where one instruction task's data is and how to read it (see the module docstring)."""

    task: str
    hf: str | None = None
    config: str | None = None
    path: str | None = None
    prompt_column: str = "prompt"
    completion_column: str = "completion"
    template: str | None = None
    splits: Mapping[str, str | None] = field(default_factory=lambda: {"train": "train", "val": None, "test": "test"})
    val_fraction: float = 0.1
    seed: int = 0

    @property
    def source(self) -> str:
        return self.path or f"{self.hf}" + (f" ({self.config})" if self.config else "")

    @property
    def prompt_template(self) -> str:
        return self.template if self.template is not None else "{" + self.prompt_column + "}"


def instruction_task_spec(task: str, **overrides: Any) -> InstructionTaskSpec:
    """The spec of ``task`` from its overrides: ``hf`` (with ``config``) or ``path`` is required."""
    keys = {f.name for f in dataclasses.fields(InstructionTaskSpec)} - {"task"}
    unknown = sorted(set(overrides) - keys)
    if unknown:
        raise ConfigError(f"taskpool.overrides.{task}: unknown keys {unknown}; an instruction task takes "
                          f"{sorted(keys)}")
    if not {"hf", "path"} & {k for k, v in overrides.items() if v is not None}:
        raise ConfigError(f"instruction task '{task}' has no data: give taskpool.overrides.{task}.hf (a Hub dataset) "
                          f"or .path (a save_to_disk folder), or put a folder named {task} under taskpool.data_root")
    merged = {k: v for k, v in overrides.items() if v is not None}
    if "splits" in merged:
        merged["splits"] = {"train": "train", "val": None, "test": "test", **merged["splits"]}
    return InstructionTaskSpec(task=task, **merged)


def prompts(data, spec: InstructionTaskSpec) -> list[str]:
    """Each row's prompt: its prompt column, or the template over its columns."""
    if spec.template is None:
        return [str(p) for p in data[spec.prompt_column]]
    return fill_template(data, spec.template, data.column_names, template_source(spec))


def tokenize_instructions(prompt: Sequence[str], completion: Sequence[str], tokenizer,
                          max_length: int) -> tuple[Tensor, Tensor, int]:
    """``(x [N, 3, T], labels [N, T], dropped)`` of ``prompt ⊕ completion ⊕ eos`` (module docstring), ``T =
    max_length``; ``dropped`` examples whose prompt alone fills ``max_length`` are left out."""
    if tokenizer.eos_token_id is None:
        raise ConfigError(f"tokenizer {getattr(tokenizer, 'name_or_path', '?')} has no end-of-sequence token; "
                          "save it with tokenizer.eos_token set (completions end with it)")
    prompt_ids = tokenizer(list(prompt), add_special_tokens=True)["input_ids"]
    completion_ids = tokenizer(list(completion), add_special_tokens=False)["input_ids"]
    rows = [pack_example(p, c + [tokenizer.eos_token_id], max_length, tokenizer.pad_token_id)
            for p, c in zip(prompt_ids, completion_ids)]
    kept = [r for r in rows if r is not None]
    x = torch.stack(kept) if kept else torch.zeros(0, 3, max_length, dtype=torch.long)
    return x, next_token_labels(x), len(rows) - len(kept)


class InstructionDataset(TextTensorDataset):
    """Packed examples ``x: [N, 3, T]`` int64 and next-token labels ``[N, T]``: ``batch(indices) -> (x, y)``."""

    @staticmethod
    def check(inputs: Tensor, labels: Tensor, name: str) -> None:
        if inputs.dim() != 3 or inputs.shape[1] != 3 or labels.shape != (inputs.shape[0], inputs.shape[2]):
            raise ValueError(f"{name}: inputs must be [N, 3, T] and labels [N, T], got {tuple(inputs.shape)} and "
                             f"{tuple(labels.shape)}")


def validate_instructions(data, spec: InstructionTaskSpec) -> None:
    """The completion column and the prompt column (or every column the template reads) exist."""
    columns = list(data.column_names)
    if spec.template is not None:
        template_columns(spec.template, columns, template_source(spec))
    for column in [spec.completion_column] + ([spec.prompt_column] if spec.template is None else []):
        if column not in columns:
            key = "completion_column" if column == spec.completion_column else "prompt_column"
            raise DatasetSpecError(f"dataset {spec.source} (task '{spec.task}') has no column '{column}'; its columns "
                                   f"are {columns}. Set `taskpool.overrides.{spec.task}.{key}`")


class InstructionTaskPool(TokenizedTaskPool):
    """The task-pool contract (:class:`fusion.data.contract.TaskPool`) over tokenised instruction datasets."""

    validate = staticmethod(validate_instructions)

    def __init__(self, specs: Mapping[str, InstructionTaskSpec], tokenizer: str, max_length: int = 512,
                 name: str = "instructions", cache_dir: str | None = None, token_cache: str | None = None):
        super().__init__(specs, tokenizer, max_length, name, cache_dir, token_cache)

    def dataset(self, task: str, split: str) -> InstructionDataset:
        """``split`` of ``task`` tokenised (cached on disk, see the module docstring)."""
        spec, data, name = self._spec(task), self._split(task, split), f"{self.name}/{task}/{split}"
        if len(data) == 0:
            raise EmptyDatasetError(f"dataset '{name}' ({spec.source}) is empty; check "
                                    f"`taskpool.overrides.{task}.splits`")
        key = sha256_json([FORMAT, data._fingerprint, spec.prompt_template, spec.completion_column,
                           tokenizer_key(self.tokenizer), self.max_length])[:24]
        path = self.token_dir() / f"{task}-{key}.safetensors"

        def make() -> dict[str, Tensor]:
            log.info("tokenising %s (%d examples, max_length %d) into %s", name, len(data), self.max_length, path)
            completions = [str(c) for c in data[spec.completion_column]]
            x, y, dropped = tokenize_instructions(prompts(data, spec), completions, self.tokenizer, self.max_length)
            if dropped == len(data):
                raise EmptyDatasetError(f"dataset '{name}' ({spec.source}): every one of its {len(data)} prompts "
                                        f"fills taskpool.max_length={self.max_length} tokens, leaving no room for a "
                                        "completion; raise taskpool.max_length")
            if dropped:
                log.warning("%s: %d of %d examples dropped, their prompt alone fills taskpool.max_length=%d tokens",
                            name, dropped, len(data), self.max_length)
            return {"inputs": x, "labels": y}

        stored = cached_tensors(path, make, {"source": spec.source, "split": name})
        return InstructionDataset(stored["inputs"], stored["labels"], name)

    def classnames(self, task: str) -> tuple[str, ...]:
        """``()``: no class names; the classes are the model's vocabulary (module docstring)."""
        self._spec(task)
        return ()

    def templates(self, task: str) -> tuple[str, ...]:
        """The task's prompt template (``"{<prompt_column>}"`` without one)."""
        return (self._spec(task).prompt_template,)


    def fingerprint(self) -> str:
        """Hash of every task's test data (fingerprint, columns, template), the tokenizer and ``max_length``."""
        parts: list[Any] = [FORMAT, tokenizer_key(self.tokenizer), self.max_length]
        for task in self.tasks:
            spec = self._spec(task)
            parts.append([task, self._split(task, "test")._fingerprint, spec.prompt_template, spec.completion_column])
        return sha256_json(parts)[:16]




def instruction_taskpool(tasks: Sequence[str], tokenizer: str, max_length: int = 512,
                         overrides: Mapping[str, Mapping[str, Any]] | None = None, data_root: str | None = None,
                         val_fraction: float = 0.1, seed: int = 0, name: str = "instructions",
                         cache_dir: str | None = None, token_cache: str | None = None) -> InstructionTaskPool:
    """An :class:`InstructionTaskPool` of ``tasks``.

    Args:
        tokenizer: a checkpoint directory or Hub id holding the tokenizer (the model pool's base).
        overrides: ``{task: {key: value}}``: ``hf``/``config`` or ``path``, ``prompt_column``, ``completion_column``,
            ``template``, ``splits``.
        data_root: a folder of ``save_to_disk`` copies named by task; used for tasks that have a folder there.
        cache_dir: the HF datasets cache; token_cache: where tokenised splits go (default
            ``<fusion cache>/tokenized``).
    """
    specs = task_specs(instruction_task_spec, tasks, overrides, data_root, val_fraction, seed)
    return InstructionTaskPool(specs, tokenizer, max_length, name, cache_dir, token_cache)
