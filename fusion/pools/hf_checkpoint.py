"""Hugging Face checkpoint directories as a base model and full fine-tuned experts, opened lazily.

A checkpoint directory holds ``config.json`` and either ``model.safetensors`` or shards
``model-0000i-of-0000n.safetensors`` listed in ``model.safetensors.index.json`` (plus tokenizer files). Tensors are
read one at a time through ``safetensors.safe_open`` (memory-mapped), so a streamed merge (:mod:`fusion.stream`)
never holds a whole model. Hub names (``org/model``) that are not local directories are downloaded with
``huggingface_hub.snapshot_download``; offline, that fails at once with what to download and where to put it.

Every mismatch is found before anything is merged, in one message naming the file, the key, both shapes and the
fix (:func:`check_expert`); non-finite values are found as each tensor is read (:meth:`HFCheckpoint.tensor`).
"""
from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Protocol

from torch import Tensor

from fusion.errors import CorruptFileError, DownloadUnavailableError, MissingFileError
from fusion.merge.task_vectors import PoolMismatchError, check_finite

INDEX, SINGLE = "model.safetensors.index.json", "model.safetensors"
REPO_ID = re.compile(r"[\w.-]+(/[\w.-]+)?")
DOWNLOAD_PATTERNS = ["*.json", "*.safetensors", "*.model", "*.txt", "*.tiktoken", "*.jinja"]


def resolve_checkpoint(name: str | Path) -> Path:
    """A local checkpoint directory for ``name``: the directory itself, or a Hub repo id (``org/model``)
    fetched with ``huggingface_hub.snapshot_download`` (config, safetensors and tokenizer files only)."""
    path = Path(name).expanduser()
    if path.is_dir():
        return path
    text = str(name)
    if path.exists() or text.startswith((".", "/", "~")) or not REPO_ID.fullmatch(text):
        raise MissingFileError(f"checkpoint '{text}' is not a directory (nor a Hub repo id 'org/model'); pass a "
                               "directory written by save_pretrained (config.json + *.safetensors)")
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(text, allow_patterns=DOWNLOAD_PATTERNS))
    except Exception as err:  # offline (HF_HUB_OFFLINE=1), no network, unknown or gated repo
        raise DownloadUnavailableError(
            f"checkpoint '{text}' is not a local directory and could not be fetched from the Hugging Face Hub "
            f"({type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}). On a machine with internet "
            f"access run `huggingface-cli download {text} --local-dir <dir>` (safetensors weights, config.json and "
            "the tokenizer files), copy <dir> here and pass its path instead of the name") from err


def weight_files(directory: Path) -> dict[str, Path]:
    """``{tensor name: safetensors file}`` from the index (sharded) or the single ``model.safetensors``."""
    if (directory / INDEX).is_file():
        weight_map = json.loads((directory / INDEX).read_text())["weight_map"]
        files = {name: directory / file for name, file in weight_map.items()}
        missing = sorted({str(f) for f in files.values() if not f.is_file()})
        if missing:
            raise MissingFileError(f"{directory / INDEX} lists shard {missing[0]}, which is missing "
                                   f"({len(missing)} shard(s) missing); copy or re-download the whole checkpoint")
        return files
    if (directory / SINGLE).is_file():
        from safetensors import safe_open

        with safe_open(str(directory / SINGLE), framework="pt") as f:
            return {name: directory / SINGLE for name in f.keys()}
    raise MissingFileError(f"{directory} has neither {SINGLE} nor {INDEX}; save the model with "
                           "save_pretrained(dir, safe_serialization=True) (a pytorch_model.bin is not read)")


class HFCheckpoint:
    """A checkpoint directory whose tensors are read one at a time (memory-mapped safetensors).

    Attributes:
        directory: the resolved directory; config: its ``config.json``; files: ``{name: shard path}``.
    """

    def __init__(self, name: str | Path):
        self.directory = resolve_checkpoint(name)
        config = self.directory / "config.json"
        if not config.is_file():
            raise MissingFileError(f"{config} is missing; a checkpoint directory needs the config.json that "
                                   "save_pretrained writes")
        self.config = json.loads(config.read_text())
        self.files = weight_files(self.directory)
        self.headers = read_headers(self.files)

    def names(self) -> list[str]:
        """Every tensor name, sorted (the order a streamed merge visits them in)."""
        return sorted(self.files)

    def shape(self, name: str) -> tuple[int, ...]:
        """The shape of tensor ``name`` (from the header)."""
        return self.headers[name][0]

    def dtype_code(self, name: str) -> str:
        """The safetensors dtype of tensor ``name`` (``"F32"``, ``"BF16"``, …), from the header."""
        return self.headers[name][1]

    def tensor(self, name: str) -> Tensor:
        """Tensor ``name`` as stored; a NaN/inf in it is a :class:`PoolMismatchError` naming file and key.

        The file is opened for this read only: a mapping kept open would keep every page read so far resident
        (counted in the process's RSS) until the end of the merge.
        """
        from safetensors import safe_open

        with safe_open(str(self.files[name]), framework="pt") as f:
            t = f.get_tensor(name)
        check_finite({name: t}, name="checkpoint", source=str(self.files[name]))
        return t


