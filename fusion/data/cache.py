"""Cache locations and small file helpers shared by the data builders."""

from __future__ import annotations

import hashlib
import os
import tempfile
from pathlib import Path

__all__ = ["default_cache_dir", "sources_dir", "sha256_file", "atomic_write_text"]

CACHE_ENV = "FUSION_CACHE"


def default_cache_dir() -> Path:
    """Return the fusion cache root: ``$FUSION_CACHE`` if set, else ``~/.cache/fusion``."""
    env = os.environ.get(CACHE_ENV)
    return Path(env).expanduser() if env else Path.home() / ".cache" / "fusion"


def sources_dir(cache_dir: Path | None = None) -> Path:
    """Directory where downloaded/extracted raw sources live: ``<cache>/sources``."""
    return (cache_dir if cache_dir is not None else default_cache_dir()) / "sources"


def sha256_file(path: Path, chunk_size: int = 1 << 20) -> str:
    """Hex sha256 of a file's bytes."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(chunk_size), b""):
            digest.update(chunk)
    return digest.hexdigest()


def atomic_write_text(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` atomically (temp file in the same dir + ``os.replace``)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(text)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
