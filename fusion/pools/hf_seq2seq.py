"""A model pool of HF text-to-text checkpoints (T5, Flan-T5): a task's logits are the decoder's scores of its label
words. The WHOLE model is merged (shared embedding, encoder, decoder, LM head), as FusionBench merges Flan-T5.

Built from HF checkpoint directories (or Hub ids, :func:`resolve_checkpoint`)::

    base:        the pretrained ``T5ForConditionalGeneration`` (e.g. google/flan-t5-base)
    experts:     {task: a fine-tune of the base (same class and vocabulary) or a peft LoRA adapter of it}
    label_words: {task: [the word answering each class, in label order]} (GLUE tasks default to FusionBench's)

:class:`FirstStepScorer` (the pool's encoder) maps packed tokens ``x: [B, 2, T]`` (ids, attention mask: what
:mod:`fusion.data.text_tasks` batches; with a task pool whose ``template`` writes the task's prompt) to the decoder's
vocabulary logits at the first output position, ``[B, V]``. :class:`LabelWordHeads` keeps, per task, the columns of
its label words: ``[B, C_t]``. A label word scores by its FIRST sub-token (its first token when the tokenizer reads
it alone, without special tokens), so the prediction is the label word whose first token the model ranks highest
as the first word of its answer.

Deviation from FusionBench (fusion_bench/tasks/flan_t5_text_generation, method/adamerging/flan_t5_*): it evaluates
by greedy generation (up to 10 tokens) and an exact string match with the label word, so an answer that is no label
word counts as wrong; here a prediction is always one of the task's label words (argmax of their first-token scores
at the first step), the accuracy of a classifier restricted to the label set. Its AdaMerging entropy is over the whole
vocabulary at the first step (decoder input id 1); here every objective reads the ``[B, C_t]`` label-word logits
with ``decoder_start_token_id`` (T5's 0, the token generation starts from) as the first decoder input.

Tied weights: T5 v1.0 ties the shared embedding, both stacks' ``embed_tokens`` and ``lm_head``; v1.1/Flan-T5
checkpoints tie the embeddings but keep their own ``lm_head``. The pool states and task vectors hold each tied tensor
once (:mod:`fusion.pools.tied`), and a merged model keeps the ties of the base. Dropout is off (p = 0, including the
attention-probability dropout T5 reads from ``config.dropout_rate``): a merge is trained and evaluated
deterministically. Export a merge with ``encoder.model.save_pretrained(dir)``.
"""
from __future__ import annotations

import functools
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor, nn

from fusion.errors import ConfigError
from fusion.merge.task_vectors import PoolMismatchError
from fusion.pools.hf_checkpoint import HFCheckpoint, resolve_checkpoint
from fusion.pools.hf_text import check_body, declared_adapter, task_order
from fusion.pools.lora_adapter import ADAPTER_CONFIG, LoRAExpert, lora_state
from fusion.pools.openclip import freeze
from fusion.pools.pool import ModelPool, _stat
from fusion.pools.tied import tied_aliases, untied_state
from fusion.report.hf_export import export_whole_model
from fusion.utils import sha256_json


@dataclass(frozen=True)
class Seq2SeqAdapter:
    """What one text-to-text ``model_type`` needs declared: the config fields holding its dropout probabilities
    (set to 0 when the model is built) and the regex of its transformer-MLP module paths (routed methods)."""

    dropout_fields: tuple[str, ...]
    mlp_pattern: str


SEQ2SEQ_ADAPTERS: dict[str, Seq2SeqAdapter] = {
    # encoder.block.<i>.layer.1.DenseReluDense / decoder.block.<i>.layer.2.DenseReluDense (wi, wo; gated: wi_0, wi_1)
    "t5": Seq2SeqAdapter(("dropout_rate",), r"(^|\.)block\.\d+\.layer\.\d+\.DenseReluDense$"),
}

# FusionBench's Flan-T5 GLUE target words (fusion_bench/tasks/flan_t5_text_generation/glue_prompt_templates.py),
# in the order of GLUE's labels.
GLUE_LABEL_WORDS: dict[str, tuple[str, ...]] = {
    "cola": ("unacceptable", "acceptable"),
    "mnli": ("entailment", "neutral", "contradiction"),
    "mrpc": ("no", "yes"),
    "qnli": ("yes", "no"),
    "qqp": ("no", "yes"),
    "rte": ("yes", "no"),
    "sst2": ("negative", "positive"),
}


def seq2seq_adapter(model_type: str, source: str) -> Seq2SeqAdapter:
    """The declared adapter of ``model_type`` (:func:`fusion.pools.hf_text.declared_adapter`)."""
    return declared_adapter(SEQ2SEQ_ADAPTERS, model_type, source, "text-to-text",
                            "fusion.pools.hf_seq2seq.SEQ2SEQ_ADAPTERS, its dropout config fields and MLP pattern")


