"""Small process-level helpers: thread settings, atomic file writes, hashing, rank-zero logging."""
from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

log = logging.getLogger("fusion")


def configure_threads(num_threads: int | None = None) -> int:
    """Set torch's intra-op threads to ``num_threads`` (default: the usable cores, at most 8).

    Oversubscribing a small machine makes tiny models ~100× slower, so every entry point calls this.
    """
    n = num_threads or min(len(os.sched_getaffinity(0)), 8)
    torch.set_num_threads(n)
    return n


def missing_members(obj: object, names: Sequence[str]) -> list[str]:
    """The names among ``names`` that ``obj`` does not offer (a method, property or attribute): the boundary check
    of the declared contracts (task pools, model pools), which name what an object lacks."""
    return [n for n in names if getattr(type(obj), n, None) is None and n not in getattr(obj, "__dict__", {})]


def atomic_write_bytes(path: str | Path, data: bytes) -> Path:
    """Write ``data`` to ``path`` through a temporary file in the same folder and ``os.replace``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def to_plain(obj: Any) -> Any:
    """JSON-ready copy of ``obj``: OmegaConf containers, tensors, paths and tuples become plain types."""
    from omegaconf import DictConfig, ListConfig, OmegaConf

    if isinstance(obj, (DictConfig, ListConfig)):
        return OmegaConf.to_container(obj, resolve=True)
    if isinstance(obj, torch.Tensor):
        return obj.tolist()
    if isinstance(obj, Path):
        return str(obj)
    if isinstance(obj, (tuple, set)):
        return list(obj)
    return repr(obj)


def atomic_write_json(path: str | Path, obj: Any) -> Path:
    """Atomically write ``obj`` as indented JSON (see :func:`to_plain` for non-JSON types)."""
    return atomic_write_bytes(path, (json.dumps(obj, indent=2, default=to_plain) + "\n").encode())


def atomic_save_safetensors(path: str | Path, tensors: Mapping[str, torch.Tensor],
                            metadata: Mapping[str, str] | None = None) -> Path:
    """Atomically save ``tensors`` (made contiguous, on CPU) as a safetensors file."""
    from safetensors.torch import save

    data = save({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, metadata=dict(metadata or {}))
    return atomic_write_bytes(path, data)


def sha256_file(path: str | Path, chunk: int = 1 << 20) -> str:
    """Hex sha256 of a file's bytes."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(chunk), b""):
            h.update(block)
    return h.hexdigest()


def sha256_json(obj: Any) -> str:
    """Hex sha256 of ``obj``'s canonical JSON (sorted keys)."""
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()


def progress(iterable, description: str, total: int | None = None):
    """``iterable`` with a rich progress bar (elapsed time and ETA) on an interactive terminal; plain otherwise."""
    import sys

    if not sys.stderr.isatty():
        return iterable
    from rich.progress import track

    return track(iterable, description=description, total=total, transient=True, console=None)


def duration(seconds: float) -> str:
    """``95`` → ``"1m35s"``, ``3700`` → ``"1h01m"``, ``7.2`` → ``"7s"``."""
    seconds = max(0, round(seconds))
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"


class EtaLog:
    """Log lines with elapsed time and ETA for a long job made of uneven parts (a data or pool build).

    ``total``: the job's size in any unit (images, optimizer steps); each :meth:`advance` logs what finished, the
    fraction done and the time left at the average rate so far::

        eta = EtaLog(sum(finetune_steps.values()), "mini8 experts")
        for task in tasks: ...fine-tune...;  eta.advance(finetune_steps[task], f"expert {task}")
    """

    def __init__(self, total: float, what: str, logger: logging.Logger | None = None,
                 clock: Callable[[], float] = time.monotonic):
        if total <= 0:
            raise ValueError(f"EtaLog total must be > 0, got {total}")
        self.total, self.what, self.log, self.clock = float(total), what, logger or log, clock
        self.done, self.start = 0.0, clock()

    def advance(self, amount: float, finished: str) -> str:
        """Count ``amount`` more units done (``finished`` names them); logs and returns the line."""
        self.done = min(self.total, self.done + amount)
        elapsed = self.clock() - self.start
        left = elapsed * (self.total - self.done) / self.done if self.done else float("nan")
        line = (f"{self.what}: {finished} done ({100 * self.done / self.total:.0f}%), elapsed {duration(elapsed)}, "
                f"ETA {duration(left) if self.done < self.total else '0s'}")
        self.log.info(line)
        return line


