"""A restricted unpickler that can only rebuild plain numpy arrays.

Third-party data files (e.g. the animal-mnist wheel) ship gzip-pickled numpy
arrays. ``pickle.load`` on such a file can execute arbitrary code, so this
module only resolves the handful of globals needed to reconstruct an
``ndarray`` and refuses everything else with :class:`UnsafePickleError`.

That covers arrays pickled with protocols 3 and 4 (the animal-mnist files use 4).
Protocol 2 (``_codecs.encode``) and protocol 5 (``numpy._core.numeric._frombuffer``)
pickles need further globals and are refused by design.
"""

from __future__ import annotations

import gzip
import io
import pickle
from typing import Any, BinaryIO, Callable

import numpy as np

__all__ = ["UnsafePickleError", "RestrictedUnpickler", "safe_loads", "safe_load_array"]


class UnsafePickleError(pickle.UnpicklingError):
    """Raised when a pickle references a global outside the numpy-array allowlist."""


def _multiarray_reconstruct() -> Callable[..., Any]:
    """Return numpy's ``_reconstruct`` without touching the deprecated ``numpy.core`` alias."""
    try:
        from numpy._core.multiarray import _reconstruct  # numpy >= 2
    except ImportError:  # pragma: no cover - numpy 1.x
        from numpy.core.multiarray import _reconstruct  # type: ignore[no-redef]
    return _reconstruct


def _safe_dtype(*args: Any) -> np.dtype:
    """Build a dtype, refusing object dtypes (which could smuggle arbitrary objects)."""
    dtype = np.dtype(*args)
    if dtype.hasobject:
        raise UnsafePickleError(f"refused object dtype {dtype!r} in pickle")
    return dtype


_RECONSTRUCT_MODULES = ("numpy.core.multiarray", "numpy._core.multiarray")


def _allowed(module: str, name: str) -> Any | None:
    """Map an allowed (module, name) global to a safe object, else ``None``."""
    if name == "_reconstruct" and module in _RECONSTRUCT_MODULES:
        return _multiarray_reconstruct()
    if module == "numpy" and name == "ndarray":
        return np.ndarray
    if module == "numpy" and name == "dtype":
        return _safe_dtype
    return None


class RestrictedUnpickler(pickle.Unpickler):
    """Unpickler whose ``find_class`` only allows numpy array reconstruction."""

    def find_class(self, module: str, name: str) -> Any:  # noqa: D102 - documented above
        obj = _allowed(module, name)
        if obj is None:
            raise UnsafePickleError(
                f"refused global '{module}.{name}': only numpy array reconstruction "
                f"({', '.join(_RECONSTRUCT_MODULES)}._reconstruct, numpy.ndarray, numpy.dtype) is allowed"
            )
        return obj

    def persistent_load(self, pid: Any) -> Any:  # noqa: D102
        raise UnsafePickleError(f"refused persistent id {pid!r}")


def safe_load(fileobj: BinaryIO) -> Any:
    """Unpickle from an open binary file with :class:`RestrictedUnpickler`."""
    return RestrictedUnpickler(fileobj).load()


def safe_loads(data: bytes) -> Any:
    """Unpickle ``data`` with :class:`RestrictedUnpickler`."""
    return safe_load(io.BytesIO(data))


def safe_load_array(data: bytes, *, gzipped: bool = False, what: str = "pickle") -> np.ndarray:
    """Unpickle bytes that must contain exactly one numpy array.

    Args:
        data: raw pickle bytes (or gzip-compressed pickle bytes if ``gzipped``).
        gzipped: decompress with gzip first.
        what: a name for the data used in error messages (e.g. a file path).
    """
    if gzipped:
        data = gzip.decompress(data)
    obj = safe_loads(data)
    if not isinstance(obj, np.ndarray):
        raise UnsafePickleError(f"{what}: expected a numpy array, got {type(obj).__name__}")
    return obj
