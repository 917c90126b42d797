"""A model pool of HF sequence-classification checkpoints: the backbone is merged, each task keeps its own head.

FusionBench's GLUE protocol. The pool is built from HF checkpoint directories (or Hub ids, :func:`resolve_checkpoint`)::

    base:    the pretrained model (any class of its ``model_type``: ``GPT2Model``, ``GPT2LMHeadModel``, a
             ``*ForSequenceClassification``; only its backbone is read, a head it may have is ignored)
    experts: {task: an ``AutoModelForSequenceClassification`` fine-tune of the base}

The input of the backbone is one int64 tensor ``x: [B, 2, T]``, token ids ``x[:, 0]`` and attention mask
``x[:, 1]`` — ``[B, 3, T]`` with token type ids ``x[:, 2]`` when the tokenizer makes them (BERT's sentence pairs) —
(what :mod:`fusion.data.text_tasks` batches), so it travels through the task-data contract, the
training stream, evaluation and the data-based merges as images do. :class:`SequenceClassifierEncoder` maps it to
pooled features ``[B, D]``; :class:`ClassifierHeads` holds every expert's own classifier over them. Task vectors cover
the backbone only (a head's shape depends on the task's number of labels); the pretrained reference row is the
pretrained backbone with each expert's head.

Supported ``model_type``s are declared in :data:`ADAPTERS` (which child is the head, how features are pooled);
their logits equal the transformers model's own (tests/test_text_backbone.py). Two rules make every backbone
behave like a plain ``nn.Linear`` network to the merges:

* GPT-2's ``Conv1D`` layers (``y = x W + b`` with ``W: [in, out]``) are replaced by equal ``nn.Linear`` layers
  (``W: [out, in]``), so 2-D weights are ``[out, in]`` as every merge assumes, RegMean's Gram hooks see their inputs
  and the routed methods (WEMoE, SMEAR) find the linears of each block's MLP (the adapter's ``mlp`` pattern, which
  the pool declares as its ``mlp_pattern``);
* dropout is switched off (p = 0) in the backbone and the heads: a merge is evaluated and trained deterministically.
"""
from __future__ import annotations

import functools
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any
from pathlib import Path

import torch
from torch import Tensor, nn

from fusion.errors import ConfigError
from fusion.merge.task_vectors import PoolMismatchError
from fusion.pools.hf_checkpoint import HFCheckpoint, _shape_fix, resolve_checkpoint
from fusion.pools.lora_adapter import ADAPTER_CONFIG, LoRAExpert, lora_state
from fusion.pools.openclip import freeze
from fusion.pools.pool import ModelPool, _stat
from fusion.report.hf_export import export_sequence_classifiers, load_checkpoint
from fusion.utils import sha256_json


@dataclass(frozen=True)
class TextAdapter:
    """How one ``model_type`` classifies: ``head`` is the attribute of its ``*ForSequenceClassification`` holding
    the classifier; ``pooling`` the features the head reads: ``last_token`` (hidden state at the last attended
    token: GPT-2's ``score``), ``first_token`` (at position 0, ``<s>``/``[CLS]``: RoBERTa's classification head,
    which is called on ``[B, 1, D]``), ``pooler`` (BERT's pooler output). ``mlp``: the regex of the encoder's
    transformer-MLP module paths (the pool's ``mlp_pattern``, what WEMoE/SMEAR route); ``None`` where the MLP is not
    one module (BERT/RoBERTa: ``intermediate.dense`` and ``output.dense`` around the residual LayerNorm)."""

    head: str
    pooling: str
    mlp: str | None
    positions: str = "max_position_embeddings"  # the config field bounding the sequence length
    position_offset: int = 0  # positions the model reserves (RoBERTa's start after padding_idx: 2)

    def max_tokens(self, config) -> int:
        """The longest input the model embeds: ``config.<positions> − position_offset``."""
        return int(config.to_dict()[self.positions]) - self.position_offset


ADAPTERS: dict[str, TextAdapter] = {
    "gpt2": TextAdapter("score", "last_token", r"(^|\.)h\.\d+\.mlp$", positions="n_positions"),
    "roberta": TextAdapter("classifier", "first_token", None, position_offset=2),
    "bert": TextAdapter("classifier", "pooler", None),
}


