"""A model pool of HF causal language models (Llama / Qwen / Mistral-shaped, GPT-2): the whole model is merged.

The pool is built from checkpoint directories (or Hub ids, :func:`resolve_checkpoint`)::

    base:    the pretrained model (any ``AutoModelForCausalLM`` checkpoint)
    experts: {task: a full fine-tune of the base (``AutoModelForCausalLM``), or a peft LoRA adapter directory
              (``adapter_config.json``): its state is ``base + s·B A`` on each target module}

The input is the packed ``x: [B, 3, T]`` of :mod:`fusion.pools.causal_inputs` (ids, mask, role: what
:mod:`fusion.data.instruction_tasks` batches). :class:`CausalLMEncoder` holds the transformers model (embeddings and
LM head included: everything is merged) and maps ``x`` to next-token logits ``[B, T, V]``; :class:`NextTokenHeads`
passes them through, every task reading the same vocabulary (``num_classes = V``).
:func:`fusion.train.objectives.token_rows` then picks the rows that objectives and metrics read.

Tied word embeddings (``tie_word_embeddings=True``: the LM head is the input embedding) stay tied
(:mod:`fusion.pools.tied`): θ0, the experts and the task vectors hold each tied tensor once (the first name in
module order, e.g. ``model.model.embed_tokens.weight``), so merges and Fisher/RegMean statistics see it once, and
loading a state fills both uses.

What differs between ``model_type``s is declared in :data:`CAUSAL_ADAPTERS`: the transformer-MLP paths routed
methods use (``ModelPool.mlp_pattern``), the config field bounding positions, the dropout fields set to 0 (merges
are evaluated and trained deterministically), and whether ``Conv1D`` layers (GPT-2) are made ``nn.Linear``
(:func:`fusion.pools.hf_text.linear_from_conv1d`; ``export_model=true`` writes them back as ``Conv1D``).
"""
from __future__ import annotations

import functools
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor, nn

from fusion.errors import ConfigError
from fusion.merge.task_vectors import PoolMismatchError, StateDict
from fusion.pools.hf_checkpoint import HFCheckpoint, resolve_checkpoint
from fusion.pools.hf_text import check_body, declared_adapter, linear_from_conv1d, no_dropout, task_order
from fusion.pools.pool import ModelPool, _stat
from fusion.pools.tied import tied_aliases, untied_state
from fusion.report.hf_export import export_whole_model, load_checkpoint
from fusion.utils import sha256_json

LAYERS_MLP = r"(^|\.)layers\.\d+\.mlp$"


@dataclass(frozen=True)
class CausalAdapter:
    """What one ``model_type`` needs: ``mlp_pattern`` (regex of its transformer-MLP module paths), ``positions``
    (the config field bounding the sequence length), ``dropout`` (config fields set to 0 when loading), ``conv1d``
    (GPT-2's ``Conv1D`` layers become ``nn.Linear``)."""

    mlp_pattern: str = LAYERS_MLP
    positions: str = "max_position_embeddings"
    dropout: tuple[str, ...] = ("attention_dropout",)
    conv1d: bool = False


CAUSAL_ADAPTERS: dict[str, CausalAdapter] = {
    "llama": CausalAdapter(),
    "mistral": CausalAdapter(),
    "qwen2": CausalAdapter(),
    "qwen3": CausalAdapter(),
    "gpt2": CausalAdapter(r"(^|\.)h\.\d+\.mlp$", "n_positions", ("attn_pdrop", "resid_pdrop", "embd_pdrop"), True),
}


class CausalLMEncoder(nn.Module):
    """``x: [B, 3, T] -> next-token logits [B, T, V]`` of the transformers causal LM ``model`` (its attribute).

    Args:
        model: an ``AutoModelForCausalLM`` (float32, eval, dropout off); it is called without a key/value cache (a
            cache object passed from block to block would make replaying a block, RegMean++, stateful), while its
            config keeps ``use_cache`` for generation after export.
        max_tokens: the longest input the model embeds (``None``: unbounded).
        conv1d: the module paths under ``model`` that were ``Conv1D`` (a LoRA expert's ``B·A`` of them is
            transposed).
    """

    def __init__(self, model: nn.Module, max_tokens: int | None = None, conv1d: Sequence[str] = ()):
        super().__init__()
        self.model, self.max_tokens, self.conv1d = model, max_tokens, list(conv1d)

    def forward(self, x: Tensor) -> Tensor:
        if x.dim() != 3 or x.shape[1] != 3:
            raise ValueError(f"a causal LM takes packed tokens [B, 3, T] (ids, mask, role), got {tuple(x.shape)} "
                             f"{x.dtype}: use an instruction task pool (fusion.data.instruction_tasks)")
        if self.max_tokens is not None and x.shape[-1] > self.max_tokens:
            raise ConfigError(f"inputs of {x.shape[-1]} tokens exceed the {self.max_tokens} positions the model "
                              f"embeds; set taskpool.max_length ≤ {self.max_tokens}")
        return self.model(input_ids=x[:, 0], attention_mask=x[:, 1], use_cache=False).logits