def local_rank() -> int:
    """This process's GPU index on its node: ``LOCAL_RANK`` (Lightning, torchrun) or ``SLURM_LOCALID``, else 0."""
    return int(os.environ.get("LOCAL_RANK", os.environ.get("SLURM_LOCALID", 0)))


def resolve_device(accelerator: str | None, source: str = "trainer.accelerator") -> torch.device:
    """The device a run uses, from its trainer's ``accelerator`` (``cpu``, ``gpu``/``cuda``, ``mps``, ``auto``).

    ``gpu`` on a machine without CUDA is a :class:`fusion.errors.ConfigError` naming the config and the fix.
    """
    from fusion.errors import ConfigError

    name = str(accelerator or "cpu").lower()
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name in ("gpu", "cuda"):
        if not torch.cuda.is_available():
            raise ConfigError(f"{source}={accelerator} (trainer=gpu, ddp or fsdp: conf/trainer/gpu.yaml) needs CUDA, "
                              f"but torch.cuda.is_available() is False on this machine (torch {torch.__version__}). "
                              "Run with trainer=cpu (or trainer.accelerator=cpu), or on a machine with a GPU")
        return torch.device("cuda", local_rank())
    if name in ("cpu", "mps"):
        return torch.device(name)
    raise ConfigError(f"{source}={accelerator} is not an accelerator fusion runs on; use cpu, gpu, mps or auto")


def read_safetensors(path: str | Path, metadata: bool = False):
    """The tensors of a safetensors file (or its metadata); a file that cannot be read is a
    :class:`fusion.errors.CorruptFileError` naming it (safetensors alone says only "incomplete metadata")."""
    from safetensors import SafetensorError, safe_open
    from safetensors.torch import load_file

    from fusion.errors import CorruptFileError

    try:
        if metadata:
            with safe_open(str(path), "pt") as f:
                return f.metadata() or {}
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError) as err:
        raise CorruptFileError(f"{path}: not a readable safetensors file ({type(err).__name__}: {err}); it may be "
                               "truncated by an interrupted download, copy or build: fetch or rebuild it") from err


def read_json(path: str | Path) -> Any:
    """The JSON in ``path``; a file that cannot be read or parsed is a :class:`fusion.errors.CorruptFileError`
    naming it (``json`` alone names only the line and column)."""
    from fusion.errors import CorruptFileError

    try:
        return json.loads(Path(path).read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise CorruptFileError(f"{path}: not a readable JSON file ({type(err).__name__}: {err}); it may be truncated "
                               "by an interrupted write or copy: fetch or rebuild it") from err


class ThirdPartyNoise(logging.Filter):
    """Drops open_clip's per-model INFO lines and Lightning's advertisement; Lightning's device summary once."""

    ONCE = ("GPU available", "TPU available", "HPU available", "Running in `fast_dev_run` mode")

    def __init__(self) -> None:
        super().__init__()
        self.seen: set[str] = set()

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno >= logging.WARNING:
            return True
        message = str(record.msg)
        if record.name == "root" and "open_clip" in record.pathname:
            return False
        if message.startswith("💡 Tip"):
            return False
        once = next((m for m in self.ONCE if message.startswith(m)), None)
        if once is not None:
            if message in self.seen:
                return False
            self.seen.add(message)
        return True


THIRD_PARTY_WARNINGS = (  # (message regex, module regex) of warnings that say nothing to a fusion user
    (r".*isinstance\(treespec, LeafSpec\)", r"pytorch_lightning"),  # Lightning's use of a deprecated torch API
    (r"Found \d+ module\(s\) in eval mode", r"pytorch_lightning"),  # the frozen experts are in eval mode on purpose
)


def quiet_third_party() -> None:
    """Install :class:`ThirdPartyNoise` on the handlers of the root, Lightning and Fabric loggers (once) and ignore
    the third-party warnings of :data:`THIRD_PARTY_WARNINGS`; transformers' per-checkpoint "Loading weights" bars
    are switched off (Hub downloads keep theirs)."""
    import warnings

    try:
        import transformers.utils.logging
    except ImportError:  # the optional [transformers] extra is not installed
        pass
    else:
        transformers.utils.logging.disable_progress_bar()

    for message, module in THIRD_PARTY_WARNINGS:
        warnings.filterwarnings("ignore", message=message, module=module)
    for name in (None, "pytorch_lightning", "lightning_fabric"):
        for handler in logging.getLogger(name).handlers:
            if not any(isinstance(f, ThirdPartyNoise) for f in handler.filters):
                handler.addFilter(ThirdPartyNoise())