def task_order(experts: Mapping[str, str], tasks: Sequence[str] | None) -> list[str]:
    """The pool's tasks: ``tasks`` (each must have an expert) or every expert, in order."""
    order = list(tasks) if tasks is not None else list(experts)
    unknown = [t for t in order if t not in experts]
    if unknown:
        raise ConfigError(f"modelpool.tasks {unknown} have no entry in modelpool.experts ({sorted(experts)})")
    return order


def declared_adapter(table: Mapping[str, Any], model_type: str, source: str, kind: str, fields: str) -> Any:
    """``table[model_type]`` (a module's declared per-``model_type`` facts), else one :class:`ConfigError` naming
    the supported model types and what a new entry declares."""
    if model_type not in table:
        raise ConfigError(f"{source}: model_type={model_type!r} has no {kind} adapter; supported: {sorted(table)} "
                          f"(declare one: {fields})")
    return table[model_type]


def pack_inputs(input_ids: Tensor, attention_mask: Tensor, token_type_ids: Tensor | None = None) -> Tensor:
    """The backbone's input ``[B, 2, T]`` int64 from token ids and attention mask, both ``[B, T]``; ``[B, 3, T]``
    with token type ids."""
    parts = [input_ids, attention_mask] + ([] if token_type_ids is None else [token_type_ids])
    return torch.stack([p.long() for p in parts], dim=1)


def unpack_inputs(x: Tensor) -> dict[str, Tensor]:
    """The keyword inputs of an HF model from ``x: [B, 2 or 3, T]`` (see :func:`pack_inputs`)."""
    if x.dim() != 3 or x.shape[1] not in (2, 3):
        raise ValueError(f"a text backbone takes packed tokens [B, 2 or 3, T] (ids, mask[, token types]), got "
                         f"{tuple(x.shape)} {x.dtype}: use a text task pool (fusion.data.text_tasks)")
    names = ("input_ids", "attention_mask", "token_type_ids")[:x.shape[1]]
    return {n: x[:, i] for i, n in enumerate(names)}


class SequenceClassifierEncoder(nn.Module):
    """``x: [B, 2 or 3, T] -> features [B, D]``: the HF backbone (``model.base_model``) and the adapter's pooling."""

    def __init__(self, body: nn.Module, pooling: str, max_tokens: int | None = None):
        super().__init__()
        if pooling not in ("last_token", "first_token", "pooler"):
            raise ValueError(f"pooling must be last_token, first_token or pooler, got {pooling!r}")
        self.body, self.pooling, self.max_tokens = body, pooling, max_tokens

    def forward(self, x: Tensor) -> Tensor:
        if self.max_tokens is not None and x.shape[-1] > self.max_tokens:
            raise ConfigError(f"inputs of {x.shape[-1]} tokens exceed the {self.max_tokens} positions the model "
                              f"embeds; set taskpool.max_length ≤ {self.max_tokens}")
        inputs = unpack_inputs(x)
        mask = inputs["attention_mask"]
        out = self.body(**inputs)
        if self.pooling == "pooler":
            return out.pooler_output
        hidden = out.last_hidden_state
        if self.pooling == "first_token":
            return hidden[:, 0]
        positions = torch.arange(mask.shape[1], device=mask.device)
        last = (positions * (mask != 0)).argmax(-1)  # the rightmost attended token (left or right padding)
        return hidden[torch.arange(hidden.shape[0], device=hidden.device), last]


