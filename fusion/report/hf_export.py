"""Merged models written back in transformers' format (``export_model=true``), loadable by ``from_pretrained``.

A run that merges HF checkpoints ends with ``<run dir>/merged_model/``:

* sequence classification (:mod:`fusion.pools.hf_text`): one directory per task, ``merged_model/<task>/``: the
  merged backbone with that task's own head, an ``AutoModelForSequenceClassification`` (GPT-2's ``nn.Linear`` layers
  are written back as the ``Conv1D`` weights ``[in, out]`` the checkpoint format has);
* whole-model pools (text-to-text, causal LM): one directory, the merged model itself (tied weights stay tied).

The tokenizer and the other non-weight files of the source checkpoint are copied beside the weights. Every
directory is written to a hidden temporary directory and renamed onto its place; an existing one is an error (a
merge never overwrites). Only a single merged model can be exported: a routed model (WEMoE, SMEAR: written to
``routed_model/``) or a task-id-at-inference method (one model per task, rebuilt at inference) is refused with one
message.
"""
from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Callable, Mapping
from pathlib import Path

from torch import Tensor, nn

from fusion.errors import ConfigError
from fusion.report.sharded_safetensors import WEIGHT_SUFFIXES

Exporter = Callable[[Mapping[str, Tensor], Path], dict[str, str]]


def require_exporter(pool) -> None:
    """A :class:`ConfigError` when ``pool`` cannot write merged models (checked before a run with
    ``export_model=true`` starts, and again when it exports)."""
    if pool.exporter is None:
        raise ConfigError(f"export_model: modelpool '{pool.name}' cannot write merged models (only HF checkpoint "
                          "pools: hf_text, hf_t5, hf_causal_lm); set export_model=false")


def export_merge(pool, outcome, directory: Path) -> dict[str, str]:
    """Write ``outcome``'s merged encoder with the pool's ``exporter``; returns ``{name: directory written}``."""
    require_exporter(pool)
    if outcome.inference != "single model":
        raise ConfigError("export_model: this method keeps one model per task, rebuilt from compressed experts at "
                          "inference (no single merged model); results.json has the accuracies. Set export_model=false")
    if type(outcome.encoder) is not type(pool.encoder):
        raise ConfigError(f"export_model: the method's model is a {type(outcome.encoder).__name__}, not one merged "
                          f"{type(pool.encoder).__name__} (a routed model depends on each input; routed_model/ holds "
                          "it). Set export_model=false")
    return pool.exporter(outcome.encoder.state_dict(), directory)


def load_checkpoint(directory: Path, auto_class: str) -> nn.Module:
    """``transformers.<auto_class>`` from ``directory`` as saved, in float32 (what an exported merge starts from:
    the checkpoint's own config, dropout, ``Conv1D`` layout and head)."""
    import torch
    import transformers

    return getattr(transformers, auto_class).from_pretrained(str(directory), dtype=torch.float32)


def save_pretrained_atomic(model: nn.Module, directory: Path, source: Path) -> Path:
    """``model.save_pretrained`` into ``directory`` with ``source``'s tokenizer and other non-weight files that
    ``save_pretrained`` does not write (config and generation config come from the model)."""
    directory = Path(directory)
    if directory.exists():
        raise ConfigError(f"export_model: {directory} already exists; a merge never overwrites: choose another "
                          "output_dir or delete it")
    directory.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=directory.parent, prefix=f".{directory.name}.partial-"))
    try:
        model.save_pretrained(str(tmp))
        for path in sorted(Path(source).iterdir()):
            if path.is_file() and not path.name.startswith(".") and not path.name.endswith(WEIGHT_SUFFIXES) \
                    and not path.name.endswith(".index.json") and not (tmp / path.name).exists():
                shutil.copyfile(path, tmp / path.name)
        os.rename(tmp, directory)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)
    return directory


def hf_state(model: nn.Module, state: Mapping[str, Tensor], prefix: str) -> dict[str, Tensor]:
    """``model``'s state from an encoder state whose keys are ``prefix + <model key>``, where the encoder holds
    ``model`` with its ``Conv1D`` layers made ``nn.Linear`` (their weights are transposed back to ``[in, out]``)."""
    from transformers.pytorch_utils import Conv1D

    conv = {path for path, m in model.named_modules() if isinstance(m, Conv1D)}
    out = {}
    for key, value in state.items():
        if not key.startswith(prefix):
            raise KeyError(f"encoder key '{key}' does not start with '{prefix}'")
        name = key[len(prefix):]
        module, _, leaf = name.rpartition(".")
        out[name] = value.T if module in conv and leaf == "weight" else value
    return out


def export_sequence_classifiers(state: Mapping[str, Tensor], directory: Path, experts: Mapping[str, str],
                                load: Callable[[Path], nn.Module]) -> dict[str, str]:
    """``directory/<task>/``: task's expert checkpoint (``load``-ed: its config and head) with the merged backbone
    ``state`` (keys ``body.<backbone key>``)."""
    written = {}
    for task, source in experts.items():
        model = load(Path(source))
        model.base_model.load_state_dict(hf_state(model.base_model, state, "body."), strict=True)
        written[task] = str(save_pretrained_atomic(model, Path(directory) / task, Path(source)))
    return written


def export_whole_model(state: Mapping[str, Tensor], directory: Path, base: str,
                       load: Callable[[Path], nn.Module]) -> dict[str, str]:
    """``directory``: the base checkpoint (``load``-ed: its config, tokenizer, ties) holding the merged ``state``
    (keys ``model.<model key>``; tied tensors may be given under their first name only)."""
    from fusion.pools.tied import with_aliases

    model = load(Path(base))
    model.load_state_dict(with_aliases(model, hf_state(model, state, "model.")), strict=True)
    return {"model": str(save_pretrained_atomic(model, Path(directory), Path(base)))}
