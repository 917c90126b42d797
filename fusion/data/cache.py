"""Cache locations and small file helpers shared by the data builders."""

from __future__ import annotations

import os
from pathlib import Path

from fusion.utils import atomic_write_bytes, sha256_file

__all__ = ["default_cache_dir", "sources_dir", "sha256_file", "atomic_write_text"]

CACHE_ENV = "FUSION_CACHE"


def default_cache_dir() -> Path:
    """Return the fusion cache root: ``$FUSION_CACHE`` if set, else ``~/.cache/fusion``."""
    env = os.environ.get(CACHE_ENV)
    return Path(env).expanduser() if env else Path.home() / ".cache" / "fusion"


def sources_dir(cache_dir: Path | None = None) -> Path:
    """Directory where downloaded/extracted raw sources live: ``<cache>/sources``."""
    return (cache_dir if cache_dir is not None else default_cache_dir()) / "sources"


def atomic_write_text(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` atomically (temp file in the same dir + ``os.replace``)."""
    atomic_write_bytes(path, text.encode("utf-8"))