class ClassifierHeads(nn.Module):
    """Each task's own frozen classifier over pooled features: ``heads(features [B, D], task) -> logits [B, C_t]``.

    The :class:`fusion.pools.contract.Heads` of a text pool. ``sequence_input``: the head reads ``[B, T, D]`` and
    takes position 0 itself (RoBERTa's classification head), so features are passed as ``[B, 1, D]``.
    """

    def __init__(self, heads: Mapping[str, nn.Module], num_labels: Mapping[str, int], sequence_input: bool):
        super().__init__()
        if not heads:
            raise ValueError("ClassifierHeads needs at least one task head, got none")
        self.tasks = list(heads)
        self.heads = nn.ModuleDict({t: freeze(m) for t, m in heads.items()})
        self.labels, self.sequence_input = dict(num_labels), sequence_input

    def num_classes(self, task: str) -> int:
        self._check(task)
        return self.labels[task]

    def forward(self, features: Tensor, task: str) -> Tensor:
        self._check(task)
        return self.heads[task](features[:, None] if self.sequence_input else features)

    def _check(self, task: str) -> None:
        if task not in self.heads:
            raise KeyError(f"no classification head for task '{task}'; this pool has heads for {self.tasks}")


def linear_from_conv1d(module: nn.Module) -> nn.Module:
    """Replace every HF ``Conv1D`` under ``module`` by the equal ``nn.Linear`` (weight transposed), in place."""
    from transformers.pytorch_utils import Conv1D

    for name, child in list(module.named_children()):
        if isinstance(child, Conv1D):
            linear = nn.Linear(child.nx, child.nf, dtype=child.weight.dtype, device=child.weight.device)
            with torch.no_grad():
                linear.weight.copy_(child.weight.T)
                linear.bias.copy_(child.bias)
            setattr(module, name, linear)
        else:
            linear_from_conv1d(child)
    return module


def no_dropout(module: nn.Module) -> nn.Module:
    """Every ``nn.Dropout`` under ``module`` set to p = 0 (HF attention reads its ``p`` too), in place."""
    for m in module.modules():
        if isinstance(m, nn.Dropout):
            m.p = 0.0
    return module


def load_classifier(directory: Path, num_labels: int | None = None) -> nn.Module:
    """``AutoModelForSequenceClassification`` from ``directory`` in float32 eval mode (a base without a
    classification head, or given another ``num_labels``, gets a random one, to be replaced or never used), without
    a key/value cache: classification never generates, and a cache object passed from block to block would make
    replaying a block (RegMean++) stateful."""
    from transformers import AutoModelForSequenceClassification

    labels = {} if num_labels is None else {"num_labels": num_labels, "ignore_mismatched_sizes": True}
    model = AutoModelForSequenceClassification.from_pretrained(str(directory), dtype=torch.float32, **labels).eval()
    model.config.use_cache = False
    return model


def split_model(model: nn.Module, adapter: TextAdapter) -> tuple[SequenceClassifierEncoder, nn.Module]:
    """``(encoder, head)`` of a sequence classifier, Conv1D made linear and dropout off in both."""
    body = no_dropout(linear_from_conv1d(model.base_model))
    head = no_dropout(getattr(model, adapter.head))
    return SequenceClassifierEncoder(body, adapter.pooling, adapter.max_tokens(model.config)), head


def lora_classifier(directory: Path, base_dir: Path, reference: Mapping[str, Tensor],
                    adapter: TextAdapter) -> tuple[dict[str, Tensor], nn.Module, int]:
    """``(backbone state, head, number of labels)`` of a peft LoRA sequence-classification adapter: the base's
    backbone + ``s·B A`` on the target modules, and the trained head peft saves whole (``modules_to_save``); the
    number of labels is the head's smallest output width (GPT-2/BERT: its one matrix; RoBERTa: ``out_proj``)."""
    from transformers.pytorch_utils import Conv1D

    expert = LoRAExpert(directory, saved_modules=True)
    head_state = {k[len(adapter.head) + 1:]: v for k, v in expert.saved.items() if k.startswith(f"{adapter.head}.")}
    if not head_state:
        raise ConfigError(f"LoRA adapter {directory} saves no '{adapter.head}' head (modules_to_save); a "
                          "sequence-classification expert needs its trained head: train the adapter with "
                          f"task_type='SEQ_CLS' (or modules_to_save=['{adapter.head}'])")
    num_labels = min(v.shape[0] for v in head_state.values() if v.dim() == 2)
    model = load_classifier(base_dir, num_labels)
    conv1d = [n for n, m in model.named_modules() if isinstance(m, Conv1D)]
    _, head = split_model(model, adapter)
    head.load_state_dict(head_state, strict=True)
    outer = f"{model.base_model_prefix}."  # LoRA names the full model's modules; the encoder holds its backbone
    state = lora_state(reference, expert, HFCheckpoint(base_dir), lambda w: "body." + w.removeprefix(outer), conv1d)
    return state, head, num_labels