def read_headers(files: dict[str, Path]) -> dict[str, tuple[tuple[int, ...], str]]:
    """``{name: (shape, safetensors dtype)}`` from each file's header (no tensor is read)."""
    from safetensors import safe_open

    out = {}
    for path in sorted(set(files.values())):
        try:
            with safe_open(str(path), framework="pt") as f:
                for name in f.keys():
                    piece = f.get_slice(name)
                    out[name] = (tuple(piece.get_shape()), piece.get_dtype())
        except Exception as err:
            raise CorruptFileError(f"{path} cannot be read as safetensors ({err}); re-download or re-save the "
                                   "checkpoint") from err
    missing = sorted(set(files) - set(out))
    if missing:
        raise CorruptFileError(f"{files[missing[0]]} does not hold '{missing[0]}', which the index places there "
                               f"({len(missing)} such keys); re-download or re-save the checkpoint")
    return out


class Expert(Protocol):
    """An expert of a streamed merge: a full fine-tune (:class:`FullExpert`) or a LoRA adapter
    (:class:`fusion.pools.lora_adapter.LoRAExpert`)."""

    source: str

    def check_against(self, base: HFCheckpoint) -> None:
        """Raise one clear error if this expert cannot be merged with ``base`` (before anything is merged)."""

    def task_vector(self, name: str, theta0: Tensor) -> Tensor:
        """``τ = θ_expert − θ_0`` for tensor ``name`` in float32 (``theta0``: the base's tensor, as stored)."""


def _architecture(config: dict) -> tuple:
    return config.get("model_type"), tuple(config.get("architectures") or ())


def _shape_fix(expert: tuple, base: tuple) -> str:
    """The fix for a shape mismatch; rows only (an embedding or LM head) means the vocabularies differ."""
    if len(expert) == len(base) and expert[1:] == base[1:] and expert[0] != base[0]:
        return (f"the vocabularies differ ({expert[0]} vs {base[0]} rows, e.g. an expert with added tokens): "
                f"resize the base with model.resize_token_embeddings({expert[0]}) and save it, or trim the expert's "
                f"rows to the base's {base[0]} if the added tokens are not needed")
    return "every expert must be fine-tuned from the base model (same architecture and sizes)"


class FullExpert:
    """A fully fine-tuned checkpoint directory: ``τ = θ_k − θ_0`` tensor by tensor."""

    def __init__(self, name: str | Path):
        self.checkpoint = HFCheckpoint(name)
        self.source = str(self.checkpoint.directory)

    def check_against(self, base: HFCheckpoint) -> None:
        """Same ``model_type``/``architectures``, the same tensor names and shapes as ``base``."""
        mine, theirs = _architecture(self.checkpoint.config), _architecture(base.config)
        if mine != theirs:
            raise PoolMismatchError(
                f"expert {self.source}/config.json is model_type={mine[0]!r} architectures={list(mine[1])}, but the "
                f"base {base.directory}/config.json is model_type={theirs[0]!r} architectures={list(theirs[1])}; "
                "every expert must be fine-tuned from the base model")
        missing = [n for n in base.names() if n not in self.checkpoint.files]
        extra = [n for n in self.checkpoint.names() if n not in base.files]
        if missing or extra:
            key, where = (missing[0], "is missing from") if missing else (extra[0], "is not in the base but in")
            raise PoolMismatchError(f"key '{key}' {where} expert {self.source} ({len(missing)} missing, {len(extra)} "
                                    f"extra keys); every expert must be fine-tuned from the base model "
                                    f"{base.directory} and saved the same way (save_pretrained of the same class)")
        for name in base.names():
            got, want = self.checkpoint.shape(name), base.shape(name)
            if got != want:
                raise PoolMismatchError(
                    f"key '{name}' has shape {got} in expert {self.checkpoint.files[name]} but {want} in the base "
                    f"{base.files[name]}: {_shape_fix(got, want)}")

    def task_vector(self, name: str, theta0: Tensor) -> Tensor:
        return self.checkpoint.tensor(name).float() - theta0.float()


def open_expert(name: str | Path) -> Expert:
    """A LoRA adapter directory (``adapter_config.json``) or a full checkpoint directory; either may be a Hub
    repo id (:func:`resolve_checkpoint`)."""
    from fusion.pools.lora_adapter import ADAPTER_CONFIG, LoRAExpert

    path = resolve_checkpoint(name)
    return LoRAExpert(path) if (path / ADAPTER_CONFIG).is_file() else FullExpert(path)
