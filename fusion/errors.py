"""Errors that describe a user's mistake (a config value, a file, a missing download) rather than a bug.

The layers below the app that may not import this module (``fusion.merge``, ``fusion.param``, the data and pool
contracts) raise their own types, listed in :func:`user_error_types`.

The ``fusion`` entry point prints such an error as one message and exits with status 2; set ``FUSION_DEBUG=1``
to see its traceback. Every other exception is a bug and keeps its traceback.
"""
from __future__ import annotations


class UserError(Exception):
    """Base of the errors whose message tells the user what to change."""


class ConfigError(UserError, ValueError):
    """A config value that cannot work on this machine or with this pool; the message names key and fix."""


class MissingFileError(UserError, FileNotFoundError):
    """A file a config names (or a run directory must hold) is not there; the message names it and what writes it."""


class CorruptFileError(UserError, OSError):
    """A file that exists but cannot be read (truncated, not the format its name says); the message names it."""


class DownloadUnavailableError(UserError, RuntimeError):
    """Weights that must be downloaded, on a machine that cannot reach them; the message says what to fetch."""


def user_error_types() -> tuple[type[BaseException], ...]:
    """Every exception type the entry point reports as a user error (imported lazily: no heavy imports here)."""
    from fusion.data.contract import TaskContractError
    from fusion.data.hf_tasks import DatasetSpecError, DatasetUnavailableError
    from fusion.data.mini8 import Mini8NotBuiltError
    from fusion.merge.task_vectors import HyperparameterError, PoolMismatchError
    from fusion.param.contract import ContractError, NotShardableError
    from fusion.pools.contract import PoolContractError

    return (UserError, TaskContractError, DatasetSpecError, DatasetUnavailableError, Mini8NotBuiltError,
            PoolMismatchError, HyperparameterError, ContractError, NotShardableError, PoolContractError)