class FirstStepScorer(nn.Module):
    """``x: [B, 2, T] -> [B, V]``: the decoder's vocabulary logits at the first output step, i.e.
    ``model(input_ids, attention_mask, decoder_input_ids=[[start]] * B).logits[:, 0]`` (no key/value cache).

    ``model`` is the whole ``*ForConditionalGeneration`` (export a merge with ``model.save_pretrained``);
    ``start`` its ``config.decoder_start_token_id``.
    """

    def __init__(self, model: nn.Module, start: int):
        super().__init__()
        self.model, self.start = model, int(start)

    def forward(self, x: Tensor) -> Tensor:
        if x.dim() != 3 or x.shape[1] != 2:
            raise ValueError(f"a text-to-text model takes packed tokens [B, 2, T] (ids, mask), got {tuple(x.shape)} "
                             f"{x.dtype}: use a text task pool (fusion.data.text_tasks) with the model's tokenizer")
        ids, mask = x[:, 0], x[:, 1]
        start = torch.full((ids.shape[0], 1), self.start, dtype=torch.long, device=ids.device)
        return self.model(input_ids=ids, attention_mask=mask, decoder_input_ids=start, use_cache=False).logits[:, 0]


class LabelWordHeads(nn.Module):
    """``heads(features [B, V], task) -> features[:, ids_t]`` ``[B, C_t]``: the first-step scores of the first
    sub-token of each of the task's label words (``ids_t``, in label order). Nothing here is trained or merged."""

    def __init__(self, ids: Mapping[str, Sequence[int]], words: Mapping[str, Sequence[str]]):
        super().__init__()
        if not ids:
            raise ValueError("LabelWordHeads needs at least one task, got none")
        self.tasks = list(ids)
        self.ids = {t: [int(i) for i in v] for t, v in ids.items()}
        self.words = {t: list(words[t]) for t in ids}

    def num_classes(self, task: str) -> int:
        self._check(task)
        return len(self.ids[task])

    def forward(self, features: Tensor, task: str) -> Tensor:
        self._check(task)
        return features[:, self.ids[task]]

    def _check(self, task: str) -> None:
        if task not in self.ids:
            raise KeyError(f"no label words for task '{task}'; this pool has label words for {self.tasks}")


def label_word_ids(tokenizer, words: Mapping[str, Sequence[str]], source: str) -> dict[str, list[int]]:
    """``{task: [first token id of each label word]}``; a word the tokenizer maps to nothing or to its unknown token,
    or two classes of one task whose words share their first token, is one :class:`ConfigError` naming the task, the
    words and the fix."""
    out = {}
    for task, task_words in words.items():
        ids = []
        for word in task_words:
            tokens = tokenizer(word, add_special_tokens=False)["input_ids"]
            if not tokens or tokens[0] == tokenizer.unk_token_id:
                raise ConfigError(f"label word {word!r} of task '{task}' is unknown to the tokenizer of {source} (it "
                                  f"tokenises to {tokenizer.convert_ids_to_tokens(tokens)}); set "
                                  f"modelpool.label_words.{task} to words the model answers with")
            if tokens[0] in ids:
                other = task_words[ids.index(tokens[0])]
                raise ConfigError(f"label words {other!r} and {word!r} of task '{task}' share their first sub-token "
                                  f"{tokenizer.convert_ids_to_tokens(tokens[0])!r} in the tokenizer of {source}, and a "
                                  f"label word scores by its first sub-token; set modelpool.label_words.{task} to "
                                  "words whose first tokens differ")
            ids.append(tokens[0])
        out[task] = ids
    return out


def task_label_words(order: Sequence[str], given: Mapping[str, Sequence[str]] | None) -> dict[str, list[str]]:
    """``{task: words}`` for every task of the pool: ``given`` (``modelpool.label_words``) over GLUE's defaults."""
    given = {t: list(w) for t, w in (given or {}).items()}
    unknown = sorted(set(given) - set(order))
    if unknown:
        raise ConfigError(f"modelpool.label_words given for {unknown}, which are not tasks of the pool {list(order)}")
    missing = [t for t in order if t not in given and t not in GLUE_LABEL_WORDS]
    if missing:
        raise ConfigError(f"tasks {missing} have no label words (defaults exist for {sorted(GLUE_LABEL_WORDS)}); set "
                          f"modelpool.label_words.{missing[0]} to the word of each class, in label order")
    words = {t: given.get(t, list(GLUE_LABEL_WORDS.get(t, ()))) for t in order}
    short = [t for t, w in words.items() if len(w) < 2]
    if short:
        raise ConfigError(f"modelpool.label_words.{short[0]} = {words[short[0]]}: a task needs a word per class "
                          "(at least two)")
    return words


