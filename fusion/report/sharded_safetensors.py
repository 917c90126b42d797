"""A sharded safetensors checkpoint written tensor by tensor, atomically (the output of a streamed merge).

Every tensor's name, shape and dtype are known before the first is computed (they are the base model's), so each
shard's safetensors header is written first and the tensors' bytes are appended as they arrive: nothing but the
tensor being written is held. Shards are ``model-0000i-of-0000n.safetensors`` with ``model.safetensors.index.json``
(one shard: ``model.safetensors``), as ``save_pretrained`` names them, so ``AutoModel*.from_pretrained`` loads the
directory. Everything is written to a hidden temporary directory beside the output and renamed onto it at the end;
an error or interruption leaves no output (and removes the temporary directory, unless the process is killed).
"""
from __future__ import annotations

import json
import os
import shutil
import struct
import tempfile
from dataclasses import dataclass
from math import prod
from pathlib import Path

import torch
from torch import Tensor

from fusion.errors import ConfigError

DTYPE_CODES = {torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16", torch.float64: "F64",
               torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8",
               torch.bool: "BOOL"}
ITEM_BYTES = {"F32": 4, "F16": 2, "BF16": 2, "F64": 8, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1, "BOOL": 1}
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".h5", ".msgpack")
UNITS = {"KB": 10 ** 3, "MB": 10 ** 6, "GB": 10 ** 9, "KIB": 2 ** 10, "MIB": 2 ** 20, "GIB": 2 ** 30, "B": 1}


@dataclass(frozen=True)
class TensorSpec:
    """A tensor to be written: ``name``, ``shape`` and safetensors dtype ``code`` (``"F32"``, ``"BF16"``, …)."""

    name: str
    shape: tuple[int, ...]
    code: str

    @property
    def nbytes(self) -> int:
        return prod(self.shape) * ITEM_BYTES[self.code]


def parse_size(size: int | str) -> int:
    """``5000000``, ``"500MB"``, ``"2GB"``, ``"1GiB"`` → bytes (``save_pretrained``'s ``max_shard_size`` units)."""
    text = str(size).strip().upper().replace(" ", "")
    unit = next((u for u in sorted(UNITS, key=len, reverse=True) if text.endswith(u)), "")
    try:
        value = int(float(text[:len(text) - len(unit)]) * UNITS.get(unit, 1))
    except ValueError:
        value = 0
    if value <= 0:
        raise ConfigError(f"max_shard_size must be a positive size such as 2GB, 500MB or a byte count, got {size!r}")
    return value


def plan_shards(specs: list[TensorSpec], max_bytes: int) -> list[list[TensorSpec]]:
    """Consecutive groups of ``specs`` of at most ``max_bytes`` each (a larger tensor gets a shard of its own)."""
    shards: list[list[TensorSpec]] = [[]]
    size = 0
    for spec in specs:
        if shards[-1] and size + spec.nbytes > max_bytes:
            shards.append([])
            size = 0
        shards[-1].append(spec)
        size += spec.nbytes
    return shards


def header(shard: list[TensorSpec]) -> bytes:
    """The safetensors header of ``shard``: little-endian u64 length, then JSON padded to 8 bytes."""
    entries, offset = {"__metadata__": {"format": "pt"}}, 0
    for spec in shard:
        entries[spec.name] = {"dtype": spec.code, "shape": list(spec.shape),
                              "data_offsets": [offset, offset + spec.nbytes]}
        offset += spec.nbytes
    text = json.dumps(entries, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    return struct.pack("<Q", len(text)) + text


def shard_names(count: int) -> list[str]:
    return ["model.safetensors"] if count == 1 else \
        [f"model-{i + 1:05d}-of-{count:05d}.safetensors" for i in range(count)]


class ShardedWriter:
    """Write ``specs``' tensors, in order, into sharded safetensors under ``output`` (atomically).

    Use as a context manager: ``write(name, tensor)`` for each spec in order, then ``finish(copy_from)``; leaving
    the block by an exception removes everything written.
    """

    def __init__(self, output: str | Path, specs: list[TensorSpec], max_shard_size: int | str):
        self.output = Path(output)
        if self.output.exists() and (not self.output.is_dir() or any(self.output.iterdir())):
            raise ConfigError(f"output {self.output} already exists; choose a new directory or delete it "
                              "(a merge never overwrites)")
        self.shards = plan_shards(list(specs), parse_size(max_shard_size))
        self.files = shard_names(len(self.shards))
        self.order = [(i, spec) for i, shard in enumerate(self.shards) for spec in shard]
        self.position, self.handle = 0, None
        self.output.parent.mkdir(parents=True, exist_ok=True)
        self.tmp = Path(tempfile.mkdtemp(dir=self.output.parent, prefix=f".{self.output.name}.partial-"))

    def __enter__(self) -> ShardedWriter:
        return self

    def __exit__(self, kind, err, trace) -> None:
        if self.handle is not None:
            self.handle.close()
        if self.tmp.exists():
            shutil.rmtree(self.tmp)

    def write(self, name: str, tensor: Tensor) -> None:
        """Append the next tensor; it must be the next spec's name, shape and dtype."""
        shard, spec = self.order[self.position]
        if (name, tuple(tensor.shape), DTYPE_CODES.get(tensor.dtype)) != (spec.name, spec.shape, spec.code):
            raise ValueError(f"expected {spec} next, got {name} {tuple(tensor.shape)} {tensor.dtype}")
        if shard != (self.order[self.position - 1][0] if self.position else -1):
            self._open(shard)
        self.handle.write(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
        self.position += 1

    def _open(self, shard: int) -> None:
        if self.handle is not None:
            self.handle.close()
        self.handle = open(self.tmp / self.files[shard], "wb")
        self.handle.write(header(self.shards[shard]))

    def finish(self, copy_from: Path) -> Path:
        """Close the last shard, write the index, copy ``copy_from``'s non-weight files, rename onto the output."""
        if self.position != len(self.order):
            raise ValueError(f"{len(self.order) - self.position} tensors were not written")
        self.handle.close()
        self.handle = None
        if len(self.shards) > 1:
            weight_map = {spec.name: self.files[i] for i, spec in self.order}
            total = sum(spec.nbytes for _, spec in self.order)
            (self.tmp / "model.safetensors.index.json").write_text(
                json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2, sort_keys=True))
        copy_side_files(copy_from, self.tmp)
        if self.output.is_dir():  # an empty directory made beforehand
            self.output.rmdir()
        os.rename(self.tmp, self.output)
        return self.output


def copy_side_files(source: Path, target: Path) -> list[str]:
    """Copy every file of ``source`` that is not weights (config.json, generation_config.json, tokenizer files,
    chat templates, README) into ``target``; links are followed (Hub snapshots link to blobs)."""
    copied = []
    for path in sorted(source.iterdir()):
        if path.is_file() and not path.name.startswith(".") and not path.name.endswith(WEIGHT_SUFFIXES) \
                and not path.name.endswith(".index.json"):
            shutil.copyfile(path, target / path.name)
            copied.append(path.name)
    return copied