def check_body(base: Mapping[str, Tensor], expert: Mapping[str, Tensor], source: str, base_source: str) -> None:
    """One :class:`PoolMismatchError` naming the first backbone key missing, extra or of another shape, and the fix
    (a vocabulary difference says so, as :mod:`fusion.pools.hf_checkpoint` does)."""
    missing, extra = [k for k in base if k not in expert], [k for k in expert if k not in base]
    if missing or extra:
        key, where = (missing[0], "is missing from") if missing else (extra[0], "is not in the base but in")
        raise PoolMismatchError(f"backbone key '{key}' {where} expert {source} ({len(missing)} missing, {len(extra)} "
                                f"extra); every expert must be fine-tuned from the base {base_source}")
    for key, want in base.items():
        got = tuple(expert[key].shape)
        if got != tuple(want.shape):
            raise PoolMismatchError(f"backbone key '{key}' has shape {got} in expert {source} but "
                                    f"{tuple(want.shape)} in the base {base_source}: "
                                    f"{_shape_fix(got, tuple(want.shape))}")


def hf_text_pool(base: str, experts: Mapping[str, str], name: str = "hf_text",
                 tasks: Sequence[str] | None = None) -> ModelPool:
    """A :class:`ModelPool` of a pretrained backbone, the experts' fine-tuned backbones and their heads.

    Args:
        base: checkpoint directory (or Hub id) of the pretrained model.
        experts: ``{task: checkpoint directory, peft LoRA adapter directory (task_type SEQ_CLS: its head is saved
            whole) or Hub id}`` of sequence-classification fine-tunes of ``base``.
        tasks: a subset of ``experts`` (in that order); ``None`` keeps all.
    """
    order = task_order(experts, tasks)
    base_dir = resolve_checkpoint(base)
    pretrained = load_classifier(base_dir)
    kind = pretrained.config.model_type
    adapter = declared_adapter(ADAPTERS, kind, str(base_dir), "sequence-classification",
                               "fusion.pools.hf_text.ADAPTERS, its head attribute, pooling and MLP pattern")
    encoder, _ = split_model(pretrained, adapter)
    reference = encoder.state_dict()
    states, heads, labels, sources = {}, {}, {}, {}
    for task in order:
        directory = resolve_checkpoint(experts[task])
        if (directory / ADAPTER_CONFIG).is_file():
            states[task], heads[task], labels[task] = lora_classifier(directory, base_dir, reference, adapter)
        else:
            model = load_classifier(directory)
            if model.config.model_type != kind:
                raise PoolMismatchError(f"base {base_dir} is model_type={kind!r} but expert {directory} is "
                                        f"{model.config.model_type!r}; every expert must be fine-tuned from the base")
            body, heads[task] = split_model(model, adapter)
            states[task] = {k: v.detach().clone() for k, v in body.state_dict().items()}
            check_body(reference, states[task], str(directory), str(base_dir))
            labels[task] = int(model.config.num_labels)
        sources[task] = str(directory)
    manifest = {"name": name, "kind": "hf_sequence_classification", "model_type": kind,
                "base": str(base_dir), "experts": sources, "tasks": order}
    manifest["pool_hash"] = sha256_json(manifest)[:16]
    manifest["files"] = {"base": _stat(str(base_dir)), **{t: _stat(s) for t, s in sources.items()}}  # content_key
    load = functools.partial(load_checkpoint, auto_class="AutoModelForSequenceClassification")
    exporter = functools.partial(export_sequence_classifiers, experts=sources, load=load)
    return ModelPool(name, encoder, states, ClassifierHeads(heads, labels, adapter.pooling == "first_token"),
                     manifest, sources, None, mlp_pattern=adapter.mlp, exporter=exporter)