class NextTokenHeads(nn.Module):
    """Every task reads the same vocabulary: ``heads(logits [B, T, V], task) -> logits`` unchanged; the
    :class:`fusion.pools.contract.Heads` of a causal-LM pool (nothing per task, nothing merged here)."""

    def __init__(self, tasks: Sequence[str], vocab_size: int):
        super().__init__()
        if not tasks:
            raise ValueError("NextTokenHeads needs at least one task, got none")
        self.tasks, self.vocab_size = list(tasks), int(vocab_size)

    def num_classes(self, task: str) -> int:
        self._check(task)
        return self.vocab_size

    def forward(self, features: Tensor, task: str) -> Tensor:
        self._check(task)
        return features

    def _check(self, task: str) -> None:
        if task not in self.tasks:
            raise KeyError(f"no task '{task}' in this causal-LM pool; it has {self.tasks}")


def load_causal_lm(directory: Path, adapter: CausalAdapter) -> tuple[nn.Module, list[str]]:
    """``(model, conv1d paths)``: ``AutoModelForCausalLM`` from ``directory`` in float32 eval mode, the adapter's
    dropout fields 0 (and every ``nn.Dropout``), ``Conv1D`` made linear when declared."""
    from transformers import AutoModelForCausalLM
    from transformers.pytorch_utils import Conv1D

    model = AutoModelForCausalLM.from_pretrained(str(directory), dtype=torch.float32,
                                                 **{f: 0.0 for f in adapter.dropout}).eval()
    paths = [n for n, m in model.named_modules() if isinstance(m, Conv1D)] if adapter.conv1d else []
    return no_dropout(linear_from_conv1d(model) if adapter.conv1d else model), paths


def model_type(directory: Path) -> str:
    from transformers import AutoConfig

    return AutoConfig.from_pretrained(str(directory)).model_type


def expert_states(experts: Mapping[str, str], order: Sequence[str], encoder: CausalLMEncoder, base_dir: Path,
                  adapter: CausalAdapter) -> tuple[dict[str, StateDict], dict[str, str]]:
    """``({task: encoder state}, {task: source})``: each full fine-tune loaded and checked against the base (keys,
    shapes: a vocabulary mismatch names the key, both shapes and the fix), each LoRA adapter applied to it."""
    from fusion.pools.lora_adapter import ADAPTER_CONFIG, LoRAExpert, lora_state

    reference, base_type = untied_state(encoder), model_type(base_dir)
    states, sources = {}, {}
    for task in order:
        directory = resolve_checkpoint(experts[task])
        sources[task] = str(directory)
        if (directory / ADAPTER_CONFIG).is_file():
            states[task] = lora_state(reference, LoRAExpert(directory), HFCheckpoint(base_dir), "model.{}".format,
                                      encoder.conv1d)
            continue
        if model_type(directory) != base_type:
            raise PoolMismatchError(f"expert {directory} is model_type={model_type(directory)!r} but the base "
                                    f"{base_dir} is {base_type!r}; every expert must be fine-tuned from the base model")
        body = CausalLMEncoder(*load_causal_lm(directory, adapter))
        states[task] = {k: v.clone() for k, v in untied_state(body).items()}
        check_body(reference, states[task], str(directory), str(base_dir))
    return states, sources


def hf_causal_lm_pool(base: str, experts: Mapping[str, str], name: str = "hf_causal_lm",
                      tasks: Sequence[str] | None = None) -> ModelPool:
    """A :class:`ModelPool` of a pretrained causal LM and its experts (the whole model merged, see the module
    docstring).

    Args:
        base: checkpoint directory (or Hub id) of the pretrained model; its tokenizer is the task pool's.
        experts: ``{task: checkpoint directory, peft LoRA adapter directory or Hub id}`` of fine-tunes of ``base``.
        tasks: a subset of ``experts`` (in that order); ``None`` keeps all.
    """
    order = task_order(experts, tasks)
    base_dir = resolve_checkpoint(base)
    kind = model_type(base_dir)
    adapter = declared_adapter(CAUSAL_ADAPTERS, kind, str(base_dir), "causal-LM", "fusion.pools.hf_causal_lm."
                               "CAUSAL_ADAPTERS, its MLP pattern, position field and dropout fields")
    model, conv1d = load_causal_lm(base_dir, adapter)
    encoder = CausalLMEncoder(model, int(model.config.to_dict()[adapter.positions]), conv1d)
    states, sources = expert_states(experts, order, encoder, base_dir, adapter)
    manifest = {"name": name, "kind": "hf_causal_lm", "model_type": kind, "base": str(base_dir), "experts": sources,
                "tasks": order, "tied": sorted(tied_aliases(encoder))}
    manifest["pool_hash"] = sha256_json(manifest)[:16]
    manifest["files"] = {"base": _stat(str(base_dir)), **{t: _stat(s) for t, s in sources.items()}}  # content_key
    vocab = model.get_output_embeddings().weight.shape[0]
    load = functools.partial(load_checkpoint, auto_class="AutoModelForCausalLM")
    exporter = functools.partial(export_whole_model, base=str(base_dir), load=load)
    return ModelPool(name, encoder, states, NextTokenHeads(order, vocab), manifest, sources, None,
                     mlp_pattern=adapter.mlp_pattern, exporter=exporter)