def load_seq2seq(directory: Path) -> nn.Module:
    """``AutoModelForSeq2SeqLM`` from ``directory`` in float32 eval mode, built with its dropout probabilities 0
    (the config's own values are kept in ``model.config``, so an exported merge saves them unchanged)."""
    from transformers import AutoConfig, AutoModelForSeq2SeqLM

    config = AutoConfig.from_pretrained(str(directory))
    adapter = seq2seq_adapter(config.model_type, str(directory))
    kept = {f: getattr(config, f) for f in adapter.dropout_fields}
    for field in adapter.dropout_fields:
        setattr(config, field, 0.0)
    model = AutoModelForSeq2SeqLM.from_pretrained(str(directory), config=config, dtype=torch.float32).eval()
    for field, value in kept.items():
        setattr(model.config, field, value)
    return model


def check_ties(base: nn.Module, expert: nn.Module, source: str, base_source: str) -> None:
    """One :class:`PoolMismatchError` when ``expert`` ties other tensors than ``base`` (e.g. a T5 v1.0 base with
    a v1.1 expert that has its own ``lm_head``)."""
    want, got = tied_aliases(base), tied_aliases(expert)
    if want != got:
        key = sorted(set(want.items()) ^ set(got.items()))[0][0]
        raise PoolMismatchError(f"'{key}' is tied to {got.get(key, 'nothing')!r} in expert {source} but to "
                                f"{want.get(key, 'nothing')!r} in the base {base_source}; every expert must be "
                                "fine-tuned from the base model and keep its tied weights (config tie_word_embeddings)")


def hf_seq2seq_pool(base: str, experts: Mapping[str, str], label_words: Mapping[str, Sequence[str]] | None = None,
                    name: str = "hf_t5", tasks: Sequence[str] | None = None) -> ModelPool:
    """A :class:`ModelPool` of a pretrained text-to-text model, its fine-tunes (whole models) and each task's label
    words.

    Args:
        base: checkpoint directory (or Hub id) of the pretrained model; its tokenizer reads the label words.
        experts: ``{task: checkpoint directory, peft LoRA adapter directory or Hub id}`` of fine-tunes of ``base``.
        label_words: ``{task: [word per class, in label order]}`` over :data:`GLUE_LABEL_WORDS`.
        tasks: a subset of ``experts`` (in that order); ``None`` keeps all.
    """
    from transformers import AutoTokenizer

    order = task_order(experts, tasks)
    words = task_label_words(order, label_words)
    base_dir = resolve_checkpoint(base)
    pretrained = load_seq2seq(base_dir)
    adapter = seq2seq_adapter(pretrained.config.model_type, str(base_dir))
    start = pretrained.config.decoder_start_token_id
    if start is None:
        raise ConfigError(f"{base_dir}/config.json has no decoder_start_token_id; set it (T5: 0, the pad token)")
    ids = label_word_ids(AutoTokenizer.from_pretrained(str(base_dir)), words, str(base_dir))
    reference = untied_state(pretrained)
    states, sources = {}, {}
    for task in order:
        directory = resolve_checkpoint(experts[task])
        sources[task] = str(directory)
        if (directory / ADAPTER_CONFIG).is_file():  # a peft LoRA adapter: θ0 + s·B A on its target modules
            states[task] = lora_state({f"model.{k}": v for k, v in reference.items()}, LoRAExpert(directory),
                                      HFCheckpoint(base_dir), "model.{}".format)
            continue
        model = load_seq2seq(directory)
        if model.config.model_type != pretrained.config.model_type:
            raise PoolMismatchError(f"base {base_dir} is model_type={pretrained.config.model_type!r} but expert "
                                    f"{directory} is {model.config.model_type!r}; every expert must be fine-tuned "
                                    "from the base model")
        check_ties(pretrained, model, str(directory), str(base_dir))
        state = untied_state(model)
        check_body(reference, state, str(directory), str(base_dir))
        states[task] = {f"model.{k}": v for k, v in state.items()}  # the keys of FirstStepScorer
    manifest = {"name": name, "kind": "hf_seq2seq", "model_type": pretrained.config.model_type, "base": str(base_dir),
                "experts": sources, "tasks": order, "label_words": words, "label_ids": ids}
    manifest["pool_hash"] = sha256_json(manifest)[:16]
    manifest["files"] = {"base": _stat(str(base_dir)), **{t: _stat(s) for t, s in sources.items()}}  # content_key
    encoder = freeze(FirstStepScorer(pretrained, start))
    exporter = functools.partial(export_whole_model, base=str(base_dir), load=load_seq2seq)
    return ModelPool(name, encoder, states, LabelWordHeads(ids, words), manifest, sources, None,
                     mlp_pattern=adapter.mlp_pattern, exporter=exporter)
