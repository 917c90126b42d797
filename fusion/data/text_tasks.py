"""Text classification task pools over HF ``datasets`` (GLUE-style columns), tokenised with the backbone's tokenizer.

Each task is a :class:`TextTaskSpec`: where the data is (a hub id with a config, e.g. ``nyu-mll/glue``/``sst2``, or
a local ``save_to_disk`` folder), its text columns (one: ``sentence``; a pair: ``sentence1``/``sentence2``,
``question``/``sentence``, ``premise``/``hypothesis``, ...), its label column and splits. GLUE's test labels are
hidden, so, as FusionBench does, ``test`` is GLUE's ``validation`` split and ``val`` is carved from train (seeded).

A split is tokenised once (``truncation``, ``padding="max_length"``) into ``x: [N, 2, T]`` int64 — token ids and
attention mask (and token type ids, ``[N, 3, T]``, for a tokenizer that makes them), the input of
:class:`fusion.pools.hf_text.SequenceClassifierEncoder` — and cached on disk under
``<fusion cache>/tokenized/<task>-<key>.safetensors``, ``key`` = the split's dataset fingerprint + columns + template +
the tokenizer's identity (class, full serialisation or vocabulary, padding side and token) + ``max_length``: another
tokenizer, template or length is another file, the same ones never tokenise again.

A task may give a ``template`` (a ``str.format`` string over the dataset's columns, e.g. T5's
``"sst2 sentence: {sentence}"``, literal braces doubled): each example is then ONE text, ``template.format(**row)``
(:func:`fill_template`), tokenised alone — the prompt a text-to-text model (:mod:`fusion.pools.hf_seq2seq`) reads. Batches are :class:`TextTensorDataset` slices: the
task-data contract of :mod:`fusion.data.contract`, with inputs in place of images.
"""
from __future__ import annotations

import logging
import re
import string
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from fusion.data.cache import default_cache_dir
from fusion.data.hf_tasks import DatasetSpecError, opened_split, task_specs
from fusion.data.taskpool import EmptyDatasetError
from fusion.errors import ConfigError
from fusion.pools.hf_text import pack_inputs
from fusion.utils import atomic_save_safetensors, read_safetensors, sha256_json

log = logging.getLogger(__name__)

GLUE = "nyu-mll/glue"
GLUE_COLUMNS = {"cola": ("sentence",), "sst2": ("sentence",), "mrpc": ("sentence1", "sentence2"),
                "qqp": ("question1", "question2"), "mnli": ("premise", "hypothesis"), "qnli": ("question", "sentence"),
                "rte": ("sentence1", "sentence2"), "wnli": ("sentence1", "sentence2")}


@dataclass(frozen=True)
class TextTaskSpec:
    """Where one text task's data is and how to read it (``splits``: ``train``/``val``/``test`` to the dataset's
    split names; a ``None`` val is carved from train, ``val_fraction`` of it, seeded)."""

    task: str
    text_columns: tuple[str, ...]
    hf: str | None = None
    config: str | None = None
    path: str | None = None
    splits: Mapping[str, str | None] = field(
        default_factory=lambda: {"train": "train", "val": None, "test": "validation"})
    label_column: str = "label"
    classnames: tuple[str, ...] | None = None
    val_fraction: float = 0.1
    seed: int = 0
    template: str | None = None  # str.format over the columns: one text per example (see the module docstring)

    @property
    def source(self) -> str:
        return self.path or f"{self.hf}" + (f" ({self.config})" if self.config else "")


def text_task_spec(task: str, **overrides: Any) -> TextTaskSpec:
    """GLUE's spec of ``task`` (hub ``nyu-mll/glue``, its config and columns; MNLI tests on validation_matched)
    with ``overrides``; another task needs ``text_columns`` and ``hf`` or ``path``."""
    shipped: dict[str, Any] = {}
    if task in GLUE_COLUMNS:
        test = "validation_matched" if task == "mnli" else "validation"
        shipped = {"hf": GLUE, "config": task, "text_columns": GLUE_COLUMNS[task],
                   "splits": {"train": "train", "val": None, "test": test}}
    elif not ({"text_columns", "template"} & set(overrides)) or not ({"hf", "path"} & set(overrides)):
        raise ConfigError(f"text task '{task}' is not a GLUE task ({sorted(GLUE_COLUMNS)}); give "
                          f"overrides.{task}.text_columns (or .template) and overrides.{task}.hf or .path")
    merged = {**shipped, **{k: v for k, v in overrides.items() if v is not None}}
    if "splits" in shipped and "splits" in overrides:
        merged["splits"] = {**shipped["splits"], **overrides["splits"]}
    merged["text_columns"] = tuple(merged.get("text_columns") or ())
    if merged.get("classnames") is not None:
        merged["classnames"] = tuple(merged["classnames"])
    if merged.get("template") is None and not 1 <= len(merged["text_columns"]) <= 2:
        raise ConfigError(f"overrides.{task}.text_columns must name one column or a pair, got "
                          f"{list(merged['text_columns'])}")
    return TextTaskSpec(task=task, **merged)


