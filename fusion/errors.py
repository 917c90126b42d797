"""Errors that describe a user's mistake (a config value, a file, a missing download) rather than a bug.

The layers below the app that may not import this module (``fusion.merge``, ``fusion.param``, the data and pool
contracts) raise their own types, listed in :func:`user_error_types`.

The entry points (``fusion``, ``fusion-merge``), wrapped in :func:`report_user_errors`, print such an error as one
message and exit with status 2; set ``FUSION_DEBUG=1`` to see its traceback. Every other exception is a bug and
keeps its traceback.
"""
from __future__ import annotations

from collections.abc import Callable
from typing import Any


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


def causes(err: BaseException):
    """``err`` and the exceptions it was raised from (Hydra's instantiate wraps the one a target raised)."""
    seen = set()
    while err is not None and id(err) not in seen:
        seen.add(id(err))
        yield err
        err = err.__cause__ or err.__context__


def report_user_errors(job: Callable[[Any], Any]) -> Callable[[Any], Any]:
    """A user's mistake (see :mod:`fusion.errors`) raised by ``job`` becomes one message and exit status 2
    (``FUSION_DEBUG=1`` keeps the traceback); bugs keep theirs. Inside the Hydra job, which would print any
    exception's traceback itself."""
    import functools
    import os
    import sys

    @functools.wraps(job)
    def wrapped(cfg: Any) -> Any:
        try:
            return job(cfg)
        except Exception as err:  # noqa: BLE001 — re-raised unless it is (or wraps) a user error
            user = next((e for e in causes(err) if isinstance(e, user_error_types())), None)
            if user is None or os.environ.get("FUSION_DEBUG"):
                raise
            print(f"fusion: error: {user}\n(set FUSION_DEBUG=1 for the traceback)", file=sys.stderr)
            sys.exit(2)

    return wrapped