class TextTensorDataset:
    """Tokenised examples ``x: [N, 2 or 3, T]`` int64 and labels ``[N]``: ``batch(indices) -> (x[idx], y[idx])``."""

    def __init__(self, inputs: Tensor, labels: Tensor, name: str):
        self.check(inputs, labels, name)
        self.inputs, self.labels, self.name = inputs.long(), labels.long(), name

    @staticmethod
    def check(inputs: Tensor, labels: Tensor, name: str) -> None:
        if inputs.dim() != 3 or inputs.shape[1] not in (2, 3) or len(inputs) != len(labels):
            raise ValueError(f"{name}: inputs must be [N, 2 or 3, T] with N labels, got {tuple(inputs.shape)} and "
                             f"{tuple(labels.shape)}")

    def __len__(self) -> int:
        return len(self.labels)

    def batch(self, indices: Tensor) -> tuple[Tensor, Tensor]:
        idx = indices.to(self.inputs.device)
        return self.inputs[idx], self.labels[idx]

    def to(self, device: str | torch.device) -> "TextTensorDataset":
        return type(self)(self.inputs.to(device), self.labels.to(device), self.name)


def load_tokenizer(name: str):
    """The tokenizer saved in checkpoint directory (or Hub id) ``name``; without a pad token it pads with its
    end-of-sequence token (GPT-2's convention; the experts' ``pad_token_id`` is the same)."""
    from transformers import AutoTokenizer

    from fusion.pools.hf_checkpoint import resolve_checkpoint

    tokenizer = AutoTokenizer.from_pretrained(str(resolve_checkpoint(name)))
    if tokenizer.pad_token is None:
        if tokenizer.eos_token is None:
            raise ConfigError(f"tokenizer {name} has neither a pad nor an end-of-sequence token; save it with "
                              "tokenizer.pad_token set")
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def tokenizer_key(tokenizer) -> str:
    """A hash of what decides the tokens: class, the full fast-tokenizer serialisation (else the vocabulary),
    padding side and pad token."""
    body = tokenizer.backend_tokenizer.to_str() if tokenizer.is_fast else sorted(tokenizer.get_vocab().items())
    return sha256_json([type(tokenizer).__name__, body, tokenizer.padding_side, tokenizer.pad_token,
                        list(tokenizer.model_input_names)])[:16]


def template_columns(template: str, columns: Sequence[str], source: str) -> list[str]:
    """The columns ``template`` reads (its ``{field}`` names, in order, once each); a field that is no column of
    ``columns`` (or a template reading none) is a :class:`DatasetSpecError` naming ``source``, the field and the
    columns."""
    used: list[str] = []
    for _, name, _, _ in string.Formatter().parse(template):
        if name is None:
            continue
        column = re.split(r"[.\[]", name, maxsplit=1)[0]
        if column not in columns:
            raise DatasetSpecError(f"{source}: the template {template!r} reads column {column or '{}'!r}, which the "
                                   f"dataset does not have; its columns are {list(columns)}. Name columns in "
                                   "{braces} (a literal brace is {{ or }})")
        if column not in used:
            used.append(column)
    if not used:
        raise DatasetSpecError(f"{source}: the template {template!r} reads no column, so every example would be the "
                               f"same text; name some of {list(columns)} in {{braces}}")
    return used


def fill_template(data, template: str, columns: Sequence[str], source: str = "the dataset") -> list[str]:
    """``[template.format(**row) for row in data]``: one text per example. ``data`` maps each column name to its
    values (an HF ``Dataset`` or a dict of lists); ``columns`` are the names a template may read (the dataset's
    columns); ``source`` names the dataset and task in the error of :func:`template_columns`."""
    used = template_columns(template, columns, source)
    values = [list(data[c]) for c in used]
    return [template.format(**dict(zip(used, row))) for row in zip(*values)]


def tokenize_columns(data, columns: Sequence[str], tokenizer, max_length: int) -> Tensor:
    """``[N, 2, max_length]``: ids and attention mask of a split's ``columns`` (one text, or a pair); ``[N, 3, ...]``
    with token type ids when they are among the tokenizer's ``model_input_names`` (BERT)."""
    return tokenize_texts([list(data[c]) for c in columns], tokenizer, max_length)


def tokenize_texts(texts: Sequence[Sequence[str]], tokenizer, max_length: int) -> Tensor:
    """:func:`tokenize_columns` of the texts themselves: one list (single texts) or two (pairs) of ``N`` strings."""
    types = "token_type_ids" in tokenizer.model_input_names
    enc = tokenizer(*texts, truncation=True, max_length=max_length, padding="max_length", return_tensors="pt",
                    return_token_type_ids=types)
    return pack_inputs(enc["input_ids"], enc["attention_mask"], enc["token_type_ids"] if types else None)


def cached_tensors(path: Path, make: Callable[[], dict[str, Tensor]], metadata: dict[str, str]) -> dict[str, Tensor]:
    """The tensors stored at ``path`` (a tokenised split keyed by its content), else ``make()`` written there
    atomically with ``metadata``."""
    if path.is_file():
        return read_safetensors(path)
    tensors = make()
    atomic_save_safetensors(path, tensors, metadata)
    return tensors


def cached_tokens(data, spec: TextTaskSpec, tokenizer, max_length: int, cache: Path, name: str) -> TextTensorDataset:
    """A split tokenised, read from ``cache`` when its key (see the module docstring) is there, else made and
    written atomically."""
    parts = [data._fingerprint, list(spec.text_columns), spec.label_column, tokenizer_key(tokenizer), int(max_length)]
    key = sha256_json(parts + ([spec.template] if spec.template is not None else []))[:24]
    path = cache / f"{spec.task}-{key}.safetensors"

    def make() -> dict[str, Tensor]:
        log.info("tokenising %s (%d examples, max_length %d) into %s", name, len(data), max_length, path)
        if spec.template is None:
            inputs = tokenize_columns(data, spec.text_columns, tokenizer, max_length)
        else:
            texts = fill_template(data, spec.template, data.column_names, template_source(spec))
            inputs = tokenize_texts([texts], tokenizer, max_length)
        return {"inputs": inputs, "labels": torch.as_tensor(list(data[spec.label_column]), dtype=torch.long)}

    stored = cached_tensors(path, make, {"source": spec.source, "split": name})
    return TextTensorDataset(stored["inputs"], stored["labels"], name)


def template_source(spec) -> str:
    """Where a task's template comes from, for messages."""
    return f"dataset {spec.source} (task '{spec.task}', overrides.{spec.task}.template)"


def validate_text(data, spec: TextTaskSpec) -> None:
    """The spec's columns (and its template's) exist; the label is a ``ClassLabel`` unless class names are given."""
    columns = list(data.column_names)
    if spec.template is not None:
        template_columns(spec.template, columns, template_source(spec))
    for column in (*spec.text_columns, spec.label_column):
        if column not in columns:
            raise DatasetSpecError(f"dataset {spec.source} (task '{spec.task}') has no column '{column}'; its columns "
                                   f"are {columns}. Set `overrides.{spec.task}.text_columns` / `.label_column`")
    if spec.classnames is None and getattr(data.features[spec.label_column], "names", None) is None:
        raise DatasetSpecError(f"dataset {spec.source} (task '{spec.task}'): column '{spec.label_column}' is not a "
                               f"ClassLabel; give the class names as `overrides.{spec.task}.classnames`")


class TokenizedTaskPool:
    """What the text and instruction task pools share: their specs by task, the base's tokenizer (loaded on first
    use), each HF split opened once (:func:`fusion.data.hf_tasks.opened_split`, checked by the subclass's
    ``validate(data, spec)``) and the folder of tokenised splits."""

    validate: Callable[[Any, Any], None]

    def __init__(self, specs: Mapping[str, Any], tokenizer: str, max_length: int, name: str,
                 cache_dir: str | None = None, token_cache: str | None = None):
        if max_length < 2:
            raise ConfigError(f"taskpool.max_length must be ≥ 2 tokens, got {max_length}")
        self.specs, self.tokenizer_name, self.max_length, self.name = dict(specs), tokenizer, int(max_length), name
        self.cache_dir, self.token_cache = cache_dir, token_cache
        self._tokenizer = None
        self._opened: dict[tuple[str, str], Any] = {}

    @property
    def tasks(self) -> list[str]:
        return list(self.specs)

    @property
    def tokenizer(self):
        if self._tokenizer is None:
            self._tokenizer = load_tokenizer(self.tokenizer_name)
        return self._tokenizer

    def token_dir(self) -> Path:
        """Where tokenised splits are cached: ``token_cache`` or ``<fusion cache>/tokenized``."""
        return Path(self.token_cache).expanduser() if self.token_cache else default_cache_dir() / "tokenized"

    def select(self, tasks: Sequence[str] | None):
        """The same pool restricted to ``tasks`` (sharing the tokenizer and the opened splits)."""
        if tasks is None:
            return self
        pool = type(self)({t: self._spec(t) for t in tasks}, self.tokenizer_name, self.max_length, self.name,
                          self.cache_dir, self.token_cache)
        pool._tokenizer, pool._opened = self._tokenizer, {k: d for k, d in self._opened.items() if k[0] in tasks}
        return pool

    def _spec(self, task: str):
        if task not in self.specs:
            raise KeyError(f"task pool '{self.name}' has no task '{task}'; tasks: {self.tasks}")
        return self.specs[task]

    def _split(self, task: str, split: str):
        """The HF dataset of one split, opened on first use (train and a missing val carved together)."""
        return opened_split(self._opened, task, split, self._spec, self.cache_dir, type(self).validate)


class TextTaskPool(TokenizedTaskPool):
    """The task-pool contract (:class:`fusion.data.contract.TaskPool`) over tokenised HF text datasets."""

    validate = staticmethod(validate_text)

    def __init__(self, specs: Mapping[str, TextTaskSpec], tokenizer: str, max_length: int = 128, name: str = "text",
                 cache_dir: str | None = None, token_cache: str | None = None):
        super().__init__(specs, tokenizer, max_length, name, cache_dir, token_cache)

    def dataset(self, task: str, split: str) -> TextTensorDataset:
        """``split`` of ``task`` tokenised (cached on disk, see the module docstring)."""
        data, name = self._split(task, split), f"{self.name}/{task}/{split}"
        if len(data) == 0:
            raise EmptyDatasetError(f"dataset '{name}' ({self._spec(task).source}) is empty; check "
                                    f"`overrides.{task}.splits`")
        return cached_tokens(data, self._spec(task), self.tokenizer, self.max_length, self.token_dir(), name)

    def classnames(self, task: str) -> tuple[str, ...]:
        spec = self._spec(task)
        if spec.classnames is not None:
            return spec.classnames
        return tuple(self._split(task, "test").features[spec.label_column].names)

    def templates(self, task: str) -> tuple[str, ...]:
        """``("{}",)``: a text pool's heads are the experts' own classifiers, not zero-shot prompts."""
        self._spec(task)
        return ("{}",)


    def fingerprint(self) -> str:
        """Hash of every task's test data (fingerprint, columns, class names), the tokenizer and ``max_length``."""
        parts: list[Any] = [tokenizer_key(self.tokenizer), self.max_length]
        for task in self.tasks:
            spec = self._spec(task)
            parts.append([task, self._split(task, "test")._fingerprint, list(spec.text_columns), spec.label_column,
                          list(self.classnames(task))] + ([spec.template] if spec.template is not None else []))
        return sha256_json(parts)[:16]




def text_taskpool(tasks: Sequence[str], tokenizer: str, max_length: int = 128,
                  overrides: Mapping[str, Mapping[str, Any]] | None = None, data_root: str | None = None,
                  val_fraction: float = 0.1, seed: int = 0, name: str = "text", cache_dir: str | None = None,
                  token_cache: str | None = None) -> TextTaskPool:
    """A :class:`TextTaskPool` of ``tasks`` (GLUE's specs unless overridden).

    Args:
        tokenizer: a checkpoint directory or Hub id holding the tokenizer (the model pool's base).
        overrides: ``{task: {key: value}}`` over the spec (``path``, ``hf``, ``config``, ``splits``, ``text_columns``,
            ``label_column``, ``classnames``, ``template``).
        data_root: a folder of ``save_to_disk`` copies named by task; used for tasks that have a folder there.
        cache_dir: the HF datasets cache; token_cache: where tokenised splits go (default
            ``<fusion cache>/tokenized``).
    """
    specs = task_specs(text_task_spec, tasks, overrides, data_root, val_fraction, seed)
    return TextTaskPool(specs, tokenizer, max_length, name, cache_dir, token_cache)
